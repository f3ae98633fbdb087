"""Unlabeled data (pipeline/text/unlabeled.py): answers never read, ids unique across sources, clear errors."""

from __future__ import annotations

import json

import pytest

import tiny
from pipeline.runtime.errors import KdqaError
from pipeline.text.features import NO_LABEL, tokenize_examples
from pipeline.text.squad import load_examples
from pipeline.text.unlabeled import UnlabeledReport, check_ids_distinct, count_dev_contexts, load_unlabeled

def test_file_without_any_answer_loads_as_teacher_only(tmp_path, tiny_assets):
    path = tiny.strip_answers(tiny_assets.train, tmp_path / "unlabeled.json")
    examples, report = load_unlabeled(str(path))
    labelled, _ = load_examples(str(tiny_assets.train), "train")
    assert report.questions == len(examples) == 24 and report.answers_ignored == 0
    assert all(not ex.labelled and ex.answer_texts == [] for ex in examples)
    assert [ex.question for ex in examples] == [ex.question for ex in labelled]


def test_answers_present_are_ignored_and_counted(tmp_path, tiny_assets):
    examples, report = load_unlabeled(str(tiny_assets.train))  # a labelled file used as unlabeled data
    answered = sum(bool(qa["answers"]) for a in json.loads(tiny_assets.train.read_text())["data"]
                   for p in a["paragraphs"] for qa in p["qas"])
    assert report.answers_ignored == answered > 0
    assert all(not ex.labelled and ex.answer_texts == [] and ex.answer_starts == [] for ex in examples)
    assert f"{answered} came with answers, ignored" in report.summary()


def test_features_of_unlabeled_rows_carry_no_label_in_every_window(tmp_path, tiny_assets):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_assets.teacher)
    path = tiny.make_squad(tmp_path / "long.json", articles=1, paragraphs=2, questions=3, seed=4,
                           context_words=(80, 120))
    examples, _ = load_unlabeled(str(path))
    features = list(tokenize_examples(tokenizer, examples, 48, 16, 12))
    assert len(features) > len(examples)  # several windows per question
    assert all(f["start_position"] == f["end_position"] == NO_LABEL for f in features)


def test_id_shared_with_a_labelled_file_names_both_files(tmp_path, tiny_assets):
    labelled, _ = load_examples(str(tiny_assets.train), "train")
    dev, _ = load_examples(str(tiny_assets.dev), "dev")
    mine = tiny.strip_answers(tiny_assets.train, tmp_path / "extra.json")
    clash = tiny.strip_answers(tiny_assets.train, tmp_path / "clash.json", id_prefix="")  # the training ids
    sources = [("data.train (train.json)", labelled), ("data.dev (dev.json)", dev)]
    check_ids_distinct([("data.unlabeled[0] (extra.json)", load_unlabeled(str(mine))[0])], sources)
    with pytest.raises(KdqaError) as err:
        check_ids_distinct([("data.unlabeled[0] (extra.json)", load_unlabeled(str(mine))[0]),
                            ("data.unlabeled[1] (clash.json)", load_unlabeled(str(clash))[0])], sources)
    message = str(err.value)
    assert "clash.json" in message and "train.json" in message and "'a0p0q0'" in message
    with pytest.raises(KdqaError, match=r"extra\.json.*also in data\.unlabeled\[0\] \(extra\.json\)"):
        check_ids_distinct([("data.unlabeled[0] (extra.json)", load_unlabeled(str(mine))[0]),
                            ("data.unlabeled[1] (extra.json)", load_unlabeled(str(mine))[0])], sources)


@pytest.mark.parametrize("content,fragment", [
    ("", "empty file"),
    ("  \n", "empty file"),
    ('{"version": "v2.0", "data": []}', "no questions in this unlabeled file"),
    ('{"data": [{"title": "t", "paragraphs": [{"context": "c", "qas": [{"id": "x", "question": ""}]}]}]}',
     "empty 'question'"),
])
def test_empty_or_broken_unlabeled_file_is_one_clear_error(tmp_path, content, fragment):
    path = tmp_path / "unlabeled.json"
    path.write_text(content)
    with pytest.raises(KdqaError, match=fragment) as err:
        load_unlabeled(str(path))
    assert str(path) in str(err.value) and "\n" not in str(err.value)


def test_questions_on_dev_paragraphs_are_counted(tmp_path, tiny_assets):
    dev, _ = load_examples(str(tiny_assets.dev), "dev")
    examples, report = load_unlabeled(str(tiny.strip_answers(tiny_assets.dev, tmp_path / "u.json")))
    count_dev_contexts(examples, dev, report)
    assert report.contexts_in_dev == len(examples)
    other = UnlabeledReport(source="x")
    count_dev_contexts(load_unlabeled(str(tiny_assets.train))[0], dev, other)
    assert other.contexts_in_dev == 0
