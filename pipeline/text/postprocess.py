"""From start/end logits over an example's windows to an answer text and a no-answer probability.

For each window, the best spans come from the top `n_best` start and end positions *inside the context*
(CLS, question and padding can never be part of an answer), with end >= start and at most
`max_answer_len` tokens. The null score of the example is the smallest CLS score (start[0] + end[0]) over
its windows: the window that most believes an answer is present decides. The answer is "" when
null score - best span score > `null_threshold`; the no-answer probability is the sigmoid of that margin,
so it lies in [0, 1] and is monotone in it (which is all the official best-threshold search needs).
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass

import numpy as np


@dataclass
class WindowLogits:
    """One feature (window) of an example with the model's logits over its real tokens."""

    start_logits: np.ndarray
    end_logits: np.ndarray
    context_start: int
    context_end: int
    offset_start: np.ndarray  # character offsets of context tokens in the context; -1 elsewhere
    offset_end: np.ndarray


@dataclass
class ExamplePrediction:
    text: str  # "" for no answer
    span_text: str  # the best non-null span, whatever the null score says ("forced" answer)
    span_score: float
    null_score: float
    na_prob: float


def best_spans(window: WindowLogits, n_best: int, max_answer_len: int) -> list[tuple[float, int, int]]:
    """Up to n_best (score, start token, end token) candidates inside the window's context."""
    lo, hi = window.context_start, window.context_end + 1
    start = window.start_logits[lo:hi].astype(np.float32)
    end = window.end_logits[lo:hi].astype(np.float32)
    top_start = np.argsort(-start, kind="stable")[:n_best]
    top_end = np.argsort(-end, kind="stable")[:n_best]
    # Every pairing of a top start with a top end (start-major), kept if it is a span of at most
    # max_answer_len tokens; the best n_best of them by score, ties in that order.
    s = np.repeat(top_start, len(top_end))
    e = np.tile(top_end, len(top_start))
    valid = (e >= s) & (e - s + 1 <= max_answer_len)
    s, e = s[valid], e[valid]
    scores = start[s] + end[e]
    best = np.argsort(-scores, kind="stable")[:n_best]
    return [(float(scores[i]), int(s[i]) + lo, int(e[i]) + lo) for i in best]


def predict_example(windows: list[WindowLogits], context: str, n_best: int, max_answer_len: int,
                    null_threshold: float) -> ExamplePrediction:
    null_score = min(float(w.start_logits[0]) + float(w.end_logits[0]) for w in windows)
    best = (-math.inf, "")
    for w in windows:
        for score, s, e in best_spans(w, n_best, max_answer_len):
            if score > best[0]:
                best = (score, context[w.offset_start[s] : w.offset_end[e]])
            break  # candidates are sorted: the first is this window's best
    span_score, span_text = best
    margin = null_score - span_score  # +inf when no window has a valid span
    text = "" if margin > null_threshold else span_text
    return ExamplePrediction(text, span_text, span_score, null_score, na_probability(margin))


def na_probability(margin: float) -> float:
    """sigmoid(null score - best span score), computed without overflow."""
    if margin >= 0:
        return 1.0 / (1.0 + math.exp(-margin)) if margin != math.inf else 1.0
    z = math.exp(margin)
    return z / (1.0 + z)


def margin_threshold(na_prob_threshold: float) -> float:
    """The `null_threshold` (a margin) that answers exactly the questions the official script answers at the
    no-answer probability threshold p: it abstains where na_prob > p, predict_example where margin > threshold,
    and na_prob = sigmoid(margin) is monotone, so the threshold is the largest margin whose na_prob is at most p.
    That is logit(p) up to rounding, found by bisection around it because logit(p) alone is wrong at the edges:

    - rounding: many margins share one float na_prob (every margin above about 37 gives 1.0), and logit(p) can
      land below the margin that produced p, flipping the very question that set the threshold;
    - p = 1 answers every question, and logit(1) is infinite: the largest float stands in for it (JSON has no
      infinity; a question with no valid span has margin +inf but no text to give either way);
    - p = 0 (the official search's start, when abstaining on everything scores best) answers only the questions
      whose na_prob is exactly 0, i.e. margins below about -745 where exp() underflows: that margin, not -inf.
    """
    p = na_prob_threshold
    if p >= 1.0:
        return sys.float_info.max
    guess = -745.0 if p <= 0.0 else math.log(p) - math.log1p(-p)
    low, high = guess - 1.0, guess + 1.0
    while na_probability(low) > p:  # never more than a step or two: logit(p) is within rounding of the answer
        low -= 1.0
    while na_probability(high) <= p:
        high += 1.0
    while True:  # na_probability(low) <= p < na_probability(high), until they are neighbouring floats
        mid = (low + high) / 2
        if mid in (low, high):
            return low
        if na_probability(mid) <= p:
            low = mid
        else:
            high = mid
