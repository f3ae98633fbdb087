"""The distillation loss for span extraction, over the positions that can hold an answer.

    loss = w * T^2 * KL(softmax(teacher/T) || softmax(student/T)) + (1 - w) * CE(student, hard label)

computed for start and end logits and averaged. Both distributions are taken only over `answer_mask`
positions (CLS and context tokens): question tokens and padding can never be an answer, and letting the
teacher's mass there leak into the KL would teach the student nothing useful. T^2 keeps the gradient
scale of the soft term independent of T (Hinton et al., 2015).

Rows without a hard label (label NO_LABEL: unlabeled data, teacher-only augmented views) take part in the
KL only: the KL is the mean over every row, the CE the mean over labelled rows (0 when a batch has none),
so a batch's mix of labelled and teacher-only rows never rescales either part. With several teachers and an
agreement option (pipeline/model/ensemble.py), rows weigh in the KL by their `target_weight` (a weighted mean:
a dropped row, weight 0, adds nothing and rescales nothing).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from pipeline.model.batching import MASKED
from pipeline.text.features import NO_LABEL


@dataclass
class LossParts:
    total: torch.Tensor
    kd: torch.Tensor
    ce: torch.Tensor
    labelled: torch.Tensor  # how many rows of the batch had a hard label (the CE is their mean)


def masked_kl(student: torch.Tensor, teacher: torch.Tensor, mask: torch.Tensor, temperature: float,
              row_weight: torch.Tensor | None = None) -> torch.Tensor:
    """Mean over the batch of KL(p_teacher || p_student) at temperature T, masked positions excluded; with
    `row_weight`, the mean weighted by it (0 when every weight is 0)."""
    s = student.float().masked_fill(~mask, MASKED) / temperature
    t = teacher.float().masked_fill(~mask, MASKED) / temperature
    log_p_s = F.log_softmax(s, dim=-1)
    log_p_t = F.log_softmax(t, dim=-1)
    p_t = log_p_t.exp()
    # 0 * log 0 = 0 at masked positions (p_t is exactly 0 there after the masked fill).
    per_position = torch.where(mask, p_t * (log_p_t - log_p_s), torch.zeros_like(p_t))
    if row_weight is None:
        return per_position.sum(-1).mean()
    row_weight = row_weight.float()
    return (per_position.sum(-1) * row_weight).sum() / row_weight.sum().clamp(min=1e-12)


def masked_ce(student: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy over the rows with a label; rows labelled NO_LABEL add nothing (nor any gradient)."""
    summed = F.cross_entropy(student.float().masked_fill(~mask, MASKED), labels, ignore_index=NO_LABEL,
                             reduction="sum")
    return summed / (labels != NO_LABEL).sum().clamp(min=1)


def distillation_loss(
    student_start: torch.Tensor,
    student_end: torch.Tensor,
    start_positions: torch.Tensor,
    end_positions: torch.Tensor,
    answer_mask: torch.Tensor,
    teacher_start: torch.Tensor | None,
    teacher_end: torch.Tensor | None,
    temperature: float,
    weight: float,
    teacher_mask: torch.Tensor | None = None,
    target_weight: torch.Tensor | None = None,
) -> LossParts:
    """The student's loss; with weight 0 (or no teacher logits) it is plain supervised fine-tuning.
    `teacher_mask` (aligned targets only): False where the teacher has no value; left out of the KL.
    `target_weight` (several teachers, an agreement option): each row's weight in the KL."""
    ce = (masked_ce(student_start, start_positions, answer_mask) + masked_ce(student_end, end_positions, answer_mask)) / 2
    labelled = (start_positions != NO_LABEL).sum()
    if weight == 0 or teacher_start is None:
        return LossParts(total=ce, kd=torch.zeros_like(ce), ce=ce, labelled=labelled)
    kd_mask = answer_mask if teacher_mask is None else answer_mask & teacher_mask
    kd = (
        masked_kl(student_start, teacher_start, kd_mask, temperature, target_weight)
        + masked_kl(student_end, teacher_end, kd_mask, temperature, target_weight)
    ) / 2
    total = weight * temperature**2 * kd + (1 - weight) * ce
    return LossParts(total=total, kd=kd, ce=ce, labelled=labelled)
