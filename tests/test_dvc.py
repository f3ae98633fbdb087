"""A real `dvc repro` in a temporary git repository; a `student.*` change must skip prepare and teacher.

One full `dvc repro` (the module fixture `dvc_repo`) is shared by every test here: a param change, DVC
experiments (`dvc exp run -S`, a queued sweep), `dvc metrics show` and `dvc plots show/diff`.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

import tiny
from conftest import REPO_ROOT
from pipeline.stage_table import STAGES

# Outputs of the stages that must not rerun, and of those that must.
UPSTREAM = ["data/features/train/part-00000.parquet", "data/features/dev_examples.parquet",
            "data/teacher/train/part-00000.parquet", "data/teacher/train/manifest.json", "data/aligned/manifest.json"]
DOWNSTREAM = ["models/student/model.safetensors", "metrics/eval.json", "results/predictions.json"]


def sh(args, cwd, env, timeout=400):
    out = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert out.returncode == 0, f"{' '.join(map(str, args))} failed ({out.returncode}):\n{out.stdout}\n{out.stderr}"
    return out.stdout + out.stderr


def mtimes(repo: Path, paths) -> dict:
    return {p: (repo / p).stat().st_mtime_ns for p in paths}


@dataclass
class DvcRepo:
    """A git + DVC repository holding the pipeline, after one full `dvc repro` (shared by this module)."""
    path: Path
    env: dict
    first_repro: str  # what that `dvc repro` printed
    tracked_before_repro: list[str]  # `git ls-files` after the stages run by hand and `git add -A`

    def dvc(self, *args, timeout=400) -> str:
        return sh([sys.executable, "-m", "dvc", *args], self.path, self.env, timeout)

    def git(self, *args) -> str:
        return sh(["git", *args], self.path, self.env)


def dvc_env() -> dict:
    venv_bin = Path(sys.executable).parent
    assert (venv_bin / "kdqa").exists(), "the kdqa console script must sit beside this interpreter"
    return dict(os.environ, PATH=f"{venv_bin}{os.pathsep}{os.environ.get('PATH', '')}", DVC_NO_ANALYTICS="1",
                HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", GIT_AUTHOR_NAME="t", GIT_AUTHOR_EMAIL="t@t",
                GIT_COMMITTER_NAME="t", GIT_COMMITTER_EMAIL="t@t")


def make_dvc_repo(root: Path, tiny_assets, **overrides) -> Path:
    """git init + dvc init in root/repo with this project's dvc.yaml and pipeline/, and tiny params."""
    env = dvc_env()
    repo = root / "repo"
    repo.mkdir()
    shutil.copy2(REPO_ROOT / "dvc.yaml", repo / "dvc.yaml")
    shutil.copytree(REPO_ROOT / "pipeline", repo / "pipeline", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    for name in (".gitignore", ".dvcignore"):
        if (REPO_ROOT / name).exists():
            shutil.copy2(REPO_ROOT / name, repo / name)
    # The data where users keep local JSON: data/raw/, a dependency of the prepare stage.
    raw = repo / "data" / "raw"
    raw.mkdir(parents=True)
    shutil.copy2(REPO_ROOT / "data" / "raw" / "README.md", raw / "README.md")
    tiny.make_squad(raw / "train.json", articles=2, paragraphs=2, questions=3, seed=5)
    tiny.make_squad(raw / "dev.json", articles=1, paragraphs=2, questions=3, seed=6)
    tiny.write_params(repo / "params.yaml", tiny_assets.teacher, tiny_assets.student,
                      Path("data/raw/train.json"), Path("data/raw/dev.json"), **overrides)
    sh(["git", "init", "-q"], repo, env)
    sh([sys.executable, "-m", "dvc", "init", "-q"], repo, env)
    sh([sys.executable, "-m", "dvc", "config", "core.analytics", "false"], repo, env)
    return repo


@pytest.fixture(scope="module")
def dvc_repo(tmp_path_factory, tiny_assets) -> DvcRepo:
    """The one full `dvc repro` of this module: every test here continues from a repository in sync.

    Before it, as a user trying things out would: every stage by hand (`kdqa prepare` ... `kdqa export`), then
    `git add -A`: the outputs DVC caches must stay out of git (.gitignore) or `dvc repro` refuses them.
    """
    from conftest import run_cli

    # eval_every 3 = max_steps: one dev point on the eval curve, so `dvc plots` has data for both files.
    path = make_dvc_repo(tmp_path_factory.mktemp("dvc"), tiny_assets, student__epochs=1, student__max_steps=3,
                         student__eval_every=3)
    repo = DvcRepo(path, dvc_env(), "", [])
    for stage in STAGES:  # every stage by hand, align and export included, as a user trying things out would
        run_cli(["-q", stage], path)
    repo.git("add", "-A")
    repo.tracked_before_repro = repo.git("ls-files").split()
    repo.first_repro = repo.dvc("repro")  # fails on an output git already tracks ("already tracked by SCM")
    return repo


def test_outputs_of_stages_run_by_hand_stay_out_of_git(dvc_repo):
    """Stage outputs are ignored from the start, so `git add -A` after running stages by hand leaves them to DVC."""
    tracked = dvc_repo.tracked_before_repro
    assert "params.yaml" in tracked and (dvc_repo.path / "data/features/train/manifest.json").is_file()
    cached = tuple(out for stage in STAGES.values() for out in (*stage.outs, *stage.work))
    assert (dvc_repo.path / "models/student-onnx/kdqa_export.json").is_file()  # export ran by hand too
    assert not [p for p in tracked if p.startswith((*cached, ".kdqa"))], tracked


def test_dvc_repro_then_student_change_skips_prepare_and_teacher(dvc_repo):
    repo, first = dvc_repo.path, dvc_repo.first_repro
    env, dvc = dvc_repo.env, [sys.executable, "-m", "dvc"]
    for stage in ("prepare", "teacher", "align", "student", "evaluate", "export"):
        assert f"Running stage '{stage}'" in first, first
    assert (repo / "dvc.lock").is_file()
    assert sh(dvc + ["status", "--json"], repo, env).strip() in ("{}", "")
    before_up, before_down = mtimes(repo, UPSTREAM), mtimes(repo, DOWNSTREAM)
    eval_before = json.loads((repo / "metrics/eval.json").read_text())

    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["student"]["learning_rate"] = params["student"]["learning_rate"] / 10
    (repo / "params.yaml").write_text(yaml.safe_dump(params))
    status = json.loads(sh(dvc + ["status", "--json"], repo, env))
    assert set(status) == {"student"}, status  # evaluate follows once models/student changes
    assert "params.yaml" in json.dumps(status["student"])  # {"changed deps": {"params.yaml": {"student": ...}}}

    second = sh(dvc + ["repro"], repo, env)
    for stage in ("prepare", "teacher", "align"):
        assert f"Stage '{stage}' didn't change, skipping" in second, second
        assert f"Running stage '{stage}'" not in second, second
    for stage in ("student", "evaluate", "export"):
        assert f"Running stage '{stage}'" in second, second
    assert mtimes(repo, UPSTREAM) == before_up  # prepare and teacher outputs untouched
    after_down = mtimes(repo, DOWNSTREAM)
    assert all(after_down[p] != before_down[p] for p in DOWNSTREAM)  # student and evaluate rewrote theirs
    assert json.loads((repo / "metrics/eval.json").read_text())["total"] == eval_before["total"]
    assert sh(dvc + ["status", "--json"], repo, env).strip() in ("{}", "")

    metrics = json.loads(sh(dvc + ["metrics", "show", "--json"], repo, env))
    shown = json.dumps(metrics)
    assert '"f1"' in shown and '"exact"' in shown and "metrics/eval.json" in shown
    assert "metrics/export.json" in shown and '"onnx_int8"' in shown


# The code prepare and teacher run; neither stage lists it in dvc.yaml (pipeline/formats.yaml stands for it).
PREPARE_AND_TEACHER_CODE = ["stages/prepare", "text/features", "text/squad", "stages/teacher", "model/inference",
                            "model/batching", "model/loading", "store/shards", "training/distributed"]


def test_upgrades_rerun_prepare_and_teacher_only_when_their_format_version_changes(dvc_repo):
    """A code change that leaves features and logits alone (comments here) reruns neither prepare nor the
    teacher; bumping a format version in pipeline/formats.yaml makes exactly that stage stale."""
    pipeline = dvc_repo.path / "pipeline"
    formats = pipeline / "formats.yaml"
    originals = {p: p.read_text() for p in [formats] + [pipeline / f"{m}.py" for m in PREPARE_AND_TEACHER_CODE]}

    def status() -> dict:
        return json.loads(dvc_repo.dvc("status", "--json"))

    try:
        for path, text in originals.items():
            if path != formats:
                path.write_text(text + "\n# a comment-only change\n")
        assert set(status()) == {"student", "evaluate", "export"}  # they still list their code (models.py, shards.py...)
        for path, text in originals.items():
            path.write_text(text)
        assert status() == {}

        formats.write_text(originals[formats].replace("logits_format: 1", "logits_format: 2"))
        changed = status()
        assert set(changed) == {"teacher"} and "logits_format" in json.dumps(changed), changed
        formats.write_text(originals[formats].replace("features_format: 1", "features_format: 2"))
        changed = status()
        # align tokenizes the student's own features with the same code
        assert set(changed) == {"prepare", "align"} and "features_format" in json.dumps(changed), changed
        formats.write_text(originals[formats].replace("aligned_format: 3", "aligned_format: 4"))
        changed = status()
        # the teacher stage carries a teacher of another tokenizer onto the features with the alignment's code
        assert set(changed) == {"teacher", "align"} and "aligned_format" in json.dumps(changed), changed
    finally:
        for path, text in originals.items():
            path.write_text(text)
    assert status() == {}


def test_editing_local_data_in_data_raw_reruns_prepare(dvc_repo):
    """data/raw/ is a dependency of prepare: a changed JSON there makes prepare (and all after it) stale."""
    repo, env, dvc = dvc_repo.path, dvc_repo.env, [sys.executable, "-m", "dvc"]
    train = repo / "data" / "raw" / "train.json"
    original = train.read_bytes()
    doc = json.loads(original)
    doc["data"][0]["paragraphs"][0]["qas"].pop()  # one question fewer
    train.write_text(json.dumps(doc))
    try:
        status = json.loads(sh(dvc + ["status", "--json"], repo, env))
        assert "prepare" in status and "data/raw" in json.dumps(status["prepare"]), status
    finally:
        train.write_bytes(original)
    assert sh(dvc + ["status", "--json"], repo, env).strip() in ("{}", "")


def test_dvc_metrics_and_plots_show(dvc_repo, tmp_path):
    """Student and teacher scores side by side in `dvc metrics show`; the training curves in `dvc plots show`."""
    metrics = json.loads(dvc_repo.dvc("metrics", "show", "--json"))
    files = next(iter(metrics.values()))["data"]  # {"workspace": {"data": {path: {"data": {...}}}}}
    for path in ("metrics/eval.json", "metrics/teacher.json"):
        assert {"exact", "f1", "HasAns_f1", "NoAns_f1"} <= set(files[path]["data"]), (path, files)

    plots = json.loads(dvc_repo.dvc("plots", "show", "--json"))["data"]
    # Exactly the plots dvc.yaml defines (no extra default plot per file), each drawn from the workspace files.
    assert set(plots) == {"Loss (total, KD part, CE part)", "Learning rate", "Dev scores during training"}, list(plots)

    def values(title):
        (plot,) = plots[title]
        assert plot["type"] == "vega" and plot["revisions"] == ["workspace"]
        return plot["content"]["data"]["values"]

    steps = yaml.safe_load((dvc_repo.path / "params.yaml").read_text())["student"]["max_steps"]
    loss = values("Loss (total, KD part, CE part)")
    assert {v["field"] for v in loss} == {"loss", "kd_loss", "ce_loss"}
    assert sorted({int(v["step"]) for v in loss}) == list(range(1, steps + 1))  # log_every 1
    assert all(float(v["lr"]) >= 0 for v in values("Learning rate"))
    dev = values("Dev scores during training")
    assert {v["field"] for v in dev} == {"f1", "exact", "f1_forced"} and {v["step"] for v in dev} == {str(steps)}

    dvc_repo.dvc("plots", "show", "-o", str(tmp_path / "html"))  # what a user opens in a browser
    html = (tmp_path / "html" / "index.html").read_text()
    for text in ("Dev scores during training", "kd_loss", "f1_forced"):
        assert text in html, text


def experiment_rows(show: list) -> dict:
    """`dvc exp show --json` flattened: {name: {kind, temperature, f1, exact, teacher_f1, teacher_logits}}."""
    rows = {}

    def add(kind, record):
        data = record["data"]
        metrics = {path: m.get("data", {}) for path, m in (data.get("metrics") or {}).items()}
        rows[record.get("name") or record["rev"]] = {
            "kind": kind,
            "temperature": data["params"]["params.yaml"]["data"]["student"]["temperature"],
            "f1": metrics.get("metrics/eval.json", {}).get("f1"),
            "exact": metrics.get("metrics/eval.json", {}).get("exact"),
            "teacher_f1": metrics.get("metrics/teacher.json", {}).get("f1"),
            "teacher_logits": data["outs"]["data/teacher"]["hash"],
        }

    for baseline in show:
        add("baseline", baseline)
        for experiment in baseline.get("experiments") or []:
            for rev in experiment["revs"]:
                add("experiment", rev)
    return rows


def test_dvc_experiments_and_a_queued_sweep_reuse_the_teacher_logits(dvc_repo):
    """`dvc exp run -S` and a queued sweep rerun student and evaluate only; `dvc exp show` lists params and scores.

    The teacher's manifest records its measured throughput, so a rerun teacher would change the hash of
    data/teacher: an equal hash in every experiment proves its logits were reused.
    """
    dvc_repo.git("add", "-A")
    dvc_repo.git("commit", "-q", "-m", "baseline")  # experiments start from a commit
    tracked = dvc_repo.git("ls-files", "metrics", "logs")
    for path in ("metrics/eval.json", "metrics/teacher.json", "logs/student/train.tsv", "logs/student/eval.tsv"):
        assert path in tracked, tracked  # git-tracked, so every experiment commit carries its own
    upstream = mtimes(dvc_repo.path, UPSTREAM)

    one = dvc_repo.dvc("exp", "run", "-S", "student.temperature=3")
    assert "Stage 'teacher' didn't change, skipping" in one and "Running stage 'teacher'" not in one, one
    assert "Running stage 'student'" in one and "Running stage 'evaluate'" in one, one

    # A sweep: -S with comma-separated values queues one experiment per value; --run-all runs the queue.
    queued = dvc_repo.dvc("exp", "run", "--queue", "-S", "student.temperature=1,5")
    assert queued.count("Queued experiment") == 2, queued
    sweep = dvc_repo.dvc("exp", "run", "--run-all", "-j", "1")
    assert sweep.count("Stage 'teacher' didn't change, skipping") == 2, sweep
    assert "Running stage 'teacher'" not in sweep and "Failed" not in sweep, sweep
    assert sweep.count("Running stage 'student'") == 2, sweep
    assert mtimes(dvc_repo.path, UPSTREAM) == upstream

    rows = experiment_rows(json.loads(dvc_repo.dvc("exp", "show", "--json")))
    experiments = {name: row for name, row in rows.items() if row["kind"] == "experiment"}
    assert sorted(row["temperature"] for row in experiments.values()) == [1, 3, 5], rows
    for name, row in rows.items():
        assert None not in (row["f1"], row["exact"], row["teacher_f1"]), (name, row)  # no "!" in the table
    assert len({row["teacher_logits"] for row in rows.values()}) == 1, rows
    # The README's table: params and the scores of student and teacher, one row per experiment.
    table = dvc_repo.dvc("exp", "show", "--csv", "--drop", ".*", "--keep",
                         "Experiment|.*:(f1|exact)$|student.temperature")
    header, *lines = table.strip().splitlines()
    assert header.split(",") == ["Experiment", "metrics/eval.json:exact", "metrics/eval.json:f1",
                                 "metrics/teacher.json:exact", "metrics/teacher.json:f1", "student.temperature"]
    assert {line.split(",")[0] for line in lines} >= set(experiments)

    # Curves of two experiments side by side.
    first, second = sorted(experiments)[:2]
    diff = json.loads(dvc_repo.dvc("plots", "diff", first, second, "--json"))["data"]
    (loss,) = diff["Loss (total, KD part, CE part)"]
    assert sorted(loss["revisions"]) == [first, second]
    assert {v["rev"] for v in loss["content"]["data"]["values"]} == {first, second}


def test_adding_an_unlabeled_file_reruns_the_teacher_for_its_shards_only(dvc_repo):
    """Extra data on a finished run: prepare and teacher rerun, the teacher computes only the new file's shards
    (the rest come from .kdqa/teacher-cache, byte for byte), and the student trains on the new rows."""
    repo = dvc_repo.path
    before = {p.name: p.read_bytes() for p in sorted((repo / "data/teacher/train").glob("part-*.parquet"))}
    extra = tiny.make_squad(repo / "data" / "raw" / "unlabeled.json", articles=1, paragraphs=2, questions=3, seed=8)
    doc = json.loads(extra.read_text())
    for paragraph in doc["data"][0]["paragraphs"]:
        for qa in paragraph["qas"]:
            qa["id"], qa["answers"] = "extra-" + qa["id"], []
    extra.write_text(json.dumps(doc))
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["data"]["unlabeled"] = ["data/raw/unlabeled.json"]
    (repo / "params.yaml").write_text(yaml.safe_dump(params))

    out = dvc_repo.dvc("repro")
    for stage in ("prepare", "teacher", "student", "evaluate"):
        assert f"Running stage '{stage}'" in out, out
    new = len(json.loads((repo / "data/features/unlabeled/manifest.json").read_text())["shards"])
    assert f"train: 0 of {len(before)} shards to compute, {len(before)} copied" in out, out
    assert f"unlabeled: {new} of {new} shards to compute, 0 copied" in out, out
    assert {p.name: p.read_bytes() for p in sorted((repo / "data/teacher/train").glob("part-*.parquet"))} == before
    assert "extra rows" in out and dvc_repo.dvc("status", "--json").strip() in ("{}", "")


def test_a_student_of_other_windows_reruns_the_alignment_never_the_teacher(dvc_repo):
    """Issue 17: another student tokenizer or other windows rerun `align` (then student, evaluate); prepare and
    the teacher come back from the cache."""
    repo = dvc_repo.path
    upstream = mtimes(repo, UPSTREAM[:-1])  # features and teacher logits; the aligned manifest changes
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["student"].update(max_seq_len=32, doc_stride=8)  # the unlabeled rows an earlier test added come along
    (repo / "params.yaml").write_text(yaml.safe_dump(params))
    assert set(json.loads(dvc_repo.dvc("status", "--json"))) == {"align", "student"}
    out = dvc_repo.dvc("repro")
    for stage in ("prepare", "teacher"):
        assert f"Stage '{stage}' didn't change, skipping" in out, out
    for stage in ("align", "student", "evaluate"):
        assert f"Running stage '{stage}'" in out, out
    assert mtimes(repo, UPSTREAM[:-1]) == upstream
    assert json.loads((repo / "data/aligned/manifest.json").read_text())["mode"] == "aligned"
    assert json.loads(dvc_repo.dvc("status", "--json")) == {}
