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
    named = ["teacher, PyTorch float32", "student, PyTorch float32", "student, PyTorch bfloat16",
             "student, ONNX Runtime float32", "student, ONNX Runtime int8",
             "student, ONNX Runtime int8, SkipLayerNormalization fused",
             "student, ONNX Runtime int8, threads not spinning"]
    assert list(rows)[: len(named)] == named
    # The defaults a user gets, built without a precision argument: the export runs its int8 model here.
    defaults = {r["default"]: r for r in pair["rows"] if r["default"]}
    assert defaults["export folder"]["row"] == "default: QuestionAnswerer(export folder) -> ONNX Runtime int8"
    assert defaults["student folder"]["row"].startswith("default: QuestionAnswerer(student folder) -> PyTorch ")
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
    assert goals["default_path"] == defaults["export folder"]["row"]
    speedups = goals["speedups_over_pytorch_float32"]
    assert set(speedups) == set(rows) - {"teacher, PyTorch float32", "student, PyTorch float32"}
    assert all(s["batch1_p50"] > 0 and s["throughput"] > 0 for s in speedups.values())
    for key in ("int8_size_share_of_onnx_float32", "teacher_over_default_latency_p50"):
        assert goals[key] > 0
    assert "| goal | measured |" in markdown and "default: QuestionAnswerer(export folder)" in markdown
