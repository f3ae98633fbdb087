"""Attention with dropout for a training step on the CPU.

PyTorch's fused CPU attention kernel (scaled_dot_product_attention's flash path) takes no dropout, so a BERT
training step with attention dropout (0.1 in BERT's config) falls back to the unfused math path. That path keeps
the probabilities in float32 and draws its dropout mask as another float32 tensor the size of every attention
matrix, one Mersenne Twister draw per element: most of the step's attention time on a CPU, and three float32
copies of each attention matrix kept for the backward pass (bench/performance.py, row 2b, "PyTorch's attention").

`dropout_attention_forward` computes the same function, softmax(QK^T * scaling + mask) with dropout, then x V,
a few batch rows at a time (`ChunkedDropoutAttention`): each chunk's dropout mask is drawn as kdqa's CPU
dropout draws its masks (pipeline/model/dropout.py: 16 bits per element, the probability rounded to 1/65536),
from a generator seeded from the call's seed and the chunk, and the backward pass recomputes the chunk's
probabilities and draws its mask again, so only Q, K and V are kept. The matrices stay in the step's precision
(bfloat16 under autocast, where the fallback upcasts to float32: on a 6-layer MiniLM that adds about a tenth to
the logits' difference from float32 that autocast makes anyway). Everything else (inference, CUDA, no dropout)
goes to PyTorch's SDPA unchanged.
"""

from __future__ import annotations

import torch

from pipeline.model.dropout import draw_keep_mask

NAME = "kdqa_cpu_dropout"  # the name registered with transformers' AttentionInterface


# Batch rows per chunk: about this many attention-matrix elements at a time (a few MB in bfloat16), so a chunk's
# temporaries stay in cache and the process never holds more than one chunk's matrices.
CHUNK_ELEMENTS = 1 << 20


def chunk_keep_mask(seed: int, first_row: int, shape: torch.Size, p: float) -> tuple[torch.Tensor, float]:
    """The dropout mask of the chunk starting at batch row `first_row`: its own generator, seeded from the
    call's seed and the row, so the backward pass draws the very mask the forward pass used."""
    return draw_keep_mask(shape, p, torch.Generator().manual_seed(seed + first_row))


def chunk_rows(query: torch.Tensor) -> int:
    batch, heads, length = query.shape[0], query.shape[1], query.shape[2]
    return max(1, min(batch, CHUNK_ELEMENTS // max(1, heads * length * length)))


def _probabilities(q, k, mask, scaling):
    scores = torch.matmul(q * scaling, k.transpose(-1, -2))
    if mask is not None:
        if mask.dtype == torch.bool:
            scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
        else:  # additive (0 or a large negative number): in the scores' dtype, not promoted to float32
            scores = scores + mask.to(scores.dtype)
    return torch.softmax(scores, dim=-1)


def _rows(mask, i, j):
    return None if mask is None else mask if mask.shape[0] == 1 else mask[i:j]


class ChunkedDropoutAttention(torch.autograd.Function):
    """softmax(QK^T * scaling + mask), dropout, x V, a few batch rows at a time. Only Q, K, V and the mask are
    kept for the backward pass, which recomputes each chunk's probabilities and redraws its dropout mask: no
    attention matrix outlives its chunk (what PyTorch's fused kernel does for attention without dropout). Under
    gradient checkpointing as well: keeping them for the recomputed layer instead saved 4% of the training loop's
    time and cost 4% more peak memory, the one thing checkpointing is for (docs/results.md)."""

    @staticmethod
    def forward(ctx, query, key, value, mask, dropout, scaling, seed):
        rows = chunk_rows(query)
        output = torch.empty_like(query)
        for i in range(0, query.shape[0], rows):
            j = min(i + rows, query.shape[0])
            probs = _probabilities(query[i:j], key[i:j], _rows(mask, i, j), scaling)
            keep, scale = chunk_keep_mask(seed, i, probs.shape, dropout)
            # Scale the [.., length, head_dim] product rather than the [.., length, length] probabilities.
            torch.matmul(torch.where(keep, probs, 0), value[i:j], out=output[i:j])
            output[i:j] *= scale
        ctx.save_for_backward(query, key, value, mask)
        ctx.dropout, ctx.scaling, ctx.seed, ctx.scale = dropout, scaling, seed, scale
        return output

    @staticmethod
    def backward(ctx, grad_output):
        query, key, value, mask = ctx.saved_tensors
        grad_output = grad_output.to(query.dtype) * ctx.scale
        grads = [torch.empty_like(t) for t in (query, key, value)]
        rows = chunk_rows(query)
        for i in range(0, query.shape[0], rows):
            j = min(i + rows, query.shape[0])
            probs = _probabilities(query[i:j], key[i:j], _rows(mask, i, j), ctx.scaling)
            keep, _ = chunk_keep_mask(ctx.seed, i, probs.shape, ctx.dropout)
            go = grad_output[i:j]
            torch.matmul(torch.where(keep, probs, 0).transpose(-1, -2), go, out=grads[2][i:j])  # dV = P_kept^T dO
            grad_probs = torch.where(keep, torch.matmul(go, value[i:j].transpose(-1, -2)), 0)
            grad_scores = torch._softmax_backward_data(grad_probs, probs, -1, probs.dtype)
            torch.matmul(grad_scores, key[i:j], out=grads[0][i:j])  # dQ = dS K * scaling
            grads[0][i:j] *= ctx.scaling
            torch.matmul(grad_scores.transpose(-1, -2), query[i:j], out=grads[1][i:j])  # dK = dS^T Q * scaling
            grads[1][i:j] *= ctx.scaling
        return grads[0], grads[1], grads[2], None, None, None, None


def dropout_attention(query, key, value, attention_mask, dropout: float, scaling: float) -> torch.Tensor:
    """softmax(QK^T * scaling + mask), dropout, x V; [batch, heads, length, head_dim] in and out.
    attention_mask: None, boolean (True = attend) or additive, broadcastable to the scores. The dropout masks
    come from a seed drawn from torch's default generator (seeded by student.seed, saved by checkpoints, and
    restored by gradient checkpointing's recomputation)."""
    dtype = query.dtype
    seed = int(torch.randint(0, 2**62, (1,)))
    with torch.autocast(query.device.type, enabled=False):
        return ChunkedDropoutAttention.apply(query, key.to(dtype), value.to(dtype), attention_mask, dropout,
                                             scaling, seed)


def dropout_attention_forward(module, query, key, value, attention_mask, dropout: float = 0.0,
                              scaling: float | None = None, **kwargs):
    """transformers' attention-function interface: [batch, length, heads, head_dim] out, no weights."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    plain_encoder = (kwargs.get("position_bias") is None and not kwargs.get("is_causal")
                     and not getattr(module, "is_causal", False) and not getattr(module, "num_key_value_groups", 1) > 1)
    if dropout == 0.0 or query.device.type != "cpu" or not plain_encoder:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    scaling = query.shape[-1] ** -0.5 if scaling is None else scaling
    output = dropout_attention(query, key, value, attention_mask, dropout, scaling)
    return output.transpose(1, 2).contiguous(), None


def use_dropout_attention(model) -> bool:
    """Run `model`'s attention through `dropout_attention_forward` if it runs PyTorch's SDPA now; True if so."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

    if getattr(model.config, "_attn_implementation", None) != "sdpa":
        return False
    AttentionInterface.register(NAME, dropout_attention_forward)
    # The padding mask SDPA gets. transformers builds no mask at all for an attention name it has no mask
    # function for (it assumes the backend masks by itself), which would let every row attend to padding.
    ALL_MASK_ATTENTION_FUNCTIONS.register(NAME, sdpa_mask)
    model.set_attn_implementation(NAME)
    return True

