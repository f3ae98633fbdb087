"""A split's examples made again exactly as prepare made them, for tokenizing them with another tokenizer: a
student's (`kdqa align`) or a teacher's carried onto the features (pipeline/model/carried.py).

Train, dev and validation are read from their sources again; the unlabeled split is one run of examples per file
of data.unlabeled; the augmented split one run per view number, made again from train (deterministic). Runs keep
prepare's order, in which the features shards hold the examples' windows.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from pipeline.params import Params
from pipeline.runtime.errors import KdqaError
from pipeline.runtime.workspace import AUGMENTED_SPLIT, UNLABELED_SPLIT, VALIDATION_SPLIT
from pipeline.store.features import read_example_ids
from pipeline.store.shards import list_shards
from pipeline.text.augment import AugmentReport, augmented_runs
from pipeline.text.squad import Example, load_examples
from pipeline.text.unlabeled import load_unlabeled

DATA_CHANGED = "the data changed since `kdqa prepare`; run it (and `kdqa teacher`) again"


@dataclass
class SplitRuns:
    """A split's examples in prepare's order: one run per source (an unlabeled file, a view number)."""

    runs: Iterable[list[Example]]  # a generator for the augmented split: read it once
    total: int  # examples
    source: object  # where they come from (a path or hub name, or a list of them): messages and manifests
    manifest_keys: dict = field(default_factory=dict)  # what a features manifest of the split adds (augmentation)


def labelled_source(split: str, params: Params) -> str:
    """data.train, data.dev or data.validation."""
    data = params.data
    return {"train": data.train, "dev": data.dev, VALIDATION_SPLIT: data.validation}[split]


def labelled_examples(split: str, params: Params) -> list[Example]:
    """Train's, dev's or validation's examples as prepare loaded them."""
    return load_examples(labelled_source(split, params), split, strict=params.prepare.strict)[0]


def split_runs(split: str, params: Params, features_dir: Path, train: list[Example]) -> SplitRuns:
    """Any split the teacher labels: train (its examples given), dev, or an extra split (`extra_split_runs`)."""
    if split == "train":
        return SplitRuns([train], len(train), params.data.train)
    if split in (UNLABELED_SPLIT, AUGMENTED_SPLIT):
        return extra_split_runs(split, params, features_dir, train)
    examples = labelled_examples(split, params)
    return SplitRuns([examples], len(examples), labelled_source(split, params))


def extra_split_runs(split: str, params: Params, features_dir: Path, train: list[Example]) -> SplitRuns:
    """An extra split's examples as prepare made them (`features_dir`: its features, named in errors). Unlabeled:
    one run per file of data.unlabeled; augmented: one run per view number, made again from train."""
    data = params.data
    if split == UNLABELED_SPLIT:
        if not data.unlabeled:
            raise KdqaError(f"{features_dir}: made from unlabeled files data.unlabeled no longer lists: "
                            "run `kdqa prepare` (and `kdqa teacher`) again")
        runs = [load_unlabeled(source)[0] for source in data.unlabeled]
        return SplitRuns(runs, sum(map(len, runs)), list(data.unlabeled))
    if not params.prepare.augment_views:
        raise KdqaError(f"{features_dir}: made from augmented views, but prepare.augment_views is 0: "
                        "run `kdqa prepare` (and `kdqa teacher`) again")
    settings = {k: v for k, v in vars(params.prepare).items() if k.startswith("augment_")}
    total = params.prepare.augment_views * len(train)
    return SplitRuns(augmented_runs(train, params, AugmentReport()), total, data.train, {"augment": settings})


@dataclass
class ShardedExamples:
    """A split's examples grouped by the features shard that holds their windows."""

    source: object  # as SplitRuns.source
    by_shard: dict[str, list[Example]]

    def examples(self) -> list[Example]:
        """Every example once, in order (one whose windows straddle two shards is in both groups)."""
        return list({id(ex): ex for group in self.by_shard.values() for ex in group}.values())


def examples_by_split(params: Params, features_root: Path, splits) -> dict[str, ShardedExamples]:
    """Every split of `splits` (features in `features_root`/<split>) with its examples by features shard."""
    train = labelled_examples("train", params)
    found = {}
    for split in splits:
        runs = split_runs(split, params, features_root / split, train)
        found[split] = ShardedExamples(runs.source, examples_by_shard(features_root / split, runs))
    return found


def examples_by_shard(features_dir: Path, split: SplitRuns) -> dict[str, list[Example]]:
    """The examples whose windows each features shard holds, in order, checked against the shards' example ids (an
    example's windows may straddle two shards: it is then in both lists)."""
    examples = itertools.chain.from_iterable(split.runs)
    current, by_shard = None, {}
    for path in list_shards(features_dir):
        mine = []
        for example_id, _ in itertools.groupby(read_example_ids(path)):
            straddling = not mine and current is not None and current.id == example_id
            if not straddling:
                current = next(examples, None)
                if current is None or current.id != example_id:
                    found = "nothing" if current is None else f"{current.id!r}"
                    raise KdqaError(f"{path}: holds example {example_id!r} where {split.source} has {found}: "
                                    f"{DATA_CHANGED}")
            mine.append(current)
        by_shard[path.name] = mine
    leftover = next(examples, None)
    if leftover is not None:
        raise KdqaError(f"{features_dir}: holds no example {leftover.id!r} that {split.source} has: {DATA_CHANGED}")
    return by_shard
