"""The features format: one row per window of an example, written by prepare (the teacher's tokenizer) and by
align (a student's own), read by the teacher, the student's stream, scoring and alignment.

The schema, the writer and every reader of feature shards live here, and nowhere else names their columns.
A change to the schema is a new `features_format` (pipeline/formats.yaml; tests/test_formats.py holds the two
together), which reruns prepare and everything after it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa

from pipeline.store.shards import list_array, list_column_to_numpy, read_table, write_table_atomic

FEATURES_SCHEMA = pa.schema(
    [
        ("feature_id", pa.string()),  # "{example_id}#{window}": the key the logits rows are aligned by
        ("example_id", pa.string()),
        ("window", pa.int32()),
        ("input_ids", pa.list_(pa.int32())),
        ("token_type_ids", pa.list_(pa.int8())),
        ("context_start", pa.int32()),  # first and last context token of the window (inclusive)
        ("context_end", pa.int32()),
        ("start_position", pa.int32()),  # token of the hard label; -1 (text.features.NO_LABEL): teacher-only row
        ("end_position", pa.int32()),
        ("offset_start", pa.list_(pa.int32())),  # character offsets of the context tokens in the context
        ("offset_end", pa.list_(pa.int32())),
    ]
)


def features_table(rows: list[dict]) -> pa.Table:
    """Feature records (text.features.tokenize_examples' dicts, keyed by the schema's names) as one table."""
    columns = {}
    for field in FEATURES_SCHEMA:
        values = [r[field.name] for r in rows]
        if pa.types.is_list(field.type):
            columns[field.name] = list_array(values, field.type.value_type)
        else:
            columns[field.name] = pa.array(values, type=field.type)
    return pa.table(columns, schema=FEATURES_SCHEMA)


def write_features_shard(rows: list[dict], path: Path, row_group_size: int) -> None:
    write_table_atomic(features_table(rows), path, row_group_size=row_group_size)


def read_feature_ids(path: Path) -> pa.ChunkedArray:
    return read_table(path, columns=["feature_id"]).column("feature_id")


def read_example_ids(path: Path) -> list[str]:
    """Each row's example id, in order: which examples' windows a shard holds."""
    return read_table(path, columns=["example_id"]).column("example_id").to_pylist()


@dataclass
class Windows:
    """What turns a window's logits back into answer text: post-processing and alignment read this."""

    feature_ids: list[str]
    example_ids: list[str]
    context_start: np.ndarray
    context_end: np.ndarray
    offset_start: list[np.ndarray]  # per row: character offsets of its context tokens
    offset_end: list[np.ndarray]


def read_windows(path: Path) -> Windows:
    """The one window reader: scoring (evaluate, the student's dev curve, export's gate), align and inspect."""
    table = read_table(path, columns=["feature_id", "example_id", "context_start", "context_end", "offset_start",
                                      "offset_end"])
    return Windows(table.column("feature_id").to_pylist(), table.column("example_id").to_pylist(),
                   table.column("context_start").to_numpy(), table.column("context_end").to_numpy(),
                   list_column_to_numpy(table.column("offset_start"), np.int64),
                   list_column_to_numpy(table.column("offset_end"), np.int64))


@dataclass
class ModelInputs:
    """What a model reads of each row (and where its answer positions are)."""

    feature_ids: pa.ChunkedArray
    input_ids: list[np.ndarray]
    token_type_ids: list[np.ndarray]
    context_start: np.ndarray
    context_end: np.ndarray


def read_model_inputs(path: Path) -> ModelInputs:
    table = read_table(path, columns=["feature_id", "input_ids", "token_type_ids", "context_start", "context_end"])
    return ModelInputs(table.column("feature_id"), list_column_to_numpy(table.column("input_ids"), np.int64),
                       list_column_to_numpy(table.column("token_type_ids"), np.int64),
                       table.column("context_start").to_numpy(), table.column("context_end").to_numpy())


@dataclass
class TrainingRows(ModelInputs):
    """Model inputs plus the hard labels (NO_LABEL on rows only the teacher labels)."""

    start_positions: np.ndarray
    end_positions: np.ndarray


def read_training_rows(path: Path) -> TrainingRows:
    table = read_table(path, columns=["feature_id", "input_ids", "token_type_ids", "context_start", "context_end",
                                      "start_position", "end_position"])
    return TrainingRows(table.column("feature_id"), list_column_to_numpy(table.column("input_ids"), np.int64),
                        list_column_to_numpy(table.column("token_type_ids"), np.int64),
                        table.column("context_start").to_numpy(), table.column("context_end").to_numpy(),
                        table.column("start_position").to_numpy().astype(np.int64),
                        table.column("end_position").to_numpy().astype(np.int64))


@dataclass
class Labels:
    """Where each row's answer may lie and its hard label: what `kdqa inspect` scores the teacher against."""

    feature_ids: pa.ChunkedArray
    context_start: np.ndarray
    context_end: np.ndarray
    start_positions: np.ndarray
    end_positions: np.ndarray


def read_labels(path: Path) -> Labels:
    table = read_table(path, columns=["feature_id", "context_start", "context_end", "start_position", "end_position"])
    return Labels(table.column("feature_id"), table.column("context_start").to_numpy(),
                  table.column("context_end").to_numpy(), table.column("start_position").to_numpy(),
                  table.column("end_position").to_numpy())
