"""Padding features into model batches: to the longest feature of the batch, never to max_seq_len.

Shared by the teacher's inference and the student's stream, so both see identical inputs for a feature.
"""

from __future__ import annotations

import numpy as np
import torch

# The logit of a position that can hold no answer, for the losses and the ensemble's targets: fits in bf16/fp16,
# and exp(MASKED / T) underflows to 0 for any T we use.
MASKED = -1e4


def answer_mask(context_start, context_end, width: int) -> torch.Tensor:
    """True at CLS and at the context tokens of each row: the only places an answer can start or end."""
    positions = torch.arange(width)
    # Each row's first and last context token; copied (a batch's worth), as Arrow's columns are read-only.
    first = torch.tensor(np.asarray(context_start)).unsqueeze(1)
    last = torch.tensor(np.asarray(context_end)).unsqueeze(1)
    mask = (positions >= first) & (positions <= last)
    mask[:, 0] = True
    return mask


def pad_batch(input_ids: list[np.ndarray], token_type_ids: list[np.ndarray], context_start, context_end,
              pad_token_id: int, multiple: int = 1, max_width: int | None = None,
              with_answer_mask: bool = True) -> dict[str, torch.Tensor]:
    """Model inputs for a list of features, padded to the longest one (not to max_seq_len), rounded up to a
    `multiple` of tokens but not past `max_width` (the model's position table). Rounding keeps the number of
    distinct batch shapes small: in a long training run every new width costs allocator arenas and
    oneDNN/CUDA kernel caches that are not given back. with_answer_mask: also the losses' answer mask
    (inference needs none)."""
    lengths = [len(x) for x in input_ids]
    width = -(-max(lengths) // multiple) * multiple
    if max_width is not None:
        width = max(max(lengths), min(width, max_width))
    ids = np.full((len(input_ids), width), pad_token_id, dtype=np.int64)
    types = np.zeros((len(input_ids), width), dtype=np.int64)
    attention = np.zeros((len(input_ids), width), dtype=np.int64)
    for i, (x, t) in enumerate(zip(input_ids, token_type_ids)):
        ids[i, : len(x)] = x
        types[i, : len(t)] = t
        attention[i, : len(x)] = 1
    batch = {
        "input_ids": torch.from_numpy(ids),
        "token_type_ids": torch.from_numpy(types),
        "attention_mask": torch.from_numpy(attention),
    }
    if with_answer_mask:
        batch["answer_mask"] = answer_mask(np.asarray(context_start), np.asarray(context_end), width)
    return batch


def pad_logits(rows: list[np.ndarray], width: int) -> torch.Tensor:
    out = np.zeros((len(rows), width), dtype=np.float32)
    for i, r in enumerate(rows):
        out[i, : len(r)] = r
    return torch.from_numpy(out)


def length_grouped_batches(lengths: np.ndarray, batch_size: int, rng: np.random.Generator,
                           group_batches: int) -> list[np.ndarray]:
    """Row indices cut into batches of rows of similar length, the batches in random order.

    A random permutation of the rows is cut into groups of `group_batches` batches; each group is sorted by
    length and cut into batches; then all batches are shuffled. Which rows meet in a batch still changes every
    epoch (the groups are random), only their lengths are alike, so little of a batch is padding. As with
    consecutive slices of a permutation, only the last batch can be short: the same number of batches."""
    order = rng.permutation(len(lengths))
    span = batch_size * group_batches
    batches = []
    for lo in range(0, len(order), span):
        group = order[lo : lo + span]
        group = group[np.argsort(-lengths[group], kind="stable")]
        batches += [group[i : i + batch_size] for i in range(0, len(group), batch_size)]
    return [batches[i] for i in rng.permutation(len(batches))]
