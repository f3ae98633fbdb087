"""Resumable student checkpoints: weights (safetensors), optimizer, schedule, RNG and stream position.

A checkpoint is a folder written under a temporary name and swapped in whole, so the last complete one
survives a crash at any moment. It records the training key (every setting that changes the computation,
the loss's temperature and weight included, and the data fingerprints); a checkpoint whose key differs
from the current run's is never resumed silently.
"""

from __future__ import annotations

import logging
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from pipeline.training import distributed
from pipeline.runtime.errors import KdqaError
from pipeline.runtime.workspace import begin_staging, previous_path, staging_path, swap_into_place
from pipeline.store.shards import read_json, write_json_atomic
from pipeline.runtime.write_errors import writes_into

log = logging.getLogger(__name__)


@dataclass
class Checkpoint:
    step: int
    epoch: int
    batch_in_epoch: int  # batches of `epoch` already trained on
    key: dict
    source: Path | None = None  # the folder it was loaded from


# Copies of the training curves kept in each checkpoint: `dvc repro` deletes the stage's plots before
# rerunning it after a crash, and a resumed run should still show its curve from step 1.
CURVES_DIR = "curves"


def _rng_state() -> dict:
    state = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


@writes_into("folder")
def save_checkpoint(folder: Path, ckpt: Checkpoint, model, optimizer, scheduler, rank: int,
                    curves: tuple[Path, ...] = (), scaler=None) -> None:
    """Rank 0 writes weights, optimizer (and float16's gradient scaler) and copies of `curves`; every rank
    writes its own RNG state."""
    staging = begin_staging(folder) if rank == 0 else staging_path(folder)
    distributed.barrier()
    torch.save(_rng_state(), staging / f"rng-rank{rank}.pt")
    if rank == 0:
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, staging / "model.safetensors")
        torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                    **({"scaler": scaler.state_dict()} if scaler is not None else {})}, staging / "optimizer.pt")
        for curve in curves:
            if curve.is_file():
                (staging / CURVES_DIR).mkdir(exist_ok=True)
                shutil.copy2(curve, staging / CURVES_DIR / curve.name)
    distributed.barrier()
    if rank == 0:
        write_json_atomic(staging / "state.json", {"step": ckpt.step, "epoch": ckpt.epoch,
                                                    "batch_in_epoch": ckpt.batch_in_epoch, "key": ckpt.key})
        # At every moment one complete checkpoint exists under `folder` or its `.old` (never only `.partial`).
        swap_into_place(staging, folder)
        log.info("checkpoint at step %d -> %s", ckpt.step, folder)
    distributed.barrier()


def restore_curves(ckpt: Checkpoint, folder: Path) -> None:
    """Put the checkpoint's copies of the training curves back into `folder` (rows up to its step)."""
    saved = ckpt.source / CURVES_DIR if ckpt.source else None
    if saved is None or not saved.is_dir():
        return
    folder.mkdir(parents=True, exist_ok=True)
    for curve in saved.iterdir():
        shutil.copy2(curve, folder / curve.name)


def remove_checkpoints(folder: Path) -> None:
    """Training finished: drop the checkpoint and any `.old` / `.partial` left by a crash."""
    for path in (folder, previous_path(folder), staging_path(folder)):
        shutil.rmtree(path, ignore_errors=True)


def _latest_complete(folder: Path) -> Path | None:
    # A crash between the two renames above leaves the last good checkpoint under `.old`.
    for candidate in (folder, previous_path(folder)):
        if (candidate / "state.json").exists():
            return candidate
    return None


def _differences(a: dict, b: dict, prefix: str = "") -> list[str]:
    out = []
    for k in sorted(set(a) | set(b)):
        if isinstance(a.get(k), dict) and isinstance(b.get(k), dict):
            out += _differences(a[k], b[k], f"{prefix}{k}.")
        elif a.get(k) != b.get(k):
            out.append(f"{prefix}{k}: {a.get(k)!r} -> {b.get(k)!r}")
    return out


def with_defaults(saved: dict, defaults: dict) -> dict:
    """`saved` with every key it lacks taken from `defaults`, at any depth: a checkpoint written before a setting
    existed was made at that setting's default (a kdqa update adds settings at values that change nothing)."""
    out = {**defaults, **saved}
    for k, v in saved.items():
        if isinstance(v, dict) and isinstance(defaults.get(k), dict):
            out[k] = with_defaults(v, defaults[k])
    return out


def load_checkpoint(folder: Path, key: dict, resume: str, model, optimizer, scheduler, rank: int,
                    scaler=None, key_defaults: dict | None = None) -> Checkpoint | None:
    """Restore a matching checkpoint into model/optimizer/scheduler(/scaler)/RNG; None means start from scratch.
    key_defaults: the key at the default settings, read for what an older checkpoint's key lacks."""
    found = _latest_complete(folder) if resume != "never" else None
    if found is None:
        if resume == "require":
            raise KdqaError(f"{folder}: no checkpoint to resume from")
        return None
    state = read_json(found / "state.json")
    if not isinstance(state, dict) or not {"step", "epoch", "batch_in_epoch", "key"} <= set(state):
        raise KdqaError(f"{found / 'state.json'}: not a kdqa checkpoint state; delete {found} or run "
                        "`kdqa student --no-resume`")
    saved_key = with_defaults(state["key"], key_defaults) if key_defaults and isinstance(state["key"], dict) \
        else state["key"]
    if saved_key != key:
        changes = "; ".join(_differences(saved_key, key)) or "unknown"
        if resume == "require":
            raise KdqaError(f"{found}: checkpoint was made with other settings ({changes}); rerun without --resume")
        log.warning("%s: not resuming, settings changed (%s); starting from scratch", found, changes)
        return None
    rng_path = found / f"rng-rank{rank}.pt"
    if not rng_path.exists():
        raise KdqaError(f"{rng_path}: missing (checkpoint made with another number of processes?)")
    try:
        weights = load_file(found / "model.safetensors", device=str(next(model.parameters()).device))
        model.load_state_dict(weights)
        # weights_only=True: tensors and plain containers only, never an arbitrary pickle.
        opt = torch.load(found / "optimizer.pt", map_location="cpu", weights_only=True)
        optimizer.load_state_dict(opt["optimizer"])
        scheduler.load_state_dict(opt["scheduler"])
        if scaler is not None:  # same key, so same precision: a float16 checkpoint has its scaler
            scaler.load_state_dict(opt["scaler"])
        rng = torch.load(rng_path, map_location="cpu", weights_only=True)
    except Exception as exc:  # safetensors, torch's unpickler and load_state_dict raise many types
        detail = (str(exc).strip().splitlines() or [""])[0]
        raise KdqaError(f"{found}: checkpoint unreadable ({type(exc).__name__}: {detail}); "
                        "delete it or run `kdqa student --no-resume` to start over") from None
    torch.set_rng_state(rng["cpu"])
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state(rng["cuda"])
    return Checkpoint(state["step"], state["epoch"], state["batch_in_epoch"], key, source=found)
