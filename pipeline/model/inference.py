"""Running a QA model over features: length-aware batches, one host copy per batch, original order kept.

Used by the teacher stage, the student's evaluation and `QuestionAnswerer`, so all three see the same
logits for the same features.
"""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np
import torch

from pipeline.model.batching import pad_batch
from pipeline.store.features import read_model_inputs

PRECISIONS = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": None}


@functools.cache  # asked on every training step
def cpu_has_native_bf16() -> bool:
    """AVX512-BF16 or AMX: the CPU multiplies bfloat16 in hardware (elsewhere it is emulated, and slower)."""
    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")  # torch.cpu, private but long-standing
    return any(getattr(torch.cpu, name, lambda: False)() for name in checks)


def autocast_dtype(device: torch.device, precision: str = "auto") -> torch.dtype | None:
    """The dtype inference runs in under autocast (None: plain float32). `auto` is bfloat16 wherever the
    hardware computes it natively, and so faster than float32 (bench/performance.py compares the two): CUDA,
    and CPUs with AVX512-BF16/AMX; float32 elsewhere. The logits are stored as float16 either way."""
    if precision == "auto":
        native = device.type == "cuda" or (device.type == "cpu" and cpu_has_native_bf16())
        return torch.bfloat16 if native else None
    return PRECISIONS[precision]


def precision_name(dtype: torch.dtype | None) -> str:
    """"bfloat16", "float16" or "float32" (None: no autocast), as the manifest and the benchmark record it."""
    return str(dtype).removeprefix("torch.") if dtype is not None else "float32"


def default_autocast(device: torch.device) -> torch.dtype | None:
    """Evaluation and `QuestionAnswerer`: bfloat16 on CUDA, float32 on CPU (scores as trained and reported)."""
    return torch.bfloat16 if device.type == "cuda" else None


def length_aware_batches(lengths: np.ndarray, max_batch: int, max_tokens: int) -> list[np.ndarray]:
    """Row indices grouped longest-first so each batch pads to a similar length, capped by padded tokens."""
    order = np.argsort(-lengths, kind="stable")
    batches, lo = [], 0
    while lo < len(order):
        longest = int(lengths[order[lo]])
        size = max(1, min(max_batch, max_tokens // max(longest, 1)))
        batches.append(order[lo : lo + size])
        lo += size
    return batches


@torch.inference_mode()
def model_logits(model, input_ids: list[np.ndarray], token_type_ids: list[np.ndarray], context_start, context_end,
                 pad_token_id: int, device: torch.device, max_batch: int, max_tokens: int,
                 dtype: torch.dtype | None | str = "default", logits_dtype: torch.dtype = torch.float16,
                 multiple: int = 1):
    """Start/end logits (float16, real tokens only) for each feature, in the given order. dtype: the autocast
    dtype (None = float32); "default" = `default_autocast(device)`. logits_dtype: float32 to compare models
    at full precision (the ONNX export's check). multiple: batch widths rounded up to it (`pad_batch`)."""
    lengths = np.fromiter((len(x) for x in input_ids), dtype=np.int64, count=len(input_ids))
    start_out: list = [None] * len(input_ids)
    end_out: list = [None] * len(input_ids)
    dtype = default_autocast(device) if dtype == "default" else dtype
    for rows in length_aware_batches(lengths, max_batch, max_tokens):
        batch = pad_batch([input_ids[i] for i in rows], [token_type_ids[i] for i in rows],
                          context_start[rows], context_end[rows], pad_token_id, multiple,
                          max_width=getattr(model.config, "max_position_embeddings", None), with_answer_mask=False)
        inputs = {k: batch[k].to(device, non_blocking=True) for k in ("input_ids", "token_type_ids", "attention_mask")}
        with torch.autocast(device_type=device.type, dtype=dtype or torch.bfloat16, enabled=dtype is not None):
            out = model(**inputs)
        # One device->host copy per batch (both heads stacked, already float16): the only sync.
        both = torch.stack([out.start_logits, out.end_logits]).to(logits_dtype).cpu().numpy()
        for j, row in enumerate(rows):
            n = lengths[row]
            start_out[row] = both[0, j, :n]
            end_out[row] = both[1, j, :n]
    return start_out, end_out


def shard_logits(model, features_path: Path, pad_token_id: int, device: torch.device, max_batch: int, max_tokens: int,
                 dtype: torch.dtype | None | str = "default", logits_dtype: torch.dtype = torch.float16,
                 multiple: int = 1):
    """(feature ids, start logits, end logits) for one features shard, in the shard's row order."""
    rows = read_model_inputs(features_path)
    start, end = model_logits(
        model, rows.input_ids, rows.token_type_ids, rows.context_start, rows.context_end,
        pad_token_id, device, max_batch, max_tokens, dtype, logits_dtype, multiple,
    )
    return rows.feature_ids.to_pylist(), start, end


def features_logits(model, features: list[dict], pad_token_id: int, device: torch.device, max_batch: int,
                    max_tokens: int, dtype: torch.dtype | None | str = "default", multiple: int = 1):
    """(start logits, end logits) for features held in memory (`text.features.tokenize_examples`' dicts), in order."""
    return model_logits(model, [f["input_ids"] for f in features], [f["token_type_ids"] for f in features],
                        np.array([f["context_start"] for f in features]), np.array([f["context_end"] for f in features]),
                        pad_token_id, device, max_batch, max_tokens, dtype, multiple=multiple)
