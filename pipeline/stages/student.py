"""Stage 3, student: train a small QA model on hard labels plus the teacher's streamed logits.

The teacher model is never loaded here: the only teacher input is `data/teacher/train/`, Parquet shards of
logits whose fingerprint must match the features being trained on (or, for a student of another tokenizer or
other windows, the teacher's targets that `kdqa align` put on the student's own features: data/aligned/).
`run_student` is the whole training procedure, in three parts: `setup` (check the data, build model, stream,
AdamW and the linear warmup/decay schedule, resume from a checkpoint), `train` (the loop:
`pipeline.training.step.train_step` on every batch, logging, dev curve, checkpoints every
`student.checkpoint_every` steps) and `finish` (dev scores, model card, save). DDP under torchrun.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from pipeline import __version__

from pipeline.training import distributed
from pipeline.model.attention import use_dropout_attention
from pipeline.model.dropout import use_cpu_dropout
from pipeline.training.checkpoint import Checkpoint, load_checkpoint, remove_checkpoints, restore_curves, save_checkpoint
from pipeline.runtime.errors import KdqaError
from pipeline.store.fingerprints import check_teacher_logits
from pipeline.store.logits import teacher_folders
from pipeline.model.ensemble import Combination
from pipeline.model.inference import precision_name
from pipeline.model.loading import check_finite_weights, check_sequence_length, keep_layers, load_qa_model, load_tokenizer
from pipeline.model.answering import UNTUNED_NULL_THRESHOLD
from pipeline.params import EvaluateParams, Params, StudentParams
from pipeline.runtime.workspace import Workspace, staged_folder
from pipeline.runtime.progress import progress
from pipeline.store.shards import check_format, verify_shards, write_json_atomic
from pipeline.training.stream import ShardStream, find_shard_pairs, verify_alignment
from pipeline.training.student_data import StudentData, student_data
from pipeline.training.step import DivergedError, build_optimizer, grad_scaler, train_step, training_dtype
from pipeline.training.curves import TrainingLog
from pipeline.runtime.write_errors import writing

log = logging.getLogger(__name__)

# Dev scores inside the student stage (curve, model card) and the validation pass that chooses the no-answer
# threshold use fixed default post-processing, so the stage never depends on `evaluate.*`; `kdqa evaluate` gives
# the official figures with the user's settings. The card's dev scores are at the untuned threshold (0.0): the
# curve's points come before any threshold is chosen, and the last one must compare with them.
CARD_EVALUATION = Params(evaluate=EvaluateParams(null_threshold=UNTUNED_NULL_THRESHOLD))

# Knobs that change how a run is observed or how the same computation runs, not what it computes: a checkpoint
# stays valid across them. (num_workers is not one: with 2+ workers the DataLoader interleaves their shards, so
# the batch order differs; 0 and 1 give the same order. `training_key` keeps the part of it that matters.)
OBSERVATION_KEYS = {"checkpoint_every", "log_every", "eval_every", "num_workers", "gradient_checkpointing"}


def uses_gradient_checkpointing(student: StudentParams, device: torch.device) -> bool:
    """`student.gradient_checkpointing`, with `auto` decided for the device: on a CPU, off on CUDA."""
    if student.gradient_checkpointing == "auto":
        return device.type == "cpu"
    return student.gradient_checkpointing


def build_student(student: StudentParams, device: torch.device):
    """The student model: `student.model`, optionally cut down to `student.init_layers` of its layers."""
    from transformers import AutoConfig

    overrides = {}
    try:
        config = AutoConfig.from_pretrained(student.model, trust_remote_code=student.trust_remote_code)
        if hasattr(config, "hidden_dropout_prob"):
            overrides["hidden_dropout_prob"] = student.dropout  # BERT applies it to the embeddings too
        if student.attention_dropout is not None and hasattr(config, "attention_probs_dropout_prob"):
            overrides["attention_probs_dropout_prob"] = student.attention_dropout
    except Exception:
        pass  # load_qa_model below reports the problem with the model path in one line
    model = load_qa_model(student.model, student.trust_remote_code, **overrides)
    if student.init_layers:
        keep_layers(model, list(student.init_layers))
    if student.attention == "auto":  # on CUDA, in evaluation and without dropout it runs PyTorch's SDPA itself
        use_dropout_attention(model)
    if student.dropout_masks == "auto":  # likewise PyTorch's dropout on CUDA and in evaluation
        use_cpu_dropout(model)
    if uses_gradient_checkpointing(student, device):
        enable_gradient_checkpointing(model, student.model)
    return model


def enable_gradient_checkpointing(model, name: str) -> None:
    """Recompute each layer in the backward pass. Non-reentrant: under the same autocast and RNG state (the same
    dropout masks), and under DDP. transformers 5 calls it activation checkpointing; 4.x gradient checkpointing."""
    supported = getattr(model, "supports_activation_checkpointing",
                        getattr(model, "supports_gradient_checkpointing", False))
    if not supported:
        raise KdqaError(f"{name}: {type(model).__name__} does not support gradient checkpointing "
                        "(set student.gradient_checkpointing: false)")
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def training_key(params: Params, data_fingerprint: dict, autocast: torch.dtype | None) -> dict:
    """What a checkpoint must agree on to be resumed: every setting that changes the computation."""
    settings = {k: v for k, v in asdict(params.student).items() if k not in OBSERVATION_KEYS}
    settings["loader_streams"] = max(1, params.student.num_workers)  # batch order: 0 and 1 worker agree
    settings["autocast"] = precision_name(autocast)  # what `precision: auto` became on this machine
    return {"student": settings, "data": data_fingerprint, "world_size": distributed.world_size()}


@dataclass
class Training:
    """What `setup` builds and the loop runs."""

    params: Params
    model: torch.nn.Module  # the student itself: evaluated, checkpointed and saved
    ddp_model: torch.nn.Module  # what forward and backward run through: DDP under torchrun, else `model`
    tokenizer: object
    stream: ShardStream
    optimizer: torch.optim.Optimizer
    scheduler: object
    steps_per_epoch: list[int]
    total_steps: int
    key: dict  # `training_key`: what a checkpoint must agree on
    train_log: TrainingLog
    device: torch.device
    ws: Workspace  # where it reads and writes
    dev_features: Path  # the dev features this student reads: the teacher's, or its own (data/aligned)
    validation_features: Path  # the same for validation (data.validation), where the no-answer threshold is chosen
    scaler: object = None  # float16 only: the gradient scaler (`pipeline.training.step.grad_scaler`)
    step: int = 0  # optimizer steps taken (after a resume: the checkpoint's)
    start_epoch: int = 0
    skip_batches: int = 0  # batches of `start_epoch` trained on before the checkpoint


def run_student(params: Params, ws: Workspace, resume: str = "auto") -> None:
    """Train the student. resume: 'auto' (continue a matching checkpoint if any), 'require', or 'never'."""
    distributed.init()
    run = setup(params, ws, resume)
    seconds, last_eval = train(run)
    if distributed.is_main():
        finish(run, seconds, last_eval)
    distributed.barrier()
    distributed.destroy()


def check_training_data(student: StudentParams, ws: Workspace, data: StudentData) -> tuple[dict, dict, list, list]:
    """Features + (unless the weight is 0) teacher logits, checked before anything trains: (features manifest,
    data fingerprint, labelled shard pairs, extra shard pairs). A truncated or corrupted shard is one error
    naming it. `data`: the teacher's features and logits, or the student's own features and aligned targets
    (pipeline/stages/align.py)."""
    distil = student.distillation_weight > 0
    regenerate = "kdqa prepare" if data.mode == "direct" else "kdqa align"
    features_manifest, data_fingerprint, pairs = checked_split(
        data.train_features, data.teacher_targets if distil else None, regenerate)
    extra = []
    for split in extra_splits(student, ws):  # the student's own features and aligned targets when aligned
        features_dir, targets_dir = data.split(split)
        _, split_fingerprint, split_pairs = checked_split(features_dir, targets_dir, regenerate)
        data_fingerprint.update({f"{split}_{k}": v for k, v in split_fingerprint.items()})
        extra += split_pairs
    return features_manifest, data_fingerprint, pairs, extra


def checked_split(features_dir: Path, logits_dir: Path | None, regenerate: str) -> tuple[dict, dict, list]:
    """One split's verified features (and logits): (manifest, fingerprints of the verified bytes, pairs)."""
    features_manifest = verify_shards(features_dir, regenerate)
    check_format(features_manifest.get("features_format"), "features", features_dir, regenerate)
    data_fingerprint = {"features": features_manifest["bytes_fingerprint"]}  # of the verified bytes
    if logits_dir is not None:
        data_fingerprint["logits"] = check_teacher_logits(features_dir, data_fingerprint["features"], logits_dir)
    pairs = find_shard_pairs(features_dir, logits_dir)
    verify_alignment(pairs)
    return features_manifest, data_fingerprint, pairs


AGREEMENT_SAYS = {"none": "", "weight": "; each row's KD term weighted by the teachers' agreement",
                  "drop": "; rows whose teachers disagree on answerability left out of the KD term"}


def target_combination(student: StudentParams, data: StudentData) -> Combination | None:
    """How the teachers' logits become the one target (None: one teacher, its logits as stored). The weights
    must be one per teacher whose logits the student reads."""
    if student.distillation_weight == 0:
        return None
    teachers = len(teacher_folders(data.teacher_targets))
    weights = student.teacher_weights
    if weights is not None and len(weights) != teachers:
        raise KdqaError(f"student.teacher_weights: {len(weights)} weight(s) {weights}, but {data.teacher_targets} "
                        f"holds the logits of {teachers} teacher(s); give one weight per teacher of teacher.models, "
                        "in its order (or null: equal weights)")
    if teachers == 1:
        if student.teacher_agreement != "none":
            log.warning("student.teacher_agreement %s: one teacher agrees with itself; every row counts fully",
                        student.teacher_agreement)
        return None
    combination = Combination(tuple(weights or (1.0,) * teachers), student.temperature, student.teacher_agreement)
    log.info("target: the mean of %d teachers' probabilities at T=%s, weights %s%s", teachers, student.temperature,
             list(combination.weights), AGREEMENT_SAYS[combination.agreement])
    return combination


def extra_splits(student: StudentParams, ws: Workspace) -> list[str]:
    """The splits of teacher-labelled rows this student mixes in: those of `student.extra_splits` that prepare
    made, unless `extra_ratio` is 0. Their rows have no hard labels (or only some), so a student that does not
    distil (weight 0) cannot learn from them and trains on the labelled rows alone."""
    made = [split for split in student.extra_splits if (ws.features / split / "manifest.json").exists()]
    if not made or student.extra_ratio == 0:
        return []
    if student.distillation_weight == 0:
        log.warning("%s: rows only the teacher labels; at distillation_weight 0 the student trains on the labelled "
                    "rows only", ", ".join(str(ws.features / split) for split in made))
        return []
    return made


def setup(params: Params, ws: Workspace, resume: str) -> Training:
    """Checks, model, stream, optimizer and schedule, then the checkpoint to resume from (if any)."""
    student = params.student
    rank, world, device = distributed.rank(), distributed.world_size(), distributed.device()
    autocast = training_dtype(device, student.precision)  # float16 off CUDA: an error before any work
    scaler = grad_scaler(autocast)
    tokenizer = load_tokenizer(student.model, student.trust_remote_code)
    data = student_data(params, ws, tokenizer)  # the teacher's features, or its own aligned ones (`kdqa align`)
    features_manifest, data_fingerprint, pairs, extra = check_training_data(student, ws, data)
    if (data.validation_features / "manifest.json").exists():  # a damaged shard fails now, not after training
        verify_shards(data.validation_features, "kdqa prepare" if data.mode == "direct" else "kdqa align")
    combination = target_combination(student, data)

    torch.manual_seed(student.seed)
    model = build_student(student, device).to(device)
    check_sequence_length(model, features_manifest.get("prepare", {}).get("max_seq_len", 0), student.model)
    stream = ShardStream(pairs, student.batch_size, student.seed, tokenizer.pad_token_id, rank, world,
                         student.pad_to_multiple_of, getattr(model.config, "max_position_embeddings", None),
                         student.group_by_length, extra=extra, extra_ratio=student.extra_ratio,
                         combination=combination)
    if extra and rank == 0:
        first = [stream.pairs[stream.labelled_shards + i].rows for i in stream.extra_shards(0)]
        log.info("each epoch: %d labelled rows + about %d extra rows (%d shards in the first epoch, of %d in %s)",
                 sum(p.rows for p in pairs), stream.extra_quota, len(first), len(extra),
                 ", ".join(extra_splits(student, ws)))
    steps_per_epoch = [stream.steps_in_epoch(epoch) for epoch in range(student.epochs)]
    total_steps = min(sum(steps_per_epoch), student.max_steps or sum(steps_per_epoch))
    if total_steps == 0:
        raise KdqaError(f"{data.train_features}: no training batches (too few features for {world} processes?)")
    if world > 1 and rank == 0:
        warn_unused_batches(stream, student.epochs, world, sum(steps_per_epoch))
    optimizer = build_optimizer(model, student.learning_rate, student.weight_decay, device)
    from transformers import get_linear_schedule_with_warmup

    scheduler = get_linear_schedule_with_warmup(optimizer, int(student.warmup * total_steps), total_steps)

    # Resume: weights, optimizer, schedule, RNG and the position in the shard stream.
    key = training_key(params, data_fingerprint, autocast)
    state = load_checkpoint(ws.checkpoints, key, resume, model, optimizer, scheduler, rank, scaler,
                            key_defaults=training_key(Params(), data_fingerprint, autocast))
    if state:
        log.info("resuming from %s at step %d (epoch %d, batch %d); loss: w=%s T=%s", ws.checkpoints, state.step,
                 state.epoch, state.batch_in_epoch, student.distillation_weight, student.temperature)
        if rank == 0:
            restore_curves(state, ws.student_logs)  # `dvc repro` deleted the curves before rerunning the stage
    train_log = TrainingLog(ws.student_logs, resume_step=state.step if state else None, enabled=rank == 0)
    ddp_model = torch.nn.parallel.DistributedDataParallel(model) if world > 1 else model
    run = Training(params, model, ddp_model, tokenizer, stream, optimizer, scheduler, steps_per_epoch, total_steps,
                   key, train_log, device, ws, data.dev_features, data.validation_features, scaler)
    if state:
        run.step, run.start_epoch, run.skip_batches = state.step, state.epoch, state.batch_in_epoch
    return run


def warn_unused_batches(stream: ShardStream, epochs: int, world: int, steps: int) -> None:
    """Under DDP every rank takes as many steps as the rank with the fewest batches: say what that drops."""
    planned = sum(stream.batches_per_rank(epoch, rank) for epoch in range(epochs) for rank in range(world))
    if planned > world * steps:
        log.warning("%d of %d batches (%.0f%%) go unused so that all %d ranks take the same number of steps "
                    "(whole shards per rank); a shard count that is a multiple of %d wastes less",
                    planned - world * steps, planned, 100 * (1 - world * steps / planned), world, world)


def train(run: Training) -> tuple[float, tuple]:
    """The loop. Returns the seconds it took and (step, dev metrics) of the last dev curve point."""
    student, rank = run.params.student, distributed.rank()
    run.model.train()
    started, seen_features = time.perf_counter(), 0
    resumed_at = run.step  # a resume from the final checkpoint has nothing new to save
    last_eval = (None, None)  # (step, dev metrics) of the latest curve point, reused for the model card
    bar = progress(total=run.total_steps, initial=run.step, desc="student", unit="step", enabled=rank == 0)
    for epoch in range(run.start_epoch, student.epochs):
        if run.step >= run.total_steps:
            break
        run.stream.epoch = epoch
        loader = DataLoader(run.stream, batch_size=None, num_workers=student.num_workers,
                            pin_memory=run.device.type == "cuda",
                            generator=torch.Generator().manual_seed(student.seed + epoch))  # global RNG untouched
        for batch_index, batch in enumerate(loader):
            if batch_index >= run.steps_per_epoch[epoch] or run.step >= run.total_steps:
                break
            if epoch == run.start_epoch and batch_index < run.skip_batches:
                continue  # already trained on before the checkpoint we resumed from
            try:
                loss = train_step(run.ddp_model, batch, run.optimizer, run.scheduler, student, run.step, run.device,
                                  run.scaler)
            except DivergedError as exc:
                bar.close()
                kept = (f"; the last checkpoint ({run.ws.checkpoints}) is kept" if (run.ws.checkpoints / "state.json").exists()
                        else "")
                raise KdqaError(f"{exc}; {run.ws.student_model} is unchanged{kept}") from None
            run.step += 1
            seen_features += len(batch["input_ids"])
            bar.update(1)

            step = run.step
            if (student.log_every and step % student.log_every == 0) or step == run.total_steps:  # 0: last only
                # The global batch's loss (mean over ranks; every rank reaches this line at the same step). The CE
                # is the mean over the labelled rows of all ranks, blank when the batch had none (extra rows only).
                total, kd, ce_sum, labelled = distributed.mean(torch.stack(
                    [loss.total, loss.kd, loss.ce * loss.labelled, loss.labelled.float()]).detach().float()).cpu().tolist()
                ce = ce_sum / labelled if labelled else None
                run.train_log.log_step(step, epoch, loss=total, kd_loss=kd, ce_loss=ce, lr=run.scheduler.get_last_lr()[0])
                bar.set_postfix(loss=f"{total:.3f}", kd=f"{kd:.3f}", ce="-" if ce is None else f"{ce:.3f}")
            if student.eval_every and step % student.eval_every == 0:
                last_eval = (step, evaluate_during_training(run, step))
            if student.checkpoint_every and step % student.checkpoint_every == 0 and step < run.total_steps:
                save_checkpoint(run.ws.checkpoints, Checkpoint(step, epoch, batch_index + 1, run.key), run.model,
                                run.optimizer, run.scheduler, rank,
                                curves=(run.ws.student_logs / "train.tsv", run.ws.student_logs / "eval.tsv"), scaler=run.scaler)
    bar.close()
    if student.checkpoint_every and run.step != resumed_at:
        # The finished training, resumable: a failure while scoring or saving the model loses none of it.
        save_checkpoint(run.ws.checkpoints, Checkpoint(run.step, student.epochs, 0, run.key), run.model, run.optimizer,
                        run.scheduler, rank, curves=(run.ws.student_logs / "train.tsv", run.ws.student_logs / "eval.tsv"),
                        scaler=run.scaler)
    seconds = time.perf_counter() - started
    log.info("trained %d steps in %.1fs (%.1f features/s per process)", run.step, seconds,
             seen_features / max(seconds, 1e-9))
    return seconds, last_eval


def dev_scores(run: Training) -> dict:
    return split_answers(run, run.dev_features, run.ws.dev_examples)[0]


def split_answers(run: Training, features: Path, examples: Path) -> tuple:
    """The model's answers to a scored split and their scores: (metrics, predictions, na_probs, forced spans)."""
    from pipeline.runtime.allocator import release_freed_memory
    from pipeline.model.scoring import evaluate_model

    release_freed_memory()  # the training steps' free buffers, before evaluation's (other sizes) are allocated
    # Batches no larger than training's: a forward pass over them needs less memory than a training step, so the
    # scoring never sets the stage's peak (at evaluate.batch_size it did on CPUs). Scores are unchanged up to
    # bfloat16 rounding: each row is computed on its own, padding masked.
    card = replace(CARD_EVALUATION, evaluate=replace(CARD_EVALUATION.evaluate, batch_size=min(
        CARD_EVALUATION.evaluate.batch_size, run.params.student.batch_size)))
    answers = evaluate_model(run.model, run.tokenizer.pad_token_id, features, card, run.device, examples)
    release_freed_memory()  # and evaluation's, before training's come back
    return answers


def validation_threshold(run: Training) -> dict | None:
    """The no-answer threshold chosen with the trained student on the validation split (what
    pipeline.model.answering stores with the model), or None without a validation split."""
    from pipeline.model.answering import choose_null_threshold
    from pipeline.store.examples import read_dev_examples

    if not (run.validation_features / "manifest.json").exists():
        log.info("no validation split (data.validation): no no-answer threshold is stored with the model; it answers "
                 "at the untuned threshold %s", UNTUNED_NULL_THRESHOLD)
        return None
    metrics, _, na_probs, forced = split_answers(run, run.validation_features, run.ws.validation_examples)
    golds = {ex["id"]: ex["answers"] for ex in read_dev_examples(run.ws.validation_examples)}
    record = choose_null_threshold(forced, na_probs, golds, "validation")
    log.info("no-answer threshold chosen on validation (%d questions): %.4g (official na_prob threshold %.4g), "
             "validation F1 %.2f there (%.2f at %s)", record["questions"], record["null_threshold"],
             record["na_prob_threshold"], record["best_f1"], metrics["f1"], UNTUNED_NULL_THRESHOLD)
    return record


def evaluate_during_training(run: Training, step: int) -> dict | None:
    """Dev F1 as a training curve (rank 0 only, which gets the metrics; the others wait at the barrier)."""
    metrics = None
    if distributed.is_main():
        metrics = dev_scores(run)
        run.train_log.log_eval(step, f1=metrics["f1"], exact=metrics["exact"],
                               f1_forced=metrics.get("HasAns_f1_forced"))
    distributed.barrier()
    return metrics


def finish(run: Training, seconds: float, last_eval: tuple) -> None:
    """Rank 0, after the loop: the final dev scores (for the model card and the curve's last point), the saved
    model, and no checkpoint left to resume."""
    # Training is over: the optimizer's moments (twice the weights) and the last step's gradients are dropped
    # before the final dev pass, so that pass does not set the stage's peak memory.
    run.optimizer.state.clear()
    run.model.zero_grad(set_to_none=True)
    dev_metrics = None
    if last_eval[0] == run.step:  # the curve's last point is the final model: no second pass over dev
        dev_metrics = last_eval[1]
    elif run.dev_features.is_dir():  # the card reports the same dev scores `kdqa evaluate` computes
        dev_metrics = dev_scores(run)
        run.train_log.log_eval(run.step, f1=dev_metrics["f1"], exact=dev_metrics["exact"],
                               f1_forced=dev_metrics.get("HasAns_f1_forced"))
    if dev_metrics is not None:
        log.info("dev after %d steps: EM %.2f, F1 %.2f, forced span F1 %s", run.step, dev_metrics["exact"],
                 dev_metrics["f1"], dev_metrics.get("HasAns_f1_forced"))
    answering = validation_threshold(run)
    save_student(run.model, run.tokenizer, run.params, run.ws, run.step, seconds, dev_metrics, answering)
    remove_checkpoints(run.ws.checkpoints)  # finished: nothing left to resume


def save_student(model, tokenizer, params: Params, ws: Workspace, steps: int, seconds: float,
                 dev_metrics: dict | None, answering: dict | None = None) -> None:
    """`save_pretrained` model + tokenizer + a model card (+ the no-answer threshold chosen on validation,
    `answering`), swapped into models/student/ whole."""
    from pipeline.model.answering import write_answering
    from pipeline.training.model_card import write_model_card

    check_finite_weights(model, "student: the trained model", f"{ws.student_model} is unchanged")  # never swapped in
    with writing(ws.student_model), staged_folder(ws.student_model) as staging:
        model.save_pretrained(staging, safe_serialization=True)
        tokenizer.save_pretrained(staging)
        write_json_atomic(staging / "kdqa_training.json", {
            "kdqa_version": __version__, "steps": steps, "seconds": round(seconds, 1),
            "student": asdict(params.student), "teacher": params.teacher.model,
            "teachers": params.teacher.teachers, "data": asdict(params.data),
        })
        if answering:
            write_answering(staging, answering)
        write_model_card(staging, params, ws, steps, dev_metrics, answering)
    log.info("saved student to %s", ws.student_model)
