"""Optionally keep freed memory in the process instead of handing it back to the kernel (glibc on Linux).

A training or inference step on the CPU frees and allocates the same large activation buffers again at every
step. glibc's default serves large blocks with mmap and unmaps them when freed, and trims the top of its heap:
the next step gets fresh pages from the kernel, each one faulted in and zero-filled. `KDQA_MALLOC=keep` turns
both off for kdqa's stages, so freed buffers are reused in place: fewer page faults and a faster CPU step, but a
process that keeps its free blocks, whose sizes change from batch to batch (length-grouped batches), so its
peak resident memory grows. It is off by default because that memory is a certain cost and the time gained
varies from run to run (docs/results.md, the student step; `python -m bench.performance` measures the step both
ways). `KDQA_MALLOC=one-arena` also keeps every thread on one malloc arena. `KDQA_MALLOC=release` does the
opposite of keep: glibc's mmap threshold is fixed (it otherwise rises to the size of the largest block freed, so
that later blocks of that size come from its heap and stay resident when freed), so every large buffer is unmapped
as soon as it is freed: the lowest peak, paid for with a page fault per page of every large buffer. Between
phases whose buffers differ in size (training steps, then an evaluation at another batch size),
`release_freed_memory` hands the free pages back.

Called by every stage (pipeline/cli.py) and by the benchmarks that mirror a stage; never on import, so an
application that imports kdqa as a library keeps its own allocator settings.
"""

from __future__ import annotations

import ctypes
import functools
import logging
import os
import sys

log = logging.getLogger(__name__)

# mallopt parameters (glibc malloc.h)
M_TRIM_THRESHOLD = -1
M_MMAP_MAX = -4
M_ARENA_MAX = -8
M_MMAP_THRESHOLD = -3
NEVER_TRIM = 2**31 - 1  # mallopt takes an int
RELEASE_THRESHOLD = 1 << 20  # "release": blocks of 1 MiB and more are mapped for themselves, unmapped when freed


POLICIES = ("default", "keep", "one-arena", "release")


@functools.cache  # looked up once: release_freed_memory runs every few training steps
def glibc():
    """This process's C library when it is glibc on Linux (the tunables below are glibc's), else None."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None)  # the C library this process already runs on
        libc.gnu_get_libc_version  # glibc only: musl and others have other malloc tunables
        return libc
    except (OSError, AttributeError):
        return None


def keep_freed_memory(policy: str | None = None) -> bool:
    """Apply `policy` (None: the KDQA_MALLOC environment variable, else "default", glibc as it comes); True when
    freed memory is now kept for reuse (glibc only; elsewhere nothing happens)."""
    policy = policy or os.environ.get("KDQA_MALLOC") or "default"
    if policy not in POLICIES:
        log.warning("KDQA_MALLOC=%s: not one of %s; glibc's allocator left as it is", policy, ", ".join(POLICIES))
        return False
    libc = glibc() if policy != "default" else None
    if libc is None:
        return False
    mallopt = libc.mallopt
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    if policy == "release":  # the opposite of keep: large blocks always come from (and go back to) the kernel
        fixed = mallopt(M_MMAP_THRESHOLD, RELEASE_THRESHOLD) == 1
        log.debug("glibc malloc: blocks of %d bytes and more %s", RELEASE_THRESHOLD,
                  "mapped and unmapped on their own" if fixed else "handled as before (mallopt failed)")
        return False
    kept = mallopt(M_MMAP_MAX, 0) == 1 and mallopt(M_TRIM_THRESHOLD, NEVER_TRIM) == 1
    if policy == "one-arena":
        kept = kept and mallopt(M_ARENA_MAX, 1) == 1
    log.debug("glibc malloc: freed memory %s", "kept for reuse" if kept else "handling unchanged (mallopt failed)")
    return kept


def release_freed_memory() -> None:
    """Hand the pages of every free block back to the kernel (glibc malloc_trim); elsewhere nothing."""
    libc = glibc()
    if libc is not None:
        libc.malloc_trim(0)
