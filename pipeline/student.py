"""Stage 3, student: train a small QA model on hard labels plus the teacher's streamed logits.

The teacher model is never loaded here: the only teacher input is `data/teacher/train/`, Parquet shards
of logits whose fingerprint must match the features being trained on. The loop below is the whole
training procedure: AdamW (fused), linear warmup then linear decay, gradient clipping, bf16 autocast on CUDA,
DDP under torchrun, resumable checkpoints every `student.checkpoint_every` steps.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import shutil
import sys
import time
from dataclasses import asdict
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from pipeline import __version__, distributed
from pipeline.checkpoint import Checkpoint, load_checkpoint, remove_checkpoints, restore_curves, save_checkpoint
from pipeline.errors import KdqaError
from pipeline.losses import distillation_loss
from pipeline.models import check_sequence_length, keep_layers, load_qa_model, load_tokenizer, vocab_fingerprint
from pipeline.params import Params, StudentParams
from pipeline.progress import progress
from pipeline.shards import read_json, verify_shards, write_json_atomic
from pipeline.stream import ShardStream, find_shard_pairs, verify_alignment
from pipeline.training_log import TrainingLog

log = logging.getLogger(__name__)

FEATURES_DIR = Path("data/features")
TEACHER_DIR = Path("data/teacher")
MODEL_DIR = Path("models/student")
CHECKPOINT_DIR = Path("checkpoints/student")
LOG_DIR = Path("logs/student")

# Dev scores inside the student stage (curve, model card) use fixed default post-processing, so the stage
# never depends on `evaluate.*`; `kdqa evaluate` gives the official figures with the user's settings.
CARD_EVALUATION = Params()

# Knobs that change how a run is observed, not what it computes: a checkpoint stays valid across them.
# (num_workers is not one: with 2+ workers the DataLoader interleaves their shards, so the batch order
# differs; 0 and 1 give the same order. `training_key` keeps the part of it that matters.)
OBSERVATION_KEYS = {"checkpoint_every", "log_every", "eval_every", "num_workers"}


def check_teacher_logits(features_dir: Path, expected: str, logits_dir: Path) -> str:
    """The logits must have been computed from exactly these features (fingerprint `expected`); returns the
    logits fingerprint."""
    manifest_path = logits_dir / "manifest.json"
    if not manifest_path.exists():
        raise KdqaError(f"{manifest_path}: no teacher logits (run `kdqa teacher`)")
    manifest = read_json(manifest_path)
    found = manifest.get("fingerprint_parts", {}).get("features")
    if found != expected:
        raise KdqaError(
            f"{logits_dir}: teacher logits were computed for features {found}, but {features_dir} holds "
            f"features {expected}; regenerate them with `kdqa teacher` (or `dvc repro teacher`)"
        )
    verify_shards(logits_dir, "kdqa teacher")  # every logits shard whole: checksums from the manifest
    return manifest["fingerprint"]


def build_student(s: StudentParams):
    """The student model: `student.model`, optionally cut down to `student.init_layers` of its layers."""
    from transformers import AutoConfig

    overrides = {}
    try:
        config = AutoConfig.from_pretrained(s.model, trust_remote_code=s.trust_remote_code)
        if hasattr(config, "hidden_dropout_prob"):
            overrides["hidden_dropout_prob"] = s.dropout  # BERT applies it to the embeddings too
    except Exception:
        pass  # load_qa_model below reports the problem with the model path in one line
    model = load_qa_model(s.model, s.trust_remote_code, **overrides)
    if s.init_layers:
        keep_layers(model, list(s.init_layers))
    return model


def build_optimizer(model, learning_rate: float, weight_decay: float, device: torch.device) -> torch.optim.AdamW:
    """AdamW without weight decay on biases and LayerNorm weights. `fused` runs the whole update as one kernel
    (CUDA) or one vectorised loop (CPU): on the CPU the step of a 2-layer MiniLM student went from 80-90 ms
    to 9 ms (for-each loop per tensor before), about 7% of its training step (one-off timing; bench/ row 2
    moved from 0.66x to 0.60-0.62x with it)."""
    no_decay = ("bias", "LayerNorm.weight", "layer_norm.weight")
    groups = [
        {"params": [p for n, p in model.named_parameters() if not n.endswith(no_decay)], "weight_decay": weight_decay},
        {"params": [p for n, p in model.named_parameters() if n.endswith(no_decay)], "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=learning_rate, fused=device.type in ("cpu", "cuda"))


def training_key(params: Params, data_fingerprint: dict) -> dict:
    """What a checkpoint must agree on to be resumed: every setting that changes the computation."""
    settings = {k: v for k, v in asdict(params.student).items() if k not in OBSERVATION_KEYS}
    settings["loader_streams"] = max(1, params.student.num_workers)  # batch order: 0 and 1 worker agree
    return {"student": settings, "data": data_fingerprint, "world_size": distributed.world_size()}


def run_student(params: Params, resume: str = "auto") -> None:
    """Train the student. resume: 'auto' (continue a matching checkpoint if any), 'require', or 'never'."""
    distributed.init()
    s = params.student
    rank, world, device = distributed.rank(), distributed.world_size(), distributed.device()
    is_main = rank == 0

    # --- data: features + (unless weight is 0) teacher logits, checked before anything trains ---
    features_dir = FEATURES_DIR / "train"
    distil = s.distillation_weight > 0
    logits_dir = TEACHER_DIR / "train" if distil else None
    # A truncated or corrupted shard: one error naming it. The fingerprint comes from the verified bytes.
    features_manifest = verify_shards(features_dir, "kdqa prepare")
    data_fingerprint = {"features": features_manifest["bytes_fingerprint"]}
    if distil:
        data_fingerprint["logits"] = check_teacher_logits(features_dir, data_fingerprint["features"], logits_dir)
    pairs = find_shard_pairs(features_dir, logits_dir)
    verify_alignment(pairs)

    tokenizer = load_tokenizer(s.model, s.trust_remote_code)
    if vocab_fingerprint(tokenizer) != features_manifest.get("vocab_fingerprint"):
        raise KdqaError(
            f"{s.model}: its tokenizer differs from the teacher's ({features_manifest.get('tokenizer')}): "
            "student and teacher must share a tokenizer (the same vocabulary, token for token)"
        )

    # --- model, optimizer, schedule ---
    torch.manual_seed(s.seed)
    model = build_student(s).to(device)
    check_sequence_length(model, features_manifest.get("prepare", {}).get("max_seq_len", 0), s.model)
    stream = ShardStream(pairs, s.batch_size, s.seed, tokenizer.pad_token_id, rank, world, s.pad_to_multiple_of,
                         getattr(model.config, "max_position_embeddings", None))
    steps_per_epoch = [stream.steps_in_epoch(e) for e in range(s.epochs)]
    total_steps = sum(steps_per_epoch) if not s.max_steps else min(sum(steps_per_epoch), s.max_steps)
    if total_steps == 0:
        raise KdqaError(f"{features_dir}: no training batches (too few features for {world} processes?)")
    if world > 1 and is_main:
        planned = sum(stream.batches_per_rank(e, r) for e in range(s.epochs) for r in range(world))
        if planned > world * sum(steps_per_epoch):
            log.warning("%d of %d batches (%.0f%%) go unused so that all %d ranks take the same number of steps "
                        "(whole shards per rank); a shard count that is a multiple of %d wastes less",
                        planned - world * sum(steps_per_epoch), planned,
                        100 * (1 - world * sum(steps_per_epoch) / planned), world, world)
    optimizer = build_optimizer(model, s.learning_rate, s.weight_decay, device)
    from transformers import get_linear_schedule_with_warmup

    scheduler = get_linear_schedule_with_warmup(optimizer, int(s.warmup * total_steps), total_steps)

    # --- resume: weights, optimizer, schedule, RNG and position in the shard stream ---
    key = training_key(params, data_fingerprint)
    state = load_checkpoint(CHECKPOINT_DIR, key, resume, model, optimizer, scheduler, rank)
    step, start_epoch, skip_batches = (state.step, state.epoch, state.batch_in_epoch) if state else (0, 0, 0)
    if state:
        log.info("resuming from %s at step %d (epoch %d, batch %d); loss: w=%s T=%s",
                 CHECKPOINT_DIR, step, start_epoch, skip_batches, s.distillation_weight, s.temperature)
    if state and is_main:
        restore_curves(state, LOG_DIR)  # `dvc repro` deleted the curves before rerunning the stage
    train_log = TrainingLog(LOG_DIR, resume_step=step if state else None, enabled=is_main)
    ddp_model = torch.nn.parallel.DistributedDataParallel(model) if world > 1 else model

    # --- the loop ---
    model.train()
    use_bf16 = device.type == "cuda"
    started, seen_features = time.perf_counter(), 0
    last_eval = (None, None)  # (step, dev metrics) of the latest curve point, reused for the model card
    bar = progress(total=total_steps, initial=step, desc="student", unit="step", enabled=is_main)
    for epoch in range(start_epoch, s.epochs):
        if step >= total_steps:
            break
        stream.epoch = epoch
        loader = DataLoader(stream, batch_size=None, num_workers=s.num_workers, pin_memory=device.type == "cuda",
                            generator=torch.Generator().manual_seed(s.seed + epoch))  # keeps the global RNG untouched
        for batch_index, batch in enumerate(loader):
            if batch_index >= steps_per_epoch[epoch] or step >= total_steps:
                break
            if epoch == start_epoch and batch_index < skip_batches:
                continue  # already trained on before the checkpoint we resumed from
            batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
            with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=use_bf16):
                out = ddp_model(input_ids=batch["input_ids"], token_type_ids=batch["token_type_ids"],
                                attention_mask=batch["attention_mask"])
            loss = distillation_loss(
                out.start_logits, out.end_logits, batch["start_positions"], batch["end_positions"],
                batch["answer_mask"], batch.get("teacher_start"), batch.get("teacher_end"),
                s.temperature, s.distillation_weight, batch.get("teacher_mask"),
            )
            optimizer.zero_grad(set_to_none=True)
            loss.total.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), s.max_grad_norm)
            optimizer.step()
            scheduler.step()
            if step % RELEASE_MEMORY_EVERY == 0:
                release_freed_memory()
            step += 1
            seen_features += len(batch["input_ids"])
            bar.update(1)

            if (s.log_every and step % s.log_every == 0) or step == total_steps:  # log_every 0: last step only
                # The global batch's loss (mean over ranks; every rank reaches this line at the same step).
                parts = distributed.mean(torch.stack([loss.total, loss.kd, loss.ce]).detach().float()).cpu().tolist()
                train_log.log_step(step, epoch, loss=parts[0], kd_loss=parts[1], ce_loss=parts[2],
                                   lr=scheduler.get_last_lr()[0])
                bar.set_postfix(loss=f"{parts[0]:.3f}", kd=f"{parts[1]:.3f}", ce=f"{parts[2]:.3f}")
            if s.eval_every and step % s.eval_every == 0:
                last_eval = (step, evaluate_during_training(model, tokenizer, params, device, step, train_log))
            if s.checkpoint_every and step % s.checkpoint_every == 0 and step < total_steps:
                save_checkpoint(CHECKPOINT_DIR, Checkpoint(step, epoch, batch_index + 1, key), model, optimizer,
                                scheduler, rank, curves=(LOG_DIR / "train.tsv", LOG_DIR / "eval.tsv"))
    bar.close()
    elapsed = time.perf_counter() - started
    log.info("trained %d steps in %.1fs (%.1f features/s per process)", step, elapsed, seen_features / max(elapsed, 1e-9))

    if is_main:
        dev_metrics = None
        if last_eval[0] == step:  # the curve's last point is the final model: no second pass over dev
            dev_metrics = last_eval[1]
        elif (FEATURES_DIR / "dev").is_dir():  # the card reports the same dev scores `kdqa evaluate` computes
            from pipeline.evaluate import evaluate_model

            dev_metrics, *_ = evaluate_model(model, tokenizer.pad_token_id, FEATURES_DIR / "dev", CARD_EVALUATION, device)
            # The curve's last point: the final scores also land in the logs, not only in the model card.
            train_log.log_eval(step, f1=dev_metrics["f1"], exact=dev_metrics["exact"],
                               f1_forced=dev_metrics.get("HasAns_f1_forced"))
        if dev_metrics is not None:
            log.info("dev after %d steps: EM %.2f, F1 %.2f, forced span F1 %s", step, dev_metrics["exact"],
                     dev_metrics["f1"], dev_metrics.get("HasAns_f1_forced"))
        save_student(model, tokenizer, params, step, elapsed, dev_metrics)
        remove_checkpoints(CHECKPOINT_DIR)  # finished: nothing left to resume
    distributed.barrier()
    distributed.destroy()


# glibc keeps the freed activations of batches of ever-different widths in its arenas, so the resident size
# creeps up with the number of steps (bench/: +16% at 10x the data). Handing them back every few steps cuts
# that to +4..11% (bench/ full runs) at no measurable cost.
RELEASE_MEMORY_EVERY = 10
_LIBC = ctypes.CDLL(ctypes.util.find_library("c")) if sys.platform.startswith("linux") else None


def release_freed_memory() -> None:
    if _LIBC is not None and hasattr(_LIBC, "malloc_trim"):
        _LIBC.malloc_trim(0)


def evaluate_during_training(model, tokenizer, params, device, step, train_log) -> dict | None:
    """Dev F1 as a training curve (rank 0 only, which gets the metrics; the others wait at the barrier)."""
    metrics = None
    if distributed.is_main():
        from pipeline.evaluate import evaluate_model

        metrics, *_ = evaluate_model(model, tokenizer.pad_token_id, FEATURES_DIR / "dev", CARD_EVALUATION, device)
        train_log.log_eval(step, f1=metrics["f1"], exact=metrics["exact"], f1_forced=metrics.get("HasAns_f1_forced"))
    distributed.barrier()
    return metrics


def save_student(model, tokenizer, params: Params, steps: int, seconds: float, dev_metrics: dict | None) -> None:
    """`save_pretrained` model + tokenizer + a model card, swapped into models/student/ whole."""
    from pipeline.model_card import write_model_card

    staging = MODEL_DIR.with_name(f".{MODEL_DIR.name}.partial")
    shutil.rmtree(staging, ignore_errors=True)
    model.save_pretrained(staging, safe_serialization=True)
    tokenizer.save_pretrained(staging)
    write_json_atomic(staging / "kdqa_training.json", {
        "kdqa_version": __version__, "steps": steps, "seconds": round(seconds, 1),
        "student": asdict(params.student), "teacher": params.teacher.model, "data": asdict(params.data),
    })
    write_model_card(staging, params, steps, dev_metrics)
    shutil.rmtree(MODEL_DIR, ignore_errors=True)
    staging.rename(MODEL_DIR)
    log.info("saved student to %s", MODEL_DIR)
