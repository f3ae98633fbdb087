"""Where every stage reads and writes, and how a folder is put there whole.

Paths are relative to the working directory (the DVC project root); dvc.yaml lists the same ones as each
stage's deps and outs, so change both together. A stage never writes into one of its output folders in
place: it fills a staging folder beside it and swaps that in when complete (`staged_folder`), so a crash at
any moment leaves the previous output (or none), never a folder that looks complete but is not.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

# prepare
RAW_DATA_DIR = Path("data/raw")  # local SQuAD JSON files: a dependency of the prepare stage
FEATURES_DIR = Path("data/features")  # {train,dev,unlabeled,augmented}/part-NNNNN.parquet + manifest.json
DEV_EXAMPLES = FEATURES_DIR / "dev_examples.parquet"  # contexts and gold answers, for scoring
DATA_REPORT = FEATURES_DIR / "report.json"  # what was repaired or skipped in the data
# Splits of rows the teacher labels beyond train: unlabeled data (data.unlabeled) and augmented views of
# train (prepare.augment_*). Each is a features folder (and a teacher folder) like train's, or absent.
UNLABELED_SPLIT, AUGMENTED_SPLIT = "unlabeled", "augmented"
EXTRA_SPLITS = (UNLABELED_SPLIT, AUGMENTED_SPLIT)

# teacher
TEACHER_DIR = Path("data/teacher")  # one folder of logits per features split, + manifest.json
TEACHER_WORK_DIR = Path(".kdqa/teacher-work")  # finished shards of an unfinished run, outside the DVC output
TEACHER_CACHE_DIR = Path(".kdqa/teacher-cache")  # every logits shard computed here, by content (logits_cache.py)

# align: a student's own features and the teacher's targets on them (when its tokenizer or windows differ)
ALIGNED_DIR = Path("data/aligned")  # manifest.json; features/{train,dev}/ and teacher/train/ when aligned
ALIGNED_FEATURES_DIR = ALIGNED_DIR / "features"  # {train,dev}: tokenized with the student's tokenizer and windows
ALIGNED_TARGETS_DIR = ALIGNED_DIR / "teacher"  # train: the teacher's targets over the student's tokens

# student
STUDENT_MODEL_DIR = Path("models/student")
CHECKPOINT_DIR = Path("checkpoints/student")
STUDENT_LOG_DIR = Path("logs/student")  # train.tsv, eval.tsv: the curves `dvc plots` draws

# evaluate
METRICS_DIR = Path("metrics")
EVAL_METRICS = METRICS_DIR / "eval.json"
TEACHER_METRICS = METRICS_DIR / "teacher.json"
RESULTS_DIR = Path("results")
PREDICTIONS = RESULTS_DIR / "predictions.json"
NA_PROBS = RESULTS_DIR / "na_probs.json"
FORCED_PREDICTIONS = RESULTS_DIR / "forced_predictions.json"

# export
EXPORT_DIR = Path("models/student-onnx")  # ONNX float32 + int8, tokenizer, model card, kdqa_export.json
EXPORT_METRICS = METRICS_DIR / "export.json"  # dev scores per precision beside the PyTorch student's


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

        with staged_folder(FEATURES_DIR / "train") as staging:
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
