"""prepare / features: sliding windows, labels, feature ids, offsets, question truncation, shard layout."""

from __future__ import annotations

import json
import re

import numpy as np
import pyarrow.parquet as pq
import pytest

import tiny
from pipeline.text.features import CLS_INDEX, tokenize_examples
from pipeline.text.squad import Example, load_examples

MAX_SEQ_LEN, DOC_STRIDE, MAX_QUERY_LEN = 48, 16, 12
# Whole vocabulary words only: one word is exactly one token, so token and word positions coincide.
CONTEXT_WORDS = [w for w in tiny.WORDS if w not in ("what", "who", "when", "where", "which", "how", "why")]


@pytest.fixture(scope="module")
def tokenizer(tiny_assets):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_assets.teacher)


def features_of(tokenizer, examples, max_seq_len=MAX_SEQ_LEN, doc_stride=DOC_STRIDE, max_query_len=MAX_QUERY_LEN):
    return list(tokenize_examples(tokenizer, examples, max_seq_len, doc_stride, max_query_len))


def long_words(n: int, seed: int = 0) -> list[str]:
    rng = np.random.default_rng(seed)
    return [CONTEXT_WORDS[i] for i in rng.integers(0, len(CONTEXT_WORDS), n)]


def char_start(words: list[str], index: int) -> int:
    return len(" ".join(words[:index])) + (1 if index else 0)


def labelled_text(feature, context: str) -> str:
    s, e = feature["start_position"], feature["end_position"]
    return context[feature["offset_start"][s] : feature["offset_end"][e]]


def window_chars(feature) -> tuple[int, int]:
    return int(feature["offset_start"][feature["context_start"]]), int(feature["offset_end"][feature["context_end"]])


def test_answer_inside_single_window(tokenizer):
    context = "alice built the red tower in paris and bob founded the old castle of rome."
    answer = "the old castle"
    ex = Example("q1", "", context, "who founded the castle?", [answer], [context.index(answer)], False)
    (f,) = features_of(tokenizer, [ex])
    assert f["feature_id"] == "q1#0" and f["window"] == 0
    assert f["start_position"] != CLS_INDEX
    assert f["context_start"] <= f["start_position"] <= f["end_position"] <= f["context_end"]
    assert labelled_text(f, context) == answer
    tokens = tokenizer.convert_ids_to_tokens(f["input_ids"][f["start_position"] : f["end_position"] + 1].tolist())
    assert tokens == ["the", "old", "castle"]


@pytest.mark.parametrize("context,answer", [
    ("bob founded rome, then paris.", "rome"),  # the next token (",") starts right where the answer ends
    ("alice built (the tower) in rome.", "the tower"),  # the previous token ends where the answer starts
    ("the tower was built in paris", "paris"),  # the answer ends the context
    ("alice built the towers.", "tower"),  # the answer ends between two word pieces (tower ##s)
])
def test_answer_boundaries(tokenizer, context, answer):
    ex = Example("b", "", context, "what?", [answer], [context.index(answer)], False)
    (f,) = features_of(tokenizer, [ex])
    assert f["start_position"] > CLS_INDEX
    assert labelled_text(f, context) == answer
    assert f["start_position"] == f["end_position"] or " " in answer


def test_answer_outside_window_labels_cls(tokenizer):
    """Several windows: only windows holding the whole answer label it; the others point at CLS."""
    words = long_words(120)
    context = " ".join(words)
    # Find where window 0 ends, then put a 4-word answer across that boundary.
    probe = Example("p", "", context, "who built it?", [], [], True)
    first = features_of(tokenizer, [probe])[0]
    n0 = first["context_end"] - first["context_start"] + 1  # context words in window 0
    i = n0 - 2
    answer = " ".join(words[i : i + 4])
    ex = Example("q", "", context, "who built it?", [answer], [char_start(words, i)], False)
    feats = features_of(tokenizer, [ex])
    assert len(feats) >= 4
    containing, not_containing = [], []
    start_char, end_char = char_start(words, i), char_start(words, i) + len(answer)
    for f in feats:
        lo, hi = window_chars(f)
        (containing if lo <= start_char and end_char <= hi else not_containing).append(f)
    assert containing and not_containing
    # Window 0 holds only the first half of the answer: not a valid target there.
    assert feats[0] in not_containing
    assert window_chars(feats[0])[0] <= start_char < window_chars(feats[0])[1] < end_char
    for f in not_containing:
        assert (f["start_position"], f["end_position"]) == (CLS_INDEX, CLS_INDEX), f["feature_id"]
    for f in containing:
        assert f["start_position"] > CLS_INDEX
        assert labelled_text(f, context) == answer, f["feature_id"]
        assert f["end_position"] - f["start_position"] == 3


def test_answer_at_the_end_of_a_long_context(tokenizer):
    words = long_words(100, seed=3)
    context = " ".join(words)
    i = len(words) - 3
    answer = " ".join(words[i:])
    ex = Example("z", "", context, "what is it?", [answer], [char_start(words, i)], False)
    feats = features_of(tokenizer, [ex])
    assert len(feats) > 2
    assert labelled_text(feats[-1], context) == answer
    assert all(f["start_position"] == f["end_position"] == CLS_INDEX for f in feats[:-2])


def test_unanswerable_labels_cls_in_every_window(tokenizer):
    words = long_words(100, seed=1)
    ex = Example("u", "", " ".join(words), "when was the bridge built?", [], [], True)
    feats = features_of(tokenizer, [ex])
    assert len(feats) > 1
    assert all((f["start_position"], f["end_position"]) == (0, 0) for f in feats)


def test_windows_slide_with_doc_stride_and_cover_the_context(tokenizer):
    words = long_words(90, seed=2)
    context = " ".join(words)
    ex = Example("w", "", context, "who?", [], [], True)
    feats = features_of(tokenizer, [ex])
    assert window_chars(feats[0])[0] == 0 and window_chars(feats[-1])[1] == len(context)
    for a, b in zip(feats, feats[1:]):
        assert len(a["input_ids"]) == MAX_SEQ_LEN
        # consecutive windows share exactly doc_stride context tokens
        overlap_first = a["context_end"] - DOC_STRIDE + 1
        assert b["offset_start"][b["context_start"]] == a["offset_start"][overlap_first]
    assert len(feats[-1]["input_ids"]) <= MAX_SEQ_LEN


def test_feature_ids_are_example_hash_window_unique_and_stable(tokenizer):
    examples = [
        Example(f"id{k}", "", " ".join(long_words(30 + 25 * k, seed=k)), "who built the tower?", [], [], True)
        for k in range(4)
    ]
    feats = features_of(tokenizer, examples)
    ids = [f["feature_id"] for f in feats]
    assert len(set(ids)) == len(ids)
    for f in feats:
        assert f["feature_id"] == f"{f['example_id']}#{f['window']}"
    # example order, then window order 0, 1, 2, ...
    by_example = {}
    for f in feats:
        by_example.setdefault(f["example_id"], []).append(f["window"])
    assert list(by_example) == [e.id for e in examples]
    assert all(w == list(range(len(w))) for w in by_example.values())
    assert max(len(w) for w in by_example.values()) > 1
    assert [f["feature_id"] for f in features_of(tokenizer, examples)] == ids  # same input, same ids


def test_question_truncated_to_max_query_len(tokenizer):
    question = " ".join(long_words(30, seed=4)) + "?"
    ex = Example("t", "", "alice built the red tower in paris.", question, [], [], True)
    (f,) = features_of(tokenizer, [ex])
    sep = tokenizer.sep_token_id
    ids = f["input_ids"].tolist()
    first_sep = ids.index(sep)
    assert ids[0] == tokenizer.cls_token_id
    assert first_sep - 1 == MAX_QUERY_LEN  # CLS + max_query_len question tokens + SEP
    full = tokenizer(question, add_special_tokens=False)["input_ids"]
    assert ids[1:first_sep] == full[:MAX_QUERY_LEN]
    assert f["context_start"] == first_sep + 1
    assert (f["token_type_ids"][: first_sep + 1] == 0).all() and (f["token_type_ids"][first_sep + 1 :] == 1).all()
    # a short question is kept whole
    (g,) = features_of(tokenizer, [Example("s", "", ex.context, "who built it?", [], [], True)])
    assert g["input_ids"].tolist()[1 : g["input_ids"].tolist().index(sep)] == tokenizer(
        "who built it?", add_special_tokens=False)["input_ids"]


# --- the prepared shards (kdqa prepare on the tiny synthetic data) ---

def read_rows(path):
    return pq.read_table(path).to_pylist()


def test_prepared_labels_and_offsets_map_back_to_answers(prepared_run, tiny_assets):
    examples = {ex.id: ex for ex in load_examples(str(tiny_assets.train), "train")[0]}
    rows = [r for p in sorted((prepared_run / "data/features/train").glob("part-*.parquet")) for r in read_rows(p)]
    assert len(rows) > len(examples)  # some long contexts made several windows
    answered = cls_answerable = 0
    for r in rows:
        ex = examples[r["example_id"]]
        ids, cs, ce = r["input_ids"], r["context_start"], r["context_end"]
        assert len(r["offset_start"]) == len(ids) == len(r["token_type_ids"]) <= 48
        # offsets: -1 outside the context, increasing character spans inside it
        assert all(r["offset_start"][k] == -1 for k in range(len(ids)) if not cs <= k <= ce)
        spans = [(r["offset_start"][k], r["offset_end"][k]) for k in range(cs, ce + 1)]
        assert all(0 <= a < b <= len(ex.context) for a, b in spans)
        assert all(spans[k][1] <= spans[k + 1][0] for k in range(len(spans) - 1))
        assert ce == len(ids) - 2  # the final [SEP] follows the context
        s, e = r["start_position"], r["end_position"]
        if ex.is_impossible:
            assert (s, e) == (0, 0)
        elif s == 0:
            assert e == 0
            cls_answerable += 1
            lo, hi = r["offset_start"][cs], r["offset_end"][ce]
            start = ex.answer_starts[0]
            assert not (lo <= start and start + len(ex.answer_texts[0]) <= hi)  # the answer is not in this window
        else:
            answered += 1
            assert cs <= s <= e <= ce
            assert ex.context[r["offset_start"][s] : r["offset_end"][e]] == ex.answer_texts[0]
    assert answered and cls_answerable


def test_prepared_feature_ids_match_a_fresh_tokenization(prepared_run, tiny_assets, tokenizer):
    examples, _ = load_examples(str(tiny_assets.train), "train")
    expected = [f["feature_id"] for f in features_of(tokenizer, examples)]
    ids = [r for p in sorted((prepared_run / "data/features/train").glob("part-*.parquet"))
           for r in pq.read_table(p, columns=["feature_id"]).column("feature_id").to_pylist()]
    assert ids == expected
    assert len(set(ids)) == len(ids)


@pytest.mark.parametrize("split", ["train", "dev"])
def test_shards_are_the_only_parquet_files_and_follow_shard_size(prepared_run, split):
    import yaml

    params = yaml.safe_load((prepared_run / "params.yaml").read_text())["prepare"]
    folder = prepared_run / "data/features" / split
    parquet = sorted(p.name for p in folder.rglob("*.parquet"))
    assert parquet and all(re.fullmatch(r"part-\d{5}\.parquet", n) for n in parquet)
    assert parquet == [f"part-{i:05d}.parquet" for i in range(len(parquet))]
    assert not [p for p in folder.iterdir() if p.name not in parquet and p.name != "manifest.json"]
    rows = [pq.ParquetFile(folder / n).metadata.num_rows for n in parquet]
    assert all(r == params["shard_size"] for r in rows[:-1]) and 0 < rows[-1] <= params["shard_size"]
    for n in parquet:
        meta = pq.ParquetFile(folder / n).metadata
        assert all(meta.row_group(g).num_rows <= params["row_group_size"] for g in range(meta.num_row_groups))
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["features"] == sum(rows)
    assert [(s["name"], s["rows"]) for s in manifest["shards"]] == list(zip(parquet, rows))
    assert (prepared_run / "data/features/dev_examples.parquet").is_file()


def test_dev_keeps_questions_whose_answer_cannot_be_located(tmp_path):
    # The official script scores every dev question against its answers as given; a dev question whose
    # answer text is not in the context must still be scored (train drops it: no label can be made).
    context = "alice built the tower in paris."
    doc = {"data": [{"title": "t", "paragraphs": [{"context": context, "qas": [
        {"id": "ok", "question": "who built it?", "answers": [{"text": "alice", "answer_start": 0}]},
        {"id": "lost", "question": "where?", "answers": [{"text": "rome", "answer_start": 3}]},
    ]}]}]}
    path = tmp_path / "d.json"
    path.write_text(json.dumps(doc))
    train, train_report = load_examples(str(path), "train")
    dev, dev_report = load_examples(str(path), "dev")
    assert [e.id for e in train] == ["ok"] and train_report.questions_dropped == 1
    assert [e.id for e in dev] == ["ok", "lost"]
    lost = dev[1]
    assert lost.gold_texts == ["rome"] and lost.answer_texts == [] and not lost.is_impossible
