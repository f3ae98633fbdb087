"""One run of a stage per folder at a time: a lock file that names its owner.

`.kdqa/locks/STAGE.lock` holds the owner's pid, host and start time, and the owner holds an exclusive
`flock` on it for as long as the stage runs. The kernel drops that lock when the process ends, however it
ends, so a lock file left by a killed run (a dead pid) is simply taken over; a second run while the first
is alive stops at once with one line saying who holds it. Under torchrun only rank 0 takes the lock (the
other ranks are the same run).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import socket
import time
from pathlib import Path

from pipeline.runtime.errors import KdqaError
from pipeline.runtime.workspace import Workspace
from pipeline.runtime.write_errors import writing

log = logging.getLogger(__name__)

def lock_path(stage: str, ws: Workspace) -> Path:
    return ws.locks / f"{stage}.lock"


def _owner(path: Path) -> dict:
    try:
        owner = json.loads(path.read_text(encoding="utf-8") or "{}")
    except (OSError, ValueError):
        return {}
    return owner if isinstance(owner, dict) else {}


def _describe(owner: dict) -> str:
    if not owner.get("pid"):
        return "another kdqa process"
    return f"pid {owner['pid']} on {owner.get('host', '?')}, started {owner.get('started', '?')}"


def _acquire(path: Path, stage: str, shown: Path) -> int:
    """An open descriptor of `path` holding its exclusive lock; KdqaError naming the owner if it is taken."""
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise KdqaError(f"{shown}: `kdqa {stage}` is already running in this folder ({_describe(_owner(path))}); "
                            "wait for it to finish or stop it, then rerun") from None
        # The previous owner may have removed the file between our open and our lock: then we hold the lock of
        # a file nobody else can see, so start again on the one at `path`.
        try:
            same = os.stat(path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:
            return fd
        os.close(fd)


@contextlib.contextmanager
def stage_lock(stage: str, ws: Workspace):
    """Hold `stage`'s lock in workspace `ws` for the block (rank 0 only under torchrun)."""
    if int(os.environ.get("RANK", "0")) != 0:
        yield
        return
    shown = lock_path(stage, ws)
    path = shown.absolute()  # released after the block even if the working directory changed
    with writing(path.parent):
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = _acquire(path, stage, shown)
    try:
        stale = _owner(path)
        if stale.get("pid") and stale.get("pid") != os.getpid():
            log.warning("%s: taking over the lock of %s, which is no longer running", shown,
                        _describe(stale))
        owner = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%d %H:%M:%S"),
                 "stage": stage}
        with writing(path):
            os.ftruncate(fd, 0)
            os.pwrite(fd, json.dumps(owner).encode(), 0)
        yield
    finally:
        # Unlink while still holding the lock, so no one can lock the old file after we let it go.
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        os.close(fd)


# ---------------------------------------------------------------------------------------------------------
# Folder locks: no stage rewrites what a running stage reads
# ---------------------------------------------------------------------------------------------------------

# One lock file per folder of the stage table (ws.folder_locks), never removed: readers share it, so a file
# unlinked by one reader while another still held it would let a writer lock a new file under the same name.


def folder_lock_path(folder: str, ws: Workspace) -> Path:
    path = Path(os.path.normpath(folder))
    root = ws.root.resolve()
    if path.is_absolute() and path.is_relative_to(root):  # the same folder however it is named
        path = path.relative_to(root)
    return ws.folder_locks / (str(path).strip("/").replace("/", "--") + ".lock")


def _holders(folder: str, role: str, ws: Workspace) -> str:
    """The running stages (from their stage locks) that read or write `folder`, for the message."""
    from pipeline.stage_table import STAGES, lock_folders

    found = []
    for path in sorted(ws.locks.glob("*.lock")):
        owner = _owner(path)
        stage = STAGES.get(owner.get("stage", ""))
        if stage and folder in lock_folders(stage)[0 if role == "reads" else 1]:
            found.append(f"`kdqa {stage.name}` ({_describe(owner)})")
    return " and ".join(found) or "another kdqa process"


@contextlib.contextmanager
def folder_locks(reads: tuple[str, ...], writes: tuple[str, ...], stage: str, ws: Workspace):
    """Shared locks on the folders a stage reads, exclusive ones on those it writes, for the block; a folder
    that a running stage is writing (or reading, for one this stage writes) stops this stage at once with one
    line naming that stage. Rank 0 only under torchrun, like the stage lock."""
    if int(os.environ.get("RANK", "0")) != 0:
        yield
        return
    held = []
    try:
        with writing(ws.folder_locks):
            ws.folder_locks.mkdir(parents=True, exist_ok=True)
            for folder, exclusive in [*((f, False) for f in reads), *((f, True) for f in writes)]:
                fd = os.open(folder_lock_path(folder, ws), os.O_RDWR | os.O_CREAT, 0o644)
                held.append(fd)
                try:
                    fcntl.flock(fd, (fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH) | fcntl.LOCK_NB)
                except BlockingIOError:
                    if exclusive:
                        raise KdqaError(f"{folder}: in use by {_holders(folder, 'reads', ws)}, which reads it; "
                                        f"`kdqa {stage}` would rewrite it under that run: wait for it to finish "
                                        "or stop it, then rerun") from None
                    raise KdqaError(f"{folder}: being rewritten by {_holders(folder, 'writes', ws)}; `kdqa {stage}` "
                                    "would read it half-written: wait for that run to finish, then rerun") from None
        yield
    finally:
        for fd in held:
            os.close(fd)  # closing the descriptor releases its lock
