"""The side-by-side benchmark against Haystack v1 (bench.peer): its quick mode end to end (kdqa's job only,
the peer skipped) on the tiny models, and the peak-memory probe it measures every process with.

No timing assertions: the figures themselves are for `python -m bench.peer` on real machines.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import tiny
from conftest import REPO_ROOT


def run_python(args: list[str], cwd, timeout: int = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def test_peer_benchmark_quick_mode_runs_the_kdqa_job(tiny_assets, tmp_path):
    data = tiny.make_squad(tmp_path / "squad.json", articles=9, paragraphs=1, questions=3, seed=0)  # 7 train, 2 held out
    proc = run_python(["-m", "bench.peer", "--quick", "--data", str(data), "--teacher-model", str(tiny_assets.teacher),
                       "--out", "out", "--set", "student_layers=[0]", "--set", "max_seq_len=48",
                       "--set", "doc_stride=16", "--set", "max_query_len=12",
                       "--kdqa-student", "attention_dropout=0"], cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    markdown = (tmp_path / "out" / "results.md").read_text()
    assert markdown in proc.stdout

    assert results["haystack"] is None and results["summary"] == {"peer": "skipped"}
    kdqa = results["kdqa"]
    stages = kdqa["stages"]
    assert list(stages) == ["prepare", "teacher", "student"]
    for stage in stages.values():
        # Every stage is a process that imported torch: its own peak is well above an empty interpreter's.
        assert stage["seconds"] > 0 and 100 < stage["peak_rss_mb"] < 4000
    assert kdqa["wall_s"] == round(sum(s["seconds"] for s in stages.values()), 2)
    assert kdqa["peak_rss_mb"] == max(s["peak_rss_mb"] for s in stages.values())
    assert stages["student"]["children_peak_rss_mb"] > 0  # the DataLoader worker
    assert kdqa["peak_tree_mb"] >= stages["student"]["peak_rss_mb"] * 0.9
    manifest = json.loads((tmp_path / "out" / "kdqa" / "data" / "features" / "train" / "manifest.json").read_text())
    assert kdqa["features"] == manifest["features"] > 0
    assert 1 <= kdqa["steps"] <= 4 and kdqa["train_s"] > 0  # quick: at most 4 steps
    # Scored with `kdqa evaluate` on the held-out articles: the student trained in this run, from its own start.
    assert results["dev_questions"] == kdqa["scores"]["total"] == 6
    assert 0 <= kdqa["scores"]["f1"] <= 100
    init = tmp_path / "out" / "models" / "student-init"
    assert json.loads((init / "config.json").read_text())["num_hidden_layers"] == 1
    # A kdqa-only setting reaches kdqa's params.yaml and the report's header.
    params = (tmp_path / "out" / "kdqa" / "params.yaml").read_text()
    assert "attention_dropout: 0" in params and "kdqa alone: student.attention_dropout: 0" in markdown
    assert results["kdqa_student_settings"] == {"attention_dropout": 0}
    # The header says what kdqa's `auto` settings became on this machine (a CPU here: checkpointing on).
    resolved = results["kdqa_resolved_defaults"]
    assert resolved["gradient_checkpointing"] == "auto = on" and resolved["precision"].startswith("auto = ")
    assert "kdqa's defaults as they ran here: student.precision: auto = " in markdown
    malloc = os.environ.get("KDQA_MALLOC") or "glibc"  # what the stages ran with: the environment, else the default
    assert results["kdqa_malloc"] == malloc and f"KDQA_MALLOC={malloc}" in markdown
    for row in ("whole KD job, wall s", "peak RSS of the job's largest process", "training features"):
        assert row in markdown


def test_rss_probe_reports_the_programs_own_peak_and_exit_status(tmp_path):
    script = tmp_path / "allocate.py"
    script.write_text("import sys\nblock = bytearray(int(sys.argv[1]) * 1024 * 1024)\n"
                      "block[::4096] = b'x' * len(block[::4096])  # touch every page\nsys.exit(int(sys.argv[2]))\n")
    peaks = {}
    for mb, code in ((0, 0), (300, 3)):
        result = tmp_path / f"{mb}.json"
        proc = run_python(["-m", "bench.rss_probe", str(result), str(script), str(mb), str(code)], cwd=tmp_path,
                          timeout=60)
        assert proc.returncode == code, proc.stderr  # the program's own exit status comes through
        peaks[mb] = json.loads(result.read_text())["peak_rss_mb"]
    assert peaks[0] < 100
    assert peaks[0] + 290 <= peaks[300] <= peaks[0] + 400
    # bench.peer starts it by its file in the peer's virtualenv, where this checkout is not on the import path.
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    result = tmp_path / "by-file.json"
    proc = subprocess.run([sys.executable, str(REPO_ROOT / "bench" / "rss_probe.py"), str(result), str(script), "0", "0"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(result.read_text())["peak_rss_mb"] < 100
