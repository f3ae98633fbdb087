"""pipeline/runtime/allocator.py: with freed memory kept (KDQA_MALLOC=keep), a buffer freed and allocated again is not faulted
in again; with a fixed mmap threshold (bounded, release) a large freed buffer is handed back at once, which glibc as
it comes (the default) does not."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from conftest import REPO_ROOT


def without_kdqa_malloc() -> dict:
    return {k: v for k, v in os.environ.items() if k != "KDQA_MALLOC"}

# Allocate, fill and free a 64 MiB buffer five times; print the page faults of the last four rounds.
ROUNDS = """
import ctypes, resource, sys
from pipeline.runtime.allocator import keep_freed_memory
assert keep_freed_memory(sys.argv[1]) == (sys.argv[1] == "keep")
libc = ctypes.CDLL(None)
libc.malloc.restype, libc.malloc.argtypes, libc.free.argtypes = ctypes.c_void_p, [ctypes.c_size_t], [ctypes.c_void_p]
faults = []
for _ in range(5):  # what a tensor of activations does every step (numpy would ask for huge pages: not this)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    buffer = libc.malloc(64 << 20)
    ctypes.memset(buffer, 1, 64 << 20)
    libc.free(buffer)
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(sum(faults[1:]))
"""


def faults_after_the_first_round(setting: str) -> int:
    out = subprocess.run([sys.executable, "-c", ROUNDS, setting], cwd=REPO_ROOT, capture_output=True, text=True,
                         check=True, env=without_kdqa_malloc())
    return int(out.stdout)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's allocator settings")
def test_freed_buffers_are_reused_without_page_faults():
    pages = (64 << 20) // 4096
    assert faults_after_the_first_round("glibc") >= 4 * pages * 0.9  # unmapped when freed: faulted in again
    assert faults_after_the_first_round("keep") < pages // 4  # the same pages, reused


# With freed memory kept, free a 64 MiB buffer, then release: print resident MiB before and after the release.
RELEASE = """
import ctypes
from pipeline.runtime.allocator import keep_freed_memory, release_freed_memory
def resident_mib():
    return int(next(l for l in open("/proc/self/status") if l.startswith("VmRSS")).split()[1]) // 1024
assert keep_freed_memory("keep")
libc = ctypes.CDLL(None)
libc.malloc.restype, libc.malloc.argtypes, libc.free.argtypes = ctypes.c_void_p, [ctypes.c_size_t], [ctypes.c_void_p]
buffer = libc.malloc(64 << 20)
ctypes.memset(buffer, 1, 64 << 20)
after = libc.malloc(1 << 10)  # so that the freed buffer is inside the heap, not at its top
libc.free(buffer)
kept = resident_mib()
release_freed_memory()
print(kept, resident_mib())
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's allocator settings")
def test_release_hands_kept_pages_back():
    out = subprocess.run([sys.executable, "-c", RELEASE], cwd=REPO_ROOT, capture_output=True, text=True, check=True)
    kept, released = map(int, out.stdout.split())
    assert kept - released >= 60  # the free 64 MiB block's pages, returned by malloc_trim


# Free an 8 MiB block (glibc then raises its mmap threshold past 8 MiB), then fill and free a 4 MiB one with a small
# block after it (so it is not the top of the heap, which glibc trims): print the resident MiB it leaves behind.
LEFT_BEHIND = """
import ctypes, sys
from pipeline.runtime.allocator import keep_freed_memory
def resident_mib():
    return int(next(l for l in open("/proc/self/status") if l.startswith("VmRSS")).split()[1]) / 1024
assert not keep_freed_memory(sys.argv[1] if len(sys.argv) > 1 else None)
libc = ctypes.CDLL(None)
libc.malloc.restype, libc.malloc.argtypes, libc.free.argtypes = ctypes.c_void_p, [ctypes.c_size_t], [ctypes.c_void_p]
libc.free(libc.malloc(8 << 20))
before = resident_mib()
buffer = libc.malloc(4 << 20)
ctypes.memset(buffer, 1, 4 << 20)
after = libc.malloc(1 << 10)
libc.free(buffer)
print(resident_mib() - before)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's allocator settings")
def test_bounded_and_release_policies_give_large_freed_blocks_back_at_once():
    def left_behind(*setting: str) -> float:
        out = subprocess.run([sys.executable, "-c", LEFT_BEHIND, *setting], cwd=REPO_ROOT, capture_output=True,
                             text=True, check=True, env=without_kdqa_malloc())
        return float(out.stdout)

    assert left_behind("glibc") >= 3.5  # glibc's own rule: now served from its heap, and kept there
    assert left_behind("bounded") < 1  # 4 MiB and more: mapped for itself, unmapped when freed
    assert left_behind("release") < 1
    assert left_behind() >= 3.5  # no KDQA_MALLOC: glibc as it comes


# The command line's entry point, then pyarrow: print the backend of Arrow's default memory pool.
ARROW_POOL = """
import sys
from pipeline.cli import main
sys.argv = ["kdqa", "--help"]
try:
    main()
except SystemExit:
    pass
import pyarrow
print(pyarrow.default_memory_pool().backend_name)
"""


def test_stages_have_arrow_allocate_with_the_c_library_unless_the_user_chose():
    def backend(**env: str) -> str:
        out = subprocess.run([sys.executable, "-c", ARROW_POOL], cwd=REPO_ROOT, capture_output=True, text=True,
                             check=True, env={**{k: v for k, v in os.environ.items()
                                                 if k != "ARROW_DEFAULT_MEMORY_POOL"}, **env})
        return out.stdout.split()[-1]

    assert backend() == "system"
    assert backend(ARROW_DEFAULT_MEMORY_POOL="mimalloc") == "mimalloc"
