"""The workspace: where every stage reads and writes, and how a folder is put there whole.

A `Workspace(root)` names every path of a run relative to its root (the DVC project root; the CLI's
`--workspace`, default the working directory). Stages get one handed to them instead of reading the working
directory, so a program or a test can run a stage on any folder. The stage table (pipeline/stage_table.py)
lists the same paths as each stage's reads and writes; a test holds the two equal. A stage never writes into
one of its output folders in place: it fills a staging folder beside it and swaps that in when complete
(`staged_folder`), so a crash at any moment leaves the previous output (or none), never a folder that looks
complete but is not.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

# Splits of rows the teacher labels beyond train: unlabeled data (data.unlabeled) and augmented views of
# train (prepare.augment_*). Each is a features folder (and a teacher folder) like train's, or absent.
UNLABELED_SPLIT, AUGMENTED_SPLIT = "unlabeled", "augmented"
EXTRA_SPLITS = (UNLABELED_SPLIT, AUGMENTED_SPLIT)
# Splits that are answered and scored, never trained on: dev, and validation (data.validation), the questions
# the no-answer threshold is chosen on. Each is a features folder plus an examples file (contexts, gold answers).
DEV_SPLIT, VALIDATION_SPLIT = "dev", "validation"
SCORED_SPLITS = (DEV_SPLIT, VALIDATION_SPLIT)


@dataclass(frozen=True)
class Workspace:
    root: Path = Path(".")

    def __post_init__(self):
        object.__setattr__(self, "root", Path(self.root))

    @property
    def is_working_directory(self) -> bool:
        return self.root.resolve() == Path.cwd().resolve()

    def path(self, relative: str | Path) -> Path:
        """`relative` under the root; an absolute path as it is."""
        return self.root / relative

    def local(self, value: str) -> str:
        """A params value that may be a local path relative to the workspace (a SQuAD file, a model folder) or a
        hub name: the path under the root where it exists there, else the value unchanged."""
        if not value or Path(value).is_absolute() or value.startswith("~") or self.is_working_directory:
            return value  # in the working directory: the value as the user wrote it, recorded as such
        candidate = self.root / value
        return str(candidate) if candidate.exists() else value

    # prepare
    @property
    def raw_data(self) -> Path:  # local SQuAD JSON files: a dependency of the prepare stage
        return self.root / "data/raw"

    @property
    def features(self) -> Path:  # {train,dev,validation,unlabeled,augmented}/part-NNNNN.parquet + manifest.json
        return self.root / "data/features"

    @property
    def dev_examples(self) -> Path:  # contexts and gold answers, for scoring
        return self.examples(DEV_SPLIT)

    @property
    def validation_examples(self) -> Path:  # the same for the questions the no-answer threshold is chosen on
        return self.examples(VALIDATION_SPLIT)

    def examples(self, split: str) -> Path:
        """The contexts and gold answers of a scored split (dev, validation)."""
        return self.features / f"{split}_examples.parquet"

    @property
    def data_report(self) -> Path:  # what was repaired or skipped in the data
        return self.features / "report.json"

    # teacher
    @property
    def teacher(self) -> Path:  # one folder of logits per features split, + manifest.json
        return self.root / "data/teacher"

    @property
    def teacher_work(self) -> Path:  # finished shards of an unfinished run, outside the DVC output
        return self.root / ".kdqa/teacher-work"

    @property
    def teacher_cache(self) -> Path:  # every logits shard computed here, by content (store/logits_cache.py)
        return self.root / ".kdqa/teacher-cache"

    # align: a student's own features and the teacher's targets on them (when its tokenizer or windows differ)
    @property
    def aligned(self) -> Path:  # manifest.json; features/{train,dev,...}/ and teacher/{train,...}/ when aligned
        return self.root / "data/aligned"

    @property
    def aligned_features(self) -> Path:  # tokenized with the student's tokenizer and windows
        return self.aligned / "features"

    @property
    def aligned_targets(self) -> Path:  # the teacher's targets over the student's tokens
        return self.aligned / "teacher"

    # student
    @property
    def student_model(self) -> Path:
        return self.root / "models/student"

    @property
    def checkpoints(self) -> Path:
        return self.root / "checkpoints/student"

    @property
    def student_logs(self) -> Path:  # train.tsv, eval.tsv: the curves `dvc plots` draws
        return self.root / "logs/student"

    # evaluate
    @property
    def metrics(self) -> Path:
        return self.root / "metrics"

    @property
    def eval_metrics(self) -> Path:
        return self.metrics / "eval.json"

    @property
    def teacher_metrics(self) -> Path:
        return self.metrics / "teacher.json"

    @property
    def results(self) -> Path:
        return self.root / "results"

    @property
    def predictions(self) -> Path:
        return self.results / "predictions.json"

    @property
    def na_probs(self) -> Path:
        return self.results / "na_probs.json"

    @property
    def forced_predictions(self) -> Path:
        return self.results / "forced_predictions.json"

    # export
    @property
    def export(self) -> Path:  # ONNX float32 + int8, tokenizer, model card, kdqa_export.json
        return self.root / "models/student-onnx"

    @property
    def export_metrics(self) -> Path:  # dev scores per precision beside the PyTorch student's
        return self.metrics / "export.json"

    # runtime
    @property
    def locks(self) -> Path:  # one lock per stage: one run of a stage per workspace
        return self.root / ".kdqa/locks"

    @property
    def folder_locks(self) -> Path:  # one lock per output folder: no stage rewrites what another reads
        return self.root / ".kdqa/folder-locks"


def staging_path(final: Path) -> Path:
    """The folder `final` is built in: hidden beside it, `.NAME.partial`."""
    return final.with_name(f".{final.name}.partial")


def previous_path(final: Path) -> Path:
    """Where the previous `final` waits during a swap, `.NAME.old`: complete, and dropped only afterwards."""
    return final.with_name(f".{final.name}.old")


def begin_staging(final: Path) -> Path:
    """An empty staging folder for `final`; whatever a crashed run left there is removed first."""
    staging = staging_path(final)
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    return staging


def swap_into_place(staging: Path, final: Path) -> None:
    """Put a complete staging folder in place of `final`.

    At every moment a complete folder exists under `final` or `previous_path(final)`: the old one is moved
    aside (not deleted) first, and deleted only once the new one is in place.
    """
    previous = previous_path(final)
    if final.exists():
        shutil.rmtree(previous, ignore_errors=True)
        final.rename(previous)
    staging.rename(final)
    shutil.rmtree(previous, ignore_errors=True)


@contextmanager
def staged_folder(final: Path) -> Iterator[Path]:
    """Write `final` whole: yields an empty staging folder, swapped into place when the block completes.

        with staged_folder(ws.features / "train") as staging:
            ...write files into staging...

    If the block raises, the staging folder is removed and `final` is left as it was.
    """
    staging = begin_staging(final)
    try:
        yield staging
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    swap_into_place(staging, final)
