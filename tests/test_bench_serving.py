"""The serving benchmark runs end to end (quick mode, tiny models) and writes every figure it promises.

No timing assertions: the figures themselves are for `python -m bench.serving` on real machines.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

from conftest import REPO_ROOT


def test_serving_benchmark_quick_mode(tiny_assets, tmp_path):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")])}
    command = [sys.executable, "-m", "bench.serving", "--quick", "--out", "out", "--data", str(tiny_assets.dev),
               "--pair", f"{tiny_assets.teacher}:{tiny_assets.student}", "--threads", "1"]
    proc = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    results = json.loads((tmp_path / "out/results.json").read_text())
    markdown = (tmp_path / "out/results.md").read_text()
    assert markdown.strip() in proc.stdout  # printed as well as written
    assert results["threads"] == 1 and results["machine"]["cpu"] and results["date"]
    (pair,) = results["pairs"]
    rows = {r["row"]: r for r in pair["rows"]}
    assert list(rows) == ["teacher, PyTorch float32", "student, PyTorch float32", "student, ONNX Runtime float32",
                          "student, ONNX Runtime int8", "student, ONNX Runtime int8, SkipLayerNormalization fused"]
    quick = results["settings"]
    for row in rows.values():
        assert row["latency_questions"] == quick["latency_questions"]
        assert row["throughput_questions"] == quick["throughput_questions"]
        p = row["latency_ms"]
        assert 0 < p["p50"] <= p["p95"] <= p["p99"] and row["throughput_qps"] > 0 and row["file_bytes"] > 0
        assert 0 <= row["f1"] <= 100
    # The exported float32 student answers exactly as the PyTorch one on every question it answered.
    f32 = rows["student, ONNX Runtime float32"]
    assert f32["same_answers_as_pytorch_student"] == [quick["throughput_questions"]] * 2
    assert f32["largest_score_difference_from_pytorch_student"] < 1e-3
    goals = pair["goals"]
    assert goals["verdicts"]["ONNX float32 answers identical, scores within 1e-3"] is True
    for key in ("int8_speedup_batch1_p50", "int8_size_share_of_onnx_float32", "teacher_over_student_int8_latency_p50"):
        assert goals[key] > 0
    assert "| goal | measured |" in markdown and "ONNX Runtime int8" in markdown
