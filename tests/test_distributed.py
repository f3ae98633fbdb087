"""Both stages under PyTorch's launcher (torch.distributed.run = torchrun), 2 processes, gloo on CPU.

Every multi-process run is a real `python -m torch.distributed.run --standalone --nproc-per-node=2 -m
pipeline ...` subprocess (or `kdqa teacher` re-launching itself that way from `teacher.nproc`), so the
rendezvous, the process group and DDP are exercised as in a user's run. 1-process reference runs go
in-process (click's runner), DVC through its Python API: interpreter start-up is most of the cost here.

- teacher: 1-process logits (reference, and a run that crashes after 3 shards) vs. `kdqa teacher` with
  teacher.nproc=2 resuming that crash: byte-identical shards, same manifest shard list, the shards done
  before the crash not recomputed; changing teacher.nproc leaves the DVC stage up to date.
- student, uneven shards (7 shards of 16 x 6 + 8 rows over 2 ranks): DDP runs 3 epochs with rank-0 dev
  evaluations without hanging, the loss falls, only rank 0 logs and saves.
- student, same global batch: 2 processes x batch 4 (crashed in a rank-0 evaluation after a checkpoint,
  then resumed) against 1 process x batch 8 on a layout where each step of both sees the same 8 features.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

TESTS_DIR = Path(__file__).resolve().parent
REPO_ROOT = TESTS_DIR.parent
if str(TESTS_DIR) not in sys.path:
    sys.path.insert(0, str(TESTS_DIR))

import tiny  # noqa: E402
from reliability_kit import single_thread  # noqa: E402

TORCHRUN_2 = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", "-m", "pipeline"]
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")  # dvc's own, from its Python API

LAUNCH_TIMEOUT = 240  # a hang (a rank waiting forever in a collective) fails the test instead of blocking CI
LAUNCHER_VARS = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "GROUP_RANK", "MASTER_ADDR",
                 "MASTER_PORT", "TORCHELASTIC_RUN_ID", "OMP_NUM_THREADS")


def env() -> dict:
    e = {k: v for k, v in os.environ.items() if k not in LAUNCHER_VARS}
    e.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1", DVC_NO_ANALYTICS="1",
             TOKENIZERS_PARALLELISM="false", TRANSFORMERS_NO_ADVISORY_WARNINGS="1")
    return e


def launch(args: list[str], cwd: Path, ok: bool = True, cmd: list[str] = TORCHRUN_2) -> subprocess.CompletedProcess:
    """`torchrun --nproc-per-node=2 -m pipeline ARGS` (or `cmd ARGS`) in `cwd`, as a subprocess."""
    proc = subprocess.run(cmd + args, cwd=cwd, env=env(), capture_output=True, text=True, timeout=LAUNCH_TIMEOUT)
    if ok and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd + args)} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr[-8000:]}")
    if not ok and proc.returncode == 0:
        raise AssertionError(f"{' '.join(cmd + args)} should have failed:\n{proc.stderr[-8000:]}")
    return proc


def kdqa(args: list[str], cwd: Path, ok: bool = True):
    """`kdqa -C CWD ARGS` in this process (1 process, no launcher): the workspace is `cwd`."""
    from click.testing import CliRunner

    from pipeline.cli import cli

    assert not any(v in os.environ for v in LAUNCHER_VARS[:4]), "run the test suite outside torchrun"
    result = CliRunner().invoke(cli, ["-C", str(cwd), *args], prog_name="kdqa")
    if ok and result.exit_code != 0:
        raise AssertionError(f"kdqa {' '.join(args)} exited {result.exit_code}: {result.output}\n{result.exception!r}")
    if not ok:
        assert result.exit_code != 0, result.output
    return result


def write_params(project: Path, assets: Path, **overrides) -> None:
    overrides.setdefault("teacher__trust_remote_code", False)  # dvc.yaml lists it as a param
    tiny.write_params(project / "params.yaml", assets / "teacher", assets / "student", assets / "train.json",
                      assets / "dev.json", **overrides)


def set_params(path: Path, **overrides) -> None:
    """Change params.yaml keys given as section__key=value."""
    import yaml

    params = yaml.safe_load(path.read_text())
    for key, value in overrides.items():
        section, name = key.split("__")
        params[section][name] = value
    path.write_text(yaml.safe_dump(params))


def read_tsv(path: Path) -> list[dict]:
    with path.open() as f:
        return list(csv.DictReader(f, delimiter="\t"))


def load_weights(model_dir: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(model_dir / "model.safetensors"))


def max_weight_difference(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k].float() - b[k].float()).abs().max()) for k in a)


def manifest(folder: Path) -> dict:
    return json.loads((folder / "manifest.json").read_text())


# --- fixtures: tiny models and data; features plus 1-process teacher logits, committed to DVC ---

@pytest.fixture(scope="module")
def assets(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("dist-assets")
    tiny.make_model(root / "teacher", layers=2, seed=0)
    tiny.make_model(root / "student", layers=1, seed=1)
    # No attention dropout in the student: the same-global-batch comparison needs the same forward pass in
    # both runs (hidden dropout is student.dropout, set per test).
    config = json.loads((root / "student" / "config.json").read_text())
    config["attention_probs_dropout_prob"] = 0.0
    (root / "student" / "config.json").write_text(json.dumps(config))
    tiny.make_squad(root / "train.json", articles=6, paragraphs=3, questions=4, seed=0)
    tiny.make_squad(root / "dev.json", articles=2, paragraphs=2, questions=3, seed=1)
    return root


@pytest.fixture(scope="module")
def reference(tmp_path_factory, assets) -> Path:
    """A DVC project (the repository's dvc.yaml) after a 1-process prepare + teacher and `dvc commit`."""
    from dvc.repo import Repo

    project = tmp_path_factory.mktemp("dist-dvc")
    shutil.copy2(REPO_ROOT / "dvc.yaml", project / "dvc.yaml")
    shutil.copytree(REPO_ROOT / "pipeline", project / "pipeline", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(REPO_ROOT / "data" / "raw", project / "data" / "raw")  # a dependency of prepare
    write_params(project, assets, teacher__nproc=1)
    kdqa(["-q", "prepare"], project)
    kdqa(["-q", "teacher"], project)
    shards = manifest(project / "data" / "features" / "train")["shards"]
    # The premise of the uneven tests: a shard count not divisible by 2, and shards of different sizes.
    assert len(shards) % 2 == 1 and len({s["rows"] for s in shards}) > 1, shards
    Repo.init(str(project), no_scm=True)
    dvc(project, "commit", "--force", "--with-deps", "teacher")  # dvc.lock as `dvc repro teacher` leaves it
    return project


def dvc(project: Path, *args: str) -> str:
    """`dvc ARGS` in the project (DVC names stages relative to its working directory: a process of its own)."""
    proc = subprocess.run([sys.executable, "-m", "dvc", *args], cwd=project, env={**env(), "DVC_NO_ANALYTICS": "1"},
                          capture_output=True, text=True, timeout=LAUNCH_TIMEOUT)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout


def teacher_stage_status(project: Path) -> dict:
    return json.loads(dvc(project, "status", "--json", "teacher") or "{}")


# --- teacher ---

def test_teacher_nproc_is_not_a_stage_dependency(reference):
    params = reference / "params.yaml"
    original = params.read_text()
    try:
        assert teacher_stage_status(reference) == {}
        set_params(params, teacher__nproc=2, teacher__batch_size=3)
        assert teacher_stage_status(reference) == {}
        set_params(params, teacher__trust_remote_code=True)  # a listed param does invalidate it
        assert "teacher" in teacher_stage_status(reference)
    finally:
        params.write_text(original)


def test_teacher_two_processes_resume_and_match_one_process(reference, assets, tmp_path):
    project = tmp_path / "two"
    shutil.copytree(reference / "data" / "features", project / "data" / "features")
    write_params(project, assets, teacher__nproc=1)
    work = project / ".kdqa" / "teacher-work" / "train"

    # 1) A 1-process run crashes: a directory squatting on shard 3's path makes its write fail, after
    # shards 0, 1 and 2 are done.
    (work / "part-00003.parquet").mkdir(parents=True)
    kdqa(["-q", "teacher"], project, ok=False)
    done = sorted(p.name.split(".")[0] for p in work.glob("*.done.json"))
    assert done == ["part-00000", "part-00001", "part-00002"], done
    kept = {name: (work / f"{name}.parquet").stat().st_mtime_ns for name in done}
    (work / "part-00003.parquet").rmdir()

    # 2) `kdqa teacher` with teacher.nproc=2 re-launches itself under torch.distributed.run. Rank 0 takes
    # shards 0, 2, 4, 6 and rank 1 shards 1, 3, 5; each skips what the crashed run finished.
    set_params(project / "params.yaml", teacher__nproc=2)
    proc = launch(["teacher"], project, cmd=[sys.executable, "-m", "pipeline"])
    assert "starting 2 processes" in proc.stderr and "torch.distributed.run --standalone" in proc.stderr
    resumed = [line for line in proc.stderr.splitlines() if "train: resuming" in line]
    assert sorted(line.split("resuming, ")[1] for line in resumed) == ["1 of 3 shards already done",
                                                                      "2 of 4 shards already done"], resumed
    published, expected = project / "data" / "teacher", reference / "data" / "teacher"
    for name, mtime in kept.items():
        assert (published / "train" / f"{name}.parquet").stat().st_mtime_ns == mtime  # not recomputed

    for split in ("train", "dev"):
        names = sorted(p.name for p in (expected / split).glob("part-*.parquet"))
        assert names == sorted(p.name for p in (published / split).glob("part-*.parquet"))
        for name in names:  # byte for byte: same rows, same order, same float16 values
            assert (expected / split / name).read_bytes() == (published / split / name).read_bytes(), name
        one, two = manifest(expected / split), manifest(published / split)
        assert one["shards"] == two["shards"] and one["rows"] == two["rows"]
        assert one["fingerprint"] == two["fingerprint"]
    assert manifest(published / "train")["rows"] == manifest(project / "data" / "features" / "train")["features"]


def test_a_carried_teacher_under_two_processes_writes_the_shards_of_one_process(reference, assets, tmp_path):
    """teacher.models[1] of another tokenizer (characters: several of its windows per features window) carried
    onto the features by 2 ranks, each aligning its own shards' examples: the same bytes and alignment figures as
    one process. Both runs start from the reference's logits cache, so teacher.models[0] is copied, not run."""
    carried = tiny.make_model(tmp_path / "characters", layers=1, seed=5, vocab=tiny.CHARACTER_VOCAB)
    runs = {}
    for nproc in (1, 2):
        project = runs[nproc] = tmp_path / f"nproc-{nproc}"
        shutil.copytree(reference / "data" / "features", project / "data" / "features")
        shutil.copytree(reference / ".kdqa" / "teacher-cache", project / ".kdqa" / "teacher-cache")
        write_params(project, assets, teacher__nproc=nproc, teacher__model=None,
                     teacher__models=[str(assets / "teacher"), str(carried)])
    with single_thread():  # as torchrun's ranks run (OMP_NUM_THREADS=1); 2 threads on 2 busy cores: 4x slower
        kdqa(["-q", "teacher"], runs[1])
    proc = launch(["teacher"], runs[2], cmd=[sys.executable, "-m", "pipeline"])
    assert "starting 2 processes" in proc.stderr and "teachers: 1 reused from earlier runs" in proc.stderr

    one, two = runs[1] / "data" / "teacher", runs[2] / "data" / "teacher"
    for split in ("train", "dev"):
        assert manifest(one / split) == manifest(two / split)
        for folder in ("teacher-0", "teacher-1"):
            names = sorted(p.name for p in (one / split / folder).glob("part-*.parquet"))
            assert len(names) == len(manifest(runs[1] / "data" / "features" / split)["shards"])
            for name in names:  # byte for byte: same rows, same order, same float16 values
                assert (one / split / folder / name).read_bytes() == (two / split / folder / name).read_bytes()
        carried_one, carried_two = (manifest(run / split / "teacher-1")["carried"] for run in (one, two))
        assert carried_one == carried_two and carried_one["features_pieced"] > 0


# --- student, uneven shards ---

def planned_steps(project: Path, batch_size: int, epochs: int, seed: int, world: int) -> int:
    from pipeline.training.stream import ShardStream, find_shard_pairs

    pairs = find_shard_pairs(project / "data" / "features" / "train", project / "data" / "teacher" / "train")
    stream = ShardStream(pairs, batch_size, seed, 0, 0, world)
    return sum(stream.steps_in_epoch(e) for e in range(epochs))


def test_student_ddp_uneven_shards(reference, assets, tmp_path):
    project = tmp_path / "uneven"
    shutil.copytree(reference / "data", project / "data")
    write_params(project, assets, student__batch_size=4, student__epochs=3, student__learning_rate=3e-3,
                 student__dropout=0.1, student__num_workers=1, student__log_every=1, student__eval_every=5,
                 student__checkpoint_every=4)
    proc = launch(["student"], project)
    steps = planned_steps(project, 4, 3, 1, world=2)  # per epoch, the smallest rank's batch count
    assert "go unused so that all 2 ranks take the same number of steps" in proc.stderr

    log = read_tsv(project / "logs" / "student" / "train.tsv")
    assert [int(r["step"]) for r in log] == list(range(1, steps + 1))  # one writer (rank 0), every step once
    losses = [float(r["loss"]) for r in log]
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 - 0.05, losses
    evals = read_tsv(project / "logs" / "student" / "eval.tsv")
    # every 5 steps, plus the final evaluation after the last step
    assert [int(r["step"]) for r in evals] == list(range(5, steps + 1, 5)) + ([steps] if steps % 5 else [])
    assert json.loads((project / "models" / "student" / "kdqa_training.json").read_text())["steps"] == steps
    assert (project / "models" / "student" / "README.md").exists()  # rank 0's final dev evaluation and save
    assert not (project / "checkpoints" / "student").exists()


# --- student, same global batch: 2 processes x 4 against 1 process x 8 ---

def write_layout(project: Path, source: Path, groups: list[list[int]], rows_per_block: int) -> None:
    """Train features + logits where shard j holds the source rows of the row blocks groups[j] (blocks of
    `rows_per_block` consecutive rows), with the manifests the student verifies."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from pipeline.store.shards import (features_fingerprint, list_shards, sha256_file, shard_name, write_json_atomic,
                                 write_table_atomic)

    src_f, src_t = source / "features" / "train", source / "teacher" / "train"
    features = pa.concat_tables([pq.read_table(p) for p in list_shards(src_f)])
    logits = pa.concat_tables([pq.read_table(p) for p in list_shards(src_t)])
    out_f, out_t = project / "data" / "features" / "train", project / "data" / "teacher" / "train"
    for j, blocks in enumerate(groups):
        rows = [b * rows_per_block + i for b in blocks for i in range(rows_per_block)]
        write_table_atomic(features.take(rows), out_f / shard_name(j), 64)
        write_table_atomic(logits.take(rows), out_t / shard_name(j), 64, float_columns=("start_logits", "end_logits"))

    def listing(folder):
        return [{"name": p.name, "rows": pq.ParquetFile(p).metadata.num_rows, "sha256": sha256_file(p)}
                for p in list_shards(folder)]

    source_manifest = manifest(src_f)
    write_json_atomic(out_f / "manifest.json", {**{k: source_manifest[k] for k in ("vocab_fingerprint", "tokenizer",
                                                                                 "features_format", "prepare")},
                                                "shards": listing(out_f)})
    write_json_atomic(out_t / "manifest.json", {"fingerprint": f"layout-{len(groups)}", "shards": listing(out_t),
                                                "fingerprint_parts": {
                                                    "features": features_fingerprint(out_f),
                                                    "logits_format": manifest(src_t)["fingerprint_parts"]["logits_format"]}})


def test_student_ddp_matches_one_process_and_resumes(reference, assets, tmp_path):
    """2 DDP processes x batch 4 train the same model as 1 process x batch 8, step for step.

    A step of the 2-process run is rank 0's batch plus rank 1's batch. For the 1-process run to see the
    same 8 features in that step, batches and shards coincide: 16 shards of 4 features for the 2-process
    run, 8 shards of 8 for the 1-process run, where the shard the 1-process run reads at step k is the
    union of the two shards ranks 0 and 1 read at step k (positions 2k and 2k+1 of the 16-shard order).
    One epoch (a later epoch reshuffles the two layouts differently), no dropout. Compared: the logged
    loss of every step (under DDP the mean over ranks, here the global batch's loss) and the final weights.

    The 2-process run also crashes in a rank-0 evaluation (truncated dev shard) after its step-3 checkpoint
    and is resumed with `--resume`: rank 0's weights/optimizer, each rank's RNG file, the stream position.
    """
    from pipeline.training.stream import ShardStream

    seed, n = 1, 8
    order16 = ShardStream([None] * (2 * n), 4, seed, 0).shard_order(0)
    order8 = ShardStream([None] * n, 8, seed, 0).shard_order(0)
    groups8 = [None] * n
    for k in range(n):
        groups8[order8[k]] = [order16[2 * k], order16[2 * k + 1]]
    # float32: bfloat16 autocast (the `auto` default on CPUs that have it) rounds batches of 8 and 2 x 4 apart
    # by more than the float32 noise this comparison allows.
    settings = dict(student__epochs=1, student__learning_rate=3e-3, student__dropout=0.0, student__seed=seed,
                    student__num_workers=0, student__log_every=1, student__precision="float32")

    one = tmp_path / "one"
    write_layout(one, reference / "data", groups8, 4)
    write_params(one, assets, student__batch_size=8, **settings)
    kdqa(["-q", "student"], one)

    two = tmp_path / "two"
    write_layout(two, reference / "data", [[b] for b in range(2 * n)], 4)
    shutil.copytree(reference / "data" / "features" / "dev", two / "data" / "features" / "dev")
    shutil.copy2(reference / "data" / "features" / "dev_examples.parquet", two / "data" / "features")
    write_params(two, assets, student__batch_size=4, student__checkpoint_every=3, student__eval_every=4, **settings)
    dev_shard = two / "data" / "features" / "dev" / "part-00000.parquet"
    intact = dev_shard.read_bytes()
    dev_shard.write_bytes(intact[: len(intact) // 2])
    launch(["student"], two, ok=False)  # rank 0 fails evaluating at step 4; torchrun stops rank 1
    checkpoint = two / "checkpoints" / "student"
    state = json.loads((checkpoint / "state.json").read_text())
    assert state["step"] == 3 and state["key"]["world_size"] == 2
    assert {p.name for p in checkpoint.iterdir()} >= {"model.safetensors", "optimizer.pt", "rng-rank0.pt", "rng-rank1.pt"}
    assert not any(k.startswith("module.") for k in load_weights(checkpoint))  # the unwrapped model's keys

    dev_shard.write_bytes(intact)
    proc = launch(["student", "--resume"], two)
    assert proc.stderr.count("resuming from checkpoints/student at step 3") == 2  # both ranks
    assert [int(r["step"]) for r in read_tsv(two / "logs" / "student" / "eval.tsv")] == [4, 8]

    log1, log2 = (read_tsv(p / "logs" / "student" / "train.tsv") for p in (one, two))
    assert [int(r["step"]) for r in log1] == [int(r["step"]) for r in log2] == list(range(1, n + 1))
    for a, b in zip(log1, log2):
        assert float(a["loss"]) == pytest.approx(float(b["loss"]), rel=1e-4, abs=1e-5), (log1, log2)
    losses = [float(r["loss"]) for r in log2]
    assert losses[-1] < losses[0], losses

    # Weights: a few biases have an exactly zero gradient (a constant added to every position's logit,
    # which softmax ignores): the key bias, the QA head's bias and the last LayerNorm's bias, which only
    # feeds the QA head. AdamW turns their rounding noise into steps of about lr, different in each run,
    # so they are left out of the elementwise check; every other tensor agrees to float32 noise.
    start = load_weights(assets / "student")
    w1, w2 = load_weights(one / "models" / "student"), load_weights(two / "models" / "student")
    last = json.loads((assets / "student" / "config.json").read_text())["num_hidden_layers"] - 1
    zero_gradient = [k for k in w1 if k.endswith(("attention.self.key.bias", "qa_outputs.bias",
                                                  f"layer.{last}.output.LayerNorm.bias"))]
    assert len(zero_gradient) == 1 + last + 2, zero_gradient
    for k in zero_gradient:
        del w1[k], w2[k]
    assert max_weight_difference(w1, w2) < 2e-5
    update = max(float((w1[k] - start[k]).abs().max()) for k in w1)
    assert update > 100 * 2e-5  # the weights did move: the check above is not vacuous


# --- the re-launch itself (no processes started) ---

def test_relaunch_only_outside_a_launcher(monkeypatch):
    from pipeline.training import distributed
    from pipeline.runtime.errors import KdqaError

    calls = []
    monkeypatch.setattr(distributed.os, "execv", lambda path, argv: calls.append(argv))
    monkeypatch.setattr(distributed.torch.cuda, "is_available", lambda: False)  # the same on every machine
    for name in LAUNCHER_VARS[:4]:
        monkeypatch.delenv(name, raising=False)
    distributed.relaunch(1, ["teacher"])
    assert calls == []  # one process: runs in place
    with pytest.raises(KdqaError):
        distributed.relaunch(0, ["teacher"])
    distributed.relaunch(3, ["--params", "p.yaml", "-q", "teacher"])
    assert calls == [[sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=3",
                      "-m", "pipeline", "--params", "p.yaml", "-q", "teacher"]]
    monkeypatch.setenv("LOCAL_RANK", "0")  # a torchrun worker: torchrun's own flags decide, teacher.nproc is ignored
    distributed.relaunch(3, ["teacher"])
    assert len(calls) == 1  # no second relaunch

    # On a CUDA machine, more processes than GPUs is refused before anything starts.
    monkeypatch.delenv("LOCAL_RANK")
    monkeypatch.setattr(distributed.torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(distributed.torch.cuda, "device_count", lambda: 2)
    with pytest.raises(KdqaError, match="3 processes requested but only 2 CUDA device"):
        distributed.relaunch(3, ["teacher"])
    assert len(calls) == 1
