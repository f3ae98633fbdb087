"""Keep freed memory in the process instead of handing it back to the operating system (glibc on Linux).

A training or inference step on the CPU frees and allocates the same large activation buffers again at every
step. glibc's default serves large blocks with mmap and unmaps them when freed, and trims the top of its heap:
the next step gets fresh pages from the kernel, each one faulted in and zero-filled. That kernel work is
a large share of a CPU student's step (docs/results.md, the student step; `python -m bench.performance`
measures the step both ways). With mmap off for large blocks and trimming off, freed buffers are reused
in place, and the process does not shrink between steps. Between phases whose buffers differ in size (training
steps, then an evaluation at another batch size), `release_freed_memory` hands the free pages back, so that the
peak is that of the larger phase rather than both together.

Called by every stage (pipeline/cli.py) and by the benchmarks that mirror a stage; never on import, so an
application that imports kdqa as a library keeps its own allocator settings.
"""

from __future__ import annotations

import ctypes
import logging
import sys

log = logging.getLogger(__name__)

# mallopt parameters (glibc malloc.h)
M_TRIM_THRESHOLD = -1
M_MMAP_MAX = -4
NEVER_TRIM = 2**31 - 1  # mallopt takes an int


def keep_freed_memory() -> bool:
    """Tell glibc to keep freed memory for reuse; True when it took effect (glibc only; elsewhere nothing)."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None)  # the C library this process already runs on
        libc.gnu_get_libc_version  # glibc: musl and others have other malloc tunables
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    kept = mallopt(M_MMAP_MAX, 0) == 1 and mallopt(M_TRIM_THRESHOLD, NEVER_TRIM) == 1
    log.debug("glibc malloc: freed memory %s", "kept for reuse" if kept else "handling unchanged (mallopt failed)")
    return kept


def release_freed_memory() -> None:
    """Hand the pages of every free block back to the kernel (glibc malloc_trim); elsewhere nothing."""
    if not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL(None)
        libc.gnu_get_libc_version
        libc.malloc_trim(0)
    except (OSError, AttributeError):
        pass
