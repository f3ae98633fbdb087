"""The logits format: the teacher's start/end logits over each feature's real tokens (no padding), float16, in
the row order of the features shard of the same name. Written by the teacher stage, read by the student's
stream, scoring (the teacher's dev scores), alignment and inspect.

The schema, the writer and the reader live here, and nowhere else names their columns. A change to the schema
is a new `logits_format` (pipeline/formats.yaml; tests/test_formats.py holds the two together).

The layout of a split folder (data/teacher/<split>/): with one teacher, its shards and manifest.json, as ever.
With several (teacher.models), one such folder per teacher inside it, `teacher-0`, `teacher-1`, ... in the
order of the list, each exactly what the split folder of that teacher alone would hold (byte for byte), and a
manifest.json that lists them (`teachers`, written by `teachers_manifest`); `teacher_folders` reads either
layout. A student's aligned targets (data/aligned/teacher/<split>/) take the same layout.

A teacher carried onto the features from its own tokenizer (pipeline/model/carried.py) stores, in these columns,
the aligned log-probabilities of its distributions (NaN where none of its windows saw a position), as aligned
targets do; its manifest says `carried`.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa

from pipeline import __version__
from pipeline.runtime.errors import KdqaError
from pipeline.store.shards import (fingerprint_of, list_array, list_column_to_numpy, read_json, read_table,
                                   write_table_atomic)

LOGITS_SCHEMA = pa.schema(
    [
        ("feature_id", pa.string()),
        ("start_logits", pa.list_(pa.float16())),
        ("end_logits", pa.list_(pa.float16())),
    ]
)
# Stored without dictionaries and with byte-stream split: float16 logits compress better that way.
FLOAT_COLUMNS = ("start_logits", "end_logits")
ROW_GROUP = 4000


def logits_table(feature_ids: list[str], start: list[np.ndarray], end: list[np.ndarray]) -> pa.Table:
    return pa.table(
        {
            "feature_id": pa.array(feature_ids, type=pa.string()),
            "start_logits": list_array(start, pa.float16()),
            "end_logits": list_array(end, pa.float16()),
        },
        schema=LOGITS_SCHEMA,
    )


def write_logits_shard(path: Path, feature_ids: list[str], start: list[np.ndarray], end: list[np.ndarray]) -> None:
    write_table_atomic(logits_table(feature_ids, start, end), path, ROW_GROUP, float_columns=FLOAT_COLUMNS)


def read_logits(path: Path) -> tuple[pa.ChunkedArray, list[np.ndarray], list[np.ndarray]]:
    """(feature ids, start logits, end logits) of a logits shard, or of an aligned-targets shard (the same first
    three columns: pipeline/store/aligned.py), as float32."""
    table = read_table(path, columns=["feature_id", "start_logits", "end_logits"])
    return (table.column("feature_id"), list_column_to_numpy(table.column("start_logits"), np.float32),
            list_column_to_numpy(table.column("end_logits"), np.float32))


def is_logits_shard(path: Path) -> bool:
    """A logits (or aligned-targets) shard rather than a features shard."""
    return "start_logits" in read_table(path).column_names


def teacher_folder_name(index: int) -> str:
    """The folder of the `index`-th teacher of an ensemble inside a split folder (teacher.models[index])."""
    return f"teacher-{index}"


def teacher_folders(split_dir: Path) -> list[Path]:
    """The logits folders of a split, one per teacher in teacher.models' order: the split folder itself for one
    teacher (or when it has no manifest yet: the caller reports that), its `teacher-N` folders for several."""
    manifest_path = split_dir / "manifest.json"
    listed = read_json(manifest_path).get("teachers") if manifest_path.exists() else None
    if listed is None:
        return [split_dir]
    if not isinstance(listed, list) or not all(isinstance(t, dict) and isinstance(t.get("folder"), str) for t in listed):
        raise KdqaError(f"{manifest_path}: 'teachers' is not a list of teacher folders (run `kdqa teacher`)")
    return [split_dir / t["folder"] for t in listed]


def teachers_manifest(split: str, parts: dict, teachers: list[dict], rows: int) -> dict:
    """The manifest of a split folder of several teachers: `teachers` (each at least its `folder` and its own
    manifest's `fingerprint`) and the fingerprint of `parts` with every teacher's."""
    parts = {**parts, "teachers": [t["fingerprint"] for t in teachers]}
    return {"kdqa_version": __version__, "split": split, "fingerprint": fingerprint_of(parts),
            "fingerprint_parts": parts, "teachers": teachers, "rows": rows}
