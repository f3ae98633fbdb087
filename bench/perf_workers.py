"""The measurements of `bench.performance`, each run in a fresh Python process of its own.

One process per configuration keeps peak-memory figures apart (ru_maxrss never goes down) and gives every
configuration the same cold start. The parent starts

    python -m bench.perf_workers CONFIG.json RESULT.json

and reads RESULT.json. CONFIG.json names the worker (`teacher`, `student`, `stage`) and its settings.

- `teacher`: the teacher stage's own code (`pipeline.stages.teacher.run_split`: length-aware batches, write of
  shard k overlapping compute of shard k+1) vs. a plain loop that pads every feature to max_seq_len and
  runs them in file order, on the same model and features in the same process; also ours compute-only
  (`pipeline.model.inference.model_logits`, no Parquet read/write).
- `student`: one epoch of student training in one of three modes, through the same ShardStream/DataLoader
  path and the stage's own training step, `pipeline.training.step.train_step` (forward, distillation loss,
  backward, clipping, AdamW and schedule step, periodic memory release):
    offline  - teacher logits streamed from the Parquet shards (ours);
    online   - the teacher loaded in the same process, run forward (no_grad) on every batch;
    hard     - hard labels only, no teacher at all.
  All three see the same batches in the same order (same shards, same seed). `precision` and
  `group_by_length` (default: the stage's defaults) set the step's autocast and the batch plan, and
  `malloc` names a KDQA_MALLOC policy for the step (pipeline/runtime/allocator.py; None: the stages' default);
  the result counts the epoch's padding and the page faults of its steps.
- `stage`: the real student stage, `pipeline.stages.student.run_student`, in a prepared work folder (for peak
  memory at 1x and 10x the training data).
"""

from __future__ import annotations

import json
import os
import resource
import sys
import time
from contextlib import chdir
from itertools import islice
from pathlib import Path

from pipeline.runtime.workspace import Workspace

from .common import MB, PeakSampler, cpu_seconds, maxrss_mb  # memory and time helpers, shared by every benchmark


# ---------------------------------------------------------------- torch, devices and memory reports

def setup_torch(threads: int):
    import torch

    torch.set_num_threads(threads)
    from pipeline.runtime.progress import configure_output

    configure_output(quiet=True)
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    return torch, device


def sync(torch, device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def cuda_peak_mb(torch, device):
    return round(torch.cuda.max_memory_allocated(device) / MB, 1) if device.type == "cuda" else None


def memory_report(torch, device, sampler: PeakSampler) -> dict:
    return {
        "peak_rss_mb": round(maxrss_mb(), 1),  # this process, whole lifetime (kernel figure)
        # DataLoader workers (joined by now): the largest one's peak. A forked worker's RSS includes the
        # parent pages it maps, so this is not additional to peak_rss_mb.
        "worker_peak_rss_mb": round(maxrss_mb(resource.RUSAGE_CHILDREN), 1),
        **sampler.stop(),
        "peak_cuda_mb": cuda_peak_mb(torch, device),
    }


# ---------------------------------------------------------------- teacher

def teacher_worker(cfg: dict) -> dict:
    torch, device = setup_torch(cfg["threads"])
    import numpy as np

    from pipeline.model.inference import autocast_dtype, model_logits, precision_name
    from pipeline.model.loading import load_qa_model, load_tokenizer, vocab_fingerprint, weights_fingerprint
    from pipeline.params import Params
    from pipeline.store.features import read_model_inputs
    from pipeline.store.shards import list_shards
    from pipeline.stages.teacher import run_split

    sampler = PeakSampler().start()
    t0 = time.perf_counter()
    tokenizer = load_tokenizer(cfg["teacher_model"])
    model = load_qa_model(cfg["teacher_model"]).to(device).eval()
    sync(torch, device)
    load_s = time.perf_counter() - t0
    pad = tokenizer.pad_token_id
    max_seq_len, max_batch, max_tokens = cfg["max_seq_len"], cfg["teacher_batch_size"], cfg["max_tokens_per_batch"]
    # Ours runs in the teacher stage's default precision (`teacher.precision: auto`: bfloat16 on CUDA and on
    # CPUs with native bfloat16). The plain loop runs in float32, as run_qa.py does without --bf16/--fp16; it
    # runs a second time in our precision, so the table separates what length-aware batching gains from what
    # the precision gains.
    ours_dtype = autocast_dtype(device, "auto")

    # The features in file order (shard order, then row order), as the plain loop reads them.
    work = Path(cfg["work"])
    shards = list_shards(Workspace(work).features / "train")
    tables = [read_model_inputs(p) for p in shards]
    input_ids = [x for t in tables for x in t.input_ids]
    token_types = [x for t in tables for x in t.token_type_ids]
    context_start = np.concatenate([t.context_start for t in tables])
    context_end = np.concatenate([t.context_end for t in tables])
    n = len(input_ids)
    lengths = np.array([len(x) for x in input_ids])
    plain_batch = max(1, max_tokens // max_seq_len)  # the same padded-token budget per batch as ours

    def forward(ids, types, attention, dtype):
        with torch.autocast(device_type=device.type, dtype=dtype or torch.bfloat16, enabled=dtype is not None):
            return model(input_ids=ids.to(device), token_type_ids=types.to(device), attention_mask=attention.to(device))

    def plain_loop(rows, dtype=None):
        """run_qa.py-style: every feature padded to max_seq_len, fixed-size batches in file order."""
        starts, ends = [], []
        with torch.no_grad():
            for lo in range(0, len(rows), plain_batch):
                chunk = rows[lo : lo + plain_batch]
                ids = np.full((len(chunk), max_seq_len), pad, dtype=np.int64)
                types = np.zeros((len(chunk), max_seq_len), dtype=np.int64)
                attention = np.zeros((len(chunk), max_seq_len), dtype=np.int64)
                for j, i in enumerate(chunk):
                    ids[j, : lengths[i]] = input_ids[i]
                    types[j, : lengths[i]] = token_types[i]
                    attention[j, : lengths[i]] = 1
                out = forward(torch.from_numpy(ids), torch.from_numpy(types), torch.from_numpy(attention), dtype)
                starts.append(out.start_logits.float().cpu().numpy())
                ends.append(out.end_logits.float().cpu().numpy())
        return np.concatenate(starts), np.concatenate(ends)

    # Warm-up (kernel selection, allocator, thread pools): one padded batch and one short batch.
    plain_loop(list(range(min(n, plain_batch))))
    plain_loop(list(range(min(n, plain_batch))), ours_dtype)
    model_logits(model, input_ids[:max_batch], token_types[:max_batch], context_start[:max_batch],
                 context_end[:max_batch], pad, device, max_batch, max_tokens, ours_dtype)
    sync(torch, device)

    def timed(fn):
        sync(torch, device)
        c, t = cpu_seconds(), time.perf_counter()
        value = fn()
        sync(torch, device)
        return value, time.perf_counter() - t, cpu_seconds() - c

    results = {"features": n, "mean_length": float(lengths.mean()), "max_seq_len": max_seq_len,
               "load_s": load_s, "plain_batch_size": plain_batch, "teacher_batch_size": max_batch,
               "max_tokens_per_batch": max_tokens, "device": device_name(torch, device),
               "precision": precision_name(ours_dtype)}

    params = Params()
    params.teacher.batch_size = max_batch
    params.teacher.max_tokens_per_batch = max_tokens
    teacher_identity = {"teacher": weights_fingerprint(model), "vocab": vocab_fingerprint(tokenizer)}

    def stage(folder: Path):
        with chdir(folder):
            return run_split(model, tokenizer, "train", params, Workspace(folder), teacher_identity, device)

    configurations = {
        # ours: the teacher stage itself (read features shard, compute, write logits shard overlapped)
        "stage": lambda rep: stage(work if rep == 0 else Path(cfg["work_copies"][rep - 1])),
        # the plain loop, same features, same model, float32
        "plain": lambda rep: plain_loop(list(range(n))),
        # ours, compute only (no Parquet I/O): pipeline.model.inference.model_logits on the in-memory features
        "compute": lambda rep: model_logits(model, input_ids, token_types, context_start, context_end, pad, device,
                                            max_batch, max_tokens, ours_dtype,
                                            multiple=Params().teacher.pad_to_multiple_of),
    }
    order = ["compute", "stage", "plain"]
    if ours_dtype is not None:  # the plain loop in our precision: the length-aware batching's share alone
        configurations["plain_same_precision"] = lambda rep: plain_loop(list(range(n)), ours_dtype)
        order.append("plain_same_precision")
    # Each configuration `repeats` times in mirrored order (compute, stage, plain, plain, stage, compute, ...),
    # so slow drift in machine load hits all of them alike; the fastest repetition of each is reported.
    sequence = [name for rep in range(cfg["repeats"]) for name in (order if rep % 2 == 0 else order[::-1])]
    times = {name: [] for name in configurations}
    values = {}
    for name in sequence:
        rep = len(times[name])
        value, wall, cpu = timed(lambda: configurations[name](rep))
        times[name].append((wall, cpu))
        values.setdefault(name, value)
    for name, measured in times.items():
        results[f"{name}_s"] = min(w for w, _ in measured)
        results[f"{name}_cpu_s"] = min(c for _, c in measured)
        results[f"{name}_all_s"] = [round(w, 3) for w, _ in measured]
    results["order"] = sequence
    results["stage_manifest_features_per_s"] = (values["stage"] or {}).get("features_per_second")
    p_start, p_end = values["plain"]
    o_start, o_end = values["compute"]
    # Same work? Ours (float16, real tokens only) must match the padded loop's logits on the real tokens.
    diff = max(float(np.max(np.abs(o_start[i].astype(np.float32) - p_start[i, : lengths[i]]))) for i in range(n))
    diff = max(diff, max(float(np.max(np.abs(o_end[i].astype(np.float32) - p_end[i, : lengths[i]]))) for i in range(n)))
    results["max_abs_logit_diff_vs_plain"] = diff
    if "plain_same_precision" in values:
        q_start, q_end = values["plain_same_precision"]
        results["max_abs_logit_diff_vs_plain_same_precision"] = max(
            max(float(np.max(np.abs(o[i].astype(np.float32) - q[i, : lengths[i]]))) for i in range(n))
            for o, q in ((o_start, q_start), (o_end, q_end)))
    results.update(memory_report(torch, device, sampler))
    return results


def device_name(torch, device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({os.cpu_count()} cores, {torch.get_num_threads()} torch threads)"


# ---------------------------------------------------------------- student

def student_worker(cfg: dict) -> dict:
    """One student run (model load + one timed epoch) in mode offline | online | hard."""
    torch, device = setup_torch(cfg["threads"])
    from torch.utils.data import DataLoader

    from pipeline.model.inference import autocast_dtype, precision_name
    from pipeline.model.loading import load_qa_model
    from pipeline.params import Params, StudentParams
    from pipeline.stages.student import setup
    from pipeline.training.step import train_step, training_dtype

    mode = cfg["mode"]
    assert mode in ("offline", "online", "hard"), mode
    # The student stage's own setup (model, stream, optimizer, schedule) on the work folder, at the reference
    # loss settings (temperature 5, distillation weight 1; `hard`: weight 0, no logits read).
    defaults = StudentParams()
    settings = StudentParams(
        model=cfg.get("student_model") or cfg["teacher_model"],
        init_layers=None if cfg.get("student_model") else list(cfg["student_layers"]),
        batch_size=cfg["batch_size"], epochs=1, learning_rate=cfg["learning_rate"], seed=cfg["seed"],
        distillation_weight=0.0 if mode == "hard" else defaults.distillation_weight,
        precision=cfg.get("precision", defaults.precision),
        group_by_length=cfg.get("group_by_length", defaults.group_by_length),
        attention_dropout=cfg.get("attention_dropout", defaults.attention_dropout),
        attention=cfg.get("attention", defaults.attention),
        dropout_masks=cfg.get("dropout_masks", defaults.dropout_masks),
        num_workers=cfg["num_workers"], checkpoint_every=0, log_every=0, eval_every=0, extra_ratio=0.0)
    work = Path(cfg["work"])
    sampler = PeakSampler().start()

    t0 = time.perf_counter()
    run = setup(Params(student=settings), Workspace(work), resume="never")
    student, stream, optimizer, scheduler = run.model, run.stream, run.optimizer, run.scheduler
    student.train()
    teacher = None
    if mode == "online":
        teacher = load_qa_model(cfg["teacher_model"]).to(device).eval()
    warmup_steps = cfg["warmup_steps"]
    sync(torch, device)
    load_s = time.perf_counter() - t0
    teacher_dtype = autocast_dtype(device, "auto")  # online: the teacher stage's default precision
    steps_taken = 0

    def step(batch) -> None:
        """The stage's own step; `online` first runs the teacher on the same batch for its logits."""
        nonlocal steps_taken
        if teacher is not None:
            batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
            inputs = {k: batch[k] for k in ("input_ids", "token_type_ids", "attention_mask")}
            with torch.no_grad(), torch.autocast(device_type=device.type, dtype=teacher_dtype or torch.bfloat16,
                                                 enabled=teacher_dtype is not None):
                t_out = teacher(**inputs)
            batch["teacher_start"], batch["teacher_end"] = t_out.start_logits, t_out.end_logits
        train_step(student, batch, optimizer, scheduler, settings, steps_taken, device)
        steps_taken += 1

    # Warm-up steps on the first batches (read in-process), the same in every mode; then the timed epoch.
    stream.epoch = 0
    seen_widths = set()  # batch widths this process has trained on: the first step at a new width also builds
    # its kernels' plans (cuDNN attention on CUDA, oneDNN primitives on CPU), a cost a long job pays once per width
    t = time.perf_counter()
    for batch in islice(iter(stream), warmup_steps):
        step(batch)
        seen_widths.add(batch["input_ids"].shape[1])
    sync(torch, device)
    warmup_s = time.perf_counter() - t

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    epoch_sampler = PeakSampler().start()
    loader = DataLoader(stream, batch_size=None, num_workers=cfg["num_workers"], pin_memory=device.type == "cuda",
                        generator=torch.Generator().manual_seed(cfg["seed"]))
    cpu0, children0 = cpu_seconds(), cpu_seconds(resource.RUSAGE_CHILDREN)
    faults0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    waits, computes, features, real_tokens, padded_tokens = [], [], 0, 0, 0
    step_times, first_sight = [], []  # per step: loader wait + step (no extra sync: on a GPU, host time)
    t = time.perf_counter()
    it = iter(loader)
    while True:
        tw = time.perf_counter()
        try:
            batch = next(it)
        except StopIteration:
            break
        tc = time.perf_counter()
        waits.append(tc - tw)
        step(batch)
        if device.type != "cuda":  # per-step compute time only where it costs no extra sync
            computes.append(time.perf_counter() - tc)
        width = batch["input_ids"].shape[1]
        step_times.append(time.perf_counter() - tw)
        first_sight.append(width not in seen_widths)
        seen_widths.add(width)
        features += len(batch["input_ids"])
        real_tokens += int(batch["attention_mask"].sum())
        padded_tokens += batch["attention_mask"].numel()
    sync(torch, device)
    epoch_s = time.perf_counter() - t
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults0  # this process's: the training loop
    del it, loader
    epoch_memory = epoch_sampler.stop()
    import statistics

    # Steps at a width seen before (the loop's steady state once every width has its plans) against steps at a
    # width met for the first time; the first batch (loader start-up) is in neither.
    seen = [x for x, new in zip(step_times[1:], first_sight[1:]) if not new]
    fresh = [x for x, new in zip(step_times[1:], first_sight[1:]) if new]
    result = {
        "mode": mode, "learning_rate": cfg["learning_rate"], "device": device_name(torch, device),
        "steps": len(waits), "features": features, "batch_size": cfg["batch_size"],
        "num_workers": cfg["num_workers"], "student_layers": list(cfg["student_layers"]),
        "precision": precision_name(training_dtype(device, settings.precision)),
        "group_by_length": settings.group_by_length, "freed_memory_kept": cfg.get("freed_memory_kept"),  # set by main()
        "malloc": cfg.get("malloc"),
        "attention_dropout": settings.attention_dropout, "attention": settings.attention,
        "dropout_masks": settings.dropout_masks,
        "minor_faults_per_step": faults / len(waits) if waits else None,
        "padding_fraction": 1 - real_tokens / padded_tokens if padded_tokens else None,
        "load_s": load_s, "warmup_steps": warmup_steps, "warmup_s": warmup_s,
        "epoch_s": epoch_s,
        "run_s": load_s + epoch_s,  # a one-epoch run after interpreter start: models, data plan, the epoch
        "first_batch_wait_s": waits[0] if waits else None,  # worker start + first shard read and decode
        "data_wait_s": sum(waits[1:]),  # time the training loop waited on the loader after the first batch
        "step_s": (epoch_s - waits[0]) / max(len(waits) - 1, 1) if waits else None,  # incl. waits
        "median_step_compute_s": statistics.median(computes) if computes else None,
        "widths": len(seen_widths), "first_sight_steps": len(fresh),
        "seen_width_step_s": statistics.mean(seen) if seen else None,
        "first_sight_step_s": statistics.mean(fresh) if fresh else None,
        "epoch_cpu_s": cpu_seconds() - cpu0 + cpu_seconds(resource.RUSAGE_CHILDREN) - children0,
        "epoch_peak_rss_mb": epoch_memory["sampled_peak_rss_mb"],
        "epoch_peak_tree_rss_mb": epoch_memory["sampled_peak_tree_rss_mb"],
        **memory_report(torch, device, sampler),
    }
    if cfg.get("profile_steps"):  # after the timed epoch, in the same process (no second model load)
        result["profile"] = profile_steps(torch, device, stream, step, cfg)
    return result


def profile_steps(torch, device, stream, step, cfg: dict) -> dict:
    """Where a step's time goes: torch.profiler over `profile_steps` steps (after the timed epoch), the operators
    with the most self time on the device (CUDA) or the CPU, and the steps' wall time with and without it."""
    from torch.profiler import ProfilerActivity, profile

    n = cfg["profile_steps"]
    batches = list(islice(iter(stream), n))  # read first: the profile holds the step alone, not the loader
    sync(torch, device)
    t = time.perf_counter()
    for batch in batches:
        step(batch)
    sync(torch, device)
    plain_s = (time.perf_counter() - t) / len(batches)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        for batch in batches:
            step(batch)
        sync(torch, device)
    key = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    events = sorted(prof.key_averages(), key=lambda e: getattr(e, key), reverse=True)
    # The kernels alone: an operator's self device time repeats its kernels' (summing both counts them twice).
    device_total = (sum(e.self_device_time_total for e in events if e.device_type != torch.autograd.DeviceType.CPU)
                    if device.type == "cuda" else None)
    return {"mode": cfg["mode"], "steps": len(batches), "step_s": plain_s, "device": device_name(torch, device),
            "kernel_s_per_step": device_total / 1e6 / len(batches) if device_total is not None else None,
            "self_cpu_s_per_step": sum(e.self_cpu_time_total for e in events) / 1e6 / len(batches),
            "top": [{"name": e.key, "calls_per_step": e.count / len(batches),
                     "self_device_ms_per_step": e.self_device_time_total / 1e3 / len(batches),
                     "self_cpu_ms_per_step": e.self_cpu_time_total / 1e3 / len(batches)} for e in events[:20]]}


# ---------------------------------------------------------------- the real student stage

def stage_worker(cfg: dict) -> dict:
    """`kdqa student` (pipeline.stages.student.run_student) in a prepared work folder: wall time and peak memory."""
    torch, device = setup_torch(cfg["threads"])
    from pipeline.params import load_params
    from pipeline.stages.student import run_student

    sampler = PeakSampler().start()
    work = Path(cfg["work"])
    with chdir(work):
        params = load_params("params.yaml")
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        t = time.perf_counter()
        run_student(params, Workspace(work), resume="never")
        seconds = time.perf_counter() - t
    rows = json.loads((Workspace(work).features / "train" / "manifest.json").read_text())["features"]
    return {"features": rows, "stage_s": seconds, "device": device_name(torch, device),
            **memory_report(torch, device, sampler)}


WORKERS = {"teacher": teacher_worker, "student": student_worker, "stage": stage_worker}


def main(argv: list[str]) -> int:
    if argv[:1] in (["-h"], ["--help"]):
        print(__doc__)
        return 0
    if len(argv) != 2:
        sys.exit("usage: python -m bench.perf_workers CONFIG.json RESULT.json (started by bench.performance)")
    config_path, result_path = Path(argv[0]), Path(argv[1])
    cfg = json.loads(config_path.read_text())
    # As every stage does (pipeline/cli.py: KDQA_MALLOC, else glibc as it comes), unless the configuration names one.
    from pipeline.runtime.allocator import DEFAULT_POLICY, arrow_on_system_allocator, keep_freed_memory

    arrow_on_system_allocator()
    cfg["malloc"] = cfg.get("malloc") or os.environ.get("KDQA_MALLOC") or DEFAULT_POLICY
    cfg["freed_memory_kept"] = keep_freed_memory(cfg["malloc"])
    result = WORKERS[cfg["worker"]](cfg)
    result_path.write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
