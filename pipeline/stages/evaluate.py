"""Stage 4, evaluate: the student's answers on the dev set, scored with the official SQuAD 2.0 semantics.

Writes `metrics/eval.json` (official keys plus `HasAns_f1_forced`, the span quality when the best non-null
span is always given), `results/predictions.json` ({id: text}, "" for no answer) and
`results/na_probs.json` ({id: no-answer probability}); the official `evaluate-v2.0.py` run on the dev JSON
with those two files reproduces every official figure in `eval.json`. `results/forced_predictions.json`
({id: best non-null span}) is what `HasAns_f1_forced` scores, kept so that per-question span quality can be
compared between models (bench/accuracy's confidence intervals).

The student answers at `evaluate.null_threshold`: `auto` (the default) is the threshold stored with the model
(chosen on data.validation by the student stage: pipeline/model/answering.py), else 0.0; a number forces it.
`eval.json` says which threshold was used (`null_threshold`) and where it came from (`null_threshold_source`),
beside the official `best_f1`/`best_f1_thresh` (the threshold tuned on dev itself: an upper bound, not a
result) and the forced span F1. The teacher has no stored threshold: `auto` scores it at 0.0.
"""

from __future__ import annotations

import logging
from pathlib import Path

from pipeline.model.answering import UNTUNED_NULL_THRESHOLD, at_threshold, null_threshold_of
from pipeline.model.scoring import evaluate_model, score_logit_shards
from pipeline.runtime.errors import KdqaError
from pipeline.runtime.workspace import Workspace
from pipeline.store.shards import read_json, write_jsons_atomic

log = logging.getLogger(__name__)


def teacher_scores(features_dir: Path, teacher_dir: Path, params, ws: Workspace, threshold: dict) -> dict:
    """The teacher's scores from its stored dev logits (`threshold`: the no-answer threshold they were scored at,
    and where it comes from, recorded beside them). Several teachers: each one's under its folder's name
    (teacher-0, ...) and their ensemble's (the equal-weight mean of their probabilities) under `ensemble`. A teacher
    carried from its own tokenizer is scored from its carried distributions on the features' windows."""
    from pipeline.store.logits import teacher_folders

    folders = teacher_folders(teacher_dir)
    scored = {folder.name: {**score_logit_shards(features_dir, [folder], params, ws.dev_examples), **threshold}
              for folder in folders}
    if len(folders) > 1:
        scored["ensemble"] = {**score_logit_shards(features_dir, folders, params, ws.dev_examples), **threshold}
    carried = {folder.name: read_json(folder / "manifest.json").get("carried") for folder in folders}
    for name, metrics in scored.items():
        seen_as = (f" (carried from tokenizer {carried[name]['tokenizer']}: as seen through the features' tokens)"
                   if carried.get(name) else "")
        log.info("%s on dev: EM %.2f F1 %.2f (forced span F1 %.2f)%s", "teacher" if len(folders) == 1 else name,
                 metrics["exact"], metrics["f1"], metrics.get("HasAns_f1_forced", float("nan")), seen_as)
    return scored[teacher_dir.name] if len(folders) == 1 else scored


def run_evaluate(params, ws: Workspace, model_dir: Path | None = None) -> dict:
    """Score `model_dir` (default: the workspace's student) and the teacher's stored dev logits."""
    from pipeline.training import distributed
    from pipeline.store.fingerprints import check_model_vocabulary, check_teacher_logits
    from pipeline.model.loading import TRAINED, load_qa_model, load_tokenizer
    from pipeline.training.student_data import evaluation_features

    from pipeline.store.shards import verify_shards

    # Everything is checked before anything is written: no metrics file may be left from a half-run.
    model_dir = ws.student_model if model_dir is None else model_dir
    features_dir, teacher_dir = ws.features / "dev", ws.teacher / "dev"
    features_manifest = verify_shards(features_dir, "kdqa prepare")  # a damaged shard: one error, never skewed scores
    has_teacher = (teacher_dir / "manifest.json").exists()
    if has_teacher:  # logits of other features would be scored against these examples: refuse by fingerprint
        check_teacher_logits(features_dir, features_manifest["bytes_fingerprint"], teacher_dir)
    if model_dir == ws.student_model and not model_dir.exists():  # the pipeline's own: say which stage makes it
        raise KdqaError(f"{model_dir}: no model there yet (run `kdqa student`, or give --model a model folder)")
    tokenizer = load_tokenizer(str(model_dir))
    threshold, threshold_source = null_threshold_of(model_dir, params.evaluate.null_threshold)
    # A student of another tokenizer or other windows reads its own dev features (`kdqa align`); the teacher's
    # scores stay on the teacher's.
    student_features = evaluation_features(ws, tokenizer)
    student_manifest = features_manifest
    if student_features != features_dir:
        student_manifest = verify_shards(student_features, "kdqa align")
    check_model_vocabulary(tokenizer, str(model_dir), student_manifest, student_features)
    device = distributed.device()
    model = load_qa_model(str(model_dir), purpose=TRAINED).to(device)

    if has_teacher:
        # The teacher's scores from its stored dev logits, post-processed exactly like the student's (at the same
        # threshold when one is set; it has none stored).
        teacher_threshold, teacher_source = (
            (threshold, threshold_source) if params.evaluate.null_threshold != "auto"
            else (UNTUNED_NULL_THRESHOLD, "untuned (the teacher's logits come with no stored threshold)"))
        teacher_metrics = teacher_scores(features_dir, teacher_dir, at_threshold(params, teacher_threshold), ws,
                                         {"null_threshold": teacher_threshold, "null_threshold_source": teacher_source})
    metrics, preds, na_probs, forced = evaluate_model(model, tokenizer.pad_token_id, student_features,
                                                      at_threshold(params, threshold), device, ws.dev_examples)
    metrics.update(null_threshold=threshold, null_threshold_source=threshold_source)
    outputs = {ws.predictions: preds, ws.na_probs: na_probs, ws.forced_predictions: forced, ws.eval_metrics: metrics}
    stale = ()
    if has_teacher:
        outputs[ws.teacher_metrics] = teacher_metrics
    elif ws.teacher_metrics.exists():  # from a run that had the teacher's dev logits: not this run's
        stale = (ws.teacher_metrics,)
        log.warning("%s removed: %s has no logits, so this run scored the student only (run `kdqa teacher` "
                    "for the teacher's scores)", ws.teacher_metrics, teacher_dir)
    write_jsons_atomic(outputs, remove=stale)  # all replaced together, or (a write failed) none
    log.info("student on dev: EM %.2f F1 %.2f at no-answer threshold %.4g (%s) (HasAns F1 %.2f, NoAns F1 %.2f, "
             "forced span F1 %.2f)", metrics["exact"], metrics["f1"], threshold, threshold_source,
             metrics.get("HasAns_f1", float("nan")), metrics.get("NoAns_f1", float("nan")),
             metrics.get("HasAns_f1_forced", float("nan")))
    return metrics
