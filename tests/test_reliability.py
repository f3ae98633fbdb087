"""Issue 4, reliability: crash-safe resumable teacher, verified alignment, exact student resume, safe loading.

Crashes are real: a subprocess runs the stage with a hook that sends itself SIGKILL at a chosen point (after
the n-th shard, inside a shard's write, inside publishing, inside a training step, inside a checkpoint swap).
The hooks count events instead of sleeping, so the tests do not depend on timing. Reruns go through the
in-process CLI and are compared with uninterrupted runs: logits shards byte for byte, student weights with
torch.equal on every tensor, the training curve (loss, KD part, CE part, lr) line for line.
"""

from __future__ import annotations

import csv
import json
import re
import shutil
import signal
from pathlib import Path

import pytest

from reliability_kit import (
    KILL_AT_NTH_HIT,
    KILL_STUDENT,
    STUDENT,
    TOTAL_STEPS,
    World,
    assert_one_line_error,
    clone,
    get_world,
    kdqa,
    reference_student,
    run_python,
    tensors,
    write_params,
)

TRAIN_SHARDS = 8  # 32 train features in shards of 4


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> World:
    return get_world(tmp_path_factory)


def shard_bytes(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.glob("part-*.parquet"))}


def comparable_manifest(folder: Path) -> dict:
    manifest = json.loads((folder / "manifest.json").read_text())
    # How fast, on what, and how many shards were copied from the logits cache: not what was computed.
    for volatile in ("features_per_second", "device", "shards_from_cache", "rows_from_cache"):
        manifest.pop(volatile, None)
    return manifest


def assert_same_logits_as_clean_run(world: World, ws: Path) -> None:
    for split in ("train", "dev"):
        clean, got = world.workspace / "data/teacher" / split, ws / "data/teacher" / split
        expected = shard_bytes(clean)
        assert expected and shard_bytes(got) == expected, f"{split} logits differ from an uninterrupted run"
        assert comparable_manifest(got) == comparable_manifest(clean)
        assert sorted(p.name for p in got.iterdir()) == sorted(p.name for p in clean.iterdir())  # no leftovers
    assert not list((ws / "data/teacher").glob(".*")), "staging folder left in the DVC output"
    assert not any((ws / ".kdqa/teacher-work").glob("*")), "work folder kept after publishing"


# ---------------------------------------------------------------------------------------------------------
# Teacher: SIGKILL at any moment, rerun, same bytes
# ---------------------------------------------------------------------------------------------------------

KILL_TEACHER = KILL_AT_NTH_HIT + r'''

import shutil
import pipeline.stages.teacher as teacher
if mode == "after-done":          # right after the n-th shard and its done record are complete
    original = teacher.write_logits_shard
    def write_logits_shard(*a, **k):
        original(*a, **k)
        hit()
    teacher.write_logits_shard = write_logits_shard
elif mode in ("mid-shard", "mid-record"):  # the n-th shard (or record) written to its temp name, not renamed
    suffix = ".parquet" if mode == "mid-shard" else ".done.json"
    original = os.replace
    def replace(src, dst):
        if "teacher-work" in str(dst) and str(dst).endswith(suffix):
            hit()
        return original(src, dst)
    os.replace = replace
elif mode == "publish":           # every shard done; killed while copying them into data/teacher
    original = shutil.copy2
    def copy2(*a, **k):
        out = original(*a, **k)
        hit()
        return out
    shutil.copy2 = copy2

from pipeline.cli import main
sys.argv = ["kdqa", "teacher"]
main()
'''


@pytest.mark.parametrize(
    "mode, n, done_before_rerun",
    [("after-done", 3, 3), ("mid-shard", 5, 4), ("mid-record", 2, 1), ("publish", 2, TRAIN_SHARDS)],
)
def test_teacher_sigkill_then_rerun_gives_identical_shards(world, tmp_path, mode, n, done_before_rerun):
    ws = clone(world, tmp_path / "ws")
    shutil.rmtree(ws / "data/teacher")

    proc = run_python(KILL_TEACHER, ws, mode, str(n))
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    work = ws / ".kdqa/teacher-work/train"
    assert len(list(work.glob("*.done.json"))) == done_before_rerun
    assert not (ws / "data/teacher/train/manifest.json").exists(), "a killed run must not look complete"
    if mode == "mid-shard":
        assert list(work.glob(".part-*.tmp-*")), "expected the half-written temp file of the killed shard"
    if mode == "publish":
        assert (ws / "data/teacher/.train.partial").is_dir()

    result = kdqa(ws, "teacher")
    assert result.exit_code == 0, result.output
    assert f"train: resuming, {done_before_rerun} of {TRAIN_SHARDS} shards already done" in result.stderr
    assert_same_logits_as_clean_run(world, ws)


def test_teacher_ctrl_c_keeps_work_and_skips_corrupted_work_shard(world, tmp_path, monkeypatch):
    """Ctrl-C: exit 130, completed shards kept; a work shard damaged afterwards is recomputed, not trusted."""
    import pipeline.stages.teacher as teacher

    ws = clone(world, tmp_path / "ws")
    shutil.rmtree(ws / "data/teacher")
    original, calls = teacher.shard_logits, []

    def interrupted(*a, **k):
        calls.append(1)
        if len(calls) == 4:
            raise KeyboardInterrupt
        return original(*a, **k)

    monkeypatch.setattr(teacher, "shard_logits", interrupted)
    result = kdqa(ws, "teacher")
    assert result.exit_code == 130
    assert "interrupted (completed work is kept; rerun to resume)" in result.stderr
    monkeypatch.setattr(teacher, "shard_logits", original)

    work = ws / ".kdqa/teacher-work/train"
    assert len(list(work.glob("*.done.json"))) == 3
    damaged = work / "part-00001.parquet"
    damaged.write_bytes(damaged.read_bytes()[:-20])  # truncated after its record was written

    result = kdqa(ws, "teacher")
    assert result.exit_code == 0, result.output
    assert "train: resuming, 2 of 8 shards already done" in result.stderr
    assert f"{damaged.relative_to(ws)}: does not match its done record" in result.stderr
    assert_same_logits_as_clean_run(world, ws)


def test_teacher_work_for_other_features_is_not_reused(world, tmp_path, monkeypatch):
    """Work left by a crash is keyed by the features: after a re-prepare it is ignored, not resumed."""
    import pipeline.stages.teacher as teacher

    ws = clone(world, tmp_path / "ws")
    shutil.rmtree(ws / "data/teacher")
    original = teacher.shard_logits
    calls = []

    def interrupted(*a, **k):
        calls.append(1)
        if len(calls) == 6:
            raise KeyboardInterrupt
        return original(*a, **k)

    monkeypatch.setattr(teacher, "shard_logits", interrupted)
    assert kdqa(ws, "teacher").exit_code == 130
    monkeypatch.setattr(teacher, "shard_logits", original)

    write_params(world, ws, prepare__doc_stride=12)
    assert kdqa(ws, "-q", "prepare").exit_code == 0
    result = kdqa(ws, "teacher")
    assert result.exit_code == 0, result.output
    assert "resuming" not in result.stderr
    from pipeline.store.shards import features_fingerprint

    manifest = json.loads((ws / "data/teacher/train/manifest.json").read_text())
    assert manifest["fingerprint_parts"]["features"] == features_fingerprint(ws / "data/features/train")


def test_teacher_recomputes_damaged_published_logits(world, tmp_path):
    """A damaged published shard is never trusted: a rerun (what `dvc repro` does when data/teacher changed)
    recomputes the logits and publishes them whole again."""
    ws = clone(world, tmp_path / "ws")
    shard = ws / "data/teacher/train/part-00002.parquet"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))

    result = kdqa(ws, "teacher")
    assert result.exit_code == 0, result.output
    assert_same_logits_as_clean_run(world, ws)


# ---------------------------------------------------------------------------------------------------------
# Student: killed, rerun, same weights as an uninterrupted run
# ---------------------------------------------------------------------------------------------------------

def read_curve(ws: Path) -> list[dict]:
    with (ws / "logs/student/train.tsv").open() as f:
        return list(csv.DictReader(f, delimiter="\t"))


@pytest.fixture(scope="module")
def uninterrupted(world, tmp_path_factory) -> dict:
    """The reference: the same training without checkpoints or crashes (num_workers 0)."""
    return reference_student(world, tmp_path_factory)


@pytest.mark.parametrize(
    "num_workers, checkpoint_every, mode, n, resume_step, curves_deleted",
    [
        (0, 5, "step", 13, 10, False),  # killed in step 13: resume at step 10, mid epoch 0
        # checkpoint on the epoch boundary: resume at the start of epoch 1; the curves were deleted in between,
        # as `dvc repro` does with a stage's plots before rerunning it
        (0, 8, "step", 21, 16, True),
        (1, 5, "checkpoint-swap", 2, 5, False),  # killed between the renames of checkpoint 10: `.old` resumes
    ],
)
def test_student_killed_then_rerun_ends_with_identical_weights(world, tmp_path, uninterrupted, num_workers,
                                                               checkpoint_every, mode, n, resume_step,
                                                               curves_deleted):
    ws = clone(world, tmp_path / "ws")
    write_params(world, ws, **STUDENT, student__checkpoint_every=checkpoint_every, student__num_workers=num_workers)

    proc = run_python(KILL_STUDENT, ws, mode, str(n))
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    assert not (ws / "models/student").exists()
    state_dir = ws / "checkpoints" / (".student.old" if mode == "checkpoint-swap" else "student")
    assert json.loads((state_dir / "state.json").read_text())["step"] == resume_step
    if curves_deleted:
        shutil.rmtree(ws / "logs")

    # A plain rerun of the stage (what `dvc repro` does after a crash) continues from the checkpoint.
    result = kdqa(ws, "student")
    assert result.exit_code == 0, result.output
    assert re.search(rf"resuming from {re.escape(str(ws / 'checkpoints/student'))} at step {resume_step} .*loss: w=0\.5 T=2\.0",
                     result.stderr)

    got = tensors(ws / "models/student/model.safetensors")
    ref = uninterrupted["weights"]
    assert got.keys() == ref.keys()
    different = [k for k in ref if not __import__("torch").equal(got[k], ref[k])]
    assert not different, f"weights differ from the uninterrupted run: {different[:5]}"

    # The curve: every step once, identical to the uninterrupted run's (loss, KD part, CE part, lr) ...
    curve = read_curve(ws)
    assert [int(r["step"]) for r in curve] == list(range(1, TOTAL_STEPS + 1))
    assert (ws / "logs/student/train.tsv").read_text() == uninterrupted["curve"]
    # ... and in particular distillation is still on after the resume (not silently dropped).
    after = [float(r["kd_loss"]) for r in curve if int(r["step"]) > resume_step]
    assert after and all(kd > 0 for kd in after)
    assert not list((ws / "checkpoints").iterdir()), "checkpoints kept after training finished"


@pytest.fixture(scope="module")
def crashed_student_template(world, tmp_path_factory) -> Path:
    ws = clone(world, tmp_path_factory.mktemp("crashed") / "ws")
    write_params(world, ws, **STUDENT, student__checkpoint_every=5, student__num_workers=0)
    proc = run_python(KILL_STUDENT, ws, "step", "8")
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    return ws


@pytest.fixture
def crashed_student(crashed_student_template, tmp_path) -> Path:
    """A workspace whose student run was killed in step 8, leaving a checkpoint at step 5 (a private copy)."""
    return Path(shutil.copytree(crashed_student_template, tmp_path / "ws"))


def test_student_resume_refuses_changed_loss_settings(world, crashed_student):
    ws = crashed_student
    write_params(world, ws, **STUDENT, student__checkpoint_every=5, student__num_workers=0,
                 student__temperature=4.0)
    result = kdqa(ws, "-q", "student", "--resume")
    assert_one_line_error(result, "checkpoints/student", "temperature: 2.0 -> 4.0", "rerun without --resume")
    assert not (ws / "models/student").exists()

    # Without --resume the changed run starts over instead of resuming someone else's loss silently.
    result = kdqa(ws, "student", "--no-resume")
    assert result.exit_code == 0, result.output
    assert "resuming" not in result.stderr


def test_student_resumes_a_checkpoint_from_before_a_setting_existed(world, crashed_student):
    """A kdqa update that adds a student setting (at a default that changes nothing) does not throw away a
    checkpoint written before it: the missing setting is read at its default. Set to anything else, it is a
    changed setting like any other."""
    import json

    ws = crashed_student
    (state_path,) = (ws / "checkpoints/student").glob("**/state.json")
    state = json.loads(state_path.read_text())
    del state["key"]["student"]["teacher_agreement"]  # as written by a kdqa that had no such setting
    state_path.write_text(json.dumps(state))
    write_params(world, ws, **STUDENT, student__checkpoint_every=5, student__num_workers=0,
                 student__teacher_agreement="drop")
    result = kdqa(ws, "-q", "student", "--resume")
    assert_one_line_error(result, "checkpoints/student", "teacher_agreement: 'none' -> 'drop'")
    write_params(world, ws, **STUDENT, student__checkpoint_every=5, student__num_workers=0)
    result = kdqa(ws, "student", "--resume")
    assert result.exit_code == 0, result.output
    assert "resuming from" in result.stderr


def test_student_resume_requires_a_checkpoint(world, tmp_path):
    ws = clone(world, tmp_path / "ws")
    write_params(world, ws, **STUDENT)
    result = kdqa(ws, "-q", "student", "--resume")
    assert_one_line_error(result, "checkpoints/student: no checkpoint to resume from")
    assert not (ws / "models/student").exists()


def test_student_checkpoint_loading_is_weights_only(world, crashed_student):
    """A pickle smuggled into optimizer.pt is refused (torch.load weights_only=True), never executed."""
    import torch

    ws = crashed_student
    marker = ws / "pwned"

    class Payload:
        def __reduce__(self):
            return (Path.touch, (marker,))

    torch.save({"optimizer": Payload(), "scheduler": {}}, ws / "checkpoints/student/optimizer.pt")
    result = kdqa(ws, "-q", "student")
    assert_one_line_error(result, "checkpoints/student: checkpoint unreadable", "--no-resume")
    assert not marker.exists()
    assert not (ws / "models/student").exists()


# ---------------------------------------------------------------------------------------------------------
# Alignment: fingerprints, corrupted shards, feature ids row for row
# ---------------------------------------------------------------------------------------------------------


def assert_nothing_trained(ws: Path) -> None:
    assert not (ws / "models/student").exists()
    assert not (ws / "checkpoints").exists()
    assert not (ws / "logs/student/train.tsv").exists()


@pytest.mark.parametrize("change", [{"prepare__doc_stride": 12}, {"prepare__max_seq_len": 40}, {"data__train": "dev"}])
def test_student_refuses_logits_for_other_features(world, tmp_path, change):
    from pipeline.store.shards import features_fingerprint

    ws = clone(world, tmp_path / "ws")
    if change.get("data__train") == "dev":
        change = {"data__train": str(world.dev)}
    write_params(world, ws, **change)
    assert kdqa(ws, "-q", "prepare").exit_code == 0
    old = json.loads((ws / "data/teacher/train/manifest.json").read_text())["fingerprint_parts"]["features"]
    new = features_fingerprint(ws / "data/features/train")
    assert old != new

    result = kdqa(ws, "-q", "student")
    assert_one_line_error(result, "data/teacher/train", old, new, "kdqa teacher")
    assert_nothing_trained(ws)


def damage(path: Path, how: str) -> None:
    data = path.read_bytes()
    if how == "truncate":
        path.write_bytes(data[: len(data) * 2 // 3])
    elif how == "flip":
        flipped = bytearray(data)
        flipped[len(data) // 2] ^= 0x5A
        path.write_bytes(bytes(flipped))
    elif how == "garbage":
        path.write_bytes(b"not parquet at all" * 10)
    elif how == "delete":
        path.unlink()


@pytest.mark.parametrize(
    "folder, how",
    [("teacher", "truncate"), ("teacher", "flip"), ("teacher", "garbage"), ("teacher", "delete"),
     ("features", "truncate"), ("features", "flip")],
)
def test_damaged_shard_is_named_and_nothing_trains(world, tmp_path, folder, how):
    ws = clone(world, tmp_path / "ws")
    write_params(world, ws, **STUDENT)
    shard = Path("data") / folder / "train" / "part-00003.parquet"
    damage(ws / shard, how)

    assert_one_line_error(kdqa(ws, "-q", "student"), str(shard))
    assert_nothing_trained(ws)
    if folder == "features":  # the teacher refuses damaged features too, naming the file
        assert_one_line_error(kdqa(ws, "-q", "teacher"), str(shard), "kdqa prepare")


def rewrite_logits_shard(ws: Path, name: str, reorder) -> None:
    """Rewrite one logits shard with its rows reordered (a buggy teacher) and record it in the manifest."""
    import pyarrow.parquet as pq

    from pipeline.store.logits import LOGITS_SCHEMA
    from pipeline.store.shards import sha256_file, write_table_atomic

    folder = ws / "data/teacher/train"
    table = pq.read_table(folder / name, schema=LOGITS_SCHEMA)
    table = table.take(reorder(table.num_rows))
    write_table_atomic(table, folder / name, 4000, float_columns=("start_logits", "end_logits"))
    manifest = json.loads((folder / "manifest.json").read_text())
    for entry in manifest["shards"]:
        if entry["name"] == name:
            entry["sha256"] = sha256_file(folder / name)
            entry["rows"] = table.num_rows
    (folder / "manifest.json").write_text(json.dumps(manifest))


def test_feature_id_misalignment_is_detected(world, tmp_path):
    ws = clone(world, tmp_path / "ws")
    write_params(world, ws, **STUDENT)
    rewrite_logits_shard(ws, "part-00005.parquet", lambda n: [1, 0, *range(2, n)])
    line = assert_one_line_error(kdqa(ws, "-q", "student"), "data/teacher/train/part-00005.parquet", "row 0",
                                 "data/features/train/part-00005.parquet")
    assert "holds feature" in line
    assert_nothing_trained(ws)


def test_logits_row_count_mismatch_is_detected(world, tmp_path):
    ws = clone(world, tmp_path / "ws")
    write_params(world, ws, **STUDENT)
    rewrite_logits_shard(ws, "part-00001.parquet", lambda n: list(range(n - 1)))
    assert_one_line_error(kdqa(ws, "-q", "student"), "data/teacher/train/part-00001.parquet", "rows")
    assert_nothing_trained(ws)


def test_stream_checks_feature_ids_row_for_row_while_streaming(world):
    """Even past the up-front check, a shard pair whose ids disagree never yields a batch."""
    from pipeline.runtime.errors import KdqaError
    from pipeline.training.stream import ShardPair, ShardStream

    ws = world.workspace
    features, logits = ws / "data/features/train/part-00000.parquet", ws / "data/teacher/train/part-00001.parquet"
    stream = ShardStream([ShardPair(features, logits, 4)], batch_size=2, seed=0, pad_token_id=0)
    with pytest.raises(KdqaError, match=r"part-00001\.parquet: row 0 holds feature .* but .*part-00000\.parquet has"):
        next(iter(stream))


# ---------------------------------------------------------------------------------------------------------
# Safe loading
# ---------------------------------------------------------------------------------------------------------

PIPELINE = Path(__file__).resolve().parent.parent / "pipeline"


def test_every_torch_load_is_weights_only():
    calls = []
    for path in sorted(PIPELINE.rglob("*.py")):
        for match in re.finditer(r"torch\.load\(([^)]*)\)", path.read_text()):
            calls.append((path.name, match.group(1)))
            assert "weights_only=True" in match.group(1), f"{path.name}: torch.load({match.group(1)})"
    assert calls, "expected the checkpoint loader's torch.load calls"
    for path in sorted(PIPELINE.rglob("*.py")):
        text = path.read_text()
        assert not re.search(r"^\s*(import pickle|from pickle|import dill)", text, re.M), path.name
        assert "weights_only=False" not in text, path.name


def call_arguments(text: str, start: int) -> str:
    """The text between an opening parenthesis (just before `start`) and its matching closing one."""
    depth, i = 1, start
    while depth:
        depth += {"(": 1, ")": -1}.get(text[i], 0)
        i += 1
    return text[start : i - 1]


def test_models_load_through_safetensors_and_no_remote_code_by_default():
    from pipeline.params import Params

    models = (PIPELINE / "model" / "loading.py").read_text()
    assert "use_safetensors=True" in models
    for path in sorted(PIPELINE.rglob("*.py")):
        text = path.read_text()
        assert "trust_remote_code=True" not in text, f"{path.name} turns remote code on by itself"
        for call in re.finditer(r"\.from_pretrained\(", text):  # every hub load passes the params' choice
            args = call_arguments(text, call.end())
            assert "trust_remote_code" in args, f"{path.name}: from_pretrained({args}) without trust_remote_code"
    p = Params()
    assert p.teacher.trust_remote_code is False and p.student.trust_remote_code is False
