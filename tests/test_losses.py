"""The distillation loss against a direct computation written independently (per-row loops, math only)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from pipeline.model.losses import distillation_loss
from pipeline.model.batching import answer_mask


def allowed_positions(context_start: int, context_end: int) -> list[int]:
    """CLS and the context tokens: the only places an answer can start or end."""
    return [0] + list(range(context_start, context_end + 1))


def softmax_at(values: list[float], temperature: float) -> list[float]:
    scaled = [v / temperature for v in values]
    top = max(scaled)
    exps = [math.exp(v - top) for v in scaled]
    total = sum(exps)
    return [e / total for e in exps]


def reference_loss(student_start, student_end, teacher_start, teacher_end, starts, ends, spans, temperature, weight):
    """w * T^2 * KL(p_t || p_s) + (1 - w) * CE, start/end averaged, batch averaged, allowed positions only."""
    kd_sum = ce_sum = 0.0
    n = len(spans)
    for student, teacher, labels in ((student_start, teacher_start, starts), (student_end, teacher_end, ends)):
        for row in range(n):
            allowed = allowed_positions(*spans[row])
            s = [float(student[row][k]) for k in allowed]
            t = [float(teacher[row][k]) for k in allowed]
            p_s, p_t = softmax_at(s, temperature), softmax_at(t, temperature)
            kd_sum += sum(pt * (math.log(pt) - math.log(ps)) for pt, ps in zip(p_t, p_s) if pt > 0)
            # cross-entropy at temperature 1 against the hard label (an allowed position)
            q = softmax_at(s, 1.0)
            ce_sum += -math.log(q[allowed.index(int(labels[row]))])
    kd = kd_sum / (2 * n)
    ce = ce_sum / (2 * n)
    return weight * temperature**2 * kd + (1 - weight) * ce, kd, ce


def make_batch(seed: int = 0, width: int = 14):
    rng = np.random.default_rng(seed)
    # (context_start, context_end) per row; rows are padded to `width`, so positions past each row's
    # context_end + 1 are padding and 1..context_start-1 are question tokens.
    spans = [(4, 12), (6, 9), (3, 5)]
    n = len(spans)
    student_start, student_end = rng.normal(0, 3, (n, width)), rng.normal(0, 3, (n, width))
    teacher_start, teacher_end = rng.normal(0, 4, (n, width)), rng.normal(0, 4, (n, width))
    starts = np.array([0, 7, 4])
    ends = np.array([0, 8, 5])
    return spans, student_start, student_end, teacher_start, teacher_end, starts, ends


def kdqa_loss(spans, ss, se, ts, te, starts, ends, temperature, weight, requires_grad=False):
    width = ss.shape[1]
    mask = answer_mask([a for a, _ in spans], [b for _, b in spans], width)
    s_start = torch.tensor(ss, dtype=torch.float32, requires_grad=requires_grad)
    s_end = torch.tensor(se, dtype=torch.float32, requires_grad=requires_grad)
    parts = distillation_loss(s_start, s_end, torch.as_tensor(starts), torch.as_tensor(ends), mask,
                              torch.tensor(ts, dtype=torch.float32), torch.tensor(te, dtype=torch.float32),
                              temperature, weight)
    return parts, s_start, s_end


def test_answer_mask_is_cls_plus_context():
    mask = answer_mask([4, 2], [6, 3], 8)
    assert mask.tolist() == [
        [True, False, False, False, True, True, True, False],
        [True, False, True, True, False, False, False, False],
    ]


@pytest.mark.parametrize("temperature,weight", [(1.0, 1.0), (2.0, 0.5), (5.0, 1.0), (3.0, 0.25)])
def test_loss_matches_direct_computation(temperature, weight):
    spans, ss, se, ts, te, starts, ends = make_batch()
    parts, _, _ = kdqa_loss(spans, ss, se, ts, te, starts, ends, temperature, weight)
    total, kd, ce = reference_loss(ss, se, ts, te, starts, ends, spans, temperature, weight)
    assert parts.kd.item() == pytest.approx(kd, rel=1e-4, abs=1e-6)
    assert parts.ce.item() == pytest.approx(ce, rel=1e-4, abs=1e-6)
    assert parts.total.item() == pytest.approx(total, rel=1e-4, abs=1e-6)
    assert kd > 1e-3  # a real comparison, not 0 == 0


def test_identical_distributions_give_zero_kd():
    spans, ss, se, _, _, starts, ends = make_batch(seed=1)
    parts, _, _ = kdqa_loss(spans, ss, se, ss.copy(), se.copy(), starts, ends, 4.0, 1.0)
    assert parts.kd.item() == pytest.approx(0.0, abs=1e-6)


def test_masked_positions_do_not_change_the_loss():
    spans, ss, se, ts, te, starts, ends = make_batch(seed=2)
    base, _, _ = kdqa_loss(spans, ss, se, ts, te, starts, ends, 2.0, 0.7)
    width = ss.shape[1]
    changed = [a.copy() for a in (ss, se, ts, te)]
    for row, (cs, ce) in enumerate(spans):
        masked = [k for k in range(width) if k != 0 and not cs <= k <= ce]  # question, [SEP] and padding
        assert masked
        for a in changed:
            a[row, masked] = np.random.default_rng(row).normal(0, 50, len(masked))
    other, _, _ = kdqa_loss(spans, *changed, starts, ends, 2.0, 0.7)
    assert other.total.item() == pytest.approx(base.total.item(), rel=1e-6)
    assert other.kd.item() == pytest.approx(base.kd.item(), rel=1e-6)
    assert other.ce.item() == pytest.approx(base.ce.item(), rel=1e-6)
    # ... whereas changing an allowed position does change it
    moved = [a.copy() for a in (ss, se, ts, te)]
    moved[2][1, spans[1][0]] += 3.0
    assert kdqa_loss(spans, *moved, starts, ends, 2.0, 0.7)[0].total.item() != pytest.approx(base.total.item())


def test_weight_zero_is_pure_cross_entropy():
    spans, ss, se, ts, te, starts, ends = make_batch(seed=3)
    parts, _, _ = kdqa_loss(spans, ss, se, ts, te, starts, ends, 5.0, 0.0)
    _, _, ce = reference_loss(ss, se, ts, te, starts, ends, spans, 5.0, 0.0)
    assert parts.total.item() == pytest.approx(ce, rel=1e-5)
    # without teacher logits at all (the supervised-only student)
    mask = answer_mask([a for a, _ in spans], [b for _, b in spans], ss.shape[1])
    alone = distillation_loss(torch.tensor(ss, dtype=torch.float32), torch.tensor(se, dtype=torch.float32),
                              torch.as_tensor(starts), torch.as_tensor(ends), mask, None, None, 5.0, 0.0)
    assert alone.total.item() == pytest.approx(ce, rel=1e-5)
    assert alone.kd.item() == 0.0


def test_gradients_are_finite_and_zero_at_masked_positions():
    spans, ss, se, ts, te, starts, ends = make_batch(seed=4)
    ss[0, 1] = 1e4  # a huge logit on a question token must not matter
    parts, s_start, s_end = kdqa_loss(spans, ss, se, ts, te, starts, ends, 5.0, 0.6, requires_grad=True)
    parts.total.backward()
    for grad in (s_start.grad, s_end.grad):
        assert torch.isfinite(grad).all()
        assert grad.abs().sum() > 0
        for row, (cs, ce) in enumerate(spans):
            masked = [k for k in range(grad.shape[1]) if k != 0 and not cs <= k <= ce]
            assert torch.all(grad[row, masked] == 0)


def test_loss_in_bfloat16_inputs_is_close_to_float32():
    """Under CUDA autocast the student's logits come in bf16; the loss is computed in float32."""
    spans, ss, se, ts, te, starts, ends = make_batch(seed=5)
    width = ss.shape[1]
    mask = answer_mask([a for a, _ in spans], [b for _, b in spans], width)
    bf = distillation_loss(torch.tensor(ss).to(torch.bfloat16), torch.tensor(se).to(torch.bfloat16),
                           torch.as_tensor(starts), torch.as_tensor(ends), mask,
                           torch.tensor(ts).to(torch.float16), torch.tensor(te).to(torch.float16), 2.0, 0.5)
    assert bf.total.dtype == torch.float32
    total, _, _ = reference_loss(ss, se, ts, te, starts, ends, spans, 2.0, 0.5)
    assert bf.total.item() == pytest.approx(total, rel=5e-2)


def reference_masked_loss(ss, se, ts, te, starts, ends, spans, temperature, weight):
    """KD as the mean over every row; CE as the mean over rows with a label (>= 0) only; 0 when none."""
    cls = np.zeros_like(starts)  # any valid label: only the KD of this call is used
    _, kd, _ = reference_loss(ss, se, ts, te, cls, cls, spans, temperature, weight)
    rows = [i for i in range(len(spans)) if starts[i] >= 0]
    ce = 0.0
    if rows:
        pick = lambda a: a[rows]  # noqa: E731
        _, _, ce = reference_loss(pick(ss), pick(se), pick(ts), pick(te), starts[rows], ends[rows],
                                  [spans[i] for i in rows], temperature, weight)
    return weight * temperature**2 * kd + (1 - weight) * ce, kd, ce


@pytest.mark.parametrize("labelled_rows", [[0, 2], [1], [0, 1, 2], []])
def test_rows_without_labels_take_the_kd_part_only(labelled_rows):
    """NO_LABEL rows: in the KL (mean over all rows), out of the CE (mean over labelled rows only)."""
    from pipeline.text.features import NO_LABEL

    spans, ss, se, ts, te, starts, ends = make_batch(seed=6)
    starts, ends = starts.copy(), ends.copy()
    for row in range(len(spans)):
        if row not in labelled_rows:
            starts[row] = ends[row] = NO_LABEL
    parts, s_start, s_end = kdqa_loss(spans, ss, se, ts, te, starts, ends, 3.0, 0.5, requires_grad=True)
    total, kd, ce = reference_masked_loss(ss, se, ts, te, starts, ends, spans, 3.0, 0.5)
    assert parts.labelled.item() == len(labelled_rows)
    assert parts.kd.item() == pytest.approx(kd, rel=1e-4, abs=1e-6)
    assert parts.ce.item() == pytest.approx(ce, rel=1e-4, abs=1e-6)
    assert parts.total.item() == pytest.approx(total, rel=1e-4, abs=1e-6)
    assert (ce > 1e-3) == bool(labelled_rows)  # a real CE wherever some row has a label
    parts.total.backward()
    assert torch.isfinite(s_start.grad).all() and torch.isfinite(s_end.grad).all()


def test_unlabelled_rows_get_no_gradient_from_the_hard_labels():
    """With weight 0 (CE only) a NO_LABEL row's logits get exactly zero gradient; labelled rows do not."""
    from pipeline.text.features import NO_LABEL

    spans, ss, se, ts, te, starts, ends = make_batch(seed=7)
    starts, ends = starts.copy(), ends.copy()
    starts[1] = ends[1] = NO_LABEL
    parts, s_start, s_end = kdqa_loss(spans, ss, se, ts, te, starts, ends, 2.0, 0.0, requires_grad=True)
    parts.total.backward()
    for grad in (s_start.grad, s_end.grad):
        assert torch.all(grad[1] == 0)
        assert grad[0].abs().sum() > 0 and grad[2].abs().sum() > 0
