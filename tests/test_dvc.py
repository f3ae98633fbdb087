"""A real `dvc repro` in a temporary git repository; a `student.*` change must skip prepare and teacher."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

import tiny
from conftest import REPO_ROOT

# Outputs of the stages that must not rerun, and of those that must.
UPSTREAM = ["data/features/train/part-00000.parquet", "data/features/dev_examples.parquet",
            "data/teacher/train/part-00000.parquet", "data/teacher/train/manifest.json"]
DOWNSTREAM = ["models/student/model.safetensors", "metrics/eval.json", "results/predictions.json"]


def sh(args, cwd, env, timeout=400):
    out = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert out.returncode == 0, f"{' '.join(map(str, args))} failed ({out.returncode}):\n{out.stdout}\n{out.stderr}"
    return out.stdout + out.stderr


def mtimes(repo: Path, paths) -> dict:
    return {p: (repo / p).stat().st_mtime_ns for p in paths}


def test_dvc_repro_then_student_change_skips_prepare_and_teacher(tmp_path, tiny_assets):
    venv_bin = Path(sys.executable).parent
    assert (venv_bin / "kdqa").exists(), "the kdqa console script must sit beside this interpreter"
    env = dict(os.environ, PATH=f"{venv_bin}{os.pathsep}{os.environ.get('PATH', '')}", DVC_NO_ANALYTICS="1",
               HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", GIT_AUTHOR_NAME="t", GIT_AUTHOR_EMAIL="t@t",
               GIT_COMMITTER_NAME="t", GIT_COMMITTER_EMAIL="t@t")
    dvc = [sys.executable, "-m", "dvc"]

    repo = tmp_path / "repo"
    repo.mkdir()
    shutil.copy2(REPO_ROOT / "dvc.yaml", repo / "dvc.yaml")
    shutil.copytree(REPO_ROOT / "pipeline", repo / "pipeline", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    for name in (".gitignore", ".dvcignore"):
        if (REPO_ROOT / name).exists():
            shutil.copy2(REPO_ROOT / name, repo / name)
    small = tmp_path / "data"
    tiny.write_params(repo / "params.yaml", tiny_assets.teacher, tiny_assets.student,
                      tiny.make_squad(small / "train.json", articles=2, paragraphs=2, questions=3, seed=5),
                      tiny.make_squad(small / "dev.json", articles=1, paragraphs=2, questions=3, seed=6),
                      student__epochs=1, student__max_steps=3)
    sh(["git", "init", "-q"], repo, env)
    sh(dvc + ["init", "-q"], repo, env)
    sh(dvc + ["config", "core.analytics", "false"], repo, env)

    first = sh(dvc + ["repro"], repo, env)
    for stage in ("prepare", "teacher", "student", "evaluate"):
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
    for stage in ("prepare", "teacher"):
        assert f"Stage '{stage}' didn't change, skipping" in second, second
        assert f"Running stage '{stage}'" not in second, second
    for stage in ("student", "evaluate"):
        assert f"Running stage '{stage}'" in second, second
    assert mtimes(repo, UPSTREAM) == before_up  # prepare and teacher outputs untouched
    after_down = mtimes(repo, DOWNSTREAM)
    assert all(after_down[p] != before_down[p] for p in DOWNSTREAM)  # student and evaluate rewrote theirs
    assert json.loads((repo / "metrics/eval.json").read_text())["total"] == eval_before["total"]
    assert sh(dvc + ["status", "--json"], repo, env).strip() in ("{}", "")

    metrics = json.loads(sh(dvc + ["metrics", "show", "--json"], repo, env))
    shown = json.dumps(metrics)
    assert '"f1"' in shown and '"exact"' in shown and "metrics/eval.json" in shown
