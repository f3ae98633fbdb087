"""Answering every question of a split and scoring the answers: what the evaluate stage reports, what the
student stage's dev curve and model card show, and what export's accuracy gate compares.

`predict_split` gathers each example's windows from the feature shards, with logits from any source (a
model run now, or stored logits), post-processes them (`pipeline.text.postprocess`) and `score` applies the
official SQuAD 2.0 semantics (`pipeline.text.squad_metrics`).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable
from pathlib import Path

import numpy as np

from pipeline.model.batching import MASKED
from pipeline.model.ensemble import Combination, combine_rows
from pipeline.runtime.errors import KdqaError
from pipeline.store.examples import read_dev_examples
from pipeline.store.features import read_windows
from pipeline.store.logits import read_logits
from pipeline.store.shards import list_shards
from pipeline.text.postprocess import WindowLogits, predict_example
from pipeline.text.squad_metrics import forced_span_metrics, squad_v2_metrics

def predict_split(features_dir: Path, logits_for_shard: Callable, params, examples_path: Path):
    """Answer every dev example of `examples_path` (data/features/dev_examples.parquet): {id: text},
    {id: na_prob}, {id: forced span}, {id: gold answers}."""
    windows: dict[str, list[WindowLogits]] = defaultdict(list)
    shards = list_shards(features_dir)
    if not shards:
        raise KdqaError(f"{features_dir}: no feature shards (run `kdqa prepare`)")
    for shard in shards:
        f = read_windows(shard)
        ids, start, end = logits_for_shard(shard)
        if ids != f.feature_ids:
            raise KdqaError(f"{shard}: logits rows do not match the features' ids")
        for i, example_id in enumerate(f.example_ids):
            windows[example_id].append(WindowLogits(start[i], end[i], int(f.context_start[i]), int(f.context_end[i]),
                                                    f.offset_start[i], f.offset_end[i]))

    examples = read_dev_examples(examples_path)
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


def score_logit_shards(features_dir: Path, logits_dirs: list[Path], params, examples_path: Path) -> dict:
    """Scores of precomputed logits (a teacher's), read from their shards; several folders (teachers): the scores
    of their ensemble (`logit_shard_predictions`)."""
    return score(*logit_shard_predictions(features_dir, logits_dirs, params, examples_path))


def logit_shard_predictions(features_dir: Path, logits_dirs: list[Path], params, examples_path: Path):
    """`predict_split` over precomputed logits (a teacher's), read from their shards; several folders (teachers):
    their ensemble, the equal-weight mean of their probabilities (T = 1) over each window's answer positions
    (those every teacher saw). A teacher carried onto the features from its own tokenizer is scored from its
    carried distributions through the features' windows: the teacher as seen through the features' tokens."""
    def from_disk(shard: Path):
        read = [read_logits(folder / shard.name) for folder in logits_dirs]
        ids, start, end = read[0]
        # A teacher carried from its own tokenizer holds NaN where none of its windows saw a position: no answer there.
        start, end = ([np.where(np.isnan(row), MASKED, row) for row in side] for side in (start, end))
        if len(read) > 1:
            for folder, (other_ids, _, _) in zip(logits_dirs[1:], read[1:]):
                if not other_ids.equals(ids):
                    raise KdqaError(f"{folder / shard.name}: rows do not match {logits_dirs[0] / shard.name}")
            windows = read_windows(shard)
            combination = Combination.equal(len(read))
            start, end = (combine_rows([r[side] for r in read], windows.context_start, windows.context_end,
                                       combination) for side in (1, 2))
        return ids.to_pylist(), start, end

    return predict_split(features_dir, from_disk, params, examples_path)


def evaluate_model(model, pad_token_id: int, features_dir: Path, params, device, examples_path: Path):
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
        preds, na_probs, forced, golds = predict_split(features_dir, logits, params, examples_path)
    model.train(was_training)
    return score(preds, na_probs, forced, golds), preds, na_probs, forced
