"""SQuAD 2.0 scores with exactly the semantics of the official `evaluate-v2.0.py`.

- Answers are normalised: lower case, punctuation removed, articles (a, an, the) removed, whitespace
  collapsed. Exact match compares normalised strings; F1 is over normalised whitespace tokens.
- Each question scores the best over its gold answers. Gold answers that normalise to "" are dropped; a
  question with none left (unanswerable) has the single gold answer "", so only an empty prediction
  scores on it, and an empty prediction scores 0 on answerable questions.
- `best_exact`/`best_f1`: the score reachable by answering "" for every question whose no-answer
  probability is above a threshold, with the threshold chosen on this data, walking questions in order
  of increasing probability as the official script does (ties keep the input order).
"""

from __future__ import annotations

import collections
import re
import string

_PUNCTUATION = set(string.punctuation)
_ARTICLES = re.compile(r"\b(a|an|the)\b", re.UNICODE)


def normalize_answer(s: str) -> str:
    s = s.lower()
    s = "".join(ch for ch in s if ch not in _PUNCTUATION)
    s = _ARTICLES.sub(" ", s)
    return " ".join(s.split())


def get_tokens(s: str) -> list[str]:
    return normalize_answer(s).split() if s else []


def compute_exact(gold: str, pred: str) -> int:
    return int(normalize_answer(gold) == normalize_answer(pred))


def compute_f1(gold: str, pred: str) -> float:
    gold_toks, pred_toks = get_tokens(gold), get_tokens(pred)
    if not gold_toks or not pred_toks:
        # If either is no-answer, F1 is 1 if they agree, 0 otherwise.
        return float(gold_toks == pred_toks)
    common = collections.Counter(gold_toks) & collections.Counter(pred_toks)
    num_same = sum(common.values())
    if num_same == 0:
        return 0.0
    precision = num_same / len(pred_toks)
    recall = num_same / len(gold_toks)
    return 2 * precision * recall / (precision + recall)


def gold_answers(answers: list[str]) -> list[str]:
    golds = [a for a in answers if normalize_answer(a)]
    return golds or [""]


def raw_scores(golds_by_id: dict[str, list[str]], preds: dict[str, str]) -> tuple[dict, dict]:
    exact, f1 = {}, {}
    for qid, answers in golds_by_id.items():
        if qid not in preds:
            continue  # the official script skips (and reports) missing predictions
        golds = gold_answers(answers)
        exact[qid] = max(compute_exact(g, preds[qid]) for g in golds)
        f1[qid] = max(compute_f1(g, preds[qid]) for g in golds)
    return exact, f1


def _averages(scores: dict, qids: list[str]) -> float:
    return 100.0 * sum(scores[q] for q in qids) / len(qids)


def find_best_threshold(preds, scores, na_probs, has_answer) -> tuple[float, float]:
    """Best score over thresholds on na_probs, and that threshold (official `find_best_thresh`)."""
    num_no_ans = sum(1 for q in has_answer if not has_answer[q])
    current = best = num_no_ans
    best_threshold = 0.0
    for qid in sorted(na_probs, key=lambda k: na_probs[k]):
        if qid not in scores:
            continue
        if has_answer[qid]:
            diff = scores[qid]
        else:
            diff = -1 if preds[qid] else 0
        current += diff
        if current > best:
            best = current
            best_threshold = na_probs[qid]
    return 100.0 * best / len(scores), best_threshold


def squad_v2_metrics(golds_by_id: dict[str, list[str]], preds: dict[str, str],
                     na_probs: dict[str, float] | None = None) -> dict:
    """The official evaluation dict: exact, f1, total, HasAns_*, NoAns_*, best_* (with na_probs)."""
    # As in the official script, "has an answer" means a non-empty gold list, before normalisation.
    has_answer = {qid: bool(a) for qid, a in golds_by_id.items()}
    exact, f1 = raw_scores(golds_by_id, preds)
    scored = list(exact)
    if not scored:
        raise ValueError("no predictions for any question")
    out = collections.OrderedDict(exact=_averages(exact, scored), f1=_averages(f1, scored), total=len(scored))
    has_ids = [q for q in scored if has_answer[q]]
    no_ids = [q for q in scored if not has_answer[q]]
    if has_ids:
        out.update(HasAns_exact=_averages(exact, has_ids), HasAns_f1=_averages(f1, has_ids), HasAns_total=len(has_ids))
    if no_ids:
        out.update(NoAns_exact=_averages(exact, no_ids), NoAns_f1=_averages(f1, no_ids), NoAns_total=len(no_ids))
    if na_probs is not None:
        out["best_exact"], out["best_exact_thresh"] = find_best_threshold(preds, exact, na_probs, has_answer)
        out["best_f1"], out["best_f1_thresh"] = find_best_threshold(preds, f1, na_probs, has_answer)
    return dict(out)


def forced_span_metrics(golds_by_id: dict[str, list[str]], forced_preds: dict[str, str]) -> dict:
    """Span quality: scores on answerable questions when the best non-null span is always given."""
    answerable = {q: a for q, a in golds_by_id.items() if a and q in forced_preds}
    if not answerable:
        return {}
    exact, f1 = raw_scores(answerable, forced_preds)
    ids = list(exact)
    return {"HasAns_exact_forced": _averages(exact, ids), "HasAns_f1_forced": _averages(f1, ids)}
