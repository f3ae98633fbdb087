"""Several teachers' logits as one target: what the student trains on, and the ensemble's own answers.

The target of a row is the weighted mean of the teachers' probabilities at the temperature T, each teacher's
distribution taken over the positions that can hold an answer (CLS and the context: `answer_mask`), as the
loss takes it (pipeline/model/losses.py). The loss reads logits and softmaxes them at T, so the mixture is
handed to it as logits whose softmax at T is exactly the mixture, T * log(sum_k w_k softmax(t_k / T)): the loss
stays one KL against one target, and the combination runs in the data path (the stream's workers), not in the
training step.

Agreement, for weighting or dropping rows (student.teacher_agreement):
- `agreement`: 1 - JS_w / H(w), where JS_w = H(mixture) - sum_k w_k H(p_k) is the weighted Jensen-Shannon
  divergence of the teachers' distributions at T and H(w) the entropy of the weights, its largest value: 1 when
  the teachers agree exactly, 0 when each puts all its mass where no other does. Mean of start and end.
- `same_answerability`: 1 where every teacher (of positive weight) makes the same call on whether the window
  holds an answer, its null score start[CLS] + end[CLS] against its best start plus best end in the context.

A teacher carried onto the features' tokens from its own tokenizer (pipeline/text/alignment.py) holds NaN where
none of its windows saw a position. Such a position leaves every teacher's distribution (`seen_mask`): each is
renormalised over the answer positions all teachers saw, and the batch reports it as `teacher_mask` False, as
one teacher's aligned targets do (pipeline/training/stream.py).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from pipeline.model.batching import MASKED, answer_mask, pad_logits


@dataclass(frozen=True)
class Combination:
    """How several teachers' logits become one target (student.teacher_weights, temperature, teacher_agreement)."""

    weights: tuple[float, ...]  # one per teacher, not normalized
    temperature: float = 1.0
    agreement: str = "none"  # student.teacher_agreement: none | weight | drop

    @classmethod
    def equal(cls, teachers: int, temperature: float = 1.0) -> Combination:
        return cls((1.0,) * teachers, temperature)

    def normalized(self) -> torch.Tensor:
        w = torch.tensor(self.weights, dtype=torch.float32)
        return w / w.sum()


def teacher_log_probs(logits: torch.Tensor, mask: torch.Tensor, temperature: float) -> torch.Tensor:
    """log softmax(logits / T) over the `mask` positions of each row (teachers stacked first: [K, B, W])."""
    return torch.log_softmax(logits.float().masked_fill(~mask, MASKED) / temperature, dim=-1)


def mixture_logits(logits: torch.Tensor, mask: torch.Tensor, combination: Combination) -> torch.Tensor:
    """[K, B, W] teachers' logits -> [B, W] logits whose softmax at T over `mask` is the weighted mean of the
    teachers' softmaxes at T (MASKED outside `mask`)."""
    log_w = combination.normalized().log().view(-1, 1, 1)  # a weight of 0: log 0 = -inf, no mass
    log_mix = torch.logsumexp(log_w + teacher_log_probs(logits, mask, combination.temperature), dim=0)
    return (combination.temperature * log_mix).masked_fill(~mask, MASKED)


def seen_mask(mask: torch.Tensor, *sides: torch.Tensor) -> torch.Tensor:
    """[B, W] `mask` less the positions some teacher did not see (NaN in any of `sides`, [K, B, W] logits)."""
    unseen = torch.zeros_like(mask)
    for logits in sides:
        unseen |= logits.isnan().any(0)
    return mask & ~unseen


def _entropy(log_p: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return -(log_p.exp() * log_p).masked_fill(~mask, 0.0).sum(-1)


def agreement(start: torch.Tensor, end: torch.Tensor, mask: torch.Tensor, combination: Combination) -> torch.Tensor:
    """[B] in [0, 1]: 1 - the teachers' weighted Jensen-Shannon divergence at T over its largest value."""
    w = combination.normalized()
    positive = w[w > 0]
    largest = float(-(positive * positive.log()).sum())
    if largest <= 0:  # one teacher carries all the weight: nothing to disagree with
        return torch.ones(start.shape[1])
    sides = []
    for logits in (start, end):
        log_p = teacher_log_probs(logits, mask, combination.temperature)
        log_mix = torch.logsumexp(w.log().view(-1, 1, 1) + log_p, dim=0)
        divergence = _entropy(log_mix, mask) - (w.view(-1, 1) * _entropy(log_p, mask)).sum(0)
        sides.append(1 - (divergence / largest).clamp(0, 1))
    return (sides[0] + sides[1]) / 2


def same_answerability(start: torch.Tensor, end: torch.Tensor, mask: torch.Tensor,
                       combination: Combination) -> torch.Tensor:
    """[B] 1.0 where every teacher of positive weight calls the window answerable, or every one unanswerable."""
    context = mask.clone()
    context[:, 0] = False
    best = (start.float().masked_fill(~context, -torch.inf).amax(-1)
            + end.float().masked_fill(~context, -torch.inf).amax(-1))
    no_answer = (start[..., 0].float() + end[..., 0].float()) > best  # [K, B]
    voters = no_answer[torch.tensor(combination.weights) > 0]
    return (voters.all(0) | ~voters.any(0)).float()


def ensemble_targets(start: torch.Tensor, end: torch.Tensor, mask: torch.Tensor,
                     combination: Combination) -> dict[str, torch.Tensor]:
    """A batch's one target from [K, B, W] teachers' logits: teacher_start/teacher_end, `teacher_mask` (False
    where some teacher saw no value) when there is such a position, and with an agreement option a per-row
    `target_weight` for the KD term. Every part is computed over the answer positions all teachers saw."""
    seen = seen_mask(mask, start, end)
    targets = {"teacher_start": mixture_logits(start, seen, combination),
               "teacher_end": mixture_logits(end, seen, combination)}
    if not torch.equal(seen, mask):
        targets["teacher_mask"] = seen | ~mask  # only the unseen positions are False, as `teacher_targets` says
    if combination.agreement == "weight":
        targets["target_weight"] = agreement(start, end, seen, combination)
    elif combination.agreement == "drop":
        targets["target_weight"] = same_answerability(start, end, seen, combination)
    return targets


def combine_rows(per_teacher: Sequence[Sequence[np.ndarray]], context_start, context_end,
                 combination: Combination) -> list[np.ndarray]:
    """Rows of different lengths (one list of rows per teacher, the same features): each row's mixture logits
    (`mixture_logits`) over the answer positions every teacher saw (MASKED elsewhere), as float32 arrays of the
    row's own length."""
    lengths = [len(row) for row in per_teacher[0]]
    width = max(lengths)
    stacked = torch.stack([pad_logits(list(rows), width) for rows in per_teacher])
    combined = mixture_logits(stacked, seen_mask(answer_mask(context_start, context_end, width), stacked),
                              combination)
    return [combined[i, :n].numpy() for i, n in enumerate(lengths)]
