"""torch.distributed set-up for runs under `torchrun`; a no-op in a plain single process.

torchrun (torch.distributed.run) sets RANK / WORLD_SIZE / LOCAL_RANK; we use its env:// rendezvous, NCCL on
CUDA and gloo on CPU. `relaunch` lets a stage started as a plain command (`kdqa teacher` from `dvc repro`)
start itself again under torch.distributed.run with a process count read from params.yaml, so that count
never has to appear in the stage's command line (and never invalidates its output).
"""

from __future__ import annotations

import logging
import os
import sys
from datetime import timedelta

import torch
import torch.distributed as dist

from pipeline.runtime.errors import KdqaError

log = logging.getLogger(__name__)

# Set by torchrun (and by other launchers: srun wrappers, mpirun scripts) for every worker process.
LAUNCHER_ENV = ("TORCHELASTIC_RUN_ID", "LOCAL_RANK", "RANK", "WORLD_SIZE")

# How long a collective may wait. Rank 0 alone evaluates (student.eval_every, the final dev scores) and
# saves while the other ranks wait at a barrier, so this must outlast one dev evaluation; a crashed rank is
# detected by torchrun, not by this timeout. Override with KDQA_DIST_TIMEOUT_MINUTES.
DEFAULT_TIMEOUT_MINUTES = 120


def is_distributed() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def under_launcher() -> bool:
    """True inside a worker started by torchrun (or any launcher that sets the env:// variables)."""
    return any(name in os.environ for name in LAUNCHER_ENV)


def timeout() -> timedelta:
    raw = os.environ.get("KDQA_DIST_TIMEOUT_MINUTES", str(DEFAULT_TIMEOUT_MINUTES))
    try:
        minutes = float(raw)
    except ValueError:
        raise KdqaError(f"KDQA_DIST_TIMEOUT_MINUTES: expected a number of minutes, got {raw!r}") from None
    return timedelta(minutes=minutes)


def init() -> None:
    if is_distributed() and not dist.is_initialized():
        if torch.cuda.is_available():
            if local_rank() >= torch.cuda.device_count():
                raise KdqaError(f"local rank {local_rank()} but only {torch.cuda.device_count()} CUDA device(s) on "
                                "this node: use at most one process per GPU (--nproc-per-node / teacher.nproc)")
            torch.cuda.set_device(local_rank())
            dist.init_process_group(backend="nccl", timeout=timeout(), device_id=device())
        else:
            dist.init_process_group(backend="gloo", timeout=timeout())


def destroy() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def is_main() -> bool:
    return rank() == 0


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def mean(tensor: torch.Tensor) -> torch.Tensor:
    """The mean of `tensor` over all ranks (every rank must call this); the tensor itself otherwise."""
    if not dist.is_initialized():
        return tensor
    tensor = tensor.detach().clone()
    dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor / dist.get_world_size()


def device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", local_rank())
    return torch.device("cpu")


def launch_command(nproc: int, args: list[str]) -> list[str]:
    """`python -m torch.distributed.run --standalone --nproc-per-node N -m pipeline ARGS`: PyTorch's launcher.

    --standalone: a single-node rendezvous on a free local port (no clash with another run's port 29500).
    """
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
            "-m", "pipeline", *args]


def relaunch(nproc: int, args: list[str]) -> None:
    """Replace this process by torchrun with `nproc` workers running `python -m pipeline ARGS`.

    Returns (doing nothing) when nproc is 1 or this process already is a launcher's worker: there the
    launcher's own flags (--nproc-per-node, --nnodes, ...) decide, and `nproc` is ignored.
    """
    if nproc < 1:
        raise KdqaError(f"process count must be at least 1, got {nproc}")
    if nproc == 1 or under_launcher():
        return
    if torch.cuda.is_available() and nproc > torch.cuda.device_count():
        raise KdqaError(f"{nproc} processes requested but only {torch.cuda.device_count()} CUDA device(s) here")
    command = launch_command(nproc, args)
    log.info("starting %d processes: %s", nproc, " ".join(command))
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    os.execv(command[0], command)
