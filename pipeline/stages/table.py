"""The stage table: for each stage of the pipeline, what it reads and what it writes.

Paths are relative to the workspace (the DVC project root). The locks (`pipeline.runtime.locks.folder_locks`)
come from it: a stage holds a shared lock on every folder it reads and an exclusive one on every folder it
writes, so no stage rewrites what a running stage reads.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Stage:
    name: str
    reads: tuple[str, ...]  # folders and files other stages write (a user's own inputs are not locked)
    writes: tuple[str, ...]


STAGES = {
    stage.name: stage
    for stage in (
        Stage("prepare", reads=(), writes=("data/features",)),
        Stage("teacher", reads=("data/features",), writes=("data/teacher",)),
        Stage("align", reads=("data/features", "data/teacher"), writes=("data/aligned",)),
        Stage("student", reads=("data/features", "data/teacher", "data/aligned"),
              writes=("models/student", "checkpoints/student", "logs/student")),
        Stage("evaluate", reads=("models/student", "data/features", "data/teacher", "data/aligned"),
              writes=("metrics/eval.json", "metrics/teacher.json", "results")),
        Stage("export", reads=("models/student", "data/features", "data/aligned"),
              writes=("models/student-onnx", "metrics/export.json")),
    )
}
