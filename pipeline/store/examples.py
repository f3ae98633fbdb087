"""The dev examples file (data/features/dev_examples.parquet): what scoring needs of each dev question that the
features do not hold, its context and gold answers. Written by prepare, read by scoring (evaluate, the student's
dev curve, export's gate). The schema, writer and reader live here.
"""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa

from pipeline.store.shards import read_table, write_table_atomic


def write_dev_examples(examples: list, path: Path) -> None:
    """`examples`: pipeline.text.squad.Example records, in the dev file's order."""
    table = pa.table(
        {
            "id": [ex.id for ex in examples],
            "title": [ex.title for ex in examples],
            "question": [ex.question for ex in examples],
            "context": [ex.context for ex in examples],
            "answers": pa.array([ex.gold_texts for ex in examples], type=pa.list_(pa.string())),
            "is_impossible": [ex.is_impossible for ex in examples],
        }
    )
    write_table_atomic(table, path, row_group_size=10000)


def read_dev_examples(path: Path) -> list[dict]:
    """Each dev question's id, context and gold answers (the texts the official script scores against)."""
    return read_table(path, columns=["id", "context", "answers"]).to_pylist()
