"""Streaming (features shard, teacher logits shard) pairs into padded training batches.

The student never holds the dataset in memory: each DataLoader worker reads whole shard pairs, checks that
their feature ids agree row for row, shuffles the rows of the shard (seeded by seed, epoch and shard) and
yields batches padded to their longest feature; with `group_by_length`, rows of similar length share a batch
and the batches come in random order. Shard order is reshuffled every epoch with the same seed
on every rank; under DDP each rank takes a disjoint slice of that order. Extra shards (rows only the teacher
labelled) join the labelled ones epoch by epoch, as pipeline/training/mixing.py plans. With several teachers
each batch still carries one target: their logits are combined here, in the loader's workers
(pipeline/model/ensemble.py), so the training step does the same work as with one teacher.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from pipeline.model.batching import length_grouped_batches, pad_batch, pad_logits
from pipeline.model.ensemble import Combination, ensemble_targets
from pipeline.runtime.errors import KdqaError
from pipeline.training.mixing import extra_quota, extra_shards_by_epoch
from pipeline.store.features import read_feature_ids, read_training_rows
from pipeline.store.logits import read_logits, teacher_folders
from pipeline.store.shards import list_shards, shard_rows

# group_by_length sorts groups of this many batches of random rows by length: enough to remove nearly all the
# padding that sorting a whole shard would (padding fractions: bench/performance.py), small enough that rows
# still meet different partners every epoch.
GROUP_BATCHES = 32


@dataclass(frozen=True)
class ShardPair:
    features_path: Path
    logits_path: Path | None  # None when training on hard labels only; with several teachers, the first one's
    rows: int
    more_logits: tuple[Path, ...] = ()  # the other teachers' logits of the same features (teacher.models[1:])

    @property
    def teacher_shards(self) -> tuple[Path, ...]:
        return () if self.logits_path is None else (self.logits_path, *self.more_logits)


def find_shard_pairs(features_dir: Path, logits_dir: Path | None) -> list[ShardPair]:
    """Pair each features shard with the logits shard of the same name (of every teacher); counts must agree."""
    features = list_shards(features_dir)
    if not features:
        raise KdqaError(f"{features_dir}: no feature shards (run `kdqa prepare`)")
    folders = [] if logits_dir is None else teacher_folders(logits_dir)
    pairs = []
    for path in features:
        rows = shard_rows(path)
        logits = [folder / path.name for folder in folders]
        for shard in logits:
            if not shard.exists():
                raise KdqaError(f"{shard}: missing logits shard for {path} (run `kdqa teacher`)")
            logit_rows = shard_rows(shard)
            if logit_rows != rows:
                raise KdqaError(f"{shard}: {logit_rows} rows but {path} has {rows} (run `kdqa teacher`)")
        pairs.append(ShardPair(path, logits[0] if logits else None, rows, tuple(logits[1:])))
    for folder in folders:
        extra = {p.name for p in list_shards(folder)} - {p.name for p in features}
        if extra:
            raise KdqaError(f"{folder}: logits shards without features: {', '.join(sorted(extra))}")
    return pairs


def check_feature_ids(pair: ShardPair, feature_ids, logit_ids, logits_path: Path) -> None:
    """Rows must be the same features in the same order; anything else would train on wrong targets."""
    if len(feature_ids) != len(logit_ids):
        raise KdqaError(f"{logits_path}: {len(logit_ids)} rows but {pair.features_path} has "
                        f"{len(feature_ids)}")
    if not feature_ids.equals(logit_ids):
        a, b = feature_ids.to_pylist(), logit_ids.to_pylist()
        row = next(i for i in range(len(a)) if a[i] != b[i])
        raise KdqaError(f"{logits_path}: row {row} holds feature {b[row]!r} but {pair.features_path} "
                        f"has {a[row]!r}")


class ShardStream(IterableDataset):
    """One epoch of training batches for one rank; set `epoch` before each pass."""

    def __init__(self, pairs: list[ShardPair], batch_size: int, seed: int, pad_token_id: int,
                 rank: int = 0, world_size: int = 1, pad_to_multiple_of: int = 1, max_width: int | None = None,
                 group_by_length: bool = False, extra: list[ShardPair] = (), extra_ratio: float = 0.0,
                 combination: Combination | None = None):
        # `pairs` are the labelled shards, every epoch; `extra` (teacher-labelled rows) join about
        # `extra_ratio` rows per labelled row each epoch, as whole shards (pipeline/training/mixing.py).
        # `combination`: how several teachers' logits become the one target (None: one teacher, as stored).
        self.combination = combination
        self.labelled_shards = len(pairs)
        self.pairs = list(pairs) + list(extra)
        self.extra_quota = extra_quota(sum(p.rows for p in pairs), extra_ratio) if extra else 0
        self.group_by_length = group_by_length
        self.pad_to_multiple_of, self.max_width = pad_to_multiple_of, max_width  # batch width rounding
        self.batch_size = batch_size
        self.seed = seed
        self.pad_token_id = pad_token_id
        self.rank = rank
        self.world_size = world_size
        self.epoch = 0

    # --- the plan of an epoch: which shards each rank reads, and how many steps every rank takes ---
    def shard_order(self, epoch: int) -> list[int]:
        chosen = list(range(self.labelled_shards)) + [self.labelled_shards + i for i in self.extra_shards(epoch)]
        return [chosen[i] for i in np.random.default_rng([self.seed, epoch]).permutation(len(chosen))]

    def extra_shards(self, epoch: int) -> list[int]:
        """Which extra shards this epoch reads (indices among the extra ones)."""
        rows = [p.rows for p in self.pairs[self.labelled_shards :]]
        return extra_shards_by_epoch(rows, self.extra_quota, self.seed, epoch + 1)[epoch]

    def rank_shards(self, epoch: int, rank: int) -> list[int]:
        return self.shard_order(epoch)[rank :: self.world_size]

    def batches_per_rank(self, epoch: int, rank: int) -> int:
        return sum(math.ceil(self.pairs[i].rows / self.batch_size) for i in self.rank_shards(epoch, rank))

    def steps_in_epoch(self, epoch: int) -> int:
        """Every rank stops after the same number of steps (the smallest), so DDP never waits on a rank."""
        return min(self.batches_per_rank(epoch, r) for r in range(self.world_size))

    # --- reading ---
    def __iter__(self):
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        mine = self.rank_shards(self.epoch, self.rank)[worker::workers]
        for shard_index in mine:
            yield from self.shard_batches(shard_index)

    def shard_batches(self, shard_index: int):
        pair = self.pairs[shard_index]
        rows = read_training_rows(pair.features_path)
        input_ids, token_types, context_start, context_end = (rows.input_ids, rows.token_type_ids,
                                                              rows.context_start, rows.context_end)
        start_positions, end_positions = rows.start_positions, rows.end_positions
        teachers = []  # per teacher: (start rows, end rows)
        for shard in pair.teacher_shards:  # the teachers' logits, or a teacher's targets aligned onto these features
            logit_ids, t_start, t_end = read_logits(shard)
            check_feature_ids(pair, rows.feature_ids, logit_ids, shard)
            for row, (ids, ts) in enumerate(zip(input_ids, t_start)):
                if len(ids) != len(ts):
                    raise KdqaError(f"{shard}: row {row} has {len(ts)} logits for {len(ids)} tokens")
            teachers.append((t_start, t_end))

        rng = np.random.default_rng([self.seed, self.epoch, shard_index])
        if self.group_by_length:
            lengths = np.fromiter((len(x) for x in input_ids), dtype=np.int64, count=len(input_ids))
            plan = length_grouped_batches(lengths, self.batch_size, rng, GROUP_BATCHES)
        else:
            order = rng.permutation(pair.rows)
            plan = [order[lo : lo + self.batch_size] for lo in range(0, pair.rows, self.batch_size)]
        for rows in plan:
            batch = pad_batch([input_ids[i] for i in rows], [token_types[i] for i in rows],
                              context_start[rows], context_end[rows], self.pad_token_id,
                              self.pad_to_multiple_of, self.max_width)
            batch["start_positions"] = torch.from_numpy(start_positions[rows])
            batch["end_positions"] = torch.from_numpy(end_positions[rows])
            width = batch["input_ids"].shape[1]
            if len(teachers) == 1 and self.combination is None:
                t_start, t_end = teachers[0]
                batch.update(teacher_targets([t_start[i] for i in rows], [t_end[i] for i in rows], width))
            elif teachers:
                start, end = (torch.stack([pad_logits([t[side][i] for i in rows], width) for t in teachers])
                              for side in (0, 1))
                batch.update(ensemble_targets(start, end, batch["answer_mask"], self.combination))
            yield batch


def teacher_targets(start: list[np.ndarray], end: list[np.ndarray], width: int) -> dict[str, torch.Tensor]:
    """The teacher's padded start/end logits; aligned targets (pipeline/text/alignment.py) hold NaN where no teacher
    window saw a position, which becomes `teacher_mask` (False there) and a 0 in the logits."""
    targets = {"teacher_start": pad_logits(start, width), "teacher_end": pad_logits(end, width)}
    unseen = targets["teacher_start"].isnan() | targets["teacher_end"].isnan()
    if unseen.any():
        targets = {k: v.masked_fill(unseen, 0.0) for k, v in targets.items()}
        targets["teacher_mask"] = ~unseen
    return targets


def verify_alignment(pairs: list[ShardPair]) -> None:
    """Check every pair's feature ids row for row before training starts (id columns only: cheap)."""
    for pair in pairs:
        feature_ids = read_feature_ids(pair.features_path) if pair.teacher_shards else None
        for shard in pair.teacher_shards:
            check_feature_ids(pair, feature_ids, read_feature_ids(shard), shard)
