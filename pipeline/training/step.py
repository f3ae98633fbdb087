"""One training step of the student: what `kdqa student` runs for every batch, and what bench/ times.

    forward (autocast in `student.precision`) -> distillation loss (float32) -> backward -> clip gradients
    -> AdamW step (float32 weights; float16: through a gradient scaler) -> learning-rate schedule step
    (-> every few steps, freed memory handed back to the OS)
"""

from __future__ import annotations

import torch

from pipeline.runtime.allocator import release_freed_memory
from pipeline.runtime.errors import KdqaError
from pipeline.model.inference import autocast_dtype
from pipeline.model.losses import LossParts, distillation_loss
from pipeline.params import StudentParams

# glibc keeps the freed activations of batches of ever-different widths in its arenas, so the resident size
# creeps up with the number of steps. Handing them back every few steps keeps it nearly flat, at a cost too
# small to see in the step time (bench/performance.py measures the growth at 1x and 10x the data).
RELEASE_MEMORY_EVERY = 10


# float16 only: the gradient scaler halves its scale at every step whose gradients overflow and skips that step
# (normal for a few steps at the start: it starts at 2**16). Once it is below 1, the gradients overflow even
# unscaled: the run has diverged, not the scale.
MIN_LOSS_SCALE = 1.0


class DivergedError(KdqaError):
    """A training step whose loss or gradients are not finite (NaN or infinite).

    kdqa stops at the first such step in float32 and bfloat16 (bfloat16 has float32's exponent range, so a
    non-finite value there is divergence, not an overflow that a smaller scale would avoid). In float16 the
    gradient scaler skips overflowing steps as designed, and kdqa stops when the loss itself is not finite or
    the scale has collapsed (MIN_LOSS_SCALE). Either way the step's update is never applied."""

    def __init__(self, step: int, what: str, student: StudentParams):
        self.step = step
        super().__init__(
            f"student: step {step}: the {what} {'is' if what == 'loss' else 'are'} not finite (NaN or infinite): "
            f"training diverged and was stopped "
            f"before this step's update. Likely cause: student.learning_rate {student.learning_rate:g} (usual: "
            f"1e-5 to 1e-4; a forgotten minus makes 3e-5 into 3e5), else student.temperature "
            f"{student.temperature:g} or student.max_grad_norm {student.max_grad_norm:g}")


def build_optimizer(model, learning_rate: float, weight_decay: float, device: torch.device) -> torch.optim.AdamW:
    """AdamW without weight decay on biases and LayerNorm weights. `fused` runs the whole update as one kernel
    (CUDA) or one vectorised loop (CPU) instead of a loop over the tensors, which is a visible part of a small
    student's step (bench/performance.py times the step)."""
    no_decay = ("bias", "LayerNorm.weight", "layer_norm.weight")
    groups = [
        {"params": [p for n, p in model.named_parameters() if not n.endswith(no_decay)], "weight_decay": weight_decay},
        {"params": [p for n, p in model.named_parameters() if n.endswith(no_decay)], "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=learning_rate, fused=device.type in ("cpu", "cuda"))


def training_dtype(device: torch.device, precision: str) -> torch.dtype | None:
    """The autocast dtype of the student's step for `student.precision` (None: plain float32); `auto` is
    bfloat16 where the hardware computes it natively (`pipeline.model.inference.autocast_dtype`). float16 needs a
    gradient scaler, which kdqa runs on CUDA only."""
    dtype = autocast_dtype(device, precision)
    if dtype == torch.float16 and device.type != "cuda":
        raise KdqaError(f"student.precision: float16 trains on CUDA only (it needs a gradient scaler); "
                        f"on {device.type} use bfloat16 or float32")
    return dtype


def grad_scaler(dtype: torch.dtype | None):
    """float16 gradients underflow without loss scaling; bfloat16 has float32's range and needs none."""
    return torch.amp.GradScaler("cuda") if dtype == torch.float16 else None


def train_step(model, batch: dict, optimizer, scheduler, student: StudentParams, step: int,
               device: torch.device, scaler=None) -> LossParts:
    """One optimizer step on `batch`; `step` counts the steps taken before this one. Returns the loss.

    `model` is what forward and backward run through (the DDP wrapper under torchrun). The teacher's logits
    come in the batch (`teacher_start`/`teacher_end`); without them, or at distillation weight 0, the loss is
    plain cross-entropy on the hard labels. `scaler`: `grad_scaler(...)` for float16, else None.
    """
    batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
    dtype = training_dtype(device, student.precision)
    with torch.autocast(device_type=device.type, dtype=dtype or torch.bfloat16, enabled=dtype is not None):
        out = model(input_ids=batch["input_ids"], token_type_ids=batch["token_type_ids"],
                    attention_mask=batch["attention_mask"])
    loss = distillation_loss(
        out.start_logits, out.end_logits, batch["start_positions"], batch["end_positions"], batch["answer_mask"],
        batch.get("teacher_start"), batch.get("teacher_end"), student.temperature, student.distillation_weight,
        batch.get("teacher_mask"), batch.get("target_weight"),
    )
    optimizer.zero_grad(set_to_none=True)
    if scaler is None:
        loss.total.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), student.max_grad_norm)
        # Checked before the weights change, so they stay those of the last finite step. Under DDP the gradient
        # norm is the same on every rank (gradients are averaged), so all ranks stop at the same step.
        if not bool(torch.isfinite(torch.stack([loss.total.detach().float(), grad_norm.float()])).all()):
            raise DivergedError(step + 1, "loss" if not torch.isfinite(loss.total) else "gradients", student)
        optimizer.step()
    else:
        if not torch.isfinite(loss.total):  # the scaler handles overflowing gradients, not a non-finite loss
            raise DivergedError(step + 1, "loss", student)
        scaler.scale(loss.total).backward()
        scaler.unscale_(optimizer)  # clip the true gradients
        torch.nn.utils.clip_grad_norm_(model.parameters(), student.max_grad_norm)
        scaler.step(optimizer)  # skipped when a gradient overflowed; the scale then shrinks
        scaler.update()
        if scaler.get_scale() < MIN_LOSS_SCALE:  # halved at every skipped step: overflow even unscaled
            raise DivergedError(step + 1, "gradients", student)
    scheduler.step()
    if step % RELEASE_MEMORY_EVERY == 0:
        release_freed_memory()
    return loss
