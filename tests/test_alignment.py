"""Teacher logits carried through character space (pipeline/text/alignment.py), against hand-computed masses."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import tiny
from pipeline.text.alignment import NO_MASS, Window, align_example, answer_probabilities
from pipeline.model.batching import answer_mask
from pipeline.text.features import tokenize_examples
from pipeline.text.squad import Example

QUESTION_TOKENS = 3  # hand-built features: [CLS], 3 question tokens, [SEP], context..., [SEP]


def window(spans: list[tuple[int, int]]) -> tuple[Window, int]:
    """A hand-built feature whose context tokens cover these character spans; returns (window, length)."""
    cs = 2 + QUESTION_TOKENS
    length = cs + len(spans) + 1
    starts, ends = np.full(length, -1), np.full(length, -1)
    for k, (a, b) in enumerate(spans):
        starts[cs + k], ends[cs + k] = a, b
    return Window(starts, ends, cs, cs + len(spans) - 1), length


def logits_for(w: Window, length: int, null: float, context: list[float]) -> np.ndarray:
    z = np.full(length, -7.0, dtype=np.float32)  # question and separators: outside the answer positions
    z[0] = null
    z[w.context_start : w.context_end + 1] = context
    return z


def probabilities(row: np.ndarray, w: Window) -> np.ndarray:
    """[null, context tokens...] of an aligned row (NaN stays NaN)."""
    return np.exp(np.r_[row[0], row[w.context_start : w.context_end + 1]].astype(np.float64))


def tempered(logits: np.ndarray, mask: np.ndarray, temperature: float) -> np.ndarray:
    """softmax(logits / T) over the masked positions, as the loss computes its teacher distribution."""
    t = torch.as_tensor(logits, dtype=torch.float32).masked_fill(~torch.as_tensor(mask), -1e4) / temperature
    return torch.softmax(t, -1).numpy()


# --- hand-built: splits, merges, windows ---

def test_student_splitting_a_teacher_token_gets_start_on_its_first_piece_end_on_its_last():
    # "unaffable cat": the teacher reads 2 tokens, the student "un", "aff", "able", "cat"
    tw, tn = window([(0, 9), (10, 13)])
    sw, sn = window([(0, 2), (2, 5), (5, 9), (10, 13)])
    start, end = logits_for(tw, tn, 0.5, [2.0, 1.0]), logits_for(tw, tn, 0.0, [1.5, 2.5])
    [aligned] = align_example([(start, end, tw)], [(sw, sn)])
    p_start, p_end = answer_probabilities(start, tw), answer_probabilities(end, tw)
    np.testing.assert_allclose(probabilities(aligned.start, sw), [p_start[0], p_start[1], 0, 0, p_start[2]], atol=1e-6)
    np.testing.assert_allclose(probabilities(aligned.end, sw), [p_end[0], 0, 0, p_end[1], p_end[2]], atol=1e-6)
    assert aligned.start[sw.context_start + 1] == NO_MASS  # no mass: 0 under softmax at any temperature
    assert (aligned.start_covered, aligned.end_covered, aligned.teacher_windows) == (1.0, 1.0, 1)


def test_student_merging_teacher_tokens_gets_their_summed_mass():
    tw, tn = window([(0, 2), (2, 5), (5, 9), (10, 13)])
    sw, sn = window([(0, 9), (10, 13)])
    start, end = logits_for(tw, tn, 0.2, [2.0, -1.0, 0.5, 1.0]), logits_for(tw, tn, 0.1, [-2.0, 0.3, 2.0, 1.0])
    [aligned] = align_example([(start, end, tw)], [(sw, sn)])
    p_start, p_end = answer_probabilities(start, tw), answer_probabilities(end, tw)
    np.testing.assert_allclose(probabilities(aligned.start, sw), [p_start[0], p_start[1:4].sum(), p_start[4]], atol=1e-6)
    np.testing.assert_allclose(probabilities(aligned.end, sw), [p_end[0], p_end[1:4].sum(), p_end[4]], atol=1e-6)


def test_student_window_inside_a_teacher_window_gives_cls_the_mass_outside_it():
    """The teacher's mass on characters outside the student window is "no answer here" for that window."""
    spans = [(4 * k, 4 * k + 3) for k in range(8)]
    tw, tn = window(spans)
    sw, sn = window(spans[2:5])
    start, end = logits_for(tw, tn, -1.0, list(np.linspace(-1, 2, 8))), logits_for(tw, tn, 0.0, [0.0] * 8)
    [aligned] = align_example([(start, end, tw)], [(sw, sn)])
    p = answer_probabilities(start, tw)
    inside = p[3:6]
    np.testing.assert_allclose(probabilities(aligned.start, sw), np.r_[1 - inside.sum(), inside], atol=1e-6)


def test_student_window_spanning_two_teacher_windows_gets_one_distribution():
    spans = [(3 * k, 3 * k + 2) for k in range(12)]
    w1, n1 = window(spans[0:7])  # characters 0..20
    w2, n2 = window(spans[5:12])  # characters 15..35
    sw, sn = window(spans[2:10])  # 6..29: 5 tokens inside w1 (seen by w1 first), 3 more only w2 saw
    s1, e1 = logits_for(w1, n1, 2.0, [0.1, 0.9, 1.3, -0.2, 0.4, 0.8, 0.0]), logits_for(w1, n1, 1.0, [0.0] * 7)
    s2, e2 = logits_for(w2, n2, 2.5, [0.5, -0.5, 1.1, 0.2, 2.0, -1.0, 0.6]), logits_for(w2, n2, 1.0, [0.0] * 7)
    [aligned] = align_example([(s1, e1, w1), (s2, e2, w2)], [(sw, sn)])
    p1, p2 = answer_probabilities(s1, w1), answer_probabilities(s2, w2)
    tokens = np.r_[p1[3:8], p2[3:6]]  # spans 2..6 from w1 (which sees as much, and comes first), 7..9 from w2
    expected = np.r_[1 - tokens.sum(), tokens]
    assert expected[0] > 0
    got = probabilities(aligned.start, sw)
    np.testing.assert_allclose(got, expected, atol=1e-6)
    assert got.sum() == pytest.approx(1.0, abs=1e-6)
    assert aligned.teacher_windows == 2


def test_pieced_windows_that_disagree_leave_no_null_and_still_sum_to_one():
    spans = [(2 * k, 2 * k + 1) for k in range(6)]
    w1, n1 = window(spans[0:4])
    w2, n2 = window(spans[2:6])
    sw, sn = window(spans)
    # w1 is sure of span 0, w2 of span 5: each one's mass lies where the other cannot see
    s1, s2 = logits_for(w1, n1, -9.0, [9.0, 0, 0, 0]), logits_for(w2, n2, -9.0, [0, 0, 0, 9.0])
    [aligned] = align_example([(s1, s1, w1), (s2, s2, w2)], [(sw, sn)])
    got = probabilities(aligned.start, sw)
    assert got[0] < 1e-6
    assert got.sum() == pytest.approx(1.0, abs=1e-6)
    assert got[1] == pytest.approx(got[6], rel=1e-3) and got[1] > 0.49


def test_student_tokens_no_teacher_window_saw_are_masked_and_the_rest_renormalised():
    tw, tn = window([(0, 3), (4, 7)])
    sw, sn = window([(0, 3), (4, 7), (8, 11), (12, 15)])  # the teacher never read characters 8..15
    start, end = logits_for(tw, tn, 0.0, [1.0, 2.0]), logits_for(tw, tn, 0.0, [2.0, 1.0])
    [aligned] = align_example([(start, end, tw)], [(sw, sn)])
    got = probabilities(aligned.start, sw)
    assert np.isnan(got[3:]).all()
    np.testing.assert_allclose(got[:3], answer_probabilities(start, tw), atol=1e-6)


def test_mass_on_characters_no_student_token_holds_is_lost_and_recorded():
    # the teacher reads "x é y" as 3 tokens; the student's tokenizer dropped the "é" (a character it removes)
    tw, tn = window([(0, 1), (2, 3), (4, 5)])
    sw, sn = window([(0, 1), (4, 5)])
    start = logits_for(tw, tn, 0.0, [0.0, 1.0, 0.0])
    [aligned] = align_example([(start, start, tw)], [(sw, sn)])
    p = answer_probabilities(start, tw)
    assert aligned.start_covered == pytest.approx(1 - p[2])
    np.testing.assert_allclose(probabilities(aligned.start, sw), np.r_[p[0], p[1], p[3]] / (1 - p[2]), atol=1e-6)


def test_unanswerable_example_keeps_its_null_mass():
    spans = [(3 * k, 3 * k + 2) for k in range(14)]
    teacher = []
    for lo in (0, 5, 10):  # three overlapping teacher windows, each sure there is no answer
        tw, tn = window(spans[lo : lo + 4 + (lo == 10)])
        z = logits_for(tw, tn, 6.0, list(np.random.default_rng(lo).normal(0, 1, tw.context_end - tw.context_start + 1)))
        teacher.append((z, z, tw))
    nulls = [answer_probabilities(z, tw)[0] for z, _, tw in teacher]
    same = align_example(teacher, [(tw, len(z)) for z, _, tw in teacher])
    for aligned, null in zip(same, nulls):
        assert np.exp(aligned.start[0]) == pytest.approx(null, rel=1e-6)
    smaller = align_example(teacher, [window(spans[k : k + 2]) for k in range(0, 13, 2)])
    for aligned in smaller:
        assert np.exp(aligned.start[0]) >= min(nulls) - 1e-6


# --- real tokenizers: same windows, other windows, another vocabulary ---

def tokenizer(tmp_path, name: str, tokens: list[str] | None = None, lowercase: bool = True):
    if tokens is None:
        return tiny.make_tokenizer(tmp_path / name)
    return tiny.make_bert_tokenizer(tmp_path / name, tokens, lowercase=lowercase)


def examples_of(path) -> list[Example]:
    from pipeline.text.squad import load_examples

    return load_examples(str(path), "train")[0]


def features_by_example(tok, examples, max_seq_len: int, doc_stride: int) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = {}
    for f in tokenize_examples(tok, examples, max_seq_len, doc_stride, 12):
        out.setdefault(f["example_id"], []).append(f)
    return out


def align_all(teacher_features, student_features, seed: int = 0):
    """Random float16 teacher logits per teacher feature; aligned targets per student feature."""
    rng = np.random.default_rng(seed)
    logits, aligned = {}, {}
    for example_id, features in teacher_features.items():
        windows = []
        for f in features:
            z = rng.normal(0, 3, (2, len(f["input_ids"]))).astype(np.float16)
            logits[f["feature_id"]] = z
            windows.append((z[0], z[1], Window.of(f)))
        students = [(Window.of(f), len(f["input_ids"])) for f in student_features[example_id]]
        for f, a in zip(student_features[example_id], align_example(windows, students)):
            aligned[f["feature_id"]] = a
    return logits, aligned


@pytest.fixture(scope="module")
def long_examples(tmp_path_factory) -> list[Example]:
    path = tiny.make_squad(tmp_path_factory.mktemp("align") / "train.json", articles=2, paragraphs=2,
                           questions=3, seed=3, context_words=(40, 90))
    return examples_of(path)


def test_same_tokenizer_and_windows_reproduce_the_teacher_at_every_temperature(tmp_path, long_examples):
    tok = tokenizer(tmp_path, "teacher")
    features = features_by_example(tok, long_examples, 40, 12)
    assert max(len(v) for v in features.values()) >= 3  # several overlapping windows per example
    logits, aligned = align_all(features, features)
    for f in (f for fs in features.values() for f in fs):
        a = aligned[f["feature_id"]]
        assert (a.start_covered, a.end_covered, a.teacher_windows) == (pytest.approx(1.0), pytest.approx(1.0), 1)
        mask = answer_mask([f["context_start"]], [f["context_end"]], len(f["input_ids"]))[0].numpy()
        for stored, z in ((a.start, logits[f["feature_id"]][0]), (a.end, logits[f["feature_id"]][1])):
            for temperature in (1.0, 2.0, 5.0):
                # stored as float16, read back as logits: the teacher's softmax(z / T) within float16
                np.testing.assert_allclose(tempered(stored.astype(np.float16), mask, temperature),
                                           tempered(z, mask, temperature), atol=2e-3)


@pytest.mark.parametrize("student_vocab,windows", [("same", (32, 8)), ("characters", (40, 12)),
                                                   ("characters", (64, 20))])
def test_kept_mass_sums_to_one_per_student_window(tmp_path, long_examples, student_vocab, windows):
    teacher = tokenizer(tmp_path, "teacher")
    student = teacher if student_vocab == "same" else tokenizer(tmp_path, "student", tiny.CHARACTER_VOCAB)
    t_features = features_by_example(teacher, long_examples, 40, 12)
    s_features = features_by_example(student, long_examples, *windows)
    _, aligned = align_all(t_features, s_features)
    pieced = 0
    for f in (f for fs in s_features.values() for f in fs):
        a = aligned[f["feature_id"]]
        w = Window.of(f)
        for row in (a.start, a.end):
            p = probabilities(row, w)
            assert not np.isnan(p).any()  # every student token lies inside some teacher window here
            assert p.sum() == pytest.approx(1.0, abs=1e-5)
        pieced += a.teacher_windows > 1
    if windows[0] > 40:
        assert pieced  # student windows larger than the teacher's span two of them


def test_accented_and_cjk_text_align_through_offsets_into_the_original_text(tmp_path):
    """The teacher lowercases and strips accents, the student keeps them; both offsets index the original."""
    context = "İstanbul Café Zürich 東京タワー naïve"
    teacher = tokenizer(tmp_path, "teacher", ["where", "istanbul", "cafe", "zurich", "東", "京", "タ", "##ワ",
                                                   "##ー", "naive"])
    student = tokenizer(tmp_path, "student", ["where", "İstanbul", "Café", "Z", "##ürich", "東", "京", "タワー", "na", "##ïve"],
                        lowercase=False)
    example = Example("q1", "", context, "where", [], [], True)
    [tf] = tokenize_examples(teacher, [example], 64, 16, 8)
    [sf] = tokenize_examples(student, [example], 64, 16, 8)
    t_window = Window.of(tf)
    t_text = [context[a:b] for a, b in zip(*t_window.context_offsets())]
    assert "Café" in t_text and "東" in t_text and "[UNK]" not in teacher.convert_ids_to_tokens(tf["input_ids"])
    s_window = Window.of(sf)
    s_text = [context[a:b] for a, b in zip(*s_window.context_offsets())]
    assert "タワー" in s_text and "Z" in s_text and "[UNK]" not in student.convert_ids_to_tokens(sf["input_ids"])

    def teacher_logits(head_text: str) -> np.ndarray:
        z = np.full(len(tf["input_ids"]), -8.0, dtype=np.float32)
        z[tf["context_start"] + t_text.index(head_text)] = 8.0
        return z

    for answer_start, answer_end in (("東", "ー"), ("Café", "Zürich"), ("İstanbul", "naïve")):
        [a] = align_example([(teacher_logits(answer_start), teacher_logits(answer_end), t_window)],
                            [(s_window, len(sf["input_ids"]))])
        start_token = int(np.nanargmax(a.start[sf["context_start"] : sf["context_end"] + 1]))
        end_token = int(np.nanargmax(a.end[sf["context_start"] : sf["context_end"] + 1]))
        answer = context[s_window.context_offsets()[0][start_token] : s_window.context_offsets()[1][end_token]]
        assert answer.startswith(answer_start) and answer.endswith(answer_end)
        assert np.exp(a.start[sf["context_start"] + start_token]) > 0.99


# --- the student's side: masked positions out of the distillation term ---

def test_positions_no_teacher_saw_are_left_out_of_the_kl():
    from pipeline.model.losses import distillation_loss
    from pipeline.training.stream import teacher_targets

    rng = np.random.default_rng(0)
    spans, width, temperature = [(2, 6), (3, 7)], 9, 2.0
    teacher = [rng.normal(0, 2, width).astype(np.float32) for _ in spans]
    teacher[0][4] = teacher[0][5] = np.nan  # two context positions of row 0 the teacher never saw
    targets = teacher_targets(teacher, [t.copy() for t in teacher], width)
    assert targets["teacher_mask"][0].tolist() == [True] * 4 + [False] * 2 + [True] * 3
    assert not targets["teacher_start"].isnan().any()
    mask = answer_mask([a for a, _ in spans], [b for _, b in spans], width)
    student = torch.tensor(rng.normal(0, 2, (2, width)), dtype=torch.float32, requires_grad=True)
    labels = torch.tensor([0, 4])
    loss = distillation_loss(student, student, labels, labels, mask, targets["teacher_start"],
                             targets["teacher_end"], temperature, 1.0, targets["teacher_mask"])

    expected = 0.0  # KL(p_t || p_s) over CLS and the seen context positions, directly
    for row, (a, b) in enumerate(spans):
        kept = [k for k in [0, *range(a, b + 1)] if not np.isnan(teacher[row][k])]
        p_t = torch.softmax(torch.tensor(teacher[row][kept]) / temperature, -1)
        log_p_s = torch.log_softmax(student[row, kept].detach() / temperature, -1)
        expected += float((p_t * (p_t.log() - log_p_s)).sum()) / len(spans)
    assert loss.kd.item() == pytest.approx(expected, rel=1e-5)
    loss.total.backward()
    assert (student.grad[0, 4:6] == 0).all() and (student.grad[0, [0, 2, 3, 6]] != 0).all()


def test_teacher_logits_without_nan_give_no_mask():
    from pipeline.training.stream import teacher_targets

    targets = teacher_targets([np.ones(4, dtype=np.float32)], [np.zeros(3, dtype=np.float32)], 5)
    assert set(targets) == {"teacher_start", "teacher_end"}  # today's path: the loss sees no teacher_mask
