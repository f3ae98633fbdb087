"""Shared fixtures: tiny offline models and data, and a pipeline run directory prepared once per session.

Everything is offline: the environment variables below are set before transformers or datasets is
imported anywhere, and models/data come from `tests/tiny.py` (random weights, made-up vocabulary).

Stages use paths relative to the working directory, so `run_cli` runs the click CLI in-process with the
working directory switched to the run directory (fast: no interpreter start, no re-import of torch).
"""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ["DVC_NO_ANALYTICS"] = "1"
os.environ["TOKENIZERS_PARALLELISM"] = "false"
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")

import contextlib  # noqa: E402
import shutil  # noqa: E402
import sys  # noqa: E402
import traceback  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

TESTS_DIR = Path(__file__).resolve().parent
REPO_ROOT = TESTS_DIR.parent
if str(TESTS_DIR) not in sys.path:
    sys.path.insert(0, str(TESTS_DIR))

import tiny  # noqa: E402

# Where a run directory keeps its inputs; params.yaml refers to them by relative paths, so a copy of a
# run directory (shutil.copytree) is self-contained and can be mutated freely.
INPUTS = "inputs"


@dataclass(frozen=True)
class TinyAssets:
    teacher: Path  # 3-layer random BertForQuestionAnswering + tokenizer
    student: Path  # 1-layer, same vocabulary
    train: Path  # synthetic SQuAD 2.0 JSON
    dev: Path


@pytest.fixture(scope="session")
def tiny_assets(tmp_path_factory) -> TinyAssets:
    root = tmp_path_factory.mktemp("tiny")
    return TinyAssets(
        teacher=tiny.make_model(root / "teacher", layers=3, seed=0),
        student=tiny.make_model(root / "student", layers=1, seed=1),
        train=tiny.make_squad(root / "train.json", articles=3, paragraphs=2, questions=4, seed=0),
        dev=tiny.make_squad(root / "dev.json", articles=2, paragraphs=2, questions=4, seed=1),
    )


def run_cli(args: list[str], cwd: Path, expect_ok: bool = True):
    """`kdqa -C CWD ARGS` in-process: the workspace is `cwd` (no change of working directory); click's Result."""
    from click.testing import CliRunner

    from pipeline.cli import cli

    result = CliRunner().invoke(cli, ["-C", str(cwd), *args], prog_name="kdqa")
    if expect_ok and result.exit_code != 0:
        tb = "".join(traceback.format_exception(*result.exc_info)) if result.exc_info else ""
        raise AssertionError(f"kdqa {' '.join(args)} exited {result.exit_code}:\n{result.output}\n{tb}")
    return result


def make_run_dir(run: Path, assets: TinyAssets, **overrides) -> Path:
    """A run directory: the tiny inputs copied under inputs/ and a params.yaml pointing at them."""
    inputs = run / INPUTS
    inputs.mkdir(parents=True, exist_ok=True)
    for name in ("teacher", "student"):
        shutil.copytree(getattr(assets, name), inputs / name)
    shutil.copy2(assets.train, inputs / "train.json")
    shutil.copy2(assets.dev, inputs / "dev.json")
    tiny.write_params(run / "params.yaml", f"./{INPUTS}/teacher", f"./{INPUTS}/student", f"./{INPUTS}/train.json",
                      f"./{INPUTS}/dev.json", **overrides)
    return run


@pytest.fixture(scope="session")
def prepared_run(tmp_path_factory, tiny_assets) -> Path:
    """A run directory after `kdqa prepare` and `kdqa teacher`. Read-only: copy it (copy_run) to mutate."""
    run = make_run_dir(tmp_path_factory.mktemp("prepared") / "run", tiny_assets)
    run_cli(["prepare"], run)
    run_cli(["teacher"], run)
    return run


def copy_run(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


@pytest.fixture
def run_copy(prepared_run, tmp_path) -> Path:
    """A private, mutable copy of the prepared run directory."""
    return copy_run(prepared_run, tmp_path / "run")
