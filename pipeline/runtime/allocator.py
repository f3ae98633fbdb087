"""How freed memory is handed back to the kernel in kdqa's stages (glibc on Linux): `KDQA_MALLOC`.

A training or inference step on the CPU frees and allocates the same large activation buffers again at every
step. glibc serves blocks above its mmap threshold with mmap and unmaps them when freed, but it raises that
threshold to the size of the largest block freed (up to 32 MiB), so after the first steps most activation
buffers come from its heap and stay resident between steps. The default, `glibc`, leaves it so: measured on the
student stage, the other policies trade step time for memory or memory for step time (docs/results.md, the
student step). `keep` keeps every freed block for reuse (no mmap, no trimming: fewest page faults, the fastest
CPU step, the highest peak; `one-arena` also keeps every thread on one malloc arena). `bounded` fixes the
threshold at 4 MiB and `release` at 1 MiB: blocks that size and larger are mapped for themselves and unmapped as
soon as they are freed, for a lower peak paid for with a page fault per page of every such buffer at every step.
Between phases whose buffers differ in size (training steps, then an evaluation at another batch size),
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
# Fixed mmap thresholds: blocks of this size and more are mapped for themselves and unmapped when freed.
MMAP_THRESHOLDS = {"bounded": 4 << 20, "release": 1 << 20}

POLICIES = ("bounded", "glibc", "keep", "one-arena", "release")
DEFAULT_POLICY = "glibc"


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
    """Apply `policy` (None: the KDQA_MALLOC environment variable, else DEFAULT_POLICY); True when freed memory is
    now kept for reuse (`keep`, `one-arena`). glibc only; elsewhere nothing happens."""
    policy = policy or os.environ.get("KDQA_MALLOC") or DEFAULT_POLICY
    if policy not in POLICIES:
        log.warning("KDQA_MALLOC=%s: not one of %s; glibc's allocator left as it is", policy, ", ".join(POLICIES))
        return False
    libc = glibc() if policy != "glibc" else None
    if libc is None:
        return False
    mallopt = libc.mallopt
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    if policy in MMAP_THRESHOLDS:  # large blocks always come from (and go back to) the kernel
        threshold = MMAP_THRESHOLDS[policy]
        fixed = mallopt(M_MMAP_THRESHOLD, threshold) == 1
        log.debug("glibc malloc: blocks of %d bytes and more %s", threshold,
                  "mapped and unmapped on their own" if fixed else "handled as before (mallopt failed)")
        return False
    kept = mallopt(M_MMAP_MAX, 0) == 1 and mallopt(M_TRIM_THRESHOLD, NEVER_TRIM) == 1
    if policy == "one-arena":
        kept = kept and mallopt(M_ARENA_MAX, 1) == 1
    log.debug("glibc malloc: freed memory %s", "kept for reuse" if kept else "handling unchanged (mallopt failed)")
    return kept


def arrow_on_system_allocator() -> None:
    """Have Arrow allocate with the C library's malloc (so under the policy above) instead of its bundled mimalloc,
    which keeps tens of MB of freed memory in every process that has read a shard (the student stage and its
    loader worker). Only before pyarrow is first imported takes effect; a user's ARROW_DEFAULT_MEMORY_POOL wins."""
    os.environ.setdefault("ARROW_DEFAULT_MEMORY_POOL", "system")


def release_freed_memory() -> None:
    """Hand the pages of every free block back to the kernel (glibc malloc_trim); elsewhere nothing."""
    libc = glibc()
    if libc is not None:
        libc.malloc_trim(0)
