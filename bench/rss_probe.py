"""Run a Python module or script in this very process, then record its peak resident memory.

    python -m bench.rss_probe RESULT.json -m pipeline student
    python -m bench.rss_probe RESULT.json path/to/script.py ARGS...

RESULT.json gets `peak_rss_mb` (this process's own VmHWM, `bench.common.maxrss_mb`) and
`children_peak_rss_mb` (the largest child it waited for, e.g. a DataLoader worker; a forked child's figure
includes the pages it shares with its parent). Measured from the inside because the ru_maxrss a parent gets
for an exec'd child starts at the parent's own size at fork time. Standard library only, so the peer's
virtualenv runs it as well: bench.peer starts it by its file (`python bench/rss_probe.py ...`) in an interpreter
whose import path lacks this checkout, and it finds bench.common itself. The exit status is the program's.
"""

from __future__ import annotations

import json
import resource
import runpy
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def peak_rss() -> dict:
    sys.path.insert(0, str(ROOT))
    try:
        from bench.common import maxrss_mb  # stdlib-only module: importable from any virtualenv
    finally:
        sys.path.remove(str(ROOT))
    return {"peak_rss_mb": round(maxrss_mb(), 1),
            "children_peak_rss_mb": round(maxrss_mb(resource.RUSAGE_CHILDREN), 1)}


def main(argv: list[str]) -> None:
    if argv[:1] in (["-h"], ["--help"]):
        print(__doc__)
        return
    if len(argv) < 2 or (argv[1] == "-m" and len(argv) < 3):
        sys.exit("usage: python -m bench.rss_probe RESULT.json (-m MODULE | SCRIPT) [ARGS...]")
    result = Path(argv[0])
    try:
        if argv[1] == "-m":
            sys.argv = [argv[2], *argv[3:]]
            sys.path[0] = str(Path.cwd())  # as `python -m MODULE` would have it
            runpy.run_module(argv[2], run_name="__main__", alter_sys=True)
        else:
            sys.argv = argv[1:]
            sys.path[0] = str(Path(argv[1]).resolve().parent)  # as `python SCRIPT` would have it
            runpy.run_path(argv[1], run_name="__main__")
    finally:  # also when the program exits through SystemExit (click does, with its exit status)
        result.write_text(json.dumps(peak_rss()))


if __name__ == "__main__":
    main(sys.argv[1:])
