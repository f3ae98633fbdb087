"""Dropout masks for a training step on the CPU, drawn 16 bits per element from 64-bit random words.

PyTorch's CPU dropout draws one random number per element (`bernoulli_`): on a 3-layer MiniLM student's step
(batch 16, 256 tokens, bfloat16, gradient checkpointing) its 13 hidden-dropout calls were the largest cost after
the matrix products (torch.profiler, `python -m bench.performance --profile-steps`). A mask drawn as four 16-bit
numbers per 64-bit word of the same generator costs a third as much to draw and apply (one [16, 230, 384]
bfloat16 activation on a 2-core Zen 4: 3.4 ms against 9.0 ms for F.dropout). The dropout
probability is rounded to a multiple of 1/65536 (0.1 -> 0.1000061) and kept values are scaled by
1/(1 - that probability), so the expectation is exact. kdqa's CPU attention (pipeline/model/attention.py) draws
its masks the same way.

`use_cpu_dropout` puts `CpuDropout` in place of a model's `nn.Dropout` modules (`student.dropout_masks: auto`).
On any other device, and in evaluation, it is PyTorch's dropout itself. Its masks come from torch's default
generator, which `student.seed` seeds, the student's checkpoints save and gradient checkpointing's
recomputation restores: a recomputed layer drops what it dropped the first time.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def draw_keep_mask(shape: torch.Size, p: float, generator: torch.Generator | None) -> tuple[torch.Tensor, float]:
    """Boolean mask of kept elements, each dropped with probability `p` rounded to 1/65536; and the kept
    elements' scale 1/(1 - rounded p). `generator` None: torch's default generator."""
    threshold = round(p * 65536)
    n = shape.numel()
    words = torch.randint(-2**63, 2**63 - 1, ((n + 3) // 4,), dtype=torch.int64, generator=generator)
    sixteen_bits = words.view(torch.int16)[:n].view(shape)  # uniform on [-32768, 32767]
    keep = sixteen_bits >= -32768 + threshold
    return keep, 1.0 / (1.0 - threshold / 65536)


class CpuDropout(torch.nn.Dropout):
    """nn.Dropout whose training-mode CPU masks are `draw_keep_mask`'s. Only the boolean mask is kept for the
    backward pass, as PyTorch's own dropout keeps it."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0 or x.device.type != "cpu" or self.inplace:
            return F.dropout(x, self.p, self.training, self.inplace)
        keep, scale = draw_keep_mask(x.shape, self.p, None)
        return torch.where(keep, x, 0).mul_(scale)  # where's backward needs the mask only, not its output


def use_cpu_dropout(model: torch.nn.Module) -> int:
    """Replace every `nn.Dropout` of `model` by a `CpuDropout` of the same probability; returns how many. The
    modules hold no weights: the saved model is the same."""
    replaced = 0
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if type(child) is torch.nn.Dropout:
                setattr(module, name, CpuDropout(child.p, child.inplace))
                replaced += 1
    return replaced
