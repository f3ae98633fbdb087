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

from pipeline.runtime.errors import KdqaError
from pipeline.runtime.workspace import Workspace, staging_path
from pipeline.runtime.write_errors import describe, existing_parent
from pipeline.stage_table import SPLITS

log = logging.getLogger(__name__)

def output_folders(stage: str, ws: Workspace) -> tuple[Path, ...]:
    """The folders a stage writes into (a file's folder for a file), from the stage table."""
    from pipeline.stage_table import STAGES

    entry = STAGES[stage]
    paths = [ws.path(p) for p in (*entry.writes, *entry.staged)]
    return tuple(dict.fromkeys(p.parent if p.suffix else p for p in paths))


def staged_folders(stage: str, ws: Workspace) -> tuple[Path, ...]:
    """The ones it writes whole, through a staging folder (workspace.staged_folder). Only the staging (`.NAME.partial`)
    is a leftover: a `.NAME.old` may be the one complete copy left by a crash mid-swap (a checkpoint resumes
    from it), so it is never touched here."""
    from pipeline.stage_table import STAGES

    return tuple(ws.path(p) for p in STAGES[stage].staged)


LOGITS_BYTES_PER_TOKEN = 4  # float16 start + end logit per token, stored as they are (noise barely compresses)
TRAINING_BYTES_PER_PARAMETER = 4  # float32 weights; AdamW keeps two more copies in the checkpoint


def remove_stale_staging(stage: str, ws: Workspace) -> None:
    """Staging folders and temporary files of the stage's outputs: leftovers of a run that died."""
    for staging in map(staging_path, staged_folders(stage, ws)):
        if staging.exists():
            log.info("%s: removing what a crashed run left", staging)
            shutil.rmtree(staging, ignore_errors=True)
    outputs = output_folders(stage, ws)
    for folder in {*outputs, *(p.parent for p in outputs)}:
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
def outputs_ready(stage: str, params, ws: Workspace):
    """Clean stale staging, check writability and free space, run the block; clean staging again if it fails.
    Rank 0 only under torchrun (one set of outputs per run)."""
    if int(os.environ.get("RANK", "0")) != 0:
        yield
        return
    remove_stale_staging(stage, ws)
    check_writable(output_folders(stage, ws))
    check_free_space(space_needed(stage, params, ws))
    try:
        yield
    except BaseException:
        remove_stale_staging(stage, ws)
        raise


def space_needed(stage: str, params, ws: Workspace) -> dict[Path, int]:
    """About what the stage will write, per folder, in bytes: a check for a disk that is plainly too full, not
    a guarantee (0 where it cannot be known beforehand)."""
    return SPACE_NEEDED[stage](params, ws)


def _prepare_space(params, ws: Workspace) -> dict[Path, int]:  # features take fewer bytes than the SQuAD JSON they come from
    data = params.data
    sources = (data.train, data.dev, *data.unlabeled, *([data.validation] if data.validation else []))
    return {ws.features: sum(_file_size(s) for s in sources)}


def _teacher_space(params, ws: Workspace) -> dict[Path, int]:  # logits go to the work folder, then are copied into data/teacher
    # each teacher's logits of every split (teacher.models); a teacher carried from its own tokenizer stores as many
    # values, one start and one end per features token
    teachers = len(params.teacher.teachers)
    tokens = sum(_tokens(ws.features / split) for split in SPLITS if not _logits_current(split, ws, teachers))
    logits = LOGITS_BYTES_PER_TOKEN * tokens * teachers
    return {ws.teacher_work: max(0, logits - _bytes_in(ws.teacher_work)), ws.teacher: logits}


def _align_space(params, ws: Workspace) -> dict[Path, int]:  # the student's own features and targets (every teacher's): about the teacher's, at most
    return {ws.aligned: _bytes_in(ws.features) + _bytes_in(ws.teacher)}


def _student_space(params, ws: Workspace) -> dict[Path, int]:  # the model, and a checkpoint (weights + two AdamW moments) twice
    model = TRAINING_BYTES_PER_PARAMETER * _parameters(params.student.model)
    checkpoints = max(0, 6 * model - _bytes_in(ws.checkpoints)) if params.student.checkpoint_every else 0
    return {ws.student_model: model, ws.checkpoints: checkpoints}


def _evaluate_space(params, ws: Workspace) -> dict[Path, int]:  # predictions: smaller than the dev examples they answer
    return {ws.results: _file_size(str(ws.dev_examples))}


def _export_space(params, ws: Workspace) -> dict[Path, int]:  # the float32 graph about the size of the weights, int8 a quarter
    return {ws.export: int((1 + params.export.int8 / 4) * _bytes_in(ws.student_model))}


# One estimate per stage of the stage table (tests/test_stage_table.py holds the keys equal).
SPACE_NEEDED = {"prepare": _prepare_space, "teacher": _teacher_space, "align": _align_space,
                "student": _student_space, "evaluate": _evaluate_space, "export": _export_space}


def _logits_current(split: str, ws: Workspace, teachers: int) -> bool:
    """The published logits were made from the features there now, by as many teachers (the teacher stage checks
    it fully)."""
    from pipeline.store.shards import read_json

    try:
        manifest = read_json(ws.teacher / split / "manifest.json")
        published = manifest.get("fingerprint_parts", {}).get("features")
        return (published == read_json(ws.features / split / "manifest.json").get("fingerprint")
                and len(manifest.get("teachers", [None])) == teachers)
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
