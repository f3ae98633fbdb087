"""What extra data costs: the teacher's time for added rows, and the student's memory with 3x the rows.

    python -m bench.extra_data --data SQUAD.json --unlabeled SQUAD.json [--quick] [--out bench/out/extra-data]
                               [--parts incremental,scratch,students]

Every stage is the kdqa CLI in its own process, timed with its peak RSS (os.wait4, as bench.accuracy):

1. Incremental teacher. One work folder: the labelled split only (prepare, teacher), then the unlabeled file
   added (prepare, teacher), then one augmented view per training question added (prepare, teacher). Each
   teacher run starts from an empty data/teacher/ (as `dvc repro` leaves it) and finds the earlier shards in
   .kdqa/teacher-cache/. Against it: a second folder that labels everything at once with an empty cache. Reported:
   shards computed and copied, seconds, the time of each increment over the from-scratch run beside the share
   of rows that were new, and whether every earlier logits shard came back byte for byte.
2. Student memory. The student stage on the labelled rows only and with student.extra_ratio 2 (3x the rows per
   epoch, the extra ones streamed from the unlabeled and augmented shards), same student, one epoch.

Models: the teacher is all-MiniLM-L6-v2 with a QA head initialised once with a fixed seed and saved (fine for
time and memory, meaningless for accuracy: bench.accuracy measures accuracy); the student is its first
layer. Data, both required: --data, a SQuAD 2.0 JSON file such as squad2-sample.json (its first 7 articles
labelled, the rest dev), and --unlabeled, a SQuAD JSON file of other articles such as squad2-unlabeled.json (20
articles, answers withheld). `--quick`: 40 questions per article and tiny shards, for CI (tests/test_bench.py runs
it on tiny models and data: --encoder and --data from tests/tiny.py).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

from .common import (
    ROOT,
    SQUAD_SPLIT_DATA,
    machine_description,
    minilm_dir,
    need_file,
    run_stage,
    split_by_article,
    write_results,
)

PARTS = ("incremental", "scratch", "students")  # --parts: what to run; the rest keeps its earlier results
UNLABELED_DATA = ("a SQuAD JSON file of other articles for the teacher alone (answers not needed), such as "
                  "squad2-unlabeled.json (20 articles)")
PREPARE = {"max_seq_len": 256, "doc_stride": 96, "max_query_len": 48, "shard_size": 1000, "row_group_size": 500}
STUDENT = {"init_layers": [0], "batch_size": 16, "epochs": 1, "learning_rate": 1.0e-4, "warmup": 0.1,
           "distillation_weight": 0.5, "temperature": 5.0, "seed": 13, "checkpoint_every": 0, "log_every": 50,
           "num_workers": 1}


def save_teacher(encoder: str, folder: Path) -> None:
    """The encoder with a QA head drawn once (seed 0) and saved: every run below loads the same weights, so the
    logits cache (keyed by the weights) can recognise them. In a child process: torch stays out of this one."""
    script = ("import sys, torch; from transformers import AutoModelForQuestionAnswering, AutoTokenizer; "
              "torch.manual_seed(0); m = AutoModelForQuestionAnswering.from_pretrained(sys.argv[1]); "
              "m.save_pretrained(sys.argv[2], safe_serialization=True); "
              "AutoTokenizer.from_pretrained(sys.argv[1]).save_pretrained(sys.argv[2])")
    if not (folder / "config.json").exists():
        subprocess.run([sys.executable, "-c", script, encoder, str(folder)], check=True, capture_output=True)


def write_params(workdir: Path, train: Path, dev: Path, teacher: Path, unlabeled: list[Path], views: int,
                 student: dict, quick: bool) -> None:
    workdir.mkdir(parents=True, exist_ok=True)
    prepare = {**PREPARE, "max_seq_len": 128, "doc_stride": 48, "max_query_len": 32, "shard_size": 16} if quick else PREPARE
    params = {"data": {"train": str(train), "dev": str(dev), "unlabeled": [str(u) for u in unlabeled]},
              "prepare": {**prepare, "augment_views": views},
              "teacher": {"model": str(teacher), "batch_size": 64, "max_tokens_per_batch": 16384},
              "student": student}
    (workdir / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


def logits_bytes(workdir: Path) -> dict[str, bytes]:
    return {f"{p.parent.name}/{p.name}": p.read_bytes() for p in sorted((workdir / "data/teacher").glob("*/part-*.parquet"))}


def teacher_run(workdir: Path, label: str) -> dict:
    """kdqa teacher from an empty data/teacher/ (the cache in .kdqa/ stays); what it computed and copied."""
    shutil.rmtree(workdir / "data" / "teacher", ignore_errors=True)
    stage = run_stage(workdir, "teacher", upstream=(label,))
    splits = {}
    for manifest in sorted((workdir / "data/teacher").glob("*/manifest.json")):
        m = json.loads(manifest.read_text())
        splits[manifest.parent.name] = {"rows": m["rows"], "shards": len(m["shards"]),
                                        "copied": m["shards_from_cache"], "rows_copied": m["rows_from_cache"]}
    rows = sum(s["rows"] for s in splits.values())
    return {"label": label, "seconds": stage["seconds"], "peak_rss_mib": stage["peak_rss_mib"], "splits": splits,
            "shards_computed": sum(s["shards"] - s["copied"] for s in splits.values()),
            "shards_copied": sum(s["copied"] for s in splits.values()), "rows": rows,
            "rows_computed": rows - sum(s["rows_copied"] for s in splits.values())}


def main() -> None:
    ap = argparse.ArgumentParser(prog="python -m bench.extra_data", description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", type=Path, help=f"required: {SQUAD_SPLIT_DATA}")
    ap.add_argument("--unlabeled", type=Path, help=f"required: {UNLABELED_DATA}")
    ap.add_argument("--encoder", type=Path, default=None, help="encoder directory (default: all-MiniLM-L6-v2)")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "out" / "extra-data")
    ap.add_argument("--quick", action="store_true", help="a smoke run: 40 questions per article, tiny shards")
    ap.add_argument("--parts", default=",".join(PARTS),
                    help="comma-separated parts to run (default all); a part left out keeps its results from an "
                         "earlier run in --out")
    args = ap.parse_args()
    need_file(ap, args.data, "--data", SQUAD_SPLIT_DATA)
    need_file(ap, args.unlabeled, "--unlabeled", UNLABELED_DATA)
    parts = set(args.parts.split(","))
    if parts - set(PARTS):
        sys.exit(f"--parts {args.parts!r}: choose from {', '.join(PARTS)}")
    out = args.out.resolve()
    train, dev = split_by_article(args.data, out / "split", 40 if args.quick else None)
    unlabeled = args.unlabeled.resolve()
    teacher = out / "teacher-model"
    encoder = args.encoder.resolve() if args.encoder else minilm_dir("python -m bench.extra_data without --encoder")
    save_teacher(str(encoder), teacher)
    student = {**STUDENT, "model": str(teacher)}
    results = {"machine": machine_description(), "command": " ".join(["python -m bench.extra_data", *sys.argv[1:]]),
               "teacher_runs": [], "students": []}
    earlier_results = out / "results.json"
    if parts != set(PARTS) and earlier_results.exists():  # keep the parts not rerun
        kept = json.loads(earlier_results.read_text())
        results["commands"] = kept.get("commands", [kept["command"]]) + [results["command"]]
        results["teacher_runs"] = [r for r in kept["teacher_runs"]
                                   if ("scratch" if r["label"].startswith("everything") else "incremental") not in parts]
        results["students"] = [] if "students" in parts else kept["students"]

    def save() -> None:
        write_results(out, results, markdown(results))

    # 1. Incremental: labelled, + unlabeled file, + one view per question; then everything from scratch.
    inc = out / "incremental"
    steps = [("labelled", [], 0), ("+ unlabeled file", [unlabeled], 0), ("+ 1 augmented view", [unlabeled], 1)]
    earlier: dict[str, bytes] = {}
    if "incremental" in parts:
        shutil.rmtree(inc / ".kdqa", ignore_errors=True)  # an empty logits cache to start from
    for label, files, views in steps if "incremental" in parts else []:
        write_params(inc, train, dev, teacher, files, views, student, args.quick)
        run_stage(inc, "prepare", upstream=(label,))
        run = teacher_run(inc, label)
        now = logits_bytes(inc)
        run["earlier_shards_byte_identical"] = all(now.get(name) == data for name, data in earlier.items())
        earlier = now
        results["teacher_runs"].append(run)
        save()
    if "scratch" in parts:
        scratch = out / "scratch"
        shutil.rmtree(scratch / ".kdqa", ignore_errors=True)
        write_params(scratch, train, dev, teacher, [unlabeled], 1, student, args.quick)
        run_stage(scratch, "prepare", upstream=("scratch",))
        run = teacher_run(scratch, "everything, empty cache")
        run["same_bytes_as_incremental"] = logits_bytes(scratch) == (earlier or logits_bytes(inc))
        results["teacher_runs"].append(run)
        save()

    # 2. The student stage on the labelled rows, and with 3x the rows per epoch (extra_ratio 2).
    for label, ratio in (("labelled rows", 0.0), ("3x rows (extra_ratio 2)", 2.0)) if "students" in parts else []:
        sdir = out / f"student-ratio-{ratio:g}"
        write_params(sdir, train, dev, teacher, [unlabeled], 1, {**student, "extra_ratio": ratio}, args.quick)
        (sdir / "data").mkdir(exist_ok=True)
        for name in ("features", "teacher"):
            if not (sdir / "data" / name).exists():
                (sdir / "data" / name).symlink_to(inc / "data" / name, target_is_directory=True)
        stage = run_stage(sdir, "student", upstream=(label,))
        trained = json.loads((sdir / "models/student/kdqa_training.json").read_text())
        results["students"].append({"label": label, "extra_ratio": ratio, "steps": trained["steps"],
                                    "seconds": stage["seconds"], "peak_rss_mib": stage["peak_rss_mib"]})
        save()
    print(markdown(results))


def markdown(results: dict) -> str:
    runs, lines = results["teacher_runs"], []
    scratch = next((r for r in runs if r["label"].startswith("everything")), None)
    # Rows computed per second of the stage (teacher load included): the same rate in every run when the time is
    # proportional to the new rows only. The first run starts from an empty cache, like the from-scratch one.
    lines += ["| teacher run | rows | rows computed | shards computed | shards copied from the cache | s "
              "| rows computed / s | s / from-scratch s | rows computed / all rows | earlier logits byte-identical |",
              "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in runs:
        ratio = f"{r['seconds'] / scratch['seconds']:.2f}" if scratch else "–"
        share = f"{r['rows_computed'] / scratch['rows']:.2f}" if scratch else "–"
        same = r.get("earlier_shards_byte_identical", r.get("same_bytes_as_incremental"))
        lines.append(f"| {r['label']} | {r['rows']} | {r['rows_computed']} | {r['shards_computed']} "
                     f"| {r['shards_copied']} | {r['seconds']} | {r['rows_computed'] / r['seconds']:.1f} | {ratio} "
                     f"| {share} | {same} |")
    students = results["students"]
    if students:
        lines += ["", "| student stage | steps | s | peak RSS (MiB) | vs labelled rows |", "| --- | --- | --- | --- | --- |"]
        for s in students:
            lines.append(f"| {s['label']} | {s['steps']} | {s['seconds']} | {s['peak_rss_mib']} "
                         f"| {100 * (s['peak_rss_mib'] / students[0]['peak_rss_mib'] - 1):+.1f}% |")
    commands = "`; `".join(results.get("commands", [results["command"]]))
    lines += ["", f"Machine: {results['machine']}. Command: `{commands}`."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    main()
