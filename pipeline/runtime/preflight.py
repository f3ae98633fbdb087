"""Before a stage does any work: its output folders are writable, have room for what it will write, and
hold no staging left by a crashed run.

A stage that can only write its result after hours of compute should learn at once that it cannot: each
output folder (or the nearest folder that exists above it) gets a real probe file, and the free space of
each file system is compared with an estimate of what the stage writes there. Staging folders
(`.NAME.partial`) and temporary files (`.NAME.tmp-PID`) of the stage's own outputs are removed first (the
stage lock guarantees no other run of the stage is writing them) and again when the stage fails, so a crash
on a full disk gives its space back.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import tempfile
from pathlib import Path

from pipeline.errors import KdqaError
from pipeline.runtime.workspace import (
    ALIGNED_DIR,
    CHECKPOINT_DIR,
    DEV_EXAMPLES,
    FEATURES_DIR,
    EXPORT_DIR,
    METRICS_DIR,
    RESULTS_DIR,
    STUDENT_LOG_DIR,
    STUDENT_MODEL_DIR,
    TEACHER_DIR,
    TEACHER_WORK_DIR,
    staging_path,
)
from pipeline.runtime.write_errors import describe, existing_parent

log = logging.getLogger(__name__)

# The folders each stage writes into.
OUTPUTS = {
    "prepare": (FEATURES_DIR / "train", FEATURES_DIR / "dev", FEATURES_DIR),
    "teacher": (TEACHER_DIR / "train", TEACHER_DIR / "dev", TEACHER_WORK_DIR / "train", TEACHER_WORK_DIR / "dev"),
    "align": (ALIGNED_DIR,),
    "student": (STUDENT_MODEL_DIR, CHECKPOINT_DIR, STUDENT_LOG_DIR),
    "evaluate": (METRICS_DIR, RESULTS_DIR),
    "export": (EXPORT_DIR, METRICS_DIR),
}
# The ones it writes whole, through a staging folder (paths.staged_folder). Only the staging (`.NAME.partial`)
# is a leftover: a `.NAME.old` may be the one complete copy left by a crash mid-swap (a checkpoint resumes
# from it), so it is never touched here.
STAGED = {
    "prepare": (FEATURES_DIR / "train", FEATURES_DIR / "dev"),
    "teacher": (TEACHER_DIR / "train", TEACHER_DIR / "dev"),
    "align": (ALIGNED_DIR,),
    "student": (STUDENT_MODEL_DIR, CHECKPOINT_DIR),
    "evaluate": (),
    "export": (EXPORT_DIR,),
}
LOGITS_BYTES_PER_TOKEN = 4  # float16 start + end logit per token, stored as they are (noise barely compresses)
TRAINING_BYTES_PER_PARAMETER = 4  # float32 weights; AdamW keeps two more copies in the checkpoint


def remove_stale_staging(stage: str) -> None:
    """Staging folders and temporary files of the stage's outputs: leftovers of a run that died."""
    for staging in map(staging_path, STAGED[stage]):
        if staging.exists():
            log.info("%s: removing what a crashed run left", staging)
            shutil.rmtree(staging, ignore_errors=True)
    for folder in {*OUTPUTS[stage], *(p.parent for p in OUTPUTS[stage])}:
        for stale in folder.glob(".*.tmp-*") if folder.is_dir() else ():
            stale.unlink(missing_ok=True)


def check_writable(folders) -> None:
    """A probe file in each folder that exists (and in its parent, where staging is renamed into place), or
    in the nearest folder above it that exists."""
    probed = set()
    for folder in folders:
        targets = [folder, folder.parent] if folder.exists() else [existing_parent(folder)]
        for target in targets:
            target = existing_parent(target)
            if target in probed:
                continue
            probed.add(target)
            try:
                fd, name = tempfile.mkstemp(dir=target, prefix=".kdqa-write-probe-")
                os.close(fd)
                os.unlink(name)
            except OSError as exc:
                raise KdqaError((describe(exc, folder) or f"{folder}: cannot write ({exc.strerror})")
                                .replace("completed work is kept", "nothing was done yet")) from None


def check_free_space(needs: dict[Path, int]) -> None:
    """`needs`: bytes each folder will receive; folders on one file system add up."""
    by_device: dict[int, list] = {}
    for folder, size in needs.items():
        anchor = existing_parent(folder)
        by_device.setdefault(os.stat(anchor).st_dev, []).append((folder, size, anchor))
    for entries in by_device.values():
        total = sum(size for _, size, _ in entries)
        free = shutil.disk_usage(entries[0][2]).free
        if total > free:
            folders = ", ".join(str(f) for f, size, _ in entries if size)
            raise KdqaError(f"{folders}: {_mb(free)} free on this disk but this stage writes about {_mb(total)}; "
                            "free some space or run kdqa on a larger disk (nothing was done yet)")


def _mb(n: int) -> str:
    return f"{n / 1e6:,.1f} MB"


@contextlib.contextmanager
def outputs_ready(stage: str, params):
    """Clean stale staging, check writability and free space, run the block; clean staging again if it fails.
    Rank 0 only under torchrun (one set of outputs per run)."""
    if int(os.environ.get("RANK", "0")) != 0:
        yield
        return
    remove_stale_staging(stage)
    check_writable(OUTPUTS[stage])
    check_free_space(space_needed(stage, params))
    try:
        yield
    except BaseException:
        remove_stale_staging(stage)
        raise


def space_needed(stage: str, params) -> dict[Path, int]:
    """About what the stage will write, per folder, in bytes: a check for a disk that is plainly too full, not
    a guarantee (0 where it cannot be known beforehand)."""
    if stage == "prepare":  # features take fewer bytes than the SQuAD JSON they come from
        return {FEATURES_DIR: sum(_file_size(s) for s in (params.data.train, params.data.dev))}
    if stage == "teacher":  # logits go to the work folder, then are copied into data/teacher
        tokens = sum(_tokens(FEATURES_DIR / split) for split in ("train", "dev") if not _logits_current(split))
        logits = LOGITS_BYTES_PER_TOKEN * tokens
        return {TEACHER_WORK_DIR: max(0, logits - _bytes_in(TEACHER_WORK_DIR)), TEACHER_DIR: logits}
    if stage == "align":  # the student's own features and targets: about as large as the teacher's, at most
        return {ALIGNED_DIR: _bytes_in(FEATURES_DIR) + _bytes_in(TEACHER_DIR / "train")}
    if stage == "student":  # the model, and a checkpoint (weights + two AdamW moments) twice while it is swapped
        model = TRAINING_BYTES_PER_PARAMETER * _parameters(params.student.model)
        checkpoints = max(0, 6 * model - _bytes_in(CHECKPOINT_DIR)) if params.student.checkpoint_every else 0
        return {STUDENT_MODEL_DIR: model, CHECKPOINT_DIR: checkpoints}
    if stage == "evaluate":  # predictions: smaller than the dev examples they answer
        return {RESULTS_DIR: _file_size(str(DEV_EXAMPLES))}
    if stage == "export":  # the float32 graph about the size of the weights, the int8 one about a quarter of it
        return {EXPORT_DIR: int((1 + params.export.int8 / 4) * _bytes_in(STUDENT_MODEL_DIR))}
    return {}


def _logits_current(split: str) -> bool:
    """The published logits were made from the features there now (the teacher stage checks it fully)."""
    from pipeline.store.shards import read_json

    try:
        published = read_json(TEACHER_DIR / split / "manifest.json").get("fingerprint_parts", {}).get("features")
        return published == read_json(FEATURES_DIR / split / "manifest.json").get("fingerprint")
    except (KdqaError, AttributeError):
        return False


def _bytes_in(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file()) if folder.is_dir() else 0


def _file_size(source: str) -> int:
    path = Path(source)
    return path.stat().st_size if path.is_file() else 0  # a hub dataset: size unknown here


def _tokens(split_dir: Path) -> int:
    """Tokens in a split's feature shards, from the Parquet metadata alone (values of `input_ids`)."""
    import pyarrow.parquet as pq

    from pipeline.store.shards import list_shards

    total = 0
    for shard in list_shards(split_dir):
        try:
            meta = pq.ParquetFile(shard).metadata
        except Exception:
            continue  # a damaged shard: the stage itself names it
        paths = [meta.schema.column(i).path for i in range(meta.num_columns)]
        if "input_ids.list.element" in paths:
            column = paths.index("input_ids.list.element")
            total += sum(meta.row_group(g).column(column).num_values for g in range(meta.num_row_groups))
    return total


def _parameters(model: str) -> int:
    """Parameters in a model's safetensors files (headers only); 0 for a hub model not in the local cache."""
    from safetensors import safe_open

    folder = Path(model).expanduser()
    files = sorted(folder.glob("*.safetensors")) if folder.is_dir() else _cached_weights(model)
    total = 0
    for path in files:
        try:
            with safe_open(str(path), framework="pt") as f:
                for name in f.keys():
                    total += _numel(f.get_slice(name).get_shape())
        except Exception:
            return 0  # unreadable: loading the model reports it
    return total


def _numel(shape) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def _cached_weights(model: str) -> list[Path]:
    from huggingface_hub import try_to_load_from_cache

    try:
        found = try_to_load_from_cache(model, "model.safetensors")
    except Exception:
        return []
    return [Path(found)] if isinstance(found, str) else []
