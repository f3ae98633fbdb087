"""The no-answer threshold is part of the model: chosen on the validation split, kept in the model folder.

The student stage answers the validation questions (`data.validation`) with the trained student and picks the
threshold the official SQuAD 2.0 script would report as `best_f1_thresh` (`choose_null_threshold`); it keeps it
in `kdqa_answering.json` beside the weights. `kdqa evaluate` (`evaluate.null_threshold: auto`), `kdqa export`
(which copies the file into the export) and `QuestionAnswerer` answer with it; `null_threshold_of` is the one
reader. Without a validation split no file is written and the threshold is 0.0, as before.
"""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path

from pipeline import __version__
from pipeline.runtime.errors import KdqaError
from pipeline.store.shards import read_json, write_json_atomic
from pipeline.text.postprocess import margin_threshold
from pipeline.text.squad_metrics import find_best_threshold, raw_scores

ANSWERING_FILE = "kdqa_answering.json"
# What `auto` (evaluate.null_threshold, QuestionAnswerer's None) gives for a model without a stored threshold:
# answer when the best span scores at least the null score.
UNTUNED_NULL_THRESHOLD = 0.0


def choose_null_threshold(forced: dict[str, str], na_probs: dict[str, float], golds: dict[str, list[str]],
                          split: str) -> dict:
    """The threshold that maximises F1 over `golds`' questions, as the official script's best_f1_thresh, and what
    `kdqa_answering.json` records about it. Predictions: the forced spans (the best non-null span of every
    question), so every threshold is searched; predictions made at some threshold would hide an answer from every
    question above it. The F1 reached is the F1 of the answers given at that threshold."""
    if not golds:
        raise KdqaError(f"{split}: no questions to choose the no-answer threshold on")
    has_answer = {q: bool(answers) for q, answers in golds.items()}
    f1 = raw_scores(golds, forced)[1]
    best_f1, na_prob_threshold = find_best_threshold(forced, f1, na_probs, has_answer)
    return {"kdqa_version": __version__,
            "null_threshold": margin_threshold(na_prob_threshold),  # what answering compares the margin with
            "na_prob_threshold": na_prob_threshold,  # the official script's best_f1_thresh it comes from
            "chosen_on": split, "questions": len(f1), "best_f1": round(best_f1, 4)}


def write_answering(folder: Path, record: dict) -> None:
    write_json_atomic(Path(folder) / ANSWERING_FILE, record)


def read_answering(model: str | Path) -> dict | None:
    """The record stored with `model` (a folder; a hub name has none): None when there is none, a KdqaError
    naming the file when it is unreadable or its threshold is not a number."""
    path = Path(model) / ANSWERING_FILE
    if not path.is_file():
        return None
    record = read_json(path)
    if not isinstance(record, dict):
        raise KdqaError(f"{path}: expected a JSON object, got a {type(record).__name__} (run `kdqa student` again)")
    value = record.get("null_threshold")
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise KdqaError(f"{path}: null_threshold must be a finite number, got {value!r} (run `kdqa student` "
                        "again, or delete the file to answer at the untuned threshold "
                        f"{UNTUNED_NULL_THRESHOLD})")
    return record


def at_threshold(params, threshold: float):
    """The params with evaluate.null_threshold resolved to a number (post-processing compares margins with it)."""
    return replace(params, evaluate=replace(params.evaluate, null_threshold=threshold))


def null_threshold_of(model: str | Path, setting: float | str | None = "auto",
                      setting_name: str = "evaluate.null_threshold") -> tuple[float, str]:
    """(threshold, where it came from) for answering with `model`: a number `setting` as it is (from
    `setting_name`); `auto` (or None) the threshold stored with the model, else UNTUNED_NULL_THRESHOLD. A
    damaged stored file is an error either way: the folder is broken for every other user of it."""
    record = read_answering(model)
    if setting not in ("auto", None):
        return float(setting), setting_name
    if record is None:
        return UNTUNED_NULL_THRESHOLD, "untuned (no threshold stored with the model)"
    return float(record["null_threshold"]), str(Path(model) / ANSWERING_FILE)
