"""Which extra shards (unlabeled data, augmented views) join the labelled ones in each epoch.

An epoch is one pass over the labelled rows plus about `ratio` extra rows per labelled row, taken as whole
shards so that the student keeps streaming shard by shard with flat memory. The extra shards are drawn
from a seeded shuffle of all of them, consumed in turn from epoch to epoch (a new shuffle once all have
been used), so every extra row is seen before any is seen twice and a ratio below 1 still covers the whole
extra set over enough epochs. The draw depends only on the seed, the epoch and the shard sizes: every rank
computes the same plan.
"""

from __future__ import annotations

import numpy as np


def extra_quota(labelled_rows: int, ratio: float) -> int:
    """How many extra rows an epoch asks for."""
    return int(round(ratio * labelled_rows))


def extra_shards_by_epoch(extra_rows: list[int], quota: int, seed: int, epochs: int) -> list[list[int]]:
    """For each epoch, the indices (into `extra_rows`) of the extra shards it reads.

    Shards are taken in the order of the running shuffle until their rows reach `quota` (the last one taken
    may overshoot it by less than a shard); an epoch never reads a shard twice, so a quota above the whole
    extra set means the whole set."""
    if not extra_rows or quota <= 0:
        return [[] for _ in range(epochs)]
    queue: list[int] = []
    cycle = 0
    plan = []
    for _ in range(epochs):
        taken: list[int] = []
        rows = 0
        while rows < quota and len(taken) < len(extra_rows):
            if not queue:
                fresh = np.random.default_rng([seed, 1, cycle]).permutation(len(extra_rows)).tolist()
                cycle += 1
                # Shards this epoch has already read go last: an epoch never reads a shard twice.
                queue = [i for i in fresh if i not in taken] + [i for i in fresh if i in taken]
            index = queue.pop(0)
            taken.append(index)
            rows += extra_rows[index]
        plan.append(taken)
    return plan
