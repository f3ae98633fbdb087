"""Helpers shared by test_reliability.py and test_bad_input.py (issue 4): a tiny world built once per session.

The world: a random-weight teacher (2 layers) and student (1 layer) sharing a made-up vocabulary, a
student whose tokenizer has one extra token, synthetic SQuAD JSON, and a workspace after `kdqa prepare` and
`kdqa teacher` with many small shards (4 features each), so crashes can land between shards. Tests copy the
workspace (`clone`) and run stages in-process (`kdqa`) or, where a real process must die, in a subprocess.

Every run uses one torch thread (in-process and in subprocesses alike): results are then bit-for-bit
comparable between processes, and tiny models run far faster than with threads fighting over 2 cores.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

for _k in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE", "DVC_NO_ANALYTICS"):
    os.environ.setdefault(_k, "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

TESTS_DIR = Path(__file__).resolve().parent
if str(TESTS_DIR) not in sys.path:
    sys.path.insert(0, str(TESTS_DIR))

import tiny  # noqa: E402

# Small shards: 32 train features -> 8 shards, so a crash can fall between shards, inside one, or in publishing.
BASE_PARAMS = {"prepare__shard_size": 4, "prepare__row_group_size": 2}


@dataclass(frozen=True)
class World:
    root: Path
    teacher: Path
    student: Path
    student_other_vocab: Path
    train: Path
    dev: Path
    workspace: Path  # after prepare + teacher; read-only, clone it


_WORLD: World | None = None


def get_world(tmp_path_factory) -> World:
    """Build the world once per session (both test files share it)."""
    global _WORLD
    if _WORLD is None:
        root = tmp_path_factory.mktemp("kdqa-world")
        teacher = tiny.make_model(root / "teacher", layers=2, seed=0)
        student = tiny.make_model(root / "student", layers=1, seed=1)
        other = tiny.make_model(root / "student-other-vocab", layers=1, seed=1)
        from transformers import AutoModelForQuestionAnswering, AutoTokenizer

        tok = AutoTokenizer.from_pretrained(other)
        tok.add_tokens(["zebra"])  # one token more than the teacher's vocabulary...
        tok.save_pretrained(other)
        model = AutoModelForQuestionAnswering.from_pretrained(other)
        model.resize_token_embeddings(len(tok))  # ...and an embedding row for it: a consistent model of its own
        model.save_pretrained(other, safe_serialization=True)
        world = World(root, teacher, student, other,
                      tiny.make_squad(root / "train.json", seed=0),
                      tiny.make_squad(root / "dev.json", articles=1, seed=1),
                      root / "workspace")
        world.workspace.mkdir()
        write_params(world, world.workspace)
        with single_thread():
            for stage in ("prepare", "teacher"):
                result = kdqa(world.workspace, "-q", stage)
                assert result.exit_code == 0, result.output
        _WORLD = world
    return _WORLD


def write_params(world: World, ws: Path, **overrides) -> Path:
    return tiny.write_params(ws / "params.yaml", world.teacher, world.student, world.train, world.dev,
                             **{**BASE_PARAMS, **overrides})


def clone(world: World, dst: Path) -> Path:
    """A private copy of the prepared workspace (params.yaml + data/). Not .kdqa/: with the teacher's logits
    cache there, a test that deletes data/teacher would get its logits copied back instead of computed."""
    shutil.copytree(world.workspace, dst,
                    ignore=lambda folder, names: [".kdqa"] if Path(folder) == world.workspace else [])
    return dst


@contextlib.contextmanager
def single_thread():
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def kdqa(ws: Path, *args: str):
    """`kdqa -C WS ARGS` in-process (workspace `ws`, no change of working directory); click's Result (exit_code, stdout, stderr, exception).

    The CLI points logging at the stderr click captures; the root logger is put back afterwards so later
    tests do not log into a closed stream.
    """
    from click.testing import CliRunner

    from pipeline.cli import cli

    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    try:
        with single_thread():
            return CliRunner().invoke(cli, ["-C", str(ws), *args], prog_name="kdqa")
    finally:
        root.handlers[:] = handlers
        root.setLevel(level)


def assert_one_line_error(result, *fragments: str) -> str:
    """Exit 1 through the CLI's own error path (no traceback), one `kdqa: error:` line holding `fragments`."""
    assert result.exit_code == 1, f"exit {result.exit_code}\n{result.output}\n{result.exception!r}"
    assert isinstance(result.exception, SystemExit), f"escaped exception: {result.exception!r}"
    errors = [line for line in result.stderr.splitlines() if line.startswith("kdqa: error:")]
    assert len(errors) == 1, result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    for fragment in fragments:
        assert fragment in errors[0], f"{fragment!r} not in {errors[0]!r}"
    return errors[0]


def subprocess_env() -> dict:
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    env.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1", DVC_NO_ANALYTICS="1",
               TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1",
               # the caller's PYTHONPATH kept: a checkout tested beside another installed one imports itself
               PYTHONPATH=os.pathsep.join(filter(None, [str(TESTS_DIR), os.environ.get("PYTHONPATH")])))
    return env


def run_python(code: str, ws: Path, *args: str, timeout: float = 180) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code, *args], cwd=ws, env=subprocess_env(),
                          capture_output=True, text=True, timeout=timeout)


def tensors(path: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(path))


# ---------------------------------------------------------------------------------------------------------
# Killing a stage at a chosen point, and the uninterrupted student run to compare with
# ---------------------------------------------------------------------------------------------------------

# Both kill scripts start here: `hit()` SIGKILLs the process at the n-th counted event (argv: mode, n).
KILL_AT_NTH_HIT = r'''
import os, pathlib, signal, sys
mode, n = sys.argv[1], int(sys.argv[2])
calls = 0
def hit():
    global calls
    calls += 1
    if calls == n:
        os.kill(os.getpid(), signal.SIGKILL)
'''

# 32 features in 8 shards of 4, batches of 3 -> 2 batches per shard, 16 steps per epoch, 32 steps.
STUDENT = {"student__batch_size": 3, "student__epochs": 2, "student__log_every": 1}
TOTAL_STEPS = 32

KILL_STUDENT = KILL_AT_NTH_HIT + r'''

import pipeline.training.step as training
if mode == "step":                # inside optimizer step n (forward done, before backward)
    original = training.distillation_loss
    def distillation_loss(*a, **k):
        hit()
        return original(*a, **k)
    training.distillation_loss = distillation_loss
elif mode == "checkpoint-swap":   # n-th checkpoint: old one moved to `.old`, new one not yet renamed in
    original = pathlib.Path.rename
    def rename(self, target):
        if self.name == ".student.partial":
            hit()
        return original(self, target)
    pathlib.Path.rename = rename

from pipeline.cli import main
sys.argv = ["kdqa", "student"]
main()
'''



_REFERENCE: dict | None = None


def reference_student(world: World, tmp_path_factory) -> dict:
    """The student trained with STUDENT settings, no checkpoints, no crash (num_workers 0), once per session:
    its weights and its training curve, for comparison with runs that were interrupted and resumed."""
    global _REFERENCE
    if _REFERENCE is None:
        ws = clone(world, tmp_path_factory.mktemp("reference") / "ws")
        write_params(world, ws, **STUDENT, student__checkpoint_every=0, student__num_workers=0)
        result = kdqa(ws, "-q", "student")
        assert result.exit_code == 0, result.output
        _REFERENCE = {"weights": tensors(ws / "models/student/model.safetensors"),
                      "curve": (ws / "logs/student/train.tsv").read_text()}
    return _REFERENCE


def disk_full_error() -> OSError:
    """What a write raises on a full disk (tests simulate full and read-only disks: as root, chmod does not bite)."""
    return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def failing_on_call(n: int, original, error=disk_full_error):
    """`original`, except that its n-th call raises `error()` instead."""
    calls = []

    def wrapper(*args, **kwargs):
        calls.append(1)
        if len(calls) == n:
            raise error()
        return original(*args, **kwargs)
    return wrapper
