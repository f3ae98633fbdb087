"""SQuAD 2.0 scoring and post-processing against cases worked by hand with the official semantics."""

from __future__ import annotations

import math

import numpy as np
import pytest

from pipeline.text.postprocess import WindowLogits, best_spans, na_probability, predict_example
from pipeline.text.squad_metrics import (
    compute_exact,
    compute_f1,
    find_best_threshold,
    normalize_answer,
    raw_scores,
    squad_v2_metrics,
)


# --- normalisation, exact match, F1 ---

@pytest.mark.parametrize("text,expected", [
    ("The Eiffel Tower", "eiffel tower"),
    ("  an   apple,  A pear. ", "apple pear"),
    ("Theatre and another", "theatre and another"),  # articles only as whole words
    ("U.S.A.", "usa"),
    ("rock-'n'-roll!", "rocknroll"),
    ("The.", ""),  # punctuation goes first, then the article
    ("a\tb\nc", "b c"),
    ("", ""),
])
def test_normalize_answer(text, expected):
    assert normalize_answer(text) == expected


def test_exact_match_ignores_case_punctuation_articles_whitespace():
    assert compute_exact("the Eiffel Tower", "Eiffel   tower.") == 1
    assert compute_exact("Paris", "paris!") == 1
    assert compute_exact("Paris", "Paris, France") == 0
    assert compute_exact("", "") == 1
    assert compute_exact("", "an") == 1  # normalises to ""


def test_f1_token_overlap_by_hand():
    # gold -> [cat, sat, on, mat], pred -> [cat, on, hat]: 2 common, P = 2/3, R = 2/4, F1 = 4/7
    assert compute_f1("the cat sat on the mat", "a cat on a hat") == pytest.approx(4 / 7)
    # common tokens count with multiplicity, clipped to the smaller count:
    # gold [new, new, york], pred [new, new]: common 2, P = 1, R = 2/3, F1 = 4/5
    assert compute_f1("new new york", "new new") == pytest.approx(0.8)
    # gold [new, new, york], pred [new, york, york]: common new 1 + york 1 = 2, P = R = 2/3
    assert compute_f1("new new york", "new york york") == pytest.approx(2 / 3)
    # gold [new, york], pred [new, new, new]: common 1, P = 1/3, R = 1/2, F1 = 2/5
    assert compute_f1("New York", "new new new") == pytest.approx(0.4)
    # gold [alpha, beta], pred [beta, gamma, delta]: 1 common, P = 1/3, R = 1/2, F1 = 2/5
    assert compute_f1("Alpha beta", "beta, gamma; delta") == pytest.approx(0.4)
    assert compute_f1("alpha", "beta") == 0.0
    assert compute_f1("The Alpha!", "alpha") == 1.0
    # no-answer on either side: 1 only if both are empty
    assert compute_f1("", "") == 1.0
    assert compute_f1("", "alpha") == 0.0
    assert compute_f1("alpha", "") == 0.0


def test_best_over_several_golds():
    golds = {"q": ["alpha beta", "beta gamma delta", "Denver Broncos"]}
    exact, f1 = raw_scores(golds, {"q": "beta gamma"})
    # vs "alpha beta": P = R = 1/2 -> 0.5; vs "beta gamma delta": P = 1, R = 2/3 -> 0.8
    assert exact["q"] == 0 and f1["q"] == pytest.approx(0.8)
    exact, f1 = raw_scores(golds, {"q": "the Denver broncos."})
    assert exact["q"] == 1 and f1["q"] == 1.0


def test_unanswerable_and_empty_predictions():
    golds = {"na": [], "ans": ["Paris"], "empty_gold": ["the", "a"]}
    exact, f1 = raw_scores(golds, {"na": "", "ans": "", "empty_gold": ""})
    assert (exact["na"], f1["na"]) == (1, 1.0)  # gold [] -> only "" scores
    assert (exact["ans"], f1["ans"]) == (0, 0.0)  # "" on an answerable question scores 0
    assert (exact["empty_gold"], f1["empty_gold"]) == (1, 1.0)  # golds normalising to "" count as no-answer
    exact, f1 = raw_scores(golds, {"na": "Paris", "ans": "paris", "empty_gold": "x"})
    assert (exact["na"], f1["na"]) == (0, 0.0)
    assert (exact["ans"], f1["ans"]) == (1, 1.0)
    assert (exact["empty_gold"], f1["empty_gold"]) == (0, 0.0)
    # ... but "has an answer" is decided on the raw gold list, as the official script does
    m = squad_v2_metrics(golds, {"na": "", "ans": "", "empty_gold": ""})
    assert m["HasAns_total"] == 2 and m["NoAns_total"] == 1


# The worked example. Per question: (golds, prediction, na_prob) -> exact, f1
#   q1 answerable   ["Paris"]                  "paris"          0.1 -> 1, 1
#   q2 answerable   ["the cat sat on the mat"] "a cat on a hat" 0.6 -> 0, 4/7
#   q3 unanswerable []                          ""              0.9 -> 1, 1
#   q4 unanswerable []                          "london"        0.7 -> 0, 0
#   q5 answerable   ["red tower"]              ""               0.8 -> 0, 0
GOLDS = {"q1": ["Paris"], "q2": ["the cat sat on the mat"], "q3": [], "q4": [], "q5": ["red tower"]}
PREDS = {"q1": "paris", "q2": "a cat on a hat", "q3": "", "q4": "london", "q5": ""}
NA_PROBS = {"q1": 0.1, "q2": 0.6, "q3": 0.9, "q4": 0.7, "q5": 0.8}


def test_official_metrics_worked_by_hand():
    m = squad_v2_metrics(GOLDS, PREDS, NA_PROBS)
    assert m["total"] == 5
    assert m["exact"] == pytest.approx(100 * 2 / 5)
    assert m["f1"] == pytest.approx(100 * (1 + 4 / 7 + 1) / 5)
    assert m["HasAns_total"] == 3 and m["NoAns_total"] == 2
    assert m["HasAns_exact"] == pytest.approx(100 / 3)
    assert m["HasAns_f1"] == pytest.approx(100 * (1 + 4 / 7) / 3)
    assert m["NoAns_exact"] == pytest.approx(50.0) and m["NoAns_f1"] == pytest.approx(50.0)
    # best thresholds: start at 2 (no-answer questions), walk by na_prob ascending:
    #   exact: q1 +1 -> 3 (best, thresh 0.1); q2 +0; q4 -1 -> 2; q5 +0; q3 +0     => 60.0 at 0.1
    #   f1:    q1 +1 -> 3 (0.1); q2 +4/7 -> 3.571 (best, 0.6); q4 -1; q5 0; q3 0  => 500/7 at 0.6
    assert m["best_exact"] == pytest.approx(60.0) and m["best_exact_thresh"] == pytest.approx(0.1)
    assert m["best_f1"] == pytest.approx(500 / 7) and m["best_f1_thresh"] == pytest.approx(0.6)
    assert set(m) == {"exact", "f1", "total", "HasAns_exact", "HasAns_f1", "HasAns_total", "NoAns_exact",
                      "NoAns_f1", "NoAns_total", "best_exact", "best_exact_thresh", "best_f1", "best_f1_thresh"}


def test_best_threshold_stays_at_zero_when_abstaining_never_helps():
    golds = {"a": ["x y"], "b": []}
    preds = {"a": "x y", "b": ""}
    # start 1; a (0.2): +1 -> 2 (best, 0.2); b (0.5): +0 -> 2
    assert find_best_threshold(preds, {"a": 1, "b": 1}, {"a": 0.2, "b": 0.5}, {"a": True, "b": False}) == (100.0, 0.2)
    # a wrong answer first: +0 never beats the start -> threshold 0.0
    m = squad_v2_metrics(golds, {"a": "z", "b": ""}, {"a": 0.3, "b": 0.4})
    assert m["best_exact"] == pytest.approx(50.0) and m["best_exact_thresh"] == 0.0
    assert m["exact"] == pytest.approx(50.0)


def test_threshold_ties_walk_in_input_order():
    # equal na_probs: walked in input order; the no-answer with a non-empty prediction first (-1) then the
    # right answer (+1) never exceeds the start score, so the threshold stays 0.0
    golds = {"n": [], "h": ["x"]}
    m = squad_v2_metrics(golds, {"n": "x", "h": "x"}, {"n": 0.5, "h": 0.5})
    assert m["best_exact"] == pytest.approx(50.0) and m["best_exact_thresh"] == 0.0


def test_no_answer_only_and_answer_only_splits():
    only_no = squad_v2_metrics({"a": [], "b": []}, {"a": "", "b": "x"})
    assert "HasAns_exact" not in only_no and only_no["NoAns_exact"] == pytest.approx(50.0)
    only_has = squad_v2_metrics({"a": ["x"]}, {"a": "x"})
    assert "NoAns_exact" not in only_has and only_has["HasAns_f1"] == 100.0
    assert "best_f1" not in only_has  # only with na_probs


# --- post-processing ---

def window(start, end, context_start, context_end, offsets):
    n = len(start)
    offset_start = np.full(n, -1)
    offset_end = np.full(n, -1)
    for k, (a, b) in zip(range(context_start, context_end + 1), offsets):
        offset_start[k], offset_end[k] = a, b
    return WindowLogits(np.asarray(start, dtype=np.float32), np.asarray(end, dtype=np.float32),
                        context_start, context_end, offset_start, offset_end)


CONTEXT = "alice built the red tower"
WORD_OFFSETS = [(0, 5), (6, 11), (12, 15), (16, 19), (20, 25)]  # one token per word


def test_spans_only_inside_the_context_and_within_max_answer_len():
    # positions: 0 CLS, 1-2 question, 3 SEP, 4-8 context words, 9 SEP, 10 padding
    start = [0, 50, 40, 30, 1, 2, 3, 9, 1, 60, 70]
    end = [0, 50, 40, 30, 1, 2, 8, 1, 1, 60, 70]
    w = window(start, end, 4, 8, WORD_OFFSETS)
    spans = best_spans(w, n_best=5, max_answer_len=30)
    assert spans and all(4 <= s <= e <= 8 for _, s, e in spans)
    assert spans[0][1:] == (6, 6)  # start "the" (3) + end "the" (8) = 11 beats start "red" with end "the"
    assert spans == sorted(spans, key=lambda c: -c[0])
    p = predict_example([w], CONTEXT, n_best=5, max_answer_len=30, null_threshold=0.0)
    assert p.text == "the" and p.span_score == pytest.approx(11.0)
    # best start at "built" (5), best end at "tower" (8): 4 tokens; with max_answer_len 2 not allowed
    start2 = [0, 0, 0, 0, 0, 9, 0, 0, 0, 0, 0]
    end2 = [0, 0, 0, 0, 0, 0, 1, 0, 9, 0, 0]
    w2 = window(start2, end2, 4, 8, WORD_OFFSETS)
    assert predict_example([w2], CONTEXT, 20, 30, 0.0).text == "built the red tower"
    p2 = predict_example([w2], CONTEXT, 20, 2, 0.0)
    assert p2.text == "built the" and p2.span_score == pytest.approx(10.0)
    assert all(e - s + 1 <= 2 for _, s, e in best_spans(w2, 20, 2))


def test_best_spans_are_the_best_pairs_of_top_starts_and_ends():
    # The definition, written out: every (start, end) from the n_best highest starts and ends inside the
    # context, end >= start, at most max_answer_len tokens, sorted by score (ties: start-major order).
    rng = np.random.default_rng(0)
    for trial in range(200):
        n = int(rng.integers(6, 40))
        context_start = int(rng.integers(1, n - 2))
        context_end = int(rng.integers(context_start, n - 1))
        # Rounded logits: ties between candidates happen and must be broken the same way.
        start, end = np.round(rng.normal(size=(2, n)), 1).astype(np.float32)
        offsets = [(k, k + 1) for k in range(context_end - context_start + 1)]
        w = window(start, end, context_start, context_end, offsets)
        n_best, max_len = int(rng.integers(1, 8)), int(rng.integers(1, 6))
        lo, hi = context_start, context_end + 1
        top_s = np.argsort(-start[lo:hi], kind="stable")[:n_best]
        top_e = np.argsort(-end[lo:hi], kind="stable")[:n_best]
        expected = [(float(start[lo:hi][a] + end[lo:hi][b]), int(a) + lo, int(b) + lo)
                    for a in top_s for b in top_e if a <= b < a + max_len]
        expected.sort(key=lambda c: -c[0])
        assert best_spans(w, n_best, max_len) == expected[:n_best], trial


def test_null_score_is_min_over_windows_and_answer_iff_margin_above_threshold():
    # window A: CLS 3 + 2 = 5, best span "red" 4 + 4 = 8; window B: CLS 1 + 0 = 1, best span 2 + 1 = 3
    a = window([3, 0, 0, 0, 0, 0, 4, 0], [2, 0, 0, 0, 0, 0, 4, 0], 3, 7,
               [(0, 5), (6, 11), (12, 15), (16, 19), (20, 25)])
    b = window([1, 0, 0, 2, 0, 0, 0, 0], [0, 0, 0, 1, 0, 0, 0, 0], 3, 7,
               [(0, 5), (6, 11), (12, 15), (16, 19), (20, 25)])
    p = predict_example([a, b], CONTEXT, 20, 30, 0.0)
    assert p.null_score == pytest.approx(1.0)  # min(5, 1)
    assert p.span_score == pytest.approx(8.0) and p.span_text == "red"
    assert p.text == "red"  # margin 1 - 8 = -7 <= 0
    assert p.na_prob == pytest.approx(1 / (1 + math.exp(7)))
    # margin -7: "" iff margin > threshold
    assert predict_example([a, b], CONTEXT, 20, 30, -7.5).text == ""
    assert predict_example([a, b], CONTEXT, 20, 30, -7.0).text == "red"
    assert predict_example([a, b], CONTEXT, 20, 30, -6.5).text == "red"
    # only window A: null 5, margin -3
    assert predict_example([a], CONTEXT, 20, 30, -3.1).text == ""
    assert predict_example([a], CONTEXT, 20, 30, -2.9).text == "red"


def test_no_answer_when_null_beats_every_span():
    w = window([20, 0, 0, 1, 0, 0, 0, 0], [20, 0, 0, 0, 1, 0, 0, 0], 3, 7, WORD_OFFSETS)
    p = predict_example([w], CONTEXT, 20, 30, 0.0)
    assert p.text == "" and p.span_text == "alice built" and p.na_prob > 0.5


def test_na_probability_in_unit_interval_and_monotone():
    margins = [-math.inf, -1e6, -800.0, -30.0, -1.0, -1e-9, 0.0, 1e-9, 0.5, 2.0, 30.0, 800.0, 1e6, math.inf]
    probs = [na_probability(m) for m in margins]
    assert all(0.0 <= p <= 1.0 for p in probs)
    assert all(a <= b for a, b in zip(probs, probs[1:]))
    assert probs[0] == 0.0 and probs[-1] == 1.0 and na_probability(0.0) == 0.5
    assert na_probability(2.0) > na_probability(0.5) > na_probability(-1.0)
