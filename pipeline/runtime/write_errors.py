"""Write failures (disk full, quota, read-only file system, no permission) as one line naming the path and the
remedy, instead of a traceback from deep inside pyarrow, safetensors or torch.

`writing(path)` wraps a block that writes under `path`; `@writes_into("arg")` does the same for a function
whose argument `arg` is the folder it writes. Both turn a write failure into a KdqaError and let every
other exception through. The CLI uses `describe` as the last resort for writes nobody wrapped.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import inspect
import os
import re
import shutil
from pathlib import Path

from pipeline.runtime.errors import KdqaError

REMEDIES = {
    errno.ENOSPC: "the disk is full: free some space (or run on a larger disk) and rerun",
    errno.EDQUOT: "the disk quota is used up: free some space (or raise the quota) and rerun",
    errno.EROFS: "the file system is read-only: run kdqa in a writable folder",
    errno.EACCES: "no permission to write there: fix the folder's permissions or run kdqa in a folder you own",
    errno.EPERM: "no permission to write there: fix the folder's permissions or run kdqa in a folder you own",
}
KEPT = "completed work is kept"

# Rust writers (safetensors, tokenizers) report the OS error only in their message: "... (os error 28)".
_RUST_OS_ERROR = re.compile(r"os error (\d+)")
# torch.save's zip writer turns a failed write into a RuntimeError that names no errno at all.
_TORCH_WRITER = ("PytorchStreamWriter", "inline_container")
NEARLY_FULL_BYTES = 1 << 20


def failed_errno(exc: BaseException, path: Path | None) -> int | None:
    """The errno of a failed write, if `exc` is one of the write failures in REMEDIES."""
    if isinstance(exc, OSError) and exc.errno in REMEDIES:
        return exc.errno
    match = _RUST_OS_ERROR.search(str(exc))
    if match and int(match.group(1)) in REMEDIES:
        return int(match.group(1))
    if isinstance(exc, RuntimeError) and any(s in str(exc) for s in _TORCH_WRITER) and path is not None:
        # No errno to read: call it a full disk only when the disk really is (nearly) full.
        if free_bytes(path) < NEARLY_FULL_BYTES:
            return errno.ENOSPC
    return None


def describe(exc: BaseException, path: Path | str | None = None) -> str | None:
    """One line for a write failure ("PATH: what happened: what to do; completed work is kept"), else None."""
    target = path if path is not None else getattr(exc, "filename", None)
    code = failed_errno(exc, Path(target) if target is not None else None)
    if code is None:
        return None
    where = f"{target}: " if target is not None else "writing failed: "
    return f"{where}{os.strerror(code)}: {REMEDIES[code]} ({KEPT})"


def free_bytes(path: Path) -> int:
    """Free bytes on the file system holding `path` (or its nearest existing parent)."""
    return shutil.disk_usage(existing_parent(path)).free


def existing_parent(path: Path) -> Path:
    path = Path(path).absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


@contextlib.contextmanager
def writing(path: Path | str):
    """Turn a write failure inside the block into a KdqaError naming `path`."""
    try:
        yield
    except KdqaError:
        raise
    except Exception as exc:
        message = describe(exc, path)
        if message is None:
            raise
        raise KdqaError(message) from None


def writes_into(argument: str):
    """Decorator: write failures inside the function name the folder passed as its argument `argument`."""
    def decorate(function):
        signature = inspect.signature(function)

        @functools.wraps(function)
        def wrapper(*args, **kwargs):
            with writing(signature.bind(*args, **kwargs).arguments[argument]):
                return function(*args, **kwargs)
        return wrapper
    return decorate
