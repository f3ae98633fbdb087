"""What a teacher keeps when it is carried onto another tokenizer's features (issue 33: ensembles of model families).

    python -m bench.carried_teacher --teacher DIR --data SQUAD.json [--questions N] [--quick] [--out DIR]

--teacher is a trained extractive QA model folder (with its tokenizer), --data held-out questions it did not
train on (e.g. bench.peer's teacher, OUT/models/teacher, and its held-out split, OUT/split/dev.json). Its twin
is the same weights read through another tokenizer: a vocabulary without the whole words longer than 6
characters, which the twin splits into pieces the teacher never makes (common.trimmed_vocabulary_model, as
bench.align's third student). Two kdqa work folders over the same questions, at kdqa's defaults:

- `own tokens`: `teacher.models: [twin]`, the features tokenized with the twin's own tokenizer: the twin scored as
  it would be alone;
- `carried`: `teacher.models: [teacher, twin]`, the features tokenized with the teacher's tokenizer; the twin runs
  over its own windows and its distributions are carried onto the features' (pipeline/model/carried.py).

For each: the dev scores of every teacher and of the ensemble (official SQuAD 2.0 semantics at threshold 0;
`pipeline.model.scoring.score_logit_shards`, what `kdqa evaluate` writes to metrics/teacher.json), the teacher
stage's seconds, the carried teacher's pieced features and covered mass, and how many of the twin's answers stay
the same when it is carried. Writes results.json and results.md into --out and prints the Markdown.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import yaml

from .common import (ROOT, first_questions, need_file, run_stage, teacher_keys, trimmed_vocabulary_model,
                     windows_for, write_results)

DEFAULT_OUT = ROOT / "bench" / "out" / "carried-teacher"
HELD_OUT = ("a SQuAD 2.0 JSON file of questions the teacher did not train on, such as bench.peer's held-out split "
            "(OUT/split/dev.json, from squad2-sample.json)")
TRAINED = "a trained extractive QA model folder with its tokenizer, such as bench.peer's OUT/models/teacher"
TRAIN_QUESTIONS = 20  # the teacher stage labels train too; only dev is scored here
QUICK_QUESTIONS = 12


def project(folder: Path, train: Path, dev: Path, teachers: list[Path]) -> dict:
    """A kdqa project with these teachers at kdqa's defaults (`windows_for`); prepare and teacher run as a user
    runs them."""
    folder.mkdir(parents=True, exist_ok=True)
    params = {"data": {"train": str(train), "dev": str(dev)}, "prepare": windows_for(teachers[0]),
              "teacher": teacher_keys(teachers),
              "evaluate": {"null_threshold": 0.0}}  # teachers store no threshold: all scored at 0
    (folder / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    prepared = run_stage(folder, "prepare")
    return {"prepare": prepared, "teacher": run_stage(folder, "teacher", upstream=(prepared["key"],))}


def dev_scores(folder: Path) -> dict:
    """Each teacher's dev scores and answers, and the ensemble's where there are several (as `kdqa evaluate`
    scores them for metrics/teacher.json)."""
    from pipeline.model.scoring import logit_shard_predictions, score
    from pipeline.params import load_params
    from pipeline.store.logits import teacher_folders

    params = load_params(folder / "params.yaml")
    features, examples = folder / "data/features/dev", folder / "data/features/dev_examples.parquet"
    folders = teacher_folders(folder / "data/teacher/dev")
    scored = {}
    for name, dirs in [*((f"teacher-{i}", [f]) for i, f in enumerate(folders)),
                       *([("ensemble", folders)] if len(folders) > 1 else [])]:
        preds, na_probs, forced, golds = logit_shard_predictions(features, dirs, params, examples)
        metrics = score(preds, na_probs, forced, golds)
        manifest = json.loads((dirs[0] / "manifest.json").read_text()) if len(dirs) == 1 else {}
        scored[name] = {"exact": round(metrics["exact"], 2), "f1": round(metrics["f1"], 2),
                        "forced_span_f1": round(metrics.get("HasAns_f1_forced", float("nan")), 2),
                        "answered_share": round(sum(1 for p in preds.values() if p) / len(preds), 4),
                        "carried": manifest.get("carried"), "answers": preds, "forced": forced}
    return scored


def same_answers(a: dict, b: dict) -> int:
    return sum(1 for k in a if a[k] == b.get(k))


def markdown(r: dict) -> str:
    s = r["settings"]
    lines = [f"Command: `{r['command']}`", "",
             f"Teacher `{s['teacher']}` and its twin (the same weights, a vocabulary without the whole words longer "
             f"than 6 characters); {r['dev_questions']} dev questions of `{s['data']}`, kdqa's default windows; "
             "scores at the no-answer threshold 0 (official SQuAD 2.0 semantics).", "",
             "| model | features it reads | EM | F1 | forced span F1 | answered | teacher stage s (folder) |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    own, carried = r["folders"]["own tokens"], r["folders"]["carried"]
    rows = [("twin on its own tokens", own, "teacher-0"), ("teacher", carried, "teacher-0"),
            ("twin carried onto the teacher's tokens", carried, "teacher-1"),
            ("ensemble: teacher + carried twin (mean of probabilities)", carried, "ensemble")]
    for label, folder, key in rows:
        x = folder["scores"][key]
        lines.append(f"| {label} | {folder['dev_features']:,} | {x['exact']:.2f} | {x['f1']:.2f} | "
                     f"{x['forced_span_f1']:.2f} | {x['answered_share']:.1%} | {folder['teacher_stage_s']:.1f} |")
    c = r["carried"]
    lines += ["", f"- The carried twin keeps {c['same_answers']:,} of {r['dev_questions']:,} answers "
              f"({c['same_answers'] / r['dev_questions']:.1%}) and {c['same_forced']:,} forced spans "
              f"({c['same_forced'] / r['dev_questions']:.1%}) of the twin on its own tokens; F1 "
              f"{c['f1_change']:+.2f}, forced span F1 {c['forced_span_f1_change']:+.2f}.",
              f"- Dev features: {c['features_pieced']} pieced from two of the twin's windows or more, mean covered "
              f"mass {c['mean_covered']}.",
              f"- Teacher stage: {own['teacher_stage_s']:.1f} s for the twin alone on its own tokens, "
              f"{carried['teacher_stage_s']:.1f} s for the teacher and the carried twin together (train "
              f"{s['train_questions']} questions + dev).", ""]
    return "\n".join(lines)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m bench.carried_teacher", description=__doc__.split("\n\n")[0])
    parser.add_argument("--teacher", type=Path, help=f"required: {TRAINED}")
    parser.add_argument("--data", type=Path, help=f"required: {HELD_OUT}")
    parser.add_argument("--questions", type=int, help="ask only the first N questions of --data (default: all)")
    parser.add_argument("--quick", action="store_true", help=f"a smoke run: the first {QUICK_QUESTIONS} questions")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args(argv)
    need_file(parser, args.data, "--data", HELD_OUT)
    if args.teacher is None or not (args.teacher / "config.json").is_file():
        parser.error(f"needs --teacher: {TRAINED}" + (f" ({args.teacher} has no config.json)" if args.teacher else ""))
    work = args.out.resolve() / "work"
    work.mkdir(parents=True, exist_ok=True)
    teacher = args.teacher.resolve()
    twin = trimmed_vocabulary_model(teacher, work / "twin")
    n = QUICK_QUESTIONS if args.quick else args.questions
    dev = first_questions(args.data, n, work / "dev.json") if n else args.data.resolve()
    train = first_questions(args.data, min(TRAIN_QUESTIONS, n or TRAIN_QUESTIONS), work / "train.json")
    folders = {}
    for name, teachers in (("own tokens", [twin]), ("carried", [teacher, twin])):
        folder = work / name.replace(" ", "-")
        stages = project(folder, train, dev, teachers)
        dev_manifest = json.loads((folder / "data/features/dev/manifest.json").read_text())
        folders[name] = {"teachers": [str(t) for t in teachers], "teacher_stage_s": stages["teacher"]["seconds"],
                         "dev_features": dev_manifest["features"], "scores": dev_scores(folder), "stages": stages}
    own = folders["own tokens"]["scores"]["teacher-0"]
    moved = folders["carried"]["scores"]["teacher-1"]
    questions = len(own["answers"])
    results = {
        "command": " ".join(["python", "-m", "bench.carried_teacher", *(sys.argv[1:] if argv is None else argv)]),
        "settings": {"teacher": str(args.teacher), "data": str(args.data), "questions": n,
                     "train_questions": min(TRAIN_QUESTIONS, n or TRAIN_QUESTIONS)},
        "dev_questions": questions, "folders": folders,
        "carried": {"same_answers": same_answers(own["answers"], moved["answers"]),
                    "same_forced": same_answers(own["forced"], moved["forced"]),
                    "f1_change": round(moved["f1"] - own["f1"], 2),
                    "forced_span_f1_change": round(moved["forced_span_f1"] - own["forced_span_f1"], 2),
                    **{k: (moved["carried"] or {}).get(k) for k in ("features_pieced", "mean_covered")}},
        "load_average_1m": os.getloadavg()[0], "finished": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    for folder in folders.values():  # answers are compared above; the raw file keeps the scores
        for x in folder["scores"].values():
            x.pop("answers"), x.pop("forced")
    text = markdown(results)
    write_results(args.out, results, text)
    print(text)
    return results


if __name__ == "__main__":
    main()
