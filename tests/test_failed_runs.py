"""Issue 16: a run that fails to write, runs twice, or dies keeps what was done.

Write failures: the student that cannot save its model keeps a final checkpoint and a rerun finishes with
the same weights as an uninterrupted run; a failed checkpoint write loses at most `checkpoint_every` steps;
an unwritable output is found before training; a teacher that fills the disk leaves no hidden staging and
resumes. Locks: a second run of a stage in one folder names the first's pid; a dead holder's lock is taken
over. Curves: a failed or killed student run leaves the previous run's curves. Plus the pieces on their own
(write_errors.describe, the free-space estimates). Full or read-only disks are simulated by patching the
writer to raise what the OS raises (tests run as root, for whom chmod does not bite).
"""

from __future__ import annotations

import collections
import errno
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from reliability_kit import (
    KILL_STUDENT,
    STUDENT,
    TOTAL_STEPS,
    World,
    assert_one_line_error,
    clone,
    disk_full_error,
    failing_on_call,
    get_world,
    kdqa,
    reference_student,
    run_python,
    subprocess_env,
    tensors,
    write_params,
)

ENOSPC = os.strerror(errno.ENOSPC)


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> World:
    return get_world(tmp_path_factory)


@pytest.fixture(scope="module")
def reference(world, tmp_path_factory) -> dict:
    return reference_student(world, tmp_path_factory)


def disk_full():
    raise disk_full_error()


def checkpoint_step(ws: Path) -> int:
    return json.loads((ws / "checkpoints/student/state.json").read_text())["step"]


def assert_same_as_reference(ws: Path, reference: dict) -> None:
    import torch

    got = tensors(ws / "models/student/model.safetensors")
    assert got.keys() == reference["weights"].keys()
    assert all(torch.equal(got[k], reference["weights"][k]) for k in got), "weights differ from the reference"
    assert (ws / "logs/student/train.tsv").read_text() == reference["curve"]


# ---------------------------------------------------------------------------------------------------------
# The student: never more than checkpoint_every steps lost to a write failure
# ---------------------------------------------------------------------------------------------------------


def test_student_that_cannot_save_keeps_a_final_checkpoint_and_the_rerun_finishes(world, tmp_path, monkeypatch,
                                                                                  reference):
    from transformers import PreTrainedModel

    ws = clone(world, tmp_path / "ws")
    write_params(world, ws, **STUDENT, student__checkpoint_every=5, student__num_workers=0)
    monkeypatch.setattr(PreTrainedModel, "save_pretrained", lambda *a, **k: disk_full())
    result = kdqa(ws, "-q", "student")
    assert_one_line_error(result, "models/student", ENOSPC, "free some space", "completed work is kept")
    assert checkpoint_step(ws) == TOTAL_STEPS  # the whole training, resumable
    assert not (ws / "models/student").exists() and not (ws / "models/.student.partial").exists()

    monkeypatch.undo()
    result = kdqa(ws, "student")
    assert result.exit_code == 0, result.output
    assert f"resuming from {ws / 'checkpoints/student'} at step {TOTAL_STEPS}" in result.stderr
    assert_same_as_reference(ws, reference)
    assert not list((ws / "checkpoints").glob("*student*"))


def test_failed_checkpoint_write_loses_at_most_checkpoint_every_steps(world, tmp_path, monkeypatch, reference):
    import pipeline.training.checkpoint as checkpoint

    ws = clone(world, tmp_path / "ws")
    write_params(world, ws, **STUDENT, student__checkpoint_every=5, student__num_workers=0)
    monkeypatch.setattr(checkpoint, "save_file", failing_on_call(3, checkpoint.save_file))  # the checkpoint of step 15
    assert_one_line_error(kdqa(ws, "-q", "student"), "checkpoints/student", ENOSPC)
    assert checkpoint_step(ws) == 10
    assert not (ws / "checkpoints/.student.partial").exists()  # the failed one's staging is gone at once

    monkeypatch.undo()
    result = kdqa(ws, "student")
    assert result.exit_code == 0, result.output
    assert f"resuming from {ws / 'checkpoints/student'} at step 10" in result.stderr
    assert_same_as_reference(ws, reference)


@pytest.mark.parametrize("folder", ["models/student", "checkpoints/student", "logs/student"])
def test_unwritable_output_is_found_before_training(world, tmp_path, monkeypatch, folder):
    import tempfile

    import pipeline.training.step as training

    ws = clone(world, tmp_path / "ws")
    write_params(world, ws, **STUDENT, student__checkpoint_every=5)
    target = (ws / folder).parent
    target.mkdir(parents=True, exist_ok=True)
    original_mkstemp, steps = tempfile.mkstemp, []

    def mkstemp(*a, dir=None, **k):
        if dir is not None and Path(dir).resolve() == target.resolve():
            raise OSError(errno.EROFS, os.strerror(errno.EROFS))
        return original_mkstemp(*a, dir=dir, **k)

    monkeypatch.setattr(tempfile, "mkstemp", mkstemp)
    monkeypatch.setattr(training, "distillation_loss", lambda *a, **k: steps.append(1))
    assert_one_line_error(kdqa(ws, "-q", "student"), folder, "Read-only file system", "nothing was done yet")
    assert not steps, "training started before the outputs were checked"
    assert not any((ws / d).exists() for d in ("models/student", "checkpoints/student", "logs/student/train.tsv"))


# ---------------------------------------------------------------------------------------------------------
# The teacher: a full disk leaves no hidden staging, and the rerun resumes
# ---------------------------------------------------------------------------------------------------------


def assert_logits_as_clean_run(world: World, ws: Path) -> None:
    for split in ("train", "dev"):
        clean, got = world.workspace / "data/teacher" / split, ws / "data/teacher" / split
        assert {p.name: p.read_bytes() for p in clean.glob("part-*")} == {p.name: p.read_bytes()
                                                                          for p in got.glob("part-*")}
    assert not list((ws / "data/teacher").glob(".*"))


@pytest.mark.parametrize("where, done_before_rerun", [("shard", 2), ("publish", 8)])
def test_teacher_on_a_full_disk_leaves_no_staging_and_resumes(world, tmp_path, monkeypatch, where,
                                                             done_before_rerun):
    import pyarrow.parquet as pq

    ws = clone(world, tmp_path / "ws")
    shutil.rmtree(ws / "data/teacher")
    if where == "shard":  # the third logits shard's write runs out of space half-way
        monkeypatch.setattr(pq, "write_table", failing_on_call(3, pq.write_table))
        fragment = ".kdqa/teacher-work/train/part-00002.parquet"
    else:  # every shard done; the copy into data/teacher/.train.partial runs out of space
        monkeypatch.setattr(shutil, "copy2", failing_on_call(2, shutil.copy2))
        fragment = "data/teacher/train"
    assert_one_line_error(kdqa(ws, "-q", "teacher"), fragment, ENOSPC)
    assert not (ws / "data/teacher/.train.partial").exists(), "hidden staging left on a full disk"
    assert not list((ws / ".kdqa/teacher-work/train").glob(".*tmp-*")), "half-written temporary left"
    assert len(list((ws / ".kdqa/teacher-work/train").glob("*.done.json"))) == done_before_rerun

    monkeypatch.undo()
    result = kdqa(ws, "teacher")
    assert result.exit_code == 0, result.output
    assert f"train: resuming, {done_before_rerun} of 8 shards already done" in result.stderr
    assert_logits_as_clean_run(world, ws)


def test_stale_staging_is_removed_at_start(world, tmp_path):
    """What a disk-full teacher run of an older kdqa left: data/teacher/.dev.partial with a truncated shard."""
    ws = clone(world, tmp_path / "ws")
    stale = ws / "data/teacher/.dev.partial"
    stale.mkdir()
    (stale / "part-00000.parquet").write_bytes(b"PAR1 truncated")
    result = kdqa(ws, "teacher")
    assert result.exit_code == 0, result.output
    assert "data/teacher/.dev.partial: removing what a crashed run left" in result.stderr
    assert not stale.exists()


# ---------------------------------------------------------------------------------------------------------
# Locks: one run of a stage per folder
# ---------------------------------------------------------------------------------------------------------

HOLD_LOCK = r'''
import sys
from pipeline.runtime.locks import stage_lock
from pipeline.runtime.workspace import Workspace
with stage_lock(sys.argv[1], Workspace(".")):
    print("locked", flush=True)
    sys.stdin.read()  # hold it until the test closes our stdin (or kills us)
'''


def test_second_teacher_run_names_the_first_and_a_dead_ones_lock_is_taken_over(world, tmp_path):
    ws = clone(world, tmp_path / "ws")
    shutil.rmtree(ws / "data/teacher")
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, "teacher"], cwd=ws, env=subprocess_env(),
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        result = kdqa(ws, "-q", "teacher")
        assert_one_line_error(result, ".kdqa/locks/teacher.lock", "`kdqa teacher` is already running in this folder",
                              f"pid {holder.pid}", "wait for it to finish")
        assert not (ws / "data/teacher").exists() and not list((ws / ".kdqa/teacher-work").rglob("*.*"))
        assert kdqa(ws, "-q", "student").exit_code != 0  # other stages have their own locks (it fails on
        # the missing logits, not on the lock)
    finally:
        holder.kill()  # SIGKILL: no clean-up, the lock file stays behind with its pid
        holder.wait()
    assert json.loads((ws / ".kdqa/locks/teacher.lock").read_text())["pid"] == holder.pid

    result = kdqa(ws, "teacher")
    assert result.exit_code == 0, result.output
    assert f"taking over the lock of pid {holder.pid}" in result.stderr
    assert not (ws / ".kdqa/locks/teacher.lock").exists()
    assert_logits_as_clean_run(world, ws)


def test_lock_only_on_rank_0(tmp_path, monkeypatch):
    from pipeline.runtime.locks import stage_lock
    from pipeline.runtime.workspace import Workspace

    monkeypatch.setenv("RANK", "1")
    with stage_lock("teacher", Workspace(tmp_path)):
        assert not (tmp_path / ".kdqa").exists()


# ---------------------------------------------------------------------------------------------------------
# Curves: a failed or killed run leaves the previous run's curves beside the previous run's model
# ---------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def finished_student(world, tmp_path_factory) -> Path:
    ws = clone(world, tmp_path_factory.mktemp("finished-student") / "ws")
    write_params(world, ws, **STUDENT)
    assert kdqa(ws, "-q", "student").exit_code == 0
    return ws


def curves(ws: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in (ws / "logs/student").glob("*.tsv")}


def test_killed_student_before_its_first_row_keeps_the_previous_curves(world, finished_student, tmp_path):
    ws = Path(shutil.copytree(finished_student, tmp_path / "ws"))
    before, model = curves(ws), (ws / "models/student/model.safetensors").read_bytes()
    write_params(world, ws, **{**STUDENT, "student__learning_rate": 5e-4, "student__log_every": 50})
    proc = run_python(KILL_STUDENT, ws, "step", "3")
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    assert curves(ws) == before and len(before) == 2
    assert (ws / "models/student/model.safetensors").read_bytes() == model


def test_failed_student_puts_the_previous_curves_back(world, finished_student, tmp_path, monkeypatch):
    import pipeline.training.step as training

    ws = Path(shutil.copytree(finished_student, tmp_path / "ws"))
    before = curves(ws)
    write_params(world, ws, **STUDENT, student__learning_rate=5e-4)
    monkeypatch.setattr(training, "distillation_loss", failing_on_call(6, training.distillation_loss))
    assert_one_line_error(kdqa(ws, "-q", "student"), ENOSPC)  # the curve had 5 new rows by then
    assert curves(ws) == before


# ---------------------------------------------------------------------------------------------------------
# The pieces: write_errors.describe, free-space estimates
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("code, remedy", [(errno.ENOSPC, "free some space"), (errno.EDQUOT, "quota"),
                                          (errno.EROFS, "writable folder"), (errno.EACCES, "permissions")])
def test_describe_names_the_path_and_the_remedy(code, remedy):
    from pipeline.runtime.write_errors import describe

    line = describe(OSError(code, os.strerror(code)), Path("models/student"))
    assert line.startswith(f"models/student: {os.strerror(code)}: ") and remedy in line
    assert describe(OSError(code, os.strerror(code), "x/y.json")).startswith("x/y.json: ")


def test_describe_reads_rust_and_torch_writers(monkeypatch, tmp_path):
    from pipeline.runtime import write_errors

    rust = RuntimeError("Error while serializing: I/O error: No space left on device (os error 28)")
    assert ENOSPC in write_errors.describe(rust, tmp_path)
    torch_error = RuntimeError("[enforce fail at inline_container.cc:672] . PytorchStreamWriter failed writing file")
    assert write_errors.describe(torch_error, tmp_path) is None  # plenty of room here: not a full disk
    usage = collections.namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage(100, 100, 0))
    assert ENOSPC in write_errors.describe(torch_error, tmp_path)
    assert write_errors.describe(FileNotFoundError(errno.ENOENT, "gone"), tmp_path) is None  # not a write failure
    assert write_errors.describe(ValueError("os error 2"), tmp_path) is None


def test_space_estimates(world, tmp_path):
    import pyarrow.parquet as pq

    from pipeline.params import Params
    from pipeline.runtime.preflight import space_needed
    from pipeline.runtime.workspace import Workspace

    ws = clone(world, tmp_path / "ws")
    params = Params()
    params.student.model, params.student.checkpoint_every = str(world.student), 5
    tokens = sum(len(ids) for split in ("train", "dev") for shard in (ws / "data/features" / split).glob("part-*")
                 for ids in pq.read_table(shard, columns=["input_ids"]).column("input_ids").to_pylist())
    from safetensors import safe_open

    with safe_open(str(world.student / "model.safetensors"), framework="pt") as f:
        parameters = sum(f.get_tensor(k).numel() for k in f.keys())
    w = Workspace(ws)
    assert space_needed("teacher", params, w) == {w.teacher_work: 0, w.teacher: 0}  # logits up to date: nothing to write
    shutil.rmtree(ws / "data/teacher")
    assert space_needed("teacher", params, w) == {w.teacher_work: 4 * tokens, w.teacher: 4 * tokens}
    assert space_needed("student", params, w) == {w.student_model: 4 * parameters, w.checkpoints: 24 * parameters}
