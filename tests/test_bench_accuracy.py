"""The accuracy benchmark's code path runs end to end (on the tiny models; no accuracy is asserted)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

import tiny

REPO = Path(__file__).resolve().parents[1]


def bench_env() -> dict:
    """For `python -m bench.accuracy` from another directory: this checkout on the path, everything offline."""
    return {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "DVC_NO_ANALYTICS": "1",
            "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}


def test_accuracy_benchmark_quick_mode_runs_every_stage(tmp_path):
    encoder = tiny.make_model(tmp_path / "encoder", layers=3)
    data = tiny.make_squad(tmp_path / "squad.json", articles=9, paragraphs=1, questions=3)
    train = tiny.make_squad(tmp_path / "train.json", articles=7, paragraphs=1, questions=3, seed=3)
    out = tmp_path / "out"
    # Two cut from the fine-tuned teacher, two from the encoder: the baseline, and one with its own layers
    # (different hyperparameters: not judged against the baseline).
    students = tmp_path / "students.yaml"
    students.write_text('- {name: "hard from teacher", distillation_weight: 0.0, temperature: 1.0, model: teacher}\n'
                        '- {name: "from teacher", distillation_weight: 1.0, temperature: 2.0, model: teacher}\n'
                        '- {name: "hard", distillation_weight: 0.0, temperature: 1.0}\n'
                        '- {name: "distilled, layer 0", distillation_weight: 1.0, temperature: 2.0, init_layers: [0]}\n')
    env = bench_env()
    # --out relative to the working directory (the stages themselves run inside their own work folders)
    command = [sys.executable, "-m", "bench.accuracy", "--quick", "--encoder", str(encoder),
               "--student-layers", "0,2", "--train-data", str(train), "--data", str(data), "--out", "out",
               "--students", str(students), "--parallel", "2"]

    def bench(*extra: str) -> str:
        return subprocess.run(command + list(extra), cwd=tmp_path, env=env, check=True, capture_output=True,
                              text=True, timeout=600).stdout

    first = bench("--set", "student_training.learning_rate=0.002")
    assert "already done" not in first
    results = json.loads((out / "results.json").read_text())
    assert results["complete"]
    # The goals are judged in the output: one hard-label student and one distilled one are enough to compare.
    assert set(results["goals"]["met"]) == {"teacher_over_abstain_f1", "student_f1_gain", "student_forced_f1_gain",
                                            "student_share_of_teacher_forced"}
    # The baseline never saw the teacher (listed after a hard-label student cut from the teacher, on purpose);
    # the two cut from the teacher are compared with each other as well.
    assert results["goals"]["hard_labels"].endswith(", hard")
    assert "layer 0" not in results["goals"]["best_by_f1"] + results["goals"]["best_by_forced_f1"]
    same = results["goals"]["same_init_from_teacher"]
    assert same["hard_labels"].endswith("hard from teacher") and same["distilled"].endswith(", from teacher")
    assert [r["init"] for r in results["rows"][1:]] == ["teacher", "teacher", "encoder", "encoder"]
    assert "| best distilled forced span F1 / teacher's |" in (tmp_path / "out" / "results.md").read_text()
    # Both gains come with a paired-bootstrap interval from the models' own per-question files.
    for ci in (results["goals"]["ci95"], same["ci95"]):
        assert set(ci) == {"f1_gain", "forced_f1_gain"} and all(lo <= hi for lo, hi in ci.values())
    names = [r["model"] for r in results["rows"]]
    assert names[0].startswith("teacher") and len(names) == 1 + len(results["config"]["students"])
    for row in results["rows"]:
        assert {"exact", "f1", "total", "HasAns_f1_forced", "has_answer_auc"} <= set(row)
        assert 0 <= row["has_answer_auc"] <= 1 or row["has_answer_auc"] != row["has_answer_auc"]  # or NaN
        assert all(stage["seconds"] > 0 and stage["peak_rss_mib"] > 0 for stage in row["stages"].values())
    # The answered share is read from the model's own predictions (empty text = abstained).
    teacher_predictions = json.loads((out / "teacher" / "results" / "predictions.json").read_text())
    answered = sum(1 for text in teacher_predictions.values() if text)
    assert results["rows"][0]["answered_pct"] == round(100 * answered / len(teacher_predictions), 1)
    # --train-data trains; --data's first 3 articles choose thresholds, the other 6 are the test questions.
    assert results["rows"][0]["total"] == 6 * 1 * 3
    assert {k: v["questions"] for k, v in results["split"].items()} == {"train": 21, "validation": 9, "test": 18}
    # Every model chose its no-answer threshold on validation and answered the test questions at it.
    for row in results["rows"]:
        assert row["null_threshold_source"].endswith("models/student/kdqa_answering.json"), row["model"]
        stored = json.loads((Path(row["workdir"]) / "models" / "student" / "kdqa_answering.json").read_text())
        assert stored["chosen_on"] == "validation" and stored["questions"] == 9
        assert stored["null_threshold"] == row["null_threshold"]
    # Every student streamed the one set of teacher logits (the logits stage ran once).
    assert (out / "logits" / "data" / "teacher" / "train" / "manifest.json").is_file()
    assert "| model |" in (out / "results.md").read_text()
    # Each student's params.yaml carries its spec on top of the shared settings.
    cut = yaml.safe_load((out / "student-from-teacher" / "params.yaml").read_text())["student"]
    assert cut["model"] == str((out / "teacher" / "models" / "student").resolve()) and cut["init_layers"] == [0, 2]
    own = yaml.safe_load((out / "student-distilled--layer-0" / "params.yaml").read_text())["student"]
    assert own["init_layers"] == [0] and own["model"] == str(encoder.resolve()) and own["learning_rate"] == 0.002
    assert names[1:] == ["student 2 layers, hard from teacher", "student 2 layers, from teacher",
                         "student 2 layers, hard", "student 1 layer, distilled, layer 0"]

    # A rerun reuses every finished stage and reports the same scores.
    again = bench("--set", "student_training.learning_rate=0.002")
    assert again.count("already done") == 3 + 1 + 4 * 2  # teacher: prepare, fine-tune, evaluate; logits; students
    def scores_only(rows):
        return [{k: v for k, v in row.items() if k != "stages"} for row in rows]

    assert scores_only(json.loads((out / "results.json").read_text())["rows"]) == scores_only(results["rows"])
    # One student's setting changed: the teacher, its logits and the other students are reused; that one runs again.
    students.write_text(students.read_text().replace('{name: "hard", distillation_weight: 0.0,',
                                                     '{name: "hard", learning_rate: 0.003, distillation_weight: 0.0,'))
    changed = bench("--set", "student_training.learning_rate=0.002")
    assert changed.count("already done") == 4 + 3 * 2 and "student-hard: kdqa student" in changed
    # A student that fails (a layer the encoder lacks) is reported at once; the students after it still run,
    # the results keep every finished row, and the run ends non-zero naming it.
    students.write_text('- {name: "bad", distillation_weight: 0.0, temperature: 1.0, init_layers: [0, 99]}\n'
                        + students.read_text())
    failing = subprocess.run(command + ["--set", "student_training.learning_rate=0.002"], cwd=tmp_path, env=env,
                             capture_output=True, text=True, timeout=600)
    assert failing.returncode != 0
    assert "FAILED: student 'bad'" in failing.stderr and "1 student(s) failed: bad" in failing.stderr
    assert "layer indices must lie in" in failing.stderr  # the stage's own message, from its log
    partial = json.loads((out / "results.json").read_text())
    assert not partial["complete"] and [r["model"] for r in partial["rows"]] == names


def test_accuracy_benchmark_seeds_give_means_spreads_and_paired_intervals(tmp_path):
    """--seeds 2: every student trains twice (seed 13 and 14, folders of their own); its row is the mean over the
    seeds with their spread, and the gain over the baseline comes with the paragraph bootstrap pooled over seeds
    and the seed-by-seed interval."""
    from bench import accuracy
    from pipeline.params import default_of

    encoder = tiny.make_model(tmp_path / "encoder", layers=2)
    data = tiny.make_squad(tmp_path / "squad.json", articles=6, paragraphs=1, questions=3)
    train = tiny.make_squad(tmp_path / "train.json", articles=4, paragraphs=1, questions=3, seed=3)
    students = tmp_path / "students.yaml"
    # "kd" names no weight or temperature and asks for kdqa's default epochs (bench/accuracy-defaults.yaml's form).
    students.write_text('- {name: "hard", distillation_weight: 0.0, temperature: 1.0, epochs: default}\n'
                        '- {name: "kd", model: teacher, epochs: default}\n')
    subprocess.run([sys.executable, "-m", "bench.accuracy", "--quick", "--seeds", "2", "--encoder", str(encoder),
                    "--student-layers", "0", "--train-data", str(train), "--data", str(data), "--out",
                    str(tmp_path / "out"), "--students", str(students)], cwd=tmp_path, env=bench_env(), check=True,
                   capture_output=True, text=True, timeout=600)
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert results["complete"] and results["seeds"] == 2
    hard, kd = results["rows"][1:]
    for row in (hard, kd):
        assert [s["seed"] for s in row["seeds"]] == [13, 14] and len(set(row["workdirs"])) == 2
        f1s = [s["f1"] for s in row["seeds"]]
        assert row["f1"] == round(sum(f1s) / 2, 2) and row["spread"]["f1"] == [min(f1s), max(f1s)]
        assert "seed" not in row["settings"]  # the seeds of one student are one set of settings
    kd_params = yaml.safe_load((Path(kd["workdirs"][1]) / "params.yaml").read_text())["student"]
    assert kd_params["seed"] == 14
    for key in ("distillation_weight", "temperature", "epochs"):  # kdqa's defaults, not the preset's
        assert kd_params[key] == default_of(f"student.{key}")
    assert [kd[key] for key in ("distillation_weight", "temperature")] == [kd_params["distillation_weight"],
                                                                          kd_params["temperature"]]
    assert accuracy.QUICK["student_training"]["epochs"] != default_of("student.epochs")
    ci = results["goals"]["ci95"]
    gains = [a["f1"] - b["f1"] for a, b in zip(kd["seeds"], hard["seeds"])]
    assert ci["by_seed"]["f1_gain"]["gains"] == [round(g, 2) for g in gains]
    lo, hi = ci["by_seed"]["f1_gain"]["ci95"]
    assert lo <= sum(gains) / 2 <= hi and set(ci) >= {"f1_gain", "forced_f1_gain"}
    assert results["goals"]["met"]["student_f1_gain"] in (True, False, None)
    text = (tmp_path / "out" / "results.md").read_text()
    assert "F1 at the validation threshold" in text and "seeds " in text and "training noise" in text


def test_goal_verdicts_need_the_mean_and_every_interval():
    from bench.accuracy import judged

    ci = {"f1_gain": [3.5, 6.0], "by_seed": {"f1_gain": {"ci95": [1.0, 8.0]}}}
    assert judged(4.0, 3.0, ci, "f1_gain") is None  # the seeds' interval reaches below +3
    assert judged(4.0, 3.0, {"f1_gain": [3.5, 6.0]}, "f1_gain") is True
    assert judged(2.0, 3.0, ci, "f1_gain") is False
    assert judged(4.0, 3.0, {}, "f1_gain") is True  # no per-question files: the mean alone, as before


def test_accuracy_benchmark_overrides_are_checked():
    from bench import accuracy
    from bench.common import apply_overrides

    cfg = apply_overrides(accuracy.FULL, ["teacher_training.epochs=6", "prepare.max_seq_len=192",
                                                   "student_training.learning_rate=2e-4"])
    assert cfg["teacher_training"]["epochs"] == 6 and cfg["prepare"]["max_seq_len"] == 192
    assert cfg["student_training"]["learning_rate"] == 2e-4  # a number, though YAML alone reads "2e-4" as text
    assert accuracy.FULL["teacher_training"]["epochs"] == 4  # the preset itself is untouched
    for bad in ("teacher_training.epochs", "teacher_training.epoch=3", "nosuch.epochs=3"):
        with pytest.raises(SystemExit, match="--set"):
            apply_overrides(accuracy.FULL, [bad])


def test_shipped_student_variants_are_valid_student_settings():
    from bench.accuracy import SPEC_KEYS, chosen_teachers
    from pipeline.params import StudentParams

    known = set(StudentParams.__dataclass_fields__)
    for shipped in ("accuracy-variants.yaml", "accuracy-6-epochs.yaml", "accuracy-extra-data.yaml",
                    "accuracy-align.yaml", "accuracy-speed.yaml", "accuracy-extra-data-gpu.yaml",
                    "accuracy-extra-data-long.yaml", "accuracy-extra-data-seeds.yaml", "accuracy-ensemble.yaml",
                    "accuracy-defaults.yaml"):
        specs = yaml.safe_load((REPO / "bench" / shipped).read_text())
        names = [spec["name"] for spec in specs]
        assert len(set(names)) == len(specs), shipped
        for spec in specs:
            assert set(spec) - SPEC_KEYS <= known, (shipped, spec)
            chosen_teachers(spec, [50.0, 51.0, 49.0])  # `teachers:` names teachers of a run of three
            assert {spec.get("compare_to"), spec.get("max_steps_of")} - {None} <= set(names), (shipped, spec)


def test_accuracy_benchmark_quick_mode_with_extra_rows(tmp_path):
    """Extra rows through the benchmark: the logits folder prepares and labels them, students mix them in at equal
    epochs and at the steps of another student, and the gains table compares each with the one it names."""
    encoder = tiny.make_model(tmp_path / "encoder", layers=2)
    data = tiny.make_squad(tmp_path / "squad.json", articles=9, paragraphs=2, questions=3)
    train = tiny.make_squad(tmp_path / "train.json", articles=7, paragraphs=2, questions=3, seed=3)
    unlabeled = tiny.strip_answers(tiny.make_squad(tmp_path / "squad-u.json", articles=2, paragraphs=2, questions=3, seed=5),
                                   tmp_path / "unlabeled.json")
    students = tmp_path / "students.yaml"
    base = "distillation_weight: 0.5, temperature: 2.0, model: teacher"
    students.write_text(f'- {{name: "labelled", {base}}}\n'
                        f'- {{name: "both", {base}, extra_ratio: 1.0, max_steps_of: "labelled", '
                        'compare_to: "labelled"}\n'
                        # through `kdqa align`: another tokenizer, from logits made at other windows
                        f'- {{name: "aligned", {base}, tokenizer: trimmed, teacher_windows: [96, 32], '
                        'compare_to: "labelled"}\n')
    subprocess.run([sys.executable, "-m", "bench.accuracy", "--quick", "--encoder", str(encoder),
                    "--student-layers", "0", "--train-data", str(train), "--data", str(data), "--out",
                    str(tmp_path / "out"), "--students",
                    str(students), "--set", "max_steps=null", "--set", f"extra.unlabeled={unlabeled}",
                    "--set", "extra.augment_views=1"], cwd=tmp_path, env=bench_env(), check=True, capture_output=True,
                   text=True, timeout=600)
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert results["complete"] and set(results["teacher_logits"]["rows"]) == {"train", "dev", "unlabeled", "augmented"}
    labelled, both, aligned = results["rows"][1:]
    assert both["steps"] == labelled["steps"]  # capped at the labelled-only student's steps...
    from bench.accuracy import planned_steps
    from bench.common import BASE_STUDENT

    data = tmp_path / "out" / "logits-extra" / "data"
    settings = {**BASE_STUDENT, "distillation_weight": 0.5, "max_steps": None}
    assert planned_steps(data, {**settings, **labelled["settings"]}) == labelled["steps"]  # the plan is the student's
    assert planned_steps(data, {**settings, **both["settings"], "max_steps": None}) > both["steps"]  # extra rows: more
    gain, aligned_gain = results["extra_data"]
    assert gain["model"] == both["model"] and gain["against"] == labelled["model"]
    assert set(gain["ci95"]) == {"f1_gain", "forced_f1_gain"}
    assert set(gain["teacher_ci95"]) == {"f1_gain", "forced_f1_gain"}  # the student against the teacher, paired
    lo, hi = gain["teacher_ci95"]["f1_gain"]
    assert lo - 0.02 <= gain["f1_minus_teacher"] <= hi + 0.02  # (the scores are rounded to 0.01)
    assert set(gain["met"]) == {"f1_gain", "forced_f1_gain", "share_of_teacher_forced", "f1_minus_teacher"}
    # The aligned student: its own tokenizer and windows, targets carried from logits made at 96/32 (their own
    # prepare and teacher stages), compared but not judged by the extra-data goals.
    assert aligned_gain["model"] == aligned["model"] and aligned_gain["met"] is None
    assert set(aligned["stages"]) == {"align", "train", "evaluate"}
    sdir = Path(aligned["workdir"])
    assert json.loads((sdir / "data" / "aligned" / "manifest.json").read_text())["train"]["features"] > 0
    logits_96 = tmp_path / "out" / "logits-96-32" / "data" / "features" / "train" / "manifest.json"
    assert json.loads(logits_96.read_text())["prepare"]["max_seq_len"] == 96
    assert "Extra rows (unlabeled data, augmented views)" in (tmp_path / "out" / "results.md").read_text()
    # The students without extra rows read the same labelled shards: train's features are the teacher's own.
    for name in ("teacher", "logits-extra"):
        assert (tmp_path / "out" / name / "data" / "features" / "train" / "manifest.json").is_file()


def test_students_with_extra_rows_and_no_comparison_are_judged_against_the_teacher():
    """A student with extra rows but no `compare_to` (e.g. another seed) still gets its F1 and forced span F1
    against the teacher's; a student with neither is not in the table."""
    from bench.accuracy import extra_data_gains, extra_data_lines

    def row(model, f1, forced, **settings):
        return {"model": model, "spec_name": model, "f1": f1, "HasAns_f1_forced": forced, "steps": 3213,
                "settings": settings}

    results = {"rows": [row("teacher: t", 56.89, 51.15), row("seed 15", 57.78, 49.45, extra_ratio=1.0),
                        row("labelled only", 54.0, 38.0, extra_ratio=0.0)]}
    (gain,) = extra_data_gains(results)
    assert gain["model"] == "seed 15" and gain["against"] is None and gain["f1_gain"] is None
    assert gain["f1_minus_teacher"] == 0.89 and gain["share_of_teacher_forced"] == 0.967
    assert gain["met"] == {"f1_gain": None, "forced_f1_gain": None, "share_of_teacher_forced": True,
                           "f1_minus_teacher": True}
    assert "| seed 15 | – (the teacher only) | 3213 | – | – | 96.7% met | +0.89 (–) met |" in extra_data_lines([gain])


def test_has_answer_auc_equals_the_pairwise_definition():
    """The rank formula must equal counting pairs directly: P(na_prob of an answerable < an unanswerable's),
    ties counted half."""
    import random

    from bench.common import has_answer_auc

    rng = random.Random(3)
    for _ in range(20):
        ids = [f"q{i}" for i in range(rng.randint(2, 40))]
        answerable = {q: rng.random() < 0.5 for q in ids}
        answerable[ids[0]], answerable[ids[1]] = True, False  # both kinds present
        na = {q: rng.choice([0.1, 0.2, 0.5, 0.9, rng.random()]) for q in ids}  # plenty of ties
        has = [na[q] for q in ids if answerable[q]]
        not_ = [na[q] for q in ids if not answerable[q]]
        direct = sum((h < n) + 0.5 * (h == n) for h in has for n in not_) / (len(has) * len(not_))
        assert has_answer_auc(na, answerable) == pytest.approx(direct, abs=1e-12)
    assert has_answer_auc({"a": 0.1, "b": 0.9}, {"a": True, "b": False}) == 1.0  # a perfect ranking


def test_paired_bootstrap_resamples_whole_paragraphs():
    """A constant gain has a zero-width interval; when the gain comes in whole paragraphs (as a misread context
    does), resampling paragraphs must give a wider interval than pretending the questions are independent."""
    from bench.accuracy import paired_bootstrap_ci

    ids = [f"q{i}" for i in range(100)]
    base = {q: 0.5 for q in ids}
    shifted = {q: 0.75 for q in ids}
    by_paragraph = {q: i // 10 for i, q in enumerate(ids)}  # 10 paragraphs of 10 questions
    assert paired_bootstrap_ci(shifted, base, by_paragraph) == (25.0, 25.0)

    # Half the paragraphs gain 1 point of F1 per question, the other half nothing: a mean gain of 50 points.
    clustered = {q: base[q] + (1.0 if by_paragraph[q] % 2 else 0.0) / 2 for q in ids}
    lo, hi = paired_bootstrap_ci(clustered, base, by_paragraph)
    own = {q: i for i, q in enumerate(ids)}  # every question its own unit
    lo_q, hi_q = paired_bootstrap_ci(clustered, base, own)
    assert lo < 25.0 < hi and lo_q < 25.0 < hi_q
    assert hi - lo > 2 * (hi_q - lo_q)  # sqrt(100 / 10) ~ 3.2x wider in theory
    # Only questions both models answered count, and the order of the arguments sets the sign.
    assert paired_bootstrap_ci(base, shifted, by_paragraph) == (-25.0, -25.0)
    assert paired_bootstrap_ci({**shifted, "extra": 0.0}, base, by_paragraph | {"extra": 99}) == (25.0, 25.0)


def test_paired_bootstrap_is_the_same_in_every_process():
    """The interval is printed in results.md: it must not change with Python's per-process string hashing."""
    probe = ("import random, sys; sys.path.insert(0, sys.argv[1]); from bench.accuracy import paired_bootstrap_ci; "
             "rng = random.Random(5); ids = [f'q{i}' for i in range(60)]; "
             "a = {q: rng.random() for q in ids}; b = {q: rng.random() for q in ids}; "
             "print(paired_bootstrap_ci(a, b, {q: i // 4 for i, q in enumerate(ids)}))")
    outputs = {subprocess.run([sys.executable, "-c", probe, str(REPO)], capture_output=True, text=True, check=True,
                              env={**os.environ, "PYTHONHASHSEED": seed}).stdout for seed in ("1", "2", "3")}
    assert len(outputs) == 1 and outputs.pop().startswith("(")


def test_goals_judge_each_schedule_against_its_own_baseline():
    """A 6-epoch distilled student is compared with the 6-epoch baseline, never with the 4-epoch one."""
    from bench.accuracy import goals_by_settings, markdown

    def row(model, weight, init, epochs, f1, forced):
        return {"model": model, "distillation_weight": weight, "temperature": 2.0, "init": init, "f1": f1,
                "HasAns_f1_forced": forced, "settings": {"epochs": epochs, "learning_rate": 1e-4},
                "stages": {"train": {"seconds": 1.0, "peak_rss_mib": 1.0}}}

    results = {"abstain_baseline_f1": 50.0, "wall_seconds": 1.0, "machine": "test", "complete": True, "rows": [
        {**row("teacher", 0.0, "encoder", 4, 60.0, 50.0), "stages": {"fine-tune": {"seconds": 1.0, "peak_rss_mib": 1.0}}},
        row("base 4", 0.0, "encoder", 4, 50.0, 10.0), row("kd 4", 1.0, "teacher", 4, 52.0, 40.0),
        row("base 6", 0.0, "encoder", 6, 51.0, 12.0), row("kd 6", 1.0, "teacher", 6, 56.0, 45.0)]}
    first, second = goals_by_settings(results)
    assert (first["hard_labels"], first["best_by_f1"], first["measured"]["student_f1_gain"]) == ("base 4", "kd 4", 2.0)
    assert (second["hard_labels"], second["best_by_f1"], second["measured"]["student_f1_gain"]) == ("base 6", "kd 6", 5.0)
    assert second["met"]["student_f1_gain"] and not first["met"]["student_f1_gain"]
    # kd 6: +5 F1, +33 forced, 90% of the teacher's: every student goal at once; kd 4 misses the F1 gain.
    assert [r["model"] for r in second["every_student_goal_met_by"]] == ["kd 6"]
    assert first["every_student_goal_met_by"] == []
    assert second["every_student_goal_met_by"][0]["student_share_of_teacher_forced"] == 0.9
    # Two students that each meet some goals: the per-goal verdicts are all met, but no one student meets them all.
    results["rows"][4:] = [row("kd 6 soft", 1.0, "teacher", 6, 53.0, 44.0),   # +2 F1, 88% of the teacher's
                           row("kd 6 mixed", 0.5, "teacher", 6, 55.0, 40.0)]  # +4 F1, 80%
    split = goals_by_settings(results)[1]
    assert (split["best_by_f1"], split["best_by_forced_f1"]) == ("kd 6 mixed", "kd 6 soft")
    assert all(split["met"].values()) and split["every_student_goal_met_by"] == []
    assert "The three student goals met by one student: **none**." in markdown(results)
    assert "Students trained with epochs 6, against their own baseline:" in markdown(results)


def test_run_stage_records_resumes_reuse_and_failures(tmp_path, monkeypatch):
    """The stage runner around `python -m pipeline`, with a stand-in pipeline that behaves as told.

    What it checks is the runner's bookkeeping: a student that continued from a checkpoint is marked (its time
    covers only the last part), one that found a checkpoint of other settings is not, a finished stage with the
    same key is reused, and a failing one raises StageFailed with its log.
    """
    from bench import common

    # The runner recognises kdqa's own warning for a checkpoint it will not resume: keep the two in step.
    assert "not resuming, settings changed" in (REPO / "pipeline" / "training" / "checkpoint.py").read_text()

    fake_root = tmp_path / "fake"
    (fake_root / "pipeline").mkdir(parents=True)
    (fake_root / "pipeline" / "__init__.py").write_text("")
    # Prints what BEHAVIOUR.txt says, writes the stage output, exits with the code it gives.
    (fake_root / "pipeline" / "__main__.py").write_text(
        "import pathlib, sys\n"
        "text, code = pathlib.Path('BEHAVIOUR.txt').read_text().split('|')\n"
        "print(text)\n"
        "out = pathlib.Path('models/student'); out.mkdir(parents=True, exist_ok=True)\n"
        "(out / 'config.json').write_text('{}')\n"
        "sys.exit(int(code))\n")
    monkeypatch.setattr(common, "ROOT", fake_root)

    workdir = tmp_path / "work"
    (workdir / "checkpoints" / "student").mkdir(parents=True)
    (workdir / "params.yaml").write_text("student: {epochs: 6}\n")

    def run(behaviour: str, **kwargs) -> dict:
        (workdir / "BEHAVIOUR.txt").write_text(behaviour)
        return common.run_stage(workdir, "student", **kwargs)

    # A checkpoint is there and kdqa does not object: resumed.
    (workdir / "checkpoints" / "student" / "state.json").write_text("{}")
    assert run("training from step 300|0")["resumed_from_checkpoint"] is True
    # Same key, output present: reused, no new process (the behaviour below would fail it).
    again = run("should not run|1")
    assert again["reused"] and again["resumed_from_checkpoint"] is True

    # Other upstream results: a new key. kdqa finds the checkpoint but its settings differ: a fresh run.
    fresh = run("WARNING checkpoints/student: not resuming, settings changed (student.epochs: 4 -> 6)|0",
                upstream=("other teacher",))
    assert fresh["resumed_from_checkpoint"] is False and "reused" not in fresh

    # No checkpoint at all: not a resume, whatever the log says.
    (workdir / "checkpoints" / "student" / "state.json").unlink()
    assert run("done|0", upstream=("third",))["resumed_from_checkpoint"] is False

    # A failure names the work folder and carries the log's end; no record is left to be reused.
    with pytest.raises(common.StageFailed, match="(?s)failed in .*work.*boom: bad layer 99"):
        run("boom: bad layer 99|3", upstream=("fourth",))
    assert not (workdir / ".bench-done" / "student.json").exists()


def test_scores_carry_the_dev_curve_kdqa_student_logged(tmp_path):
    """The per-epoch dev scores (student.eval_every) reach the results row, so results.json holds them."""
    from bench.common import scores

    (tmp_path / "metrics").mkdir()
    (tmp_path / "metrics" / "eval.json").write_text(json.dumps({"exact": 50.0, "f1": 51.234, "total": 10}))
    assert "dev_curve" not in scores(tmp_path)  # no training log (the teacher of an old run, say): no curve
    (tmp_path / "logs" / "student").mkdir(parents=True)
    (tmp_path / "logs" / "student" / "eval.tsv").write_text("step\tf1\texact\tf1_forced\n204\t53.9\t52.1\t32.7\n"
                                                           "408\t54.4\t53.0\t37.3\n")
    row = scores(tmp_path)
    assert row["f1"] == 51.23 and row["dev_curve"] == [
        {"step": 204.0, "f1": 53.9, "exact": 52.1, "f1_forced": 32.7},
        {"step": 408.0, "f1": 54.4, "exact": 53.0, "f1_forced": 37.3}]


def test_trimmed_vocabulary_model_splits_long_words_and_keeps_every_other_id(tmp_path):
    from transformers import AutoTokenizer

    from bench.common import LONG_WORD, trimmed_vocabulary_model

    model = tiny.make_model(tmp_path / "model", layers=1)
    trimmed = trimmed_vocabulary_model(model, tmp_path / "trimmed")
    before, after = AutoTokenizer.from_pretrained(model), AutoTokenizer.from_pretrained(trimmed)
    assert len(after) == len(before) and (trimmed / "config.json").resolve() == (model / "config.json").resolve()
    long_word = next(w for w in tiny.WORDS if len(w) > LONG_WORD)
    short_word = next(w for w in tiny.WORDS if len(w) <= LONG_WORD)
    assert before.tokenize(long_word) == [long_word] and len(after.tokenize(long_word)) > 1
    assert after(short_word)["input_ids"] == before(short_word)["input_ids"]  # same ids: the embeddings still fit
    for piece in after.tokenize(long_word):
        assert after.convert_tokens_to_ids(piece) == before.convert_tokens_to_ids(piece)


# ---------------------------------------------------------------- several teachers (`teachers: N`, issue 33)

def test_one_teacher_leaves_the_plan_unchanged(tmp_path):
    """`teachers: 1` (the default) writes the teacher's and the logits folder's params.yaml byte for byte as before
    there could be several, in the same folders, so earlier runs' stages are reused and the output is the same."""
    from bench import accuracy

    cfg, encoder = accuracy.FULL, "/models/encoder"
    split = accuracy.Split(tmp_path / "train.json", tmp_path / "validation.json", tmp_path / "test.json")
    assert accuracy.teacher_count(cfg) == 1 and "teachers" not in cfg
    assert accuracy.teacher_workdir(tmp_path, 0) == tmp_path / "teacher"
    assert accuracy.teacher_name(0, 1) == "teacher: MiniLM-L6 fine-tuned (6 layers)"
    for base in ("logits", "logits-extra"):
        assert accuracy.logits_folder_name(base, (0,)) == base
    assert accuracy.chosen_teachers({"name": "s"}, [0.0]) == ((0,), 0)

    def params(folder: str, teacher, student: dict) -> bytes:
        accuracy.write_split_params(tmp_path / folder, cfg, split, teacher, student)
        return (tmp_path / folder / "params.yaml").read_bytes()

    before = {"model": encoder, "distillation_weight": 0.0, **cfg["teacher_training"]}  # the settings as they were
    assert params("teacher-before", encoder, before) == params("teacher", encoder,
                                                               accuracy.teacher_settings(cfg, encoder, 0))
    assert params("logits-before", "/t0", {"model": encoder}) == params("logits", ["/t0"], {"model": encoder})
    for n in (0, -1, 1.5, True, "3"):
        with pytest.raises(SystemExit, match="teachers"):
            accuracy.teacher_count({"teachers": n})


def test_best_single_teacher_is_chosen_on_validation(tmp_path):
    """The best single teacher is the one with the highest validation F1, whatever the test questions say; ties go
    to the first. ensemble_record keeps it, each teacher's and the ensemble's test scores from metrics/teacher.json,
    and what the stage that added the last teacher computed."""
    from bench.accuracy import best_teacher, chosen_teachers, ensemble_record

    validation = [55.0, 58.0, 54.0]
    assert best_teacher(validation) == 1 and best_teacher([3.0, 3.0]) == 0 and best_teacher(validation, (0, 2)) == 0
    assert chosen_teachers({"name": "s", "teachers": "best"}, validation) == ((1,), 1)
    assert chosen_teachers({"name": "s", "teachers": "all"}, validation) == ((0, 1, 2), 1)
    assert chosen_teachers({"name": "s", "teachers": [2, 0]}, validation) == ((2, 0), 0)  # cut from the better
    for bad in ([3], [0, 0], [], "some", [True]):
        with pytest.raises(SystemExit, match="teachers"):
            chosen_teachers({"name": "s", "teachers": bad}, validation)
    with pytest.raises(SystemExit, match="teacher_windows"):
        chosen_teachers({"name": "s", "teachers": "best", "teacher_windows": [96, 32]}, validation)

    (tmp_path / "metrics").mkdir()
    test_f1 = {"teacher-0": 56.0, "teacher-1": 55.0, "teacher-2": 59.0, "ensemble": 60.123}  # 2 is best on test
    (tmp_path / "metrics" / "teacher.json").write_text(json.dumps(
        {name: {"f1": f1, "HasAns_f1_forced": f1 - 10, "null_threshold": 0.0} for name, f1 in test_f1.items()}))
    rows = [{"model": f"teacher {i}", "validation_f1": v} for i, v in enumerate(validation)]
    shards = {"train": {"rows": 9, "teachers": [{"rows": 9, "shards": 2, "shards_from_cache": 2},
                                                 {"rows": 9, "shards": 2, "shards_from_cache": 2},
                                                 {"rows": 9, "shards": 2, "shards_from_cache": 0}]},
              "dev": {"rows": 3, "teachers": [{"rows": 3, "shards": 1, "shards_from_cache": 1}] * 2
                      + [{"rows": 3, "shards": 1, "shards_from_cache": 0}]}}
    log = ["12:00:01 pipeline.stages.teacher: train: 0 of 2 shards to compute, 2 copied from the logits cache (x)",
           "12:00:09 pipeline.stages.teacher: teacher.models[2] (/t/2): 3 shards computed in 7.5s",
           "12:00:09 pipeline.stages.teacher: teachers: 2 reused from earlier runs (a, b), 1 computed now (c)"]
    record = ensemble_record(rows, tmp_path, {"seconds": 20.0}, {"seconds": 9.0, "log": log, "rows": shards}, {})
    assert record["best_single_teacher"] == 1
    assert [t["test"]["f1"] for t in record["teachers"]] == [56.0, 55.0, 59.0] and record["ensemble"]["f1"] == 60.12
    added = record["logits"]["added"]
    assert added["computed_shards"] == [0, 0, 3] and added["copied_shards"] == [3, 3, 0]
    assert added["added_teacher_seconds"] == 7.5


def test_student_specs_resolve_to_their_teachers_logits_and_params(tmp_path):
    """A student of one teacher reads a logits folder of that teacher alone (teacher.model); a student of several,
    one with teacher.models listing them in order, which kdqa's own params reader accepts. Every logits folder of a
    run with several teachers shares one logits cache."""
    from bench import accuracy
    from pipeline.params import load_params
    from pipeline.runtime.workspace import Workspace

    assert accuracy.logits_folder_name("logits", (1,)) == "logits-teacher-1"
    assert accuracy.logits_folder_name("logits-extra", (0, 1, 2)) == "logits-extra-teachers-0-1-2"
    assert accuracy.teacher_workdir(tmp_path, 2) == tmp_path / "teacher-seed-15"
    assert accuracy.teacher_settings(accuracy.FULL, "/e", 2)["seed"] == 15
    split = accuracy.Split(tmp_path / "train.json", tmp_path / "validation.json", tmp_path / "test.json")
    models = ["/t/0", "/t/1", "/t/2"]
    for teachers, expected in (((1,), {"model": "/t/1"}), ((0, 1, 2), {"model": None, "models": models})):
        folder = tmp_path / accuracy.logits_folder_name("logits", teachers)
        accuracy.write_split_params(folder, accuracy.FULL, split, [models[i] for i in teachers], {"model": "/e"})
        written = yaml.safe_load((folder / "params.yaml").read_text())["teacher"]
        assert {k: written[k] for k in expected} == expected and ("models" in written) == (len(teachers) > 1)
        assert load_params(folder / "params.yaml").teacher.teachers == [models[i] for i in teachers]

    shared = tmp_path / "logits-cache"
    own = Workspace(tmp_path / "logits").teacher_cache  # a run of one teacher's own cache becomes the shared one
    own.mkdir(parents=True)
    (own / "shard.parquet").write_text("x")
    for name in ("logits", "logits-teacher-1", "logits-teachers-0-1-2"):
        accuracy.share_logits_cache(tmp_path / name, shared)
        assert (Workspace(tmp_path / name).teacher_cache / "shard.parquet").read_text() == "x"
    accuracy.share_logits_cache(tmp_path / "logits", shared)  # again: nothing changes


def test_ensemble_goals_judge_means_and_both_intervals(monkeypatch):
    """Issue 33's goals on constructed rows: against the student of the best single teacher (>= +1 F1, >= +2
    forced span F1) and against that teacher (F1 at least its own): met where the mean and both intervals clear the
    target, missed where the mean does not, not shown where an interval straddles it; judged only against the best
    single teacher's student (by validation, not test); students of several teachers are not issue 14's."""
    from bench import accuracy

    def row(model, f1, forced, teachers=None, compare_to=None, **extra):
        return {"model": model, "spec_name": model, "f1": f1, "HasAns_f1_forced": forced, "steps": 100,
                "compare_to": compare_to, "settings": {"extra_ratio": 1.0},
                **({"teachers": teachers} if teachers else {}), **extra}

    rows = [row("teacher 0", 55.0, 50.0), row("teacher 1", 57.0, 52.0), row("teacher 2", 58.0, 53.0),
            row("student of 1", 56.0, 45.0, [1]), row("student of 0", 55.0, 44.0, [0]),
            row("ensemble", 57.5, 48.0, [0, 1, 2], "student of 1"),  # +1.5 F1, +3 forced; 0.5 above teacher 1
            row("ensemble, noisy", 58.5, 48.0, [0, 1, 2], "student of 1"),
            row("ensemble, weak", 56.5, 48.0, [0, 1, 2], "student of 1"),  # +0.5 F1
            row("ensemble vs teacher 0's", 57.5, 48.0, [0, 1, 2], "student of 0"),
            row("ensemble alone", 57.5, 48.0, [0, 1, 2])]
    results = {"rows": rows, "ensemble": {"best_single_teacher": 1}}
    clear = {"f1_gain": [1.2, 3.8], "forced_f1_gain": [2.1, 4.0],
             "by_seed": {"f1_gain": {"ci95": [1.1, 3.9]}, "forced_f1_gain": {"ci95": [2.5, 3.5]}}}
    straddles = {**clear, "by_seed": {**clear["by_seed"], "f1_gain": {"ci95": [-0.5, 5.5]}}}
    intervals = {("ensemble, noisy", "student of 1"): straddles, ("ensemble, noisy", "teacher 1"): {"f1_gain": [-1.0, 3.0]}}
    monkeypatch.setattr(accuracy, "gain_intervals", lambda row, _, base: intervals.get(
        (row["model"], base["model"]), clear if base["model"].startswith("student") else {"f1_gain": [0.1, 0.9]}))
    gains = {g["model"]: g for g in accuracy.ensemble_gains(results)}
    assert list(gains) == ["ensemble", "ensemble, noisy", "ensemble, weak", "ensemble vs teacher 0's", "ensemble alone"]
    assert gains["ensemble"]["met"] == {"f1_gain": True, "forced_f1_gain": True, "f1_minus_teacher": True}
    assert (gains["ensemble"]["f1_gain"], gains["ensemble"]["f1_minus_teacher"]) == (1.5, 0.5)  # teacher 1's, not 2's
    assert gains["ensemble, noisy"]["met"] == {"f1_gain": None, "forced_f1_gain": True, "f1_minus_teacher": None}
    assert gains["ensemble, weak"]["met"] == {"f1_gain": False, "forced_f1_gain": True, "f1_minus_teacher": False}
    assert gains["ensemble vs teacher 0's"]["met"] is None and gains["ensemble vs teacher 0's"]["against_teachers"] == [0]
    assert gains["ensemble alone"]["met"] == {"f1_gain": None, "forced_f1_gain": None, "f1_minus_teacher": True}
    # issue 14's table keeps the students of one teacher, each against its own teacher
    extra = {g["model"]: g for g in accuracy.extra_data_gains(results)}
    assert set(extra) == {"student of 1", "student of 0"} and extra["student of 1"]["f1_minus_teacher"] == -1.0
    results["ensemble_gains"] = list(gains.values())
    results["ensemble"] = {"best_single_teacher": 1, "ensemble": {"f1": 60.1, "HasAns_f1_forced": 55.0},
                           "teachers": [{"model": r["model"], "validation_f1": v, "test": {"f1": r["f1"]}}
                                        for r, v in zip(rows, (55.0, 58.0, 54.0))],
                           "logits": {"first": {"seconds": 20.0}, "added": {"seconds": 9.0, "added_teacher_seconds": 7.5,
                                                                            "computed_shards": [0, 0, 3],
                                                                            "copied_shards": [3, 3, 0]}}}
    text = "\n".join(accuracy.ensemble_lines(results))
    assert "| teacher 1 (best on validation) | 58.00 | 57.0 |" in text and "| ensemble of the 3 | – | 60.1 |" in text
    assert "kdqa logged 7.5 s for it; shards computed by each teacher in that stage: 0, 0, 3" in text
    assert "| ensemble, noisy | student of 1 | 100 vs 100 | +2.50 (+1.20 to +3.80; seeds -0.50 to +5.50) **not shown**" in text
