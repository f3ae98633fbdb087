"""The student step's speed options change how batches are formed and in which precision the step runs, never
what is learnt from: length-grouped batches hold every row once per epoch with its own targets."""

from __future__ import annotations

import numpy as np
import pyarrow.parquet as pq

from pipeline.batching import length_grouped_batches


def padding_fraction(lengths: np.ndarray, batches: list[np.ndarray]) -> float:
    padded = sum(len(b) * int(lengths[b].max()) for b in batches)
    return 1 - int(lengths.sum()) / padded


def test_length_grouped_batches_hold_every_row_once_with_little_padding():
    lengths = np.random.default_rng(0).integers(20, 257, size=1003)
    batches = length_grouped_batches(lengths, 16, np.random.default_rng(1), group_batches=8)
    rows = np.concatenate(batches)
    assert sorted(rows.tolist()) == list(range(1003))
    assert len(batches) == -(-1003 // 16) and sum(len(b) < 16 for b in batches) == 1  # as consecutive slices
    order = np.random.default_rng(1).permutation(1003)
    random_batches = [order[i : i + 16] for i in range(0, 1003, 16)]
    assert padding_fraction(lengths, batches) < 0.1 < 0.3 < padding_fraction(lengths, random_batches)
    # The batches come in random order, not longest first: short and long batches alternate.
    longest = [int(lengths[b].max()) for b in batches]
    assert longest != sorted(longest, reverse=True) and longest != sorted(longest)
    # Reproducible from the generator's seed; another seed (epoch) pairs rows differently.
    again = length_grouped_batches(lengths, 16, np.random.default_rng(1), group_batches=8)
    assert all(np.array_equal(a, b) for a, b in zip(batches, again))
    other = length_grouped_batches(lengths, 16, np.random.default_rng(2), group_batches=8)
    pairs = {frozenset(b.tolist()) for b in batches}
    assert len(pairs & {frozenset(b.tolist()) for b in other}) < len(batches) // 4


def test_grouped_stream_gives_every_feature_its_own_targets_once(prepared_run):
    from pipeline.stream import ShardStream, find_shard_pairs

    targets = {}
    for fp in sorted((prepared_run / "data/features/train").glob("part-*.parquet")):
        logits = pq.read_table(prepared_run / "data/teacher/train" / fp.name).to_pylist()
        for f, t in zip(pq.read_table(fp).to_pylist(), logits):
            targets[tuple(f["input_ids"])] = (f["start_position"], f["end_position"], t["start_logits"])
    pairs = find_shard_pairs(prepared_run / "data/features/train", prepared_run / "data/teacher/train")
    stream = ShardStream(pairs, 3, 7, pad_token_id=0, group_by_length=True)
    seen = []
    for epoch in (0, 1):
        stream.epoch = epoch
        batches = list(stream)
        assert len(batches) == stream.steps_in_epoch(epoch)
        keys = []
        for b in batches:
            for i, n in enumerate(b["attention_mask"].sum(1).tolist()):
                key = tuple(b["input_ids"][i, :n].tolist())
                start, end, teacher_start = targets[key]
                assert (int(b["start_positions"][i]), int(b["end_positions"][i])) == (start, end)
                np.testing.assert_array_equal(b["teacher_start"][i, :n].numpy(), np.asarray(teacher_start, np.float32))
                keys.append(key)
        assert sorted(keys) == sorted(targets)  # every feature exactly once per epoch
        seen.append(keys)
    assert seen[0] != seen[1]  # reshuffled every epoch
