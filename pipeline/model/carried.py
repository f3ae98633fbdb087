"""A teacher of another tokenizer than the features': run over its own windows of the same examples, its start/end
distributions carried onto the features' windows through character space (pipeline/text/alignment.py, the code
`kdqa align` carries a teacher onto a student's tokens with).

Features are tokenized once, with teacher.models[0]'s tokenizer. A teacher whose vocabulary differs labels each
features shard on its own: the examples whose windows the shard holds are tokenized again with the teacher's
tokenizer at prepare's windows (max_seq_len, doc_stride, max_query_len), the teacher runs over those windows, and
each example's distributions are aligned onto its windows in the shard. So a shard's values depend only on the
shard's features, its examples' text and the teacher (`shard_key`), one shard is in memory at a time, and the
logits cache and resuming work shard by shard as for any teacher (an example whose windows straddle two shards is
read by the teacher for each: one example per shard boundary).

The values are stored in the logits format: the aligned log-probabilities (softmax gives back the carried
distribution at any temperature), NaN where no window of the teacher saw a position, NO_MASS where it put no mass
(the student's stream and the ensemble leave NaN positions out: pipeline/model/ensemble.py).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass
from itertools import groupby
from pathlib import Path

import numpy as np

from pipeline.params import Params
from pipeline.runtime.errors import KdqaError
from pipeline.store.features import read_windows
from pipeline.store.shards import output_format
from pipeline.text.alignment import AlignStats, Window, align_example
from pipeline.text.features import check_contexts_have_tokens, check_window, features_by_example
from pipeline.text.splits import ShardedExamples
from pipeline.text.squad import Example

# (features of the teacher's own windows) -> (start logits, end logits) per feature: the teacher run over them.
RunTeacher = Callable[[list[dict]], tuple[list[np.ndarray], list[np.ndarray]]]


@dataclass
class CarriedTeacher:
    """A teacher whose tokenizer is not the features': how it labels a features shard."""

    name: str  # its model (and tokenizer) name
    key: str  # where params names it: teacher.models[N]
    tokenizer: object
    params: Params  # prepare's windows: the teacher reads windows of the same sizes, of its own tokens
    run: RunTeacher

    def parts(self) -> dict:
        """What its carried values depend on besides weights, vocabulary, precision and the shard (`shard_key`)."""
        windows = self.params.prepare
        return {"windows": {k: getattr(windows, k) for k in ("max_seq_len", "doc_stride", "max_query_len")},
                "aligned_format": output_format("aligned")}

    def label_shard(self, path: Path, examples: list[Example]) -> tuple[list[str], list, list, AlignStats]:
        """(feature ids, start, end, alignment stats) of a features shard whose windows are of `examples`."""
        features = read_windows(path)
        own = list(features_by_example(self.tokenizer, examples, self.params.prepare))
        start, end = self.run([f for _, fs in own for f in fs])
        starts, ends, stats, first = [], [], AlignStats(), 0
        groups = groupby(range(len(features.feature_ids)), key=lambda row: features.example_ids[row])
        for (ex, teacher_features), (example_id, shard_rows) in zip(own, groups):
            if example_id != ex.id:
                raise KdqaError(f"{path}: holds example {example_id!r} where {ex.id!r} was expected (run `kdqa prepare`)")
            teacher = [(start[first + k], end[first + k], Window.of(f)) for k, f in enumerate(teacher_features)]
            first += len(teacher_features)
            targets = align_example(teacher, [(Window.of_row(features, row), len(features.offset_start[row]))
                                              for row in shard_rows])
            for target in targets:
                starts.append(target.start)
                ends.append(target.end)
                stats.add(target)
        if len(starts) != len(features.feature_ids):
            raise KdqaError(f"{path}: holds windows of other examples than the {len(examples)} given (run `kdqa prepare`)")
        return features.feature_ids, starts, ends, stats


def check_carriable(name: str, key: str, tokenizer, params: Params, splits: dict[str, ShardedExamples]) -> None:
    """A teacher's windows can be made for every example of `splits`: room for context beside its special tokens,
    and tokens in every context under its tokenizer. One line naming the teacher otherwise."""
    try:
        check_window(params, tokenizer)
        for found in splits.values():
            check_contexts_have_tokens(tokenizer, found.examples(), str(found.source))
    except KdqaError as exc:
        raise KdqaError(f"{name}: {key} cannot be carried onto the features (its tokenizer is not "
                        f"teacher.models[0]'s): {exc}") from None


def shard_key(features_sha256: str, examples: list[Example]) -> str:
    """What a carried shard is computed from besides the teacher: the features shard's bytes and the text of its
    examples (the teacher tokenizes that text itself; the features hold another tokenizer's ids of it)."""
    h = hashlib.sha256(features_sha256.encode())
    for ex in examples:
        h.update(json.dumps([ex.id, ex.question, ex.context]).encode())
    return h.hexdigest()
