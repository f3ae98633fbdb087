"""Stage 4, evaluate: the student's answers on the dev set, scored with the official SQuAD 2.0 semantics.

Writes `metrics/eval.json` (official keys plus `HasAns_f1_forced`, the span quality when the best non-null
span is always given), `results/predictions.json` ({id: text}, "" for no answer) and
`results/na_probs.json` ({id: no-answer probability}); the official `evaluate-v2.0.py` run on the dev JSON
with those two files reproduces every official figure in `eval.json`. `results/forced_predictions.json`
({id: best non-null span}) is what `HasAns_f1_forced` scores, kept so that per-question span quality can be
compared between models (bench/accuracy's confidence intervals).
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path

import numpy as np

from pipeline.errors import KdqaError
from pipeline.runtime.workspace import (
    DEV_EXAMPLES,
    EVAL_METRICS,
    FEATURES_DIR,
    FORCED_PREDICTIONS,
    NA_PROBS,
    PREDICTIONS,
    STUDENT_MODEL_DIR,
    TEACHER_DIR,
    TEACHER_METRICS,
)
from pipeline.text.postprocess import WindowLogits, predict_example
from pipeline.store.shards import list_column_to_numpy, list_shards, read_table, write_jsons_atomic
from pipeline.text.squad_metrics import forced_span_metrics, squad_v2_metrics

log = logging.getLogger(__name__)

WINDOW_COLUMNS = ["feature_id", "example_id", "context_start", "context_end", "offset_start", "offset_end"]


def predict_split(features_dir: Path, logits_for_shard: Callable, params, examples_path: Path = DEV_EXAMPLES):
    """Answer every dev example: {id: text}, {id: na_prob}, {id: forced span}, {id: gold answers}."""
    windows: dict[str, list[WindowLogits]] = defaultdict(list)
    shards = list_shards(features_dir)
    if not shards:
        raise KdqaError(f"{features_dir}: no feature shards (run `kdqa prepare`)")
    for shard in shards:
        table = read_table(shard, columns=WINDOW_COLUMNS)
        ids, start, end = logits_for_shard(shard)
        if ids != table.column("feature_id").to_pylist():
            raise KdqaError(f"{shard}: logits rows do not match the features' ids")
        offset_start = list_column_to_numpy(table.column("offset_start"), np.int64)
        offset_end = list_column_to_numpy(table.column("offset_end"), np.int64)
        context_start = table.column("context_start").to_numpy()
        context_end = table.column("context_end").to_numpy()
        for i, example_id in enumerate(table.column("example_id").to_pylist()):
            windows[example_id].append(WindowLogits(start[i], end[i], int(context_start[i]), int(context_end[i]),
                                                    offset_start[i], offset_end[i]))

    examples = read_table(examples_path, columns=["id", "context", "answers"]).to_pylist()
    preds, na_probs, forced, golds = {}, {}, {}, {}
    settings = params.evaluate
    for ex in examples:
        if ex["id"] not in windows:
            raise KdqaError(f"{features_dir}: no features for dev example {ex['id']!r}")
        prediction = predict_example(windows[ex["id"]], ex["context"], settings.n_best, settings.max_answer_len,
                                     settings.null_threshold)
        preds[ex["id"]], na_probs[ex["id"]] = prediction.text, prediction.na_prob
        forced[ex["id"]] = prediction.span_text
        golds[ex["id"]] = ex["answers"]
    return preds, na_probs, forced, golds


def score(preds, na_probs, forced, golds) -> dict:
    metrics = squad_v2_metrics(golds, preds, na_probs)
    metrics.update(forced_span_metrics(golds, forced))
    return metrics


def score_logit_shards(features_dir: Path, logits_dir: Path, params) -> dict:
    """Scores of precomputed logits (the teacher's), read from their shards."""
    def from_disk(shard: Path):
        t = read_table(logits_dir / shard.name)
        return (t.column("feature_id").to_pylist(), list_column_to_numpy(t.column("start_logits"), np.float32),
                list_column_to_numpy(t.column("end_logits"), np.float32))

    return score(*predict_split(features_dir, from_disk, params))


def evaluate_model(model, pad_token_id: int, features_dir: Path, params, device):
    """Run a model over the dev features and score it: (metrics, predictions, na_probs)."""
    from pipeline.model.inference import shard_logits

    from pipeline.runtime.progress import progress
    from pipeline.store.shards import shard_rows

    def logits(shard: Path):
        out = shard_logits(model, shard, pad_token_id, device, params.evaluate.batch_size, 1 << 30)
        bar.update(len(out[0]))
        return out

    was_training = model.training
    model.eval()
    # leave=False: during training (student.eval_every) this bar comes and goes under the student's own.
    with progress(total=sum(shard_rows(p) for p in list_shards(features_dir)), desc=f"evaluate {features_dir.name}",
                  unit="feat", leave=False) as bar:
        preds, na_probs, forced, golds = predict_split(features_dir, logits, params)
    model.train(was_training)
    return score(preds, na_probs, forced, golds), preds, na_probs, forced


def run_evaluate(params, model_dir: Path = STUDENT_MODEL_DIR) -> dict:
    from pipeline.training import distributed
    from pipeline.store.fingerprints import check_model_vocabulary, check_teacher_logits
    from pipeline.model.loading import TRAINED, load_qa_model, load_tokenizer
    from pipeline.training.student_data import evaluation_features

    from pipeline.store.shards import verify_shards

    # Everything is checked before anything is written: no metrics file may be left from a half-run.
    features_dir, teacher_dir = FEATURES_DIR / "dev", TEACHER_DIR / "dev"
    features_manifest = verify_shards(features_dir, "kdqa prepare")  # a damaged shard: one error, never skewed scores
    has_teacher = (teacher_dir / "manifest.json").exists()
    if has_teacher:  # logits of other features would be scored against these examples: refuse by fingerprint
        check_teacher_logits(features_dir, features_manifest["bytes_fingerprint"], teacher_dir)
    if model_dir == STUDENT_MODEL_DIR and not model_dir.exists():
        raise KdqaError(f"{model_dir}: no model there yet (run `kdqa student`, or give --model a model folder)")
    tokenizer = load_tokenizer(str(model_dir))
    # A student of another tokenizer or other windows reads its own dev features (`kdqa align`); the teacher's
    # scores stay on the teacher's.
    student_features = evaluation_features(tokenizer)
    student_manifest = features_manifest
    if student_features != features_dir:
        student_manifest = verify_shards(student_features, "kdqa align")
    check_model_vocabulary(tokenizer, str(model_dir), student_manifest, student_features)
    device = distributed.device()
    model = load_qa_model(str(model_dir), purpose=TRAINED).to(device)

    if has_teacher:
        # The teacher's scores from its stored dev logits, post-processed exactly like the student's.
        teacher_metrics = score_logit_shards(features_dir, teacher_dir, params)
        log.info("teacher on dev: EM %.2f F1 %.2f (forced span F1 %.2f)", teacher_metrics["exact"],
                 teacher_metrics["f1"], teacher_metrics.get("HasAns_f1_forced", float("nan")))
    metrics, preds, na_probs, forced = evaluate_model(model, tokenizer.pad_token_id, student_features, params, device)
    outputs = {PREDICTIONS: preds, NA_PROBS: na_probs,
               FORCED_PREDICTIONS: forced, EVAL_METRICS: metrics}
    stale = ()
    if has_teacher:
        outputs[TEACHER_METRICS] = teacher_metrics
    elif TEACHER_METRICS.exists():  # from a run that had the teacher's dev logits: not this run's
        stale = (TEACHER_METRICS,)
        log.warning("%s removed: %s has no logits, so this run scored the student only (run `kdqa teacher` "
                    "for the teacher's scores)", TEACHER_METRICS, teacher_dir)
    write_jsons_atomic(outputs, remove=stale)  # all replaced together, or (a write failed) none
    log.info("student on dev: EM %.2f F1 %.2f (HasAns F1 %.2f, NoAns F1 %.2f, forced span F1 %.2f)",
             metrics["exact"], metrics["f1"], metrics.get("HasAns_f1", float("nan")),
             metrics.get("NoAns_f1", float("nan")), metrics.get("HasAns_f1_forced", float("nan")))
    return metrics
