"""The stage table: every stage of the pipeline in one place (the stage modules themselves are pipeline/stages/).

Per stage: the function that runs it, a one-line summary, what it reads and writes relative to the workspace
(the DVC project root), the `params.yaml` keys it depends on, and how its code is tracked. Everything else
that knows about stages comes from here: the click commands' one-line help (pipeline/cli.py), the folder
locks and the folders preflight checks and cleans (pipeline/runtime/), the stage table of docs/pipeline.md.
`dvc.yaml` and `.gitignore` stay real, readable files; tests/test_stage_table.py holds them to this table,
the code each stage imports included.

Code: `student`, `evaluate` and `export` list every project module their process imports (outside the
runtime package, which cannot change a result). `prepare`, `teacher` and `align` list format versions
(pipeline/formats.yaml) instead, so a kdqa upgrade that leaves features and logits alone never reruns the
hours-long teacher; tests/test_formats.py fails when a format's schema changes without a bump.

Each stage module is a recipe (setup, work, write) and never imports another stage: what two stages share
lives in the library packages below (store, text, model, training, serving).
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass

from pipeline.runtime.workspace import VALIDATION_SPLIT


@dataclass(frozen=True)
class Stage:
    name: str
    run: str  # "module:function" that runs it (imported only when the stage runs)
    summary: str  # one line: `kdqa --help`, docs/pipeline.md
    deps: tuple[str, ...]  # data it reads: dvc.yaml deps besides code
    outs: tuple[str, ...]  # what it writes, cached by DVC (shared between experiments)
    params: tuple[str, ...]  # params.yaml keys (dvc.yaml params); "FILE:key" for another params file
    git_outs: tuple[str, ...] = ()  # metrics and curves: DVC outs with cache: false, kept in git
    staged: tuple[str, ...] = ()  # folders written whole through a staging folder (pipeline.runtime.workspace)
    work: tuple[str, ...] = ()  # its own folders outside DVC: resumable work, caches (never in git)
    lists_code: bool = False  # dvc.yaml lists the project modules it imports (else a format version stands for them)

    @property
    def module(self) -> str:
        return self.run.split(":")[0]

    def function(self):
        module, name = self.run.split(":")
        return getattr(importlib.import_module(module), name)

    @property
    def writes(self) -> tuple[str, ...]:
        """Every path it writes: outs, git-kept outs, its work folders."""
        return (*self.outs, *self.git_outs, *self.work)


# The extra splits prepare may write beside train and dev (data.unlabeled; prepare.augment_views), each a
# features folder of its own and, after the teacher, a logits folder.
SPLITS = ("train", "dev", "unlabeled", "augmented")

STAGES = {
    stage.name: stage
    for stage in (
        Stage("prepare", "pipeline.stages.prepare:run_prepare",
              "Tokenize SQuAD data into feature shards (data/features/).",
              deps=("data/raw",), outs=("data/features",),
              params=("data", "prepare", "teacher.model", "teacher.models", "teacher.trust_remote_code",
                      "pipeline/formats.yaml:features_format"),
              # validation (data.validation): scored only, so the teacher never labels it
              staged=tuple(f"data/features/{split}" for split in (*SPLITS, VALIDATION_SPLIT))),
        Stage("teacher", "pipeline.stages.teacher:run_teacher",
              "Run each teacher once; logits shards to data/teacher/.",
              # data/raw, data, prepare: a teacher of another tokenizer than the features' reads the examples again
              deps=("data/raw", "data/features"), outs=("data/teacher",),
              params=("data", "prepare", "teacher.model", "teacher.models", "teacher.trust_remote_code",
                      "teacher.precision", "pipeline/formats.yaml:logits_format", "pipeline/formats.yaml:aligned_format"),
              staged=tuple(f"data/teacher/{split}" for split in SPLITS),
              work=(".kdqa/teacher-work", ".kdqa/teacher-cache")),
        Stage("align", "pipeline.stages.align:run_align",
              "Map the teacher's logits onto the student's tokenizer and windows (data/aligned/).",
              deps=("data/raw", "data/features", "data/teacher"), outs=("data/aligned",),
              params=("data", "prepare", "student.model", "student.max_seq_len", "student.doc_stride",
                      "student.trust_remote_code", "pipeline/formats.yaml:features_format",
                      "pipeline/formats.yaml:aligned_format"),
              staged=("data/aligned",)),
        Stage("student", "pipeline.stages.student:run_student",
              "Train the student on the stored logits; save models/student/.",
              deps=("data/features", "data/teacher", "data/aligned"), outs=("models/student",),
              params=("student",), git_outs=("logs/student/train.tsv", "logs/student/eval.tsv"),
              staged=("models/student", "checkpoints/student"), work=("checkpoints/student",), lists_code=True),
        Stage("evaluate", "pipeline.stages.evaluate:run_evaluate",
              "Score student and teacher on dev; write metrics/ and results/.",
              deps=("models/student", "data/features", "data/teacher/dev", "data/aligned"),
              outs=("results/predictions.json", "results/na_probs.json", "results/forced_predictions.json"),
              params=("evaluate",), git_outs=("metrics/eval.json", "metrics/teacher.json"), lists_code=True),
        Stage("export", "pipeline.stages.export:run_export",
              "Export the student to ONNX (float32, int8), checked on dev.",
              deps=("models/student", "data/features/dev", "data/features/dev_examples.parquet", "data/aligned"),
              outs=("models/student-onnx",),
              params=("export", "evaluate.n_best", "evaluate.max_answer_len", "evaluate.null_threshold"),
              git_outs=("metrics/export.json",), staged=("models/student-onnx",), lists_code=True),
    )
}


def lock_folders(stage: Stage, model_dir: str | None = None) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(folders to share-lock, folders to lock exclusively) for a run of `stage`: what it reads that another
    stage writes (a read inside an output locks that output), and everything it writes. `model_dir`: the model
    read in place of models/student (evaluate/export --model)."""
    shared = []
    for dep in stage.deps:
        if dep == "models/student" and model_dir:
            shared.append(owner_of(model_dir) or model_dir)  # another model folder: locked by its own path
        elif owner_of(dep):  # the user's own data (data/raw) has no writer to guard against
            shared.append(owner_of(dep))
    return tuple(dict.fromkeys(shared)), stage.writes


def owner_of(path: str) -> str | None:
    """The output of some stage that holds `path` (itself, or a folder above it), or None (the user's own data)."""
    for stage in STAGES.values():
        for out in stage.writes:
            if path == out or path.startswith(out.rstrip("/") + "/"):
                return out
    return None
