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


# ---------------------------------------------------------------- test order: the longest work first

# Seconds each file takes on 2 CPU cores (measured with --durations; rough is enough). xdist hands out one file
# at a time (--dist loadfile, --no-loadscope-reorder in pyproject.toml) in collection order, so the longest files
# go first and the short ones fill in at the end: the two workers then finish within seconds of each other,
# instead of one running the DVC file alone for minutes after the other ran out of files. Unlisted files: 0.
FILE_SECONDS = {"test_bench_accuracy.py": 260, "test_dvc.py": 255, "test_bench.py": 230, "test_reliability.py": 80,
                "test_fault_table.py": 50, "test_distributed.py": 60, "test_bench_peer.py": 30, "test_pipeline.py": 25,
                "test_bad_input.py": 20, "test_export.py": 13, "test_report.py": 12, "test_bench_serving.py": 12}
# Within these files (independent tests, no shared state between them) the minute-long tests run first, so that
# xdist, which sends a worker its next file when two tests of the current one are left, never queues a file
# behind a long test. test_dvc.py keeps its order: its tests continue one repository.
LONG_TESTS = ("test_accuracy_benchmark_quick_mode_runs_every_stage",
              "test_accuracy_benchmark_seeds_give_means_spreads_and_paired_intervals",
              "test_accuracy_benchmark_quick_mode_with_extra_rows", "test_performance_benchmark_quick_mode",
              "test_extra_data_benchmark_quick_mode", "test_ensemble_step_benchmark_quick_mode",
              "test_reference_shapes_build_a_separate_student")


def pytest_collection_modifyitems(config, items):
    def key(item):
        name = item.path.name
        long_test = name != "test_dvc.py" and item.originalname in LONG_TESTS
        return -FILE_SECONDS.get(name, 0), name if name in FILE_SECONDS else "", not long_test

    items.sort(key=key)  # stable: unlisted files and the other tests keep their collection order
