"""The performance benchmark runs end to end (quick mode, tiny models) and writes every row it promises.

No timing assertions: the figures themselves are for `python -m bench.performance` on real machines.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest

from conftest import REPO_ROOT


def test_performance_benchmark_quick_mode(tiny_assets, tmp_path):
    out = tmp_path / "out"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")])}
    # A relative --out from another directory: the stage workers change directory, so every path must hold.
    command = [sys.executable, "-m", "bench.performance", "--quick", "--out", "out",
               "--data", str(tiny_assets.train), "--teacher-model", str(tiny_assets.teacher), "--student-layers", "0",
               "--max-seq-len", "48", "--doc-stride", "16", "--max-query-len", "12", "--threads", "1",
               "--profile-steps", "2"]
    proc = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    results = json.loads((out / "results.json").read_text())
    markdown = (out / "results.md").read_text()
    assert markdown in proc.stdout  # printed as well as written

    # 1. teacher: ours (stage, compute only) vs the plain padded loop, on the same features
    teacher = results["teacher"]
    assert teacher["features"] > 0 and teacher["features"] == results["settings"]["main_set_features"]
    for key in ("stage_s", "compute_s", "plain_s"):
        assert teacher[key] > 0
    assert teacher["max_abs_logit_diff_vs_plain"] < 0.05  # both loops computed the same logits
    # 2-3. student: offline / online / hard, each with epoch time and peak memory
    summary = results["summary"]
    for mode in ("offline", "online", "hard"):
        runs = results["student_runs"][mode]
        assert runs and all(r["steps"] > 0 and r["epoch_s"] > 0 and r["peak_rss_mb"] > 0 for r in runs)
        assert {r["features"] for r in runs} == {teacher["features"]}  # every mode trains on all features
        for r in runs:  # every step after the first is at a width seen before or at a new one, never both
            assert 1 <= r["widths"] and 0 <= r["first_sight_steps"] <= min(r["widths"], r["steps"] - 1)
            assert (r["seen_width_step_s"] is None) == (r["first_sight_steps"] == r["steps"] - 1)
    # 2b. the step per precision and batch plan: every variant trained the same features, in its own precision
    variants = results["step_variant_runs"]
    assert list(variants) == list(summary["step_variants"]) and len(variants) == 10
    for name, rs in variants.items():
        assert rs and all(r["features"] == teacher["features"] and r["step_s"] > 0 for r in rs)
        assert rs[0]["precision"] == name.split(",")[0] and rs[0]["group_by_length"] == ("grouped" in name)
        # glibc on Linux (CI and this benchmark's machines): the setting takes effect where asked for
        assert rs[0]["freed_memory_kept"] == ("kept" in name) and rs[0]["minor_faults_per_step"] >= 0
        assert rs[0]["malloc"] == ("keep" if "kept" in name else "bounded" if "4 MiB" in name else "glibc")
        assert rs[0]["attention_dropout"] == (0.0 if "no attention dropout" in name else None)
        reference = name.startswith("float32, random batches")  # the step before kdqa's attention existed
        assert rs[0]["attention"] == ("sdpa" if reference or "PyTorch's attention" in name else "auto")
        assert rs[0]["dropout_masks"] == ("torch" if reference or "PyTorch's dropout" in name else "auto")
        assert 0 <= rs[0]["padding_fraction"] < 1
    for precision in ("float32", "bfloat16"):
        grouped = variants[f"{precision}, grouped by length"][0]["padding_fraction"]
        assert grouped <= variants[f"{precision}, random batches"][0]["padding_fraction"]
    assert summary["step_variants"]["float32, random batches"]["speedup"] == 1.0
    for key in ("offline_vs_online_epoch", "streaming_overhead_step", "teacher_speedup", "shard_vs_fp16_dense"):
        assert isinstance(summary[key], float)
    # 4. shards
    shards = results["shards"]
    assert shards["rows"] == teacher["features"] and shards["bytes_per_feature"] > 0
    assert shards["dense_float16_bytes_per_feature"] == 2 * 48 * 2
    # 5. the student stage at 1x and 10x the data
    stage = results["stage"]
    assert stage["10x"]["features"] == 10 * stage["1x"]["features"]
    assert stage["1x"]["peak_rss_mb"] > 0 and stage["10x"]["peak_rss_mb"] > 0
    # 6. the sweep
    sweep = summary["sweep"]
    assert sweep["offline_total_s"] > sweep["teacher_run_s"] > 0 and sweep["online_total_s"] > 0

    # 2c. the profile: both modes, the same steps, the operators of a BERT step among the top ones
    profiles = results["profiles"]
    assert set(profiles) == {"offline", "hard"}
    for x in profiles.values():
        assert x["steps"] == 2 and x["step_s"] > 0 and x["self_cpu_s_per_step"] > 0
        assert any(e["name"] in ("aten::mm", "aten::addmm", "aten::bmm") for e in x["top"])
    for row in ("teacher throughput", "student epoch", "student step", "peak RSS", "shard size", "10x vs 1x", "sweep",
                "2b. Student step: precision and batch plan", "2c. Where a step's time goes"):
        assert row in markdown
    assert not (out / "work").exists()  # scratch removed unless --keep-work


def test_reference_shapes_build_a_separate_student(tiny_assets, tmp_path, monkeypatch):
    """--shapes reference: random teacher and student of given shapes; the student runs are the student model's.
    Run as --profile-only (the teacher stage, one streamed-logits and one hard-label run, their profiles)."""
    from bench import common, performance

    tiny_shape = {"layers": 2, "hidden": 32, "heads": 2, "intermediate": 64, "name": "tiny teacher shape"}
    monkeypatch.setitem(common.REFERENCE_SHAPES, "teacher", tiny_shape)
    monkeypatch.setitem(common.REFERENCE_SHAPES, "student",
                        {**tiny_shape, "layers": 1, "hidden": 16, "name": "tiny student shape"})
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")]))
    args = performance.parse_args(["--quick", "--shapes", "reference", "--out", str(tmp_path / "out"),
                                   "--data", str(tiny_assets.train), "--teacher-model", str(tiny_assets.teacher),
                                   "--max-seq-len", "48", "--doc-stride", "16", "--max-query-len", "12",
                                   "--threads", "1", "--profile-only", "--profile-steps", "2"])
    results = performance.run(args)
    st = results["settings"]
    assert st["teacher_layers"] == 2 and st["student_layers"] == [0]  # all of the 1-layer student model
    assert st["student_parameters"] < st["teacher_parameters"]
    markdown = performance.markdown_profile_only(results)
    assert "tiny student shape (1 x 16)" in markdown and "2c. Where a step's time goes" in markdown
    runs = results["student_runs"]
    assert set(runs) == {"offline", "hard"} and all(r["steps"] > 0 for r in runs.values())
    assert {r["features"] for r in runs.values()} == {results["teacher"]["features"]}
    assert set(results["profiles"]) == {"offline", "hard"}
    assert all(p["steps"] == 2 and p["step_s"] > 0 for p in results["profiles"].values())
    assert results["streaming_overhead_step"] == runs["offline"]["step_s"] / runs["hard"]["step_s"] - 1
    assert "width seen" in markdown


def test_parameter_count_matches_the_model(tiny_assets):
    from transformers import AutoModelForQuestionAnswering

    from bench.performance import parameter_count
    from pipeline.model.loading import keep_layers

    model = AutoModelForQuestionAnswering.from_pretrained(tiny_assets.teacher)
    assert parameter_count(tiny_assets.teacher) == sum(p.numel() for p in model.parameters())
    keep_layers(model, [0])
    assert parameter_count(tiny_assets.teacher, [0]) == sum(p.numel() for p in model.parameters())


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux-specific: ru_maxrss survives exec there")
def test_worker_peak_memory_is_its_own_not_its_parents():
    """A benchmark worker is started by a process that may be much bigger; Linux carries ru_maxrss across
    fork + exec, so the worker's peak must come from its own address space (VmHWM)."""
    ballast = bytearray(400 * 1024 * 1024)
    ballast[:: 4096] = b"\x01" * len(ballast[:: 4096])  # touch every page: 400 MB resident in this process
    probe = "import resource; from bench.common import maxrss_mb; print(maxrss_mb(), resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)"
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    own, inherited = map(float, subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True,
                                               check=True).stdout.split())
    assert inherited > 400  # the trap this guards against...
    assert own < 200  # ...and the worker's own peak: an interpreter and a few modules
    del ballast


def test_student_benchmark_times_the_stages_own_train_step(prepared_run, tiny_assets, monkeypatch):
    """The benchmark's student epoch runs `pipeline.training.step.train_step` (the stage's step), once per step."""
    import torch

    import pipeline.training.step
    from bench import perf_workers

    taken = []
    real_step = pipeline.training.step.train_step

    def counted(*args):
        taken.append(args[5])  # `step`: the steps taken before this one
        return real_step(*args)

    monkeypatch.setattr(pipeline.training.step, "train_step", counted)
    monkeypatch.setattr(perf_workers, "setup_torch", lambda threads: (torch, torch.device("cpu")))  # no global changes
    result = perf_workers.student_worker({
        "threads": 1, "mode": "offline", "work": str(prepared_run), "teacher_model": str(tiny_assets.teacher),
        "student_layers": [0], "seed": 1, "batch_size": 4, "learning_rate": 1e-3, "warmup_steps": 1, "num_workers": 0})
    assert result["steps"] > 1 and taken == list(range(1 + result["steps"]))  # the warm-up step, then the epoch


def test_extra_data_benchmark_quick_mode(tmp_path):
    """bench.extra_data end to end on tiny models: every teacher run reports what it computed and copied, the
    increments copy every earlier shard byte for byte, and the 3x student streams more steps."""
    import tiny

    encoder = tiny.make_model(tmp_path / "encoder", layers=2)
    data = tiny.make_squad(tmp_path / "squad.json", articles=9, paragraphs=2, questions=3)
    unlabeled = tiny.strip_answers(tiny.make_squad(tmp_path / "squad-u.json", articles=3, paragraphs=2, questions=3, seed=4),
                                   tmp_path / "unlabeled.json")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "DVC_NO_ANALYTICS": "1",
           "PYTHONPATH": os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, "-m", "bench.extra_data", "--quick", "--encoder",
                           str(encoder), "--data", str(data), "--unlabeled", str(unlabeled), "--out", str(tmp_path / "out")],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    labelled, unlabeled_run, views, scratch = results["teacher_runs"]
    assert labelled["shards_copied"] == 0 and scratch["shards_copied"] == 0
    # Each increment computes only the new split's shards and copies all the earlier ones, byte for byte.
    assert unlabeled_run["shards_copied"] == labelled["shards_computed"]
    assert unlabeled_run["shards_computed"] == unlabeled_run["splits"]["unlabeled"]["shards"]
    assert views["shards_computed"] == views["splits"]["augmented"]["shards"]
    assert views["rows"] == scratch["rows"] and scratch["shards_computed"] == sum(
        r["shards_computed"] for r in (labelled, unlabeled_run, views))
    assert all(r["earlier_shards_byte_identical"] for r in (labelled, unlabeled_run, views))
    one, three = results["students"]
    assert three["steps"] > one["steps"] and one["peak_rss_mib"] > 0 and three["peak_rss_mib"] > 0
    assert "| teacher run |" in (tmp_path / "out" / "results.md").read_text()


def test_results_name_the_cpu_generation_and_its_kernel_flags(tmp_path):
    # VMs of one model name ("AMD EPYC") differ by generation; the family/model numbers and the flags the
    # kernels dispatch on are what tell two runs' machines apart.
    from bench import common

    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\ncpu family\t: 26\nmodel\t\t: 2\nmodel name\t: AMD EPYC\n"
                       "flags\t\t: fpu avx2 avx512f avx512_vnni avx512_bf16 sse\n\nprocessor\t: 1\nflags\t: amx_tile\n")
    info = common.cpu_identity(cpuinfo)
    assert info == {"cpu": "AMD EPYC", "cpu_family_model": "26/2",
                    "cpu_kernel_flags": ["avx2", "avx512f", "avx512_vnni", "avx512_bf16"]}
    assert common.cpu_words(info) == "AMD EPYC (family/model 26/2; avx512_vnni, avx512_bf16)"
    assert common.cpu_words({"cpu": "arm64"}) == "arm64"
    assert common.cpu_identity(tmp_path / "absent")["cpu"]  # no /proc/cpuinfo: the platform's name


BENCHMARKS = ("accuracy", "align", "extra_data", "first_run", "peer", "performance", "serving", "attention_widths",
              "ensemble_step", "carried_teacher", "student_step")
# What each benchmark that needs real data must be given: none falls back to a file outside the repository.
NEEDS = {"accuracy": "--train-data", "align": "--data", "extra_data": "--data", "first_run": "--data-dir",
         "peer": "--data", "serving": "--data", "ensemble_step": "--data", "carried_teacher": "--data"}


@pytest.mark.parametrize("name", BENCHMARKS)
def test_every_benchmark_runs_as_a_module_and_says_which_data_it_needs(name, tmp_path):
    """One invocation style, `python -m bench.NAME`, from any directory; a benchmark that needs data and was not
    given it stops with a usage error naming the option and the file it wants (no default path is assumed)."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")])}

    def bench(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", f"bench.{name}", *args], cwd=tmp_path, env=env,
                              capture_output=True, text=True, timeout=120)

    helped = bench("--help")
    assert helped.returncode == 0 and f"python -m bench.{name}" in helped.stdout, helped.stderr[-2000:]
    if name in NEEDS:
        missing = bench("--out", str(tmp_path / "out"))
        assert missing.returncode == 2 and f"needs {NEEDS[name]}: " in missing.stderr, missing.stderr[-2000:]
        assert re.search(r"squad2-(train-)?sample\.json", missing.stderr)  # which file: named, not assumed
        assert not (tmp_path / "out").exists()


def test_student_step_benchmark_quick_mode(tiny_assets, tmp_path, monkeypatch):
    """bench.student_step times every row at every width on the same batches (no timing assertions); each row is
    the student the stage's own build_student makes of its settings (kdqa's dropout masks unless put back)."""
    from bench import student_step
    from pipeline.model.dropout import CpuDropout
    from pipeline.stages import student as student_stage

    built, real_build = {}, student_stage.build_student

    def spy(settings, device):
        model = real_build(settings, device)
        key = (settings.dropout_masks, settings.attention, settings.gradient_checkpointing)
        built[key] = any(isinstance(m, CpuDropout) for m in model.modules())
        return model

    monkeypatch.setattr(student_stage, "build_student", spy)
    results = student_step.main(["--quick", "--encoder", str(tiny_assets.teacher), "--student-layers", "0,2",
                                 "--widths", "16,24", "--out", str(tmp_path / "out")])
    assert built == {("auto", "auto", "auto"): True, ("torch", "auto", "auto"): False,
                     ("auto", "sdpa", "auto"): True, ("auto", "auto", False): True}
    assert list(results["rows"]) == list(student_step.ROWS) and results["student_layers"] == [0, 2]
    for by_width in results["rows"].values():
        assert list(by_width) == ["16", "24"]
        assert all(w["steps"] == 2 and w["median_s"] > 0 for w in by_width.values())
    assert all(r["defaults_vs_this"] == 1.0 for r in results["rows"][student_step.DEFAULTS].values())
    assert "the defaults' median / this" in (tmp_path / "out/results.md").read_text()


def test_ensemble_step_benchmark_quick_mode(tiny_assets, tmp_path):
    """bench.ensemble_step runs end to end on the tiny models: two folders, one and three teachers over the same
    features, the student's step timed in each (no timing assertions)."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")])}
    command = [sys.executable, "-m", "bench.ensemble_step", "--quick", "--data", str(tiny_assets.train),
               "--teacher-encoder", str(tiny_assets.teacher), "--out", str(tmp_path / "out")]
    proc = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = json.loads((tmp_path / "out/results.json").read_text())
    assert set(results["modes"]) == {"1 teacher", "3 teachers"}
    for mode in results["modes"].values():
        assert mode["steps"] > 1 and all(s > 0 for s in mode["step_s"])
    three = tmp_path / "out/work/three-teachers/data/teacher/train"
    assert sorted(p.name for p in three.glob("teacher-*")) == ["teacher-0", "teacher-1", "teacher-2"]
    assert "within +3% of one teacher's" in (tmp_path / "out/results.md").read_text()


def test_first_run_benchmark_starts_every_run_from_an_empty_project(tmp_path, monkeypatch):
    """A second `bench.first_run` in the same --out must not find the first run's logits cache or checkpoints:
    every stage it times starts from a project holding only the preset's params.yaml."""
    import types

    from bench import first_run

    out = tmp_path / "out"
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    for name in first_run.DATA_FILES.values():
        (data_dir / name).write_text("{}")
    monkeypatch.setattr(first_run, "stand_in_model", lambda folder: folder)
    monkeypatch.setattr(first_run, "first_questions", lambda source, n, dest: dest)
    seen, real_run = [], subprocess.run

    def fake_stage(command, cwd=None, **kwargs):
        if command[1:3] != ["-m", "pipeline"]:
            return real_run(command, cwd=cwd, **kwargs)  # the machine's description
        stage = command[-1]
        if stage == "prepare":
            seen.append(sorted(str(p.relative_to(cwd)) for p in cwd.rglob("*")))
            for split in ("train", "dev"):
                (cwd / "data" / "features" / split).mkdir(parents=True)
                (cwd / "data" / "features" / split / "manifest.json").write_text('{"features": 1}')
        if stage == "teacher":  # what a real teacher stage leaves behind: its logits cache
            (cwd / ".kdqa" / "teacher-cache").mkdir(parents=True)
            (cwd / ".kdqa" / "teacher-cache" / "logits.parquet").write_text("cached")
        return types.SimpleNamespace(returncode=0)

    monkeypatch.setattr(first_run.subprocess, "run", fake_stage)
    for _ in range(2):
        first_run.run(out, threads=1, data_dir=data_dir)
    assert seen == [["params.yaml"], ["params.yaml"]]
