"""The accuracy benchmark's code path runs end to end (on the tiny models; no accuracy is asserted)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import tiny

REPO = Path(__file__).resolve().parents[1]


def test_accuracy_benchmark_quick_mode_runs_every_stage(tmp_path):
    encoder = tiny.make_model(tmp_path / "encoder", layers=3)
    data = tiny.make_squad(tmp_path / "squad.json", articles=9, paragraphs=1, questions=3)
    out = tmp_path / "out"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "DVC_NO_ANALYTICS": "1"}
    subprocess.run([sys.executable, "bench/accuracy.py", "--quick", "--encoder", str(encoder), "--student-layers",
                    "0,2", "--data", str(data), "--out", str(out)], cwd=REPO, env=env, check=True,
                   capture_output=True, text=True, timeout=600)
    results = json.loads((out / "results.json").read_text())
    names = [r["model"] for r in results["rows"]]
    assert names[0].startswith("teacher") and len(names) == 1 + len(results["config"]["students"])
    for row in results["rows"]:
        assert {"exact", "f1", "total", "HasAns_f1_forced"} <= set(row)
        assert all(stage["seconds"] > 0 and stage["peak_rss_mib"] > 0 for stage in row["stages"].values())
    # 7 articles train, the rest are held out: the held-out questions are exactly the last 2 articles'.
    assert results["rows"][0]["total"] == 2 * 1 * 3
    # Every student streamed the one set of teacher logits (the logits stage ran once).
    assert (out / "logits" / "data" / "teacher" / "train" / "manifest.json").is_file()
    assert "| model |" in (out / "results.md").read_text()
