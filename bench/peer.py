"""Side by side with the peer: one knowledge-distillation job in Haystack v1 and in kdqa, same machine, in turn.

    python -m bench.peer --data SQUAD.json [--quick] [--out bench/out/peer] [--teacher-model DIR]
                         [--set KEY=VALUE ...] [--skip-peer]

The job: distil a 3-layer student (layers 0, 2, 4 of the teacher) from a 6-layer MiniLM-L6 QA teacher on the
first 7 articles of --data (required: a SQuAD 2.0 JSON file such as squad2-sample.json, 10 dev articles; the rest
are held out for scoring): 2 epochs, batch 16,
max_seq_len 256, doc_stride 128, max_query_len 64, lr 1e-4 with 10% linear warmup, distillation weight 0.5,
temperature 2, seed 42 (`JOB`; `--set epochs=1` changes one). Both tools start from the same weights: the
teacher and the student's initial model are saved once as transformers folders and loaded by both.

- Haystack v1 (`farm-haystack==1.26.4.post0`, installed by this script into its own virtualenv with the same
  torch as kdqa's; `PEER_REQUIREMENTS`): `bench.peer_haystack distil`, i.e. `FARMReader(teacher)`,
  `FARMReader(student)`, `student.distil_prediction_layer_from(teacher, ...)`: its tokenization and teacher pass,
  training, save.
- kdqa: `kdqa prepare`, `kdqa teacher`, `kdqa student`, each its own process, as a user runs them (prepare and
  teacher also do the held-out split, and the student stage scores it for the model card: work Haystack's job
  does not do, counted against kdqa).

Measured per job: wall time (process start to exit, interpreter start and imports included; kdqa: the three
stages summed) and peak RSS (each process's own VmHWM via `bench.rss_probe`; the job's peak is the largest
process's), and the peak of the process tree: a process's RSS plus its children's (the DataLoader worker's)
unique pages, sampled every 0.5 s. Then, untimed,
both students are scored by `kdqa evaluate` on the held-out articles with the official SQuAD 2.0 semantics
(`pipeline/squad_metrics`); Haystack's student after its own `convert_to_transformers` (logits checked equal).

The teacher (untimed, shared, reused by later runs): `--teacher-model DIR`, or the MiniLM-L6 encoder with a
seeded QA head fine-tuned by kdqa on the same training articles for `teacher_epochs` (0: the random head).
`--quick` (CI): kdqa only, the peer is skipped; a few questions per article, 1 epoch, 4 steps.
Writes results.json and results.md into --out and prints the Markdown.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import yaml

from .common import (
    ROOT,
    SQUAD_SPLIT_DATA,
    PeakSampler,
    apply_overrides,
    cpu_identity,
    cpu_words,
    fmt,
    link_data,
    machine_description,
    minilm_dir,
    need_file,
    pythonpath,
    run_stage,
    scores,
    split_by_article,
    write_results,
)

DEFAULT_OUT = ROOT / "bench" / "out" / "peer"
# Both run in the measured process's own interpreter, the peer's virtualenv included, where this checkout is not on
# the import path (its job must see Haystack's packages only): started by file, they work in any interpreter.
PROBE = ROOT / "bench" / "rss_probe.py"
PEER_SCRIPT = ROOT / "bench" / "peer_haystack.py"
GOALS = {"wall_ratio": 0.5, "rss_ratio": 0.5}  # kdqa / Haystack, whole job (issue 15)

JOB = {"max_seq_len": 256, "doc_stride": 128, "max_query_len": 64, "batch_size": 16, "epochs": 2,
       "learning_rate": 1e-4, "warmup": 0.1, "distillation_weight": 0.5, "temperature": 2.0,
       "student_layers": [0, 2, 4], "seed": 42, "teacher_epochs": 2, "questions_per_article": None,
       "max_steps": None}
QUICK = {**JOB, "epochs": 1, "teacher_epochs": 0, "questions_per_article": 8, "max_steps": 4}

# Haystack 1.26.4.post0 asks for transformers >= 4.46, < 5: the oldest it allows (its release's), with the
# numpy / pandas / scikit-learn of that time; torch is kdqa's own, so the two jobs differ in the tool only.
PEER_REQUIREMENTS = ["farm-haystack[inference]==1.26.4.post0", "transformers==4.46.3", "numpy==2.1.3",
                     "pandas==2.2.3", "scikit-learn==1.5.2"]
TOKENIZER_FILES = ("vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
OFFLINE = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "DVC_NO_ANALYTICS": "1",
           "HAYSTACK_TELEMETRY_ENABLED": "False"}


def progress(message: str) -> None:
    print(f"[peer] {message}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------- models both tools load

def save_model(model, tokenizer_source: Path, folder: Path) -> Path:
    """A transformers folder with the source's own tokenizer files (both tools' transformers read them)."""
    tmp = folder.with_name(folder.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, safe_serialization=True)
    copy_tokenizer(tokenizer_source, tmp)
    shutil.rmtree(folder, ignore_errors=True)
    tmp.rename(folder)
    return folder


def copy_tokenizer(source: Path, folder: Path) -> None:
    files = [source / name for name in TOKENIZER_FILES if (source / name).exists()]
    if not files:
        sys.exit(f"{source}: no tokenizer files ({', '.join(TOKENIZER_FILES)})")
    for path in files:
        shutil.copyfile(path, folder / path.name)


def make_teacher(args, job: dict, out: Path, train: Path, dev: Path, split_key: str) -> Path:
    """The teacher both tools distil from (untimed): --teacher-model, or the encoder fine-tuned by kdqa."""
    if args.teacher_model:
        return Path(args.teacher_model).resolve()
    import torch

    from pipeline.model.loading import load_qa_model

    encoder = minilm_dir("python -m bench.peer without --teacher-model")
    head = out / "models" / "encoder-qa"
    if not (head / "config.json").exists():
        torch.manual_seed(job["seed"])  # the QA head is new: seeded, then saved, so both tools load the same one
        save_model(load_qa_model(str(encoder)), encoder, head)
    if not job["teacher_epochs"]:
        return head
    work = out / "teacher-finetune"  # an ordinary kdqa project; a rerun reuses it (bench.common.run_stage)
    work.mkdir(parents=True, exist_ok=True)
    write_kdqa_params(work, job, train, dev, teacher=head, student={
        "model": str(head), "distillation_weight": 0.0, "epochs": job["teacher_epochs"], "checkpoint_every": 100})
    prepared = run_stage(work, "prepare", upstream=(split_key,))
    trained = run_stage(work, "student", upstream=(prepared["key"],))
    teacher = out / "models" / "teacher"
    stamp = teacher / ".trained-by"
    if not (stamp.exists() and stamp.read_text() == trained["key"]):
        save_model(load_qa_model(str(work / "models" / "student")), encoder, teacher)
        stamp.write_text(trained["key"])
    return teacher


def make_student_init(teacher: Path, layers: list[int], out: Path) -> Path:
    """The student's starting weights: the teacher's `layers`, its QA head included."""
    from pipeline.model.loading import keep_layers, load_qa_model

    model = load_qa_model(str(teacher))
    keep_layers(model, list(layers))
    return save_model(model, teacher, out / "models" / "student-init")


# ---------------------------------------------------------------- running and measuring a process

def measure(command: list[str], cwd: Path, log: Path, env: dict) -> dict:
    """Run one process to completion: wall time, its own peak RSS (VmHWM through bench.rss_probe) and the
    sampled peaks of its process tree."""
    probe_result = log.with_suffix(".rss.json")
    probe_result.unlink(missing_ok=True)
    started = time.perf_counter()
    with open(log, "w") as out:
        proc = subprocess.Popen([command[0], str(PROBE), str(probe_result), *command[1:]], cwd=cwd, env=env,
                                stdout=out, stderr=subprocess.STDOUT)
        sampler = PeakSampler(pid=proc.pid, unique=True).start()
        code = proc.wait()
    seconds = time.perf_counter() - started
    sampled = sampler.stop()
    if code != 0 or not probe_result.exists():
        sys.stderr.write(log.read_text()[-3000:])
        sys.exit(f"bench.peer: {' '.join(command[1:])} failed (exit {code}) in {cwd}; log: {log}")
    rss = json.loads(probe_result.read_text())
    progress(f"{log.stem}: {seconds:.1f} s, peak RSS {rss['peak_rss_mb']:.0f} MB")
    return {"seconds": round(seconds, 2), **rss, "sampled_peak_tree_mb": sampled["sampled_peak_tree_unique_mb"],
            "sampled_peak_tree_rss_mb": sampled["sampled_peak_tree_rss_mb"]}


def kdqa_env() -> dict:
    return {**os.environ, **OFFLINE, "PYTHONPATH": pythonpath()}


# ---------------------------------------------------------------- kdqa

def write_kdqa_params(work: Path, job: dict, train: Path, dev: Path, teacher: Path, student: dict) -> None:
    import torch

    params = {
        "data": {"train": str(train), "dev": str(dev)},
        "prepare": {k: job[k] for k in ("max_seq_len", "doc_stride", "max_query_len")},
        # CPU: 2048 padded tokens per teacher batch (bench/README.md, row 1); CUDA: params.yaml's default.
        "teacher": {"model": str(teacher), "batch_size": 64,
                    "max_tokens_per_batch": 32768 if torch.cuda.is_available() else 2048},
        "student": {"batch_size": job["batch_size"], "epochs": job["epochs"], "learning_rate": job["learning_rate"],
                    "warmup": job["warmup"], "distillation_weight": job["distillation_weight"],
                    "temperature": job["temperature"], "seed": job["seed"], "max_steps": job["max_steps"],
                    "checkpoint_every": 0, "log_every": 50, "eval_every": 0, "num_workers": 1, **student},
    }
    (work / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


def run_kdqa(job: dict, out: Path, train: Path, dev: Path, teacher: Path, student_init: Path,
             student_settings: dict | None = None) -> dict:
    work = out / "kdqa"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    write_kdqa_params(work, job, train, dev, teacher, {"model": str(student_init), **(student_settings or {})})
    env = kdqa_env()
    stages = {stage: measure([sys.executable, "-m", "pipeline", stage], work, work / f"{stage}.log", env)
              for stage in ("prepare", "teacher", "student")}
    trained = re.search(r"trained (\d+) steps in ([\d.]+)s", (work / "student.log").read_text())
    subprocess.run([sys.executable, "-m", "pipeline", "-q", "evaluate"], cwd=work, env=env, check=True)
    manifest = json.loads((work / "data" / "features" / "train" / "manifest.json").read_text())
    return {"stages": stages, **job_totals(stages), "features": manifest["features"],
            "steps": int(trained[1]) if trained else None, "train_s": float(trained[2]) if trained else None,
            "scores": scores(work), "teacher_scores": teacher_scores(work), "work": str(work)}


def job_totals(processes: dict) -> dict:
    return {"wall_s": round(sum(p["seconds"] for p in processes.values()), 2),
            "peak_rss_mb": max(p["peak_rss_mb"] for p in processes.values()),
            "peak_tree_mb": max((p["sampled_peak_tree_mb"] or 0) for p in processes.values()) or None}


def teacher_scores(work: Path) -> dict | None:
    path = work / "metrics" / "teacher.json"
    if not path.exists():
        return None
    m = json.loads(path.read_text())
    return {k: round(m[k], 2) for k in ("exact", "f1", "HasAns_f1_forced") if k in m}


# ---------------------------------------------------------------- Haystack

def peer_python(venv: Path) -> Path:
    """The peer's virtualenv (created once; rebuilt when the requirements change): Haystack v1 + kdqa's torch."""
    import torch

    requirements = [*PEER_REQUIREMENTS, f"torch=={torch.__version__}"]
    python, stamp = venv / "bin" / "python", venv / "requirements.txt"
    if python.exists() and stamp.exists() and stamp.read_text().split() == requirements:
        return python
    progress(f"installing the peer into {venv}: {' '.join(requirements)} (a few minutes)")
    shutil.rmtree(venv, ignore_errors=True)
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    subprocess.run([str(python), "-m", "pip", "install", "-q", *requirements], check=True)
    stamp.write_text("\n".join(requirements) + "\n")
    return python


def run_peer(job: dict, out: Path, train: Path, teacher: Path, student_init: Path, venv: Path, kdqa: dict) -> dict:
    import torch

    python = peer_python(venv)
    work = out / "haystack"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    cfg = {"teacher": str(teacher), "student": str(student_init), "data_dir": str(train.parent),
           "train_filename": train.name, "save_dir": str(work / "student"), "use_gpu": torch.cuda.is_available(),
           "teacher_batch_size": None,  # Haystack's default: the student's batch size
           **{k: job[k] for k in ("max_seq_len", "doc_stride", "max_query_len", "batch_size", "epochs",
                                  "learning_rate", "warmup", "distillation_weight", "temperature")}}
    (work / "config.json").write_text(json.dumps(cfg, indent=2))
    env = {**os.environ, **OFFLINE}
    env.pop("PYTHONPATH", None)  # the peer's own packages only
    process = measure([str(python), str(PEER_SCRIPT), "distil", str(work / "config.json"), str(work / "result.json")],
                      work, work / "distil.log", env)
    inside = json.loads((work / "result.json").read_text())
    # Untimed: the student as a transformers model, scored by `kdqa evaluate` on kdqa's held-out features.
    converted = work / "student-hf"
    subprocess.run([str(python), str(PEER_SCRIPT), "convert", str(work / "student"), str(converted)], cwd=work,
                   env=env, check=True, stdout=subprocess.DEVNULL)
    copy_tokenizer(student_init, converted)
    scoring = out / "haystack-evaluate"
    shutil.rmtree(scoring, ignore_errors=True)
    scoring.mkdir(parents=True)
    shutil.copyfile(Path(kdqa["work"]) / "params.yaml", scoring / "params.yaml")
    link_data(Path(kdqa["work"]), scoring)
    subprocess.run([sys.executable, "-m", "pipeline", "-q", "evaluate", "--model", str(converted)], cwd=scoring,
                   env=kdqa_env(), check=True)
    versions = subprocess.run([str(python), "-m", "pip", "freeze"], capture_output=True, text=True).stdout.split()
    return {"process": process, **job_totals({"distil": process}), **inside, "scores": scores(scoring),
            "packages": [v for v in versions if re.match(r"(farm-haystack|torch|transformers|tokenizers)==", v)]}


# ---------------------------------------------------------------- report

def summary(kdqa: dict, peer: dict | None) -> dict:
    if peer is None:
        return {"peer": "skipped"}
    wall, rss = kdqa["wall_s"] / peer["wall_s"], kdqa["peak_rss_mb"] / peer["peak_rss_mb"]
    return {"wall_ratio": round(wall, 3), "rss_ratio": round(rss, 3),
            "wall_goal_met": wall <= GOALS["wall_ratio"], "rss_goal_met": rss <= GOALS["rss_ratio"]}


def ratio(a, b) -> str:
    return "–" if a is None or b is None or not b else f"{a / b:.2f}x"


def markdown(r: dict) -> str:
    k, p, s, job = r["kdqa"], r.get("haystack"), r["summary"], r["job"]
    per_step = (lambda x: x["train_s"] / x["steps"] if x and x.get("steps") and x.get("train_s") else None)
    p = p or {}
    rows = [
        ("whole KD job, wall s", k["wall_s"], p.get("wall_s"), 1, f"<= {GOALS['wall_ratio']}x"),
        ("peak RSS of the job's largest process, MB", k["peak_rss_mb"], p.get("peak_rss_mb"), 0,
         f"<= {GOALS['rss_ratio']}x"),
        ("peak of the process tree (RSS + workers' unique pages; sampled), MB", k["peak_tree_mb"],
         p.get("peak_tree_mb"), 0, ""),
        ("training features", k["features"], p.get("features"), 0, ""),
        ("optimizer steps", k["steps"], p.get("steps"), 0, ""),
        ("training loop, s", k["train_s"], p.get("train_s"), 1, ""),
        ("training loop, s per step", per_step(k), per_step(p), 3, ""),
    ]
    lines = [
        f"# kdqa vs Haystack v1: the same distillation job ({r['mode']} run)",
        "",
        f"- **Machine:** {r['machine']}; wall time of this benchmark {r['wall_s'] / 60:.1f} min; load average "
        f"(1 min) {r['load_average'][0]} at start, {r['load_average'][1]} at end.",
        f"- **Data:** `{Path(r['data']).name}`, train = first articles ({r['train_questions']} questions), "
        f"held out = the rest ({r['dev_questions']} questions).",
        f"- **Job:** teacher `{r['teacher']}`; student = its layers {job['student_layers']}; "
        f"{job['epochs']} epoch(s), batch {job['batch_size']}, max_seq_len {job['max_seq_len']}, doc_stride "
        f"{job['doc_stride']} (each tool's own meaning: Haystack's windows step by it, kdqa's overlap by it), "
        f"max_query_len {job['max_query_len']}, lr {job['learning_rate']:g}, warmup {job['warmup']:g}, "
        f"distillation weight {job['distillation_weight']:g}, temperature {job['temperature']:g}."
        + (f" Peer: {', '.join(p['packages'])}." if p.get("packages") else " Peer: skipped.")
        + (" kdqa alone: " + ", ".join(f"student.{k}: {v}" for k, v in r["kdqa_student_settings"].items()) + "."
           if r.get("kdqa_student_settings") else "")
        + (" kdqa's defaults as they ran here: " + ", ".join(f"student.{k}: {v}" for k, v in
                                                             r["kdqa_resolved_defaults"].items()) + "."
           if r.get("kdqa_resolved_defaults") else "")
        + (f" kdqa's allocator: KDQA_MALLOC={r['kdqa_malloc']}." if r.get("kdqa_malloc") else ""),
        "",
        "| measure | kdqa | Haystack v1 | kdqa / Haystack | goal | |",
        "|---|---|---|---|---|---|",
    ]
    verdicts = {0: s.get("wall_goal_met"), 1: s.get("rss_goal_met")}
    for i, (name, ours, theirs, digits, goal) in enumerate(rows):
        verdict = "" if verdicts.get(i) is None else ("**met**" if verdicts[i] else "**missed**")
        lines.append(f"| {name} | {fmt(ours, digits)} | {fmt(theirs, digits)} | {ratio(ours, theirs)} | {goal} | {verdict} |")
    st = k["stages"]
    lines += [
        "",
        f"kdqa by stage (s / peak RSS MB): prepare {st['prepare']['seconds']:.1f} / {st['prepare']['peak_rss_mb']:.0f}, "
        f"teacher {st['teacher']['seconds']:.1f} / {st['teacher']['peak_rss_mb']:.0f}, student "
        f"{st['student']['seconds']:.1f} / {st['student']['peak_rss_mb']:.0f} (of which the training loop "
        f"{fmt(k['train_s'])} s; the rest: start-up and the held-out scoring for the model card)."
        + (f" Haystack: model loads {p['load_models_s']:.1f} s, tokenization + teacher pass "
           f"{p['data_and_teacher_s']:.1f} s, training {p['train_s']:.1f} s, the rest (imports, save) "
           f"{p['wall_s'] - p['load_models_s'] - p['data_and_teacher_s'] - p['train_s']:.1f} s." if p else ""),
        "",
        "## Accuracy on the held-out articles (`kdqa evaluate`, official SQuAD 2.0 semantics)",
        "",
        "| student | EM | F1 | forced span F1 | has-answer AUC | answered % |",
        "|---|---|---|---|---|---|",
    ]
    for name, x in (("kdqa", k["scores"]), ("Haystack v1 (converted to transformers)", p.get("scores"))):
        if x:
            lines.append(f"| {name} | {fmt(x.get('exact'), 2)} | {fmt(x.get('f1'), 2)} | "
                         f"{fmt(x.get('HasAns_f1_forced'), 2)} | {fmt(x.get('has_answer_auc'), 3)} | "
                         f"{fmt(x.get('answered_pct'))} |")
    if k.get("teacher_scores"):
        t = k["teacher_scores"]
        lines.append(f"\nThe teacher's logits on the same questions: EM {t.get('exact')}, F1 {t.get('f1')}, "
                     f"forced span F1 {t.get('HasAns_f1_forced')}.")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------- main

def count_questions(path: Path) -> int:
    return sum(len(p["qas"]) for a in json.loads(path.read_text())["data"] for p in a["paragraphs"])


def run(args) -> dict:
    job = apply_overrides(QUICK if args.quick else JOB, args.overrides)
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    started, load_start = time.perf_counter(), os.getloadavg()[0]
    data = Path(args.data).resolve()
    train, dev = split_by_article(data, out / "split", job["questions_per_article"])
    split_key = hashlib.sha256(train.read_bytes() + dev.read_bytes()).hexdigest()[:16]
    teacher = make_teacher(args, job, out, train, dev, split_key)
    student_init = make_student_init(teacher, job["student_layers"], out)
    results = {"mode": "quick" if args.quick else "full", "job": job, "data": str(data), "teacher": str(teacher),
               "train_questions": count_questions(train), "dev_questions": count_questions(dev),
               "machine": f"{cpu_words(cpu_identity())}, {machine_description()}"}
    kdqa_student = student_overrides(args.kdqa_student)
    results["kdqa_student_settings"] = kdqa_student
    results["kdqa_resolved_defaults"] = resolved_defaults(kdqa_student)
    from pipeline.runtime.allocator import DEFAULT_POLICY

    results["kdqa_malloc"] = os.environ.get("KDQA_MALLOC") or DEFAULT_POLICY  # the stages inherit this environment
    progress("kdqa: prepare, teacher, student")
    results["kdqa"] = run_kdqa(job, out, train, dev, teacher, student_init, kdqa_student)
    peer = None
    if not (args.quick or args.skip_peer):
        progress("Haystack v1: distil_prediction_layer_from")
        venv = Path(args.peer_venv or out / "venv").resolve()  # its processes run in other folders
        peer = run_peer(job, out, train, teacher, student_init, venv, results["kdqa"])
    results["haystack"] = peer
    results["summary"] = summary(results["kdqa"], peer)
    results["wall_s"] = time.perf_counter() - started
    results["load_average"] = [round(load_start, 2), round(os.getloadavg()[0], 2)]
    write_results(out, results, markdown(results))
    return results


def resolved_defaults(overridden: dict) -> dict:
    """What kdqa's `auto` student settings become on this machine, for the ones the job leaves at their defaults:
    the header says which precision and whether gradient checkpointing ran, not just "the defaults"."""
    import torch

    from pipeline.model.inference import precision_name
    from pipeline.params import StudentParams
    from pipeline.stages.student import uses_gradient_checkpointing
    from pipeline.training.step import training_dtype

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    defaults = StudentParams()
    resolved = {"precision": f"{defaults.precision} = {precision_name(training_dtype(device, defaults.precision))}",
                "gradient_checkpointing": f"{defaults.gradient_checkpointing} = "
                                          f"{'on' if uses_gradient_checkpointing(defaults, device) else 'off'}",
                "attention": defaults.attention, "group_by_length": defaults.group_by_length,
                "pad_to_multiple_of": defaults.pad_to_multiple_of}
    return {k: v for k, v in resolved.items() if k not in overridden}


def student_overrides(pairs: list[str]) -> dict:
    """`--kdqa-student KEY=VALUE`: student.* settings of kdqa's job that the peer has no counterpart for."""
    from pipeline.params import StudentParams

    settings = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or key not in StudentParams.__dataclass_fields__:
            sys.exit(f"--kdqa-student {pair!r}: expected KEY=VALUE with KEY a student.* setting")
        settings[key] = yaml.safe_load(value)
    return settings


def parse_args(argv=None):
    ap = argparse.ArgumentParser(prog="python -m bench.peer", description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", help=f"required: {SQUAD_SPLIT_DATA}")
    ap.add_argument("--out", default=str(DEFAULT_OUT))
    ap.add_argument("--quick", action="store_true", help="kdqa only, a few questions, 4 steps: a smoke test")
    ap.add_argument("--skip-peer", action="store_true", help="run only kdqa's job")
    ap.add_argument("--teacher-model", help="a QA model folder as the teacher (default: MiniLM-L6 fine-tuned here)")
    ap.add_argument("--peer-venv", help="the peer's virtualenv (default: OUT/venv; created when missing)")
    ap.add_argument("--kdqa-student", action="append", default=[], metavar="KEY=VALUE",
                    help="a student.* setting for kdqa's job alone (one the peer lacks), e.g. attention_dropout=0")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help=f"change one job setting ({', '.join(JOB)}), e.g. --set epochs=1")
    args = ap.parse_args(argv)
    need_file(ap, args.data, "--data", SQUAD_SPLIT_DATA)
    return args


def main(argv=None) -> int:
    for name, value in OFFLINE.items():
        os.environ.setdefault(name, value)
    print(markdown(run(parse_args(argv))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
