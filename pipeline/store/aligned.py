"""The aligned-targets format: the teacher's targets carried onto a student's own features (pipeline/text/
alignment.py), written by align and streamed by the student like logits. The logits columns hold
log-probabilities (NaN where no teacher window saw the position), plus what the alignment kept.

The schema and the writer live here; the student's stream reads these shards with the logits reader
(pipeline/store/logits.py), since their first three columns are the logits format's. A change is a new
`aligned_format` (pipeline/formats.yaml).
"""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa

from pipeline.store.logits import FLOAT_COLUMNS, LOGITS_SCHEMA, logits_table
from pipeline.store.shards import write_table_atomic

ALIGNED_SCHEMA = pa.schema(
    [
        *LOGITS_SCHEMA,
        ("start_covered", pa.float32()),  # the share of the teacher's mass the student's tokens could hold
        ("end_covered", pa.float32()),
        ("teacher_windows", pa.int16()),  # how many teacher windows the targets were pieced from
    ]
)


def aligned_table(feature_ids: list[str], targets: list) -> pa.Table:
    """Rows of ALIGNED_SCHEMA from `alignment.AlignedTargets`, one per feature."""
    logits = logits_table(feature_ids, [t.start for t in targets], [t.end for t in targets])
    return pa.table(
        {
            **{name: logits.column(name) for name in logits.column_names},
            "start_covered": pa.array([t.start_covered for t in targets], type=pa.float32()),
            "end_covered": pa.array([t.end_covered for t in targets], type=pa.float32()),
            "teacher_windows": pa.array([t.teacher_windows for t in targets], type=pa.int16()),
        },
        schema=ALIGNED_SCHEMA,
    )


def write_aligned_shard(path: Path, feature_ids: list[str], targets: list, row_group_size: int) -> None:
    write_table_atomic(aligned_table(feature_ids, targets), path, row_group_size, float_columns=FLOAT_COLUMNS)
