"""`kdqa inspect`: what is in a folder of logits (or features) shards, and how confident the teacher is."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from pipeline.runtime.errors import KdqaError
from pipeline.text.features import NO_LABEL
from pipeline.runtime.workspace import Workspace
from pipeline.store.features import read_labels
from pipeline.model.ensemble import Combination, combine_rows
from pipeline.store.logits import is_logits_shard, read_logits, teacher_folders
from pipeline.store.shards import features_fingerprint, list_shards, read_json, shard_rows

log = logging.getLogger(__name__)

def _entropy(logits: np.ndarray) -> float:
    z = logits - logits.max()
    p = np.exp(z) / np.exp(z).sum()
    return float(-(p * np.log(np.maximum(p, 1e-12))).sum())


def inspect_folder(folder: Path, ws: Workspace, features_dir: Path | None = None) -> dict:
    folders = teacher_folders(folder) if list_shards(folder) == [] else [folder]
    if len(folders) > 1:
        return inspect_ensemble(folder, folders, ws, features_dir)
    shards = list_shards(folder)
    if not shards:
        raise KdqaError(f"{folder}: no part-NNNNN.parquet shards")
    manifest = read_json(folder / "manifest.json") if (folder / "manifest.json").exists() else {}
    info = {
        "folder": str(folder),
        "shards": len(shards),
        "rows": sum(shard_rows(p) for p in shards),
        "bytes": sum(p.stat().st_size for p in shards),
        "fingerprint": manifest.get("fingerprint"),
    }
    info["bytes_per_row"] = round(info["bytes"] / max(info["rows"], 1), 1)
    if not is_logits_shard(shards[0]):
        return info
    if features_dir is None:
        features_dir = features_of(folder, manifest, ws)
    if not features_match(folder, manifest, features_dir, info):
        return info
    info.update(accuracy(shards, features_dir, read_logits, "teacher"))
    info.update(teacher_features_per_second=manifest.get("features_per_second"), device=manifest.get("device"))
    if manifest.get("carried"):  # a teacher of another tokenizer: its distributions carried onto these tokens
        info["carried"] = {k: manifest["carried"].get(k) for k in ("tokenizer", "features_pieced", "mean_covered")}
    return info


def features_of(folder: Path, manifest: dict, ws: Workspace) -> Path:
    """The features a logits folder was made for: aligned targets sit beside the student's own features, logits
    beside prepare's; a teacher's folder of an ensemble (data/teacher/train/teacher-1) is of the split its manifest
    names."""
    aligned = ws.aligned_targets.resolve() in folder.resolve().parents
    return (ws.aligned_features if aligned else ws.features) / manifest.get("split", folder.name)


def features_match(folder: Path, manifest: dict, features_dir: Path, info: dict) -> bool:
    """Whether the logits of `folder` were computed for the features in `features_dir` (and there are some)."""
    if not list_shards(features_dir):
        return False
    made_for = manifest.get("fingerprint_parts", {}).get("features")
    if made_for is not None and made_for != features_fingerprint(features_dir):
        # Same ids can hold other tokens after a re-prepare: accuracy against these labels would mean nothing.
        log.warning("%s: logits were computed for other features than %s now holds (run `kdqa teacher`); "
                    "no teacher accuracy or entropy", folder, features_dir)
        info["features_match"] = False
        return False
    return True


def inspect_ensemble(folder: Path, folders: list[Path], ws: Workspace, features_dir: Path | None) -> dict:
    """A split folder of several teachers: each teacher's folder described, and the accuracy of their ensemble
    (the equal-weight mean of their probabilities, as `kdqa evaluate` scores it)."""
    manifest = read_json(folder / "manifest.json")
    features_dir = features_of(folder, manifest, ws) if features_dir is None else features_dir
    teachers = {sub.name: {"model": entry.get("model"), **inspect_folder(sub, ws, features_dir)}
                for sub, entry in zip(folders, manifest["teachers"])}
    info = {"folder": str(folder), "teachers": len(folders), "fingerprint": manifest.get("fingerprint"),
            "rows": manifest.get("rows"), "bytes": sum(t["bytes"] for t in teachers.values()), **teachers}
    if not features_match(folder, manifest, features_dir, info):
        return info
    combination = Combination.equal(len(folders))

    def combined(shard: Path):
        read = [read_logits(sub / shard.name) for sub in folders]
        windows = read_labels(features_dir / shard.name)
        return read[0][0], *(combine_rows([r[side] for r in read], windows.context_start, windows.context_end,
                                          combination) for side in (1, 2))

    scores = accuracy(list_shards(folders[0]), features_dir, combined, "ensemble")
    info.update({k: v for k, v in scores.items() if k.startswith("ensemble_") and "accuracy" in k})
    return info


def accuracy(shards: list[Path], features_dir: Path, read, name: str) -> dict:
    """Accuracy against the hard labels (rows that have one) of the logits `read(shard)` gives for each shard,
    and the entropy of its distributions over the positions that can hold an answer (every row)."""
    hits_start = hits_both = n = labelled = 0
    entropies = {"start": [], "end": []}
    for shard in shards:
        logit_ids, start_logits, end_logits = read(shard)
        labels = read_labels(features_dir / shard.name)
        if logit_ids != labels.feature_ids:
            raise KdqaError(f"{shard}: feature ids do not match {features_dir / shard.name}")
        # Aligned targets hold NaN where no teacher window saw a token: no mass there.
        starts = [np.nan_to_num(x, nan=-np.inf) for x in start_logits]
        ends = [np.nan_to_num(x, nan=-np.inf) for x in end_logits]
        context_start, context_end = labels.context_start, labels.context_end
        gold_start, gold_end = labels.start_positions, labels.end_positions
        for i in range(len(starts)):
            allowed = np.r_[0, np.arange(context_start[i], context_end[i] + 1)]
            predicted_start = allowed[np.argmax(starts[i][allowed])]
            predicted_end = allowed[np.argmax(ends[i][allowed])]
            if gold_start[i] != NO_LABEL:
                labelled += 1
                hits_start += predicted_start == gold_start[i]
                hits_both += (predicted_start == gold_start[i]) and (predicted_end == gold_end[i])
            entropies["start"].append(_entropy(starts[i][allowed]))
            entropies["end"].append(_entropy(ends[i][allowed]))
            n += 1
    return {
        "labelled_rows": labelled,
        f"{name}_start_accuracy": round(100 * hits_start / labelled, 2) if labelled else None,
        f"{name}_span_accuracy": round(100 * hits_both / labelled, 2) if labelled else None,
        "start_entropy_mean": round(float(np.mean(entropies["start"])), 3),
        "end_entropy_mean": round(float(np.mean(entropies["end"])), 3),
    }
