"""One training step of the student: what `kdqa student` runs for every batch, and what bench/ times.

    forward (autocast in `student.precision`) -> distillation loss (float32) -> backward -> clip gradients
    -> AdamW step (float32 weights; float16: through a gradient scaler) -> learning-rate schedule step
    (-> every few steps, freed memory handed back to the OS)
"""

from __future__ import annotations

import torch

from pipeline.allocator import release_freed_memory
from pipeline.errors import KdqaError
from pipeline.inference import autocast_dtype
from pipeline.losses import LossParts, distillation_loss
from pipeline.params import StudentParams

# glibc keeps the freed activations of batches of ever-different widths in its arenas, so the resident size
# creeps up with the number of steps. Handing them back every few steps keeps it nearly flat, at a cost too
# small to see in the step time (bench/performance.py measures the growth at 1x and 10x the data).
RELEASE_MEMORY_EVERY = 10


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
    bfloat16 where the hardware computes it natively (`pipeline.inference.autocast_dtype`). float16 needs a
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
        batch.get("teacher_mask"),
    )
    optimizer.zero_grad(set_to_none=True)
    if scaler is None:
        loss.total.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), student.max_grad_norm)
        optimizer.step()
    else:
        scaler.scale(loss.total).backward()
        scaler.unscale_(optimizer)  # clip the true gradients
        torch.nn.utils.clip_grad_norm_(model.parameters(), student.max_grad_norm)
        scaler.step(optimizer)  # skipped when a gradient overflowed; the scale then shrinks
        scaler.update()
    scheduler.step()
    if step % RELEASE_MEMORY_EVERY == 0:
        release_freed_memory()
    return loss
