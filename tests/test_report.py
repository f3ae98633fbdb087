"""Evidence a user can reproduce: every result file says where it came from (machine, date, command, commit,
library versions), and the README's results table is regenerated from raw files only."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from conftest import REPO_ROOT

from bench import common


def test_a_quick_bench_run_records_its_provenance(tiny_assets, tmp_path):
    """A results.json written by a real (quick) benchmark run carries every provenance key, with this checkout's
    commit and the command as typed; results.md starts with the same in one line."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")])}
    args = ["--quick", "--out", "out", "--data", str(tiny_assets.dev), "--pair", f"none:{tiny_assets.student}",
            "--threads", "1"]
    proc = subprocess.run([sys.executable, "-m", "bench.serving", *args], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    record = json.loads((tmp_path / "out" / "results.json").read_text())["provenance"]
    assert set(common.PROVENANCE_KEYS) <= set(record)
    head = subprocess.run(["git", "-C", str(REPO_ROOT), "rev-parse", "HEAD"], capture_output=True, text=True,
                          check=True).stdout.strip()
    assert record["commit"] == head and isinstance(record["uncommitted_changes"], list)
    assert record["command"] == "python -m bench.serving " + " ".join(args)
    assert record["date_utc"].endswith("Z") and record["cores"] == os.cpu_count()
    for library in ("torch", "transformers", "onnxruntime"):
        assert record[library][0].isdigit()  # installed: the benchmark just ran on them
    markdown = (tmp_path / "out" / "results.md").read_text()
    first_line = markdown.splitlines()[0]
    assert first_line == common.provenance_line(record)
    assert record["command"] in first_line and record["commit"][:10] in first_line and record["cpu"] in first_line


def test_machine_slug_keeps_cpu_generations_and_gpus_apart():
    amd = {"cpu_vendor": "AuthenticAMD", "cpu_family_model": "26/2", "gpu": None}
    assert common.machine_slug(amd) == "amd-26-2"
    assert common.machine_slug({**amd, "cpu_family_model": "25/17"}) == "amd-25-17"
    assert common.machine_slug({"cpu_vendor": "GenuineIntel", "cpu_family_model": "6/143"}) == "intel-6-143"
    assert common.machine_slug({**amd, "gpu": "NVIDIA H100 80GB HBM3"}) == "nvidia-h100-80gb-hbm3"
    assert common.machine_slug({"cpu_vendor": "unknown", "cpu_family_model": "unknown"}) == "unknown-unknown"


def test_git_head_reads_the_checkouts_commit(tmp_path):
    head = subprocess.run(["git", "-C", str(REPO_ROOT), "rev-parse", "HEAD"], capture_output=True, text=True,
                          check=True).stdout.strip()
    assert common.git_head(REPO_ROOT) == head
    assert common.git_head(tmp_path) == common.UNKNOWN
