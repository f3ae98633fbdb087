"""One training step of the student: what `kdqa student` runs for every batch, and what bench/ times.

    forward (bf16 autocast on CUDA) -> distillation loss -> backward -> clip gradients -> AdamW step
    -> learning-rate schedule step (-> every few steps, freed memory handed back to the OS)
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys

import torch

from pipeline.losses import LossParts, distillation_loss
from pipeline.params import StudentParams

# glibc keeps the freed activations of batches of ever-different widths in its arenas, so the resident size
# creeps up with the number of steps. Handing them back every few steps keeps it nearly flat, at a cost too
# small to see in the step time (bench/performance.py measures the growth at 1x and 10x the data).
RELEASE_MEMORY_EVERY = 10
_LIBC = ctypes.CDLL(ctypes.util.find_library("c")) if sys.platform.startswith("linux") else None


def release_freed_memory() -> None:
    if _LIBC is not None and hasattr(_LIBC, "malloc_trim"):
        _LIBC.malloc_trim(0)


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


def train_step(model, batch: dict, optimizer, scheduler, student: StudentParams, step: int,
               device: torch.device) -> LossParts:
    """One optimizer step on `batch`; `step` counts the steps taken before this one. Returns the loss.

    `model` is what forward and backward run through (the DDP wrapper under torchrun). The teacher's logits
    come in the batch (`teacher_start`/`teacher_end`); without them, or at distillation weight 0, the loss is
    plain cross-entropy on the hard labels.
    """
    batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
    with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
        out = model(input_ids=batch["input_ids"], token_type_ids=batch["token_type_ids"],
                    attention_mask=batch["attention_mask"])
    loss = distillation_loss(
        out.start_logits, out.end_logits, batch["start_positions"], batch["end_positions"], batch["answer_mask"],
        batch.get("teacher_start"), batch.get("teacher_end"), student.temperature, student.distillation_weight,
    )
    optimizer.zero_grad(set_to_none=True)
    loss.total.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), student.max_grad_norm)
    optimizer.step()
    scheduler.step()
    if step % RELEASE_MEMORY_EVERY == 0:
        release_freed_memory()
    return loss
