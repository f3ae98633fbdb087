"""Running a QA model over features: length-aware batches, one host copy per batch, original order kept.

Used by the teacher stage, the student's evaluation and `QuestionAnswerer`, so all three see the same
logits for the same features.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from pipeline.shards import list_column_to_numpy, read_table
from pipeline.batching import pad_batch

INFERENCE_COLUMNS = ["feature_id", "input_ids", "token_type_ids", "context_start", "context_end"]


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
                 pad_token_id: int, device: torch.device, max_batch: int, max_tokens: int):
    """Start/end logits (float16, real tokens only) for each feature, in the given order."""
    lengths = np.fromiter((len(x) for x in input_ids), dtype=np.int64, count=len(input_ids))
    start_out: list = [None] * len(input_ids)
    end_out: list = [None] * len(input_ids)
    use_bf16 = device.type == "cuda"
    for rows in length_aware_batches(lengths, max_batch, max_tokens):
        batch = pad_batch([input_ids[i] for i in rows], [token_type_ids[i] for i in rows],
                          context_start[rows], context_end[rows], pad_token_id)
        inputs = {k: batch[k].to(device, non_blocking=True) for k in ("input_ids", "token_type_ids", "attention_mask")}
        with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=use_bf16):
            out = model(**inputs)
        # One device->host copy per batch (both heads stacked, already float16): the only sync.
        both = torch.stack([out.start_logits, out.end_logits]).to(torch.float16).cpu().numpy()
        for j, row in enumerate(rows):
            n = lengths[row]
            start_out[row] = both[0, j, :n]
            end_out[row] = both[1, j, :n]
    return start_out, end_out


def shard_logits(model, features_path: Path, pad_token_id: int, device: torch.device, max_batch: int, max_tokens: int):
    """(feature ids, start logits, end logits) for one features shard, in the shard's row order."""
    table = read_table(features_path, columns=INFERENCE_COLUMNS)
    start, end = model_logits(
        model,
        list_column_to_numpy(table.column("input_ids"), np.int64),
        list_column_to_numpy(table.column("token_type_ids"), np.int64),
        table.column("context_start").to_numpy(),
        table.column("context_end").to_numpy(),
        pad_token_id, device, max_batch, max_tokens,
    )
    return table.column("feature_id").to_pylist(), start, end
