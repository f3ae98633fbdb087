"""Stage align: the teacher's logits on the student's own features, when its tokenizer or windows differ.

When `student.model`'s tokenizer has the vocabulary data/features was tokenized with and the student's windows
(`student.max_seq_len`, `student.doc_stride`; null: the teacher's) are the teacher's, there is nothing to do:
`data/aligned/manifest.json` says `direct`, and the student trains on data/features and data/teacher as it
would without this stage (pipeline/training/student_data.py decides). Otherwise the stage tokenizes train, dev (and validation,
when data.validation names it) and the extra splits the teacher labelled (unlabeled, augmented: their examples made again exactly as prepare made them)
with the student's tokenizer and windows into `data/aligned/features/<split>/`, and writes for every student
training feature the teacher's start/end targets over the student's tokens into `data/aligned/teacher/<split>/`
(same shard names and rows as the features; pipeline/text/alignment.py says how they are made and stored). With
several teachers (teacher.models) every teacher's logits are carried onto the same student features, each into
`data/aligned/teacher/<split>/teacher-N/`, with a manifest listing them: data/teacher's layout
(pipeline/store/logits.py). The student streams those pairs exactly as it streams features and logits, extra
rows included, and combines several teachers' targets as it combines their logits.

The whole of data/aligned/ is built in a staging folder and swapped in when complete; the manifest records
the fingerprint of what it was made from (teacher logits, features, student vocabulary, windows), which the
student checks. The teacher is never run again: one teacher run serves students of any tokenizer.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Iterable, Iterator
from pathlib import Path

from pipeline import __version__
from pipeline.model.loading import check_position_table, load_tokenizer
from pipeline.params import Params
from pipeline.runtime.errors import KdqaError
from pipeline.runtime.progress import progress
from pipeline.runtime.workspace import DEV_SPLIT, UNLABELED_SPLIT, VALIDATION_SPLIT, Workspace, staged_folder
from pipeline.runtime.write_errors import writing
from pipeline.store.aligned import write_aligned_shard
from pipeline.store.features import read_windows, write_features_shard
from pipeline.store.fingerprints import check_teacher_logits
from pipeline.store.logits import read_logits, teacher_folders, teachers_manifest
from pipeline.store.shards import (
    check_format,
    features_fingerprint,
    fingerprint_of,
    list_shards,
    output_format,
    read_json,
    sha256_file,
    shard_name,
    verify_shards,
    write_json_atomic,
)
from pipeline.text.alignment import AlignStats, Window, align_example
from pipeline.text.features import check_contexts_have_tokens, check_window, features_by_example, tokenize_into
from pipeline.text.splits import DATA_CHANGED, SplitRuns, labelled_examples, labelled_source, split_runs
from pipeline.text.squad import Example
from pipeline.training.student_data import aligned, student_plan, teacher_labelled_splits

log = logging.getLogger(__name__)


def teacher_windows(features_dir: Path, logits_dir: Path) -> Iterator[tuple[str, list]]:
    """(example id, [(start logits, end logits, Window), ...]) per example, in order, one shard in memory at a
    time; an example's windows may straddle two shards."""
    current, windows = None, []
    for path in list_shards(features_dir):
        f = read_windows(path)
        logit_ids, start, end = read_logits(logits_dir / path.name)
        if f.feature_ids != logit_ids.to_pylist():
            raise KdqaError(f"{logits_dir / path.name}: rows do not match {path} (run `kdqa teacher`)")
        for i, example_id in enumerate(f.example_ids):
            if example_id != current:
                if windows:
                    yield current, windows
                current, windows = example_id, []
            windows.append((start[i], end[i], Window.of_row(f, i)))
    if windows:
        yield current, windows


def align_split(split: str, runs: Iterable[list[Example]], total: int, tokenizer, params: Params,
                features_out: Path, targets_outs: list[Path], teachers: list[Iterator[tuple[str, list]]],
                source, teacher_features: Path) -> tuple[list[AlignStats], list[dict], float]:
    """One training split's student features and each teacher's aligned targets on them, written side by side in
    shards of `shard_size` (teacher k's into `targets_outs[k]`); `runs`: its examples in the order prepare
    tokenized them for the teachers (`teachers`: each one's windows, from `teacher_windows`, over
    `teacher_features`). Returns each teacher's stats, the shards and the seconds it took."""
    p, started = params.prepare, time.perf_counter()
    stats = [AlignStats() for _ in teachers]
    features_out.mkdir(parents=True)
    for out in targets_outs:
        out.mkdir(parents=True)
    features, targets, shards = [], [[] for _ in teachers], []

    def flush():
        name = shard_name(len(shards))
        write_features_shard(features, features_out / name, p.row_group_size)
        for out, rows in zip(targets_outs, targets):
            write_aligned_shard(out / name, [f["feature_id"] for f in features], rows, p.row_group_size)
            rows.clear()
        shards.append({"name": name, "rows": len(features)})
        features.clear()

    with progress(total=total, desc=f"align {split}", unit="ex") as bar:
        for examples in runs:
            for ex, own in features_by_example(tokenizer, examples, p):
                windows = [(Window.of(f), len(f["input_ids"])) for f in own]
                aligned = [align_example(example_windows(teacher, ex, source, teacher_features), windows)
                           for teacher in teachers]
                for k, feature in enumerate(own):
                    features.append(feature)
                    for rows, teacher_stats, teacher_targets in zip(targets, stats, aligned):
                        rows.append(teacher_targets[k])
                        teacher_stats.add(teacher_targets[k])
                    if len(features) == p.shard_size:
                        flush()
                bar.update(1)
    if features:
        flush()
    for teacher in teachers:
        leftover = next(teacher, None)
        if leftover is not None:
            raise KdqaError(f"{teacher_features}: holds example {leftover[0]!r} that {source} does not: {DATA_CHANGED}")
    return stats, shards, time.perf_counter() - started


def example_windows(teacher: Iterator[tuple[str, list]], ex: Example, source, teacher_features: Path) -> list:
    """A teacher's windows of `ex`, the next example of `teacher` (which must be it)."""
    example_id, windows = next(teacher, (None, None))
    if example_id != ex.id:
        raise KdqaError(f"{teacher_features}: holds example {example_id!r} where {source} has {ex.id!r}: {DATA_CHANGED}")
    return windows


def write_features_manifest(features_out: Path, shards: list[dict], base: dict) -> str:
    """The student's features manifest (as prepare writes it); returns the features' fingerprint."""
    for entry in shards:
        entry["sha256"] = sha256_file(features_out / entry["name"])
    features_fp = features_fingerprint(features_out)
    write_json_atomic(features_out / "manifest.json", {**base, "features_format": output_format("features"),
                                                       "features": sum(e["rows"] for e in shards),
                                                       "fingerprint": features_fp, "shards": shards})
    return features_fp


def write_targets_manifest(split: str, targets_out: Path, shards: list[dict], features_fp: str, teacher_fp: str) -> dict:
    """One teacher's targets manifest (as the teacher stage writes its logits'); returns it."""
    parts = {"features": features_fp, "teacher_logits": teacher_fp, "logits_format": output_format("logits"),
             "aligned_format": output_format("aligned")}
    target_shards = [{"name": e["name"], "rows": e["rows"], "sha256": sha256_file(targets_out / e["name"])}
                     for e in shards]
    manifest = {
        "kdqa_version": __version__, "split": split, "fingerprint": fingerprint_of(parts),
        "fingerprint_parts": parts, "rows": sum(e["rows"] for e in shards),
        "bytes": sum((targets_out / e["name"]).stat().st_size for e in shards), "shards": target_shards,
    }
    write_json_atomic(targets_out / "manifest.json", manifest)
    return manifest


def write_manifests(split: str, features_out: Path, targets_out: Path, shards: list[dict], base: dict,
                    logits_dir: Path, teacher_fp: str) -> None:
    """The features manifest and the targets manifests: of the one teacher, or of each teacher's folder and the
    split folder listing them (the layout of data/teacher/<split>/, pipeline/store/logits.py)."""
    features_fp = write_features_manifest(features_out, shards, base)
    folders = teacher_folders(logits_dir)
    if folders == [logits_dir]:
        write_targets_manifest(split, targets_out, shards, features_fp, teacher_fp)
        return
    entries = []
    for folder, teacher in zip(folders, read_json(logits_dir / "manifest.json")["teachers"]):
        made = write_targets_manifest(split, targets_out / folder.name, shards, features_fp,
                                      read_json(folder / "manifest.json")["fingerprint"])
        entries.append({"model": teacher.get("model"), "folder": folder.name, "fingerprint": made["fingerprint"]})
    parts = {"features": features_fp, "teacher_logits": teacher_fp, "logits_format": output_format("logits"),
             "aligned_format": output_format("aligned")}
    write_json_atomic(targets_out / "manifest.json",
                      teachers_manifest(split, parts, entries, sum(e["rows"] for e in shards)))


def run_align(params: Params, ws: Workspace) -> None:
    s = params.student
    tokenizer = load_tokenizer(s.model, s.trust_remote_code)  # a slow tokenizer (no offsets) stops here
    features_dir, logits_dir = ws.features / "train", ws.teacher / "train"
    features_manifest = verify_shards(features_dir, "kdqa prepare")
    check_format(features_manifest.get("features_format"), "features", features_dir, "kdqa prepare")
    parts = {**student_plan(params, tokenizer, features_manifest), "features": features_manifest["bytes_fingerprint"]}
    if parts["mode"] == "aligned":
        parts["teacher_logits"] = check_teacher_logits(features_dir, parts["features"], logits_dir)
        parts["extra_splits"] = {}
        for split in teacher_labelled_splits(ws):  # what the student may mix in: carried onto its tokens as well
            manifest = verify_shards(ws.features / split, "kdqa prepare")
            parts["extra_splits"][split] = {"features": manifest["bytes_fingerprint"], "teacher_logits":
                                            check_teacher_logits(ws.features / split, manifest["bytes_fingerprint"],
                                                                 ws.teacher / split)}
        parts["max_query_len"] = params.prepare.max_query_len
        parts["aligned_format"] = output_format("aligned")
    manifest = {"kdqa_version": __version__, "mode": parts["mode"], "student": s.model,
                "fingerprint": fingerprint_of(parts), "fingerprint_parts": parts}
    with writing(ws.aligned), staged_folder(ws.aligned) as staging:
        if parts["mode"] == "aligned":
            manifest.update(align_splits(params, ws, tokenizer, parts, staging))  # per split: what was aligned
        else:
            log.info("student %s shares the teacher's tokenizer and windows: it trains on %s and %s as they are",
                     s.model, ws.features, ws.teacher)
        write_json_atomic(staging / "manifest.json", manifest)


def align_splits(params: Params, ws: Workspace, tokenizer, parts: dict, staging: Path) -> dict:
    """Student features of train, of the extra splits the teacher labelled (unlabeled, augmented) and of dev, and
    the training splits' aligned targets (one folder per teacher when there are several), under `staging`.
    Returns what was aligned, per training split."""
    student_windows = dataclasses.replace(params.prepare, max_seq_len=parts["max_seq_len"],
                                          doc_stride=parts["doc_stride"])
    student_params = dataclasses.replace(params, prepare=student_windows)
    check_window(student_params, tokenizer, section="student")
    check_position_table(params.student.model, parts["max_seq_len"], params.student.trust_remote_code,
                         key="student.max_seq_len (null: prepare.max_seq_len)")
    base = {"kdqa_version": __version__, "tokenizer": params.student.model, "vocab_fingerprint": parts["student_vocab"],
            "prepare": {k: v for k, v in vars(student_windows).items()
                        if k != "strict" and not k.startswith("augment_")}}  # as prepare's manifest_base
    data = params.data
    # the scored splits: dev, and validation (data.validation) where the student's no-answer threshold is chosen
    scored = [DEV_SPLIT] + ([VALIDATION_SPLIT] if data.validation else [])
    loaded = {split: labelled_examples(split, params) for split in ("train", *scored)}
    splits = {"train": (split_runs("train", params, ws.features / "train", loaded["train"]), parts["teacher_logits"])}
    for split, made in parts["extra_splits"].items():
        splits[split] = (split_runs(split, params, ws.features / split, loaded["train"]), made["teacher_logits"])
    for split, (runs, _) in splits.items():
        if split in ("train", UNLABELED_SPLIT):  # augmented views are cut from train's contexts
            for examples in runs.runs:
                check_contexts_have_tokens(tokenizer, examples, runs.source)
    for split in scored:
        check_contexts_have_tokens(tokenizer, loaded[split], labelled_source(split, params))
    summary = {}
    for split, (runs, teacher_fp) in splits.items():
        summary[split] = align_split_into(staging, split, runs, teacher_fp, tokenizer, student_params, ws, base)
    for split in scored:
        out = staging / aligned(ws).dev_features.parent.relative_to(ws.aligned) / split
        out.mkdir(parents=True)
        tokenize_into(out, [loaded[split]], tokenizer, student_params, split,
                      {**base, "split": split, "source": labelled_source(split, params)}, total=len(loaded[split]))
    return summary


def align_split_into(staging: Path, split: str, runs: SplitRuns, teacher_fp: str, tokenizer, student_params: Params,
                     ws: Workspace, base: dict) -> dict:
    """One training split aligned under `staging`, every teacher's logits onto the student's features, with its
    manifests; returns what was aligned (logged)."""
    features_out, targets_out = (staging / path.relative_to(ws.aligned) for path in aligned(ws).split(split))
    logits_dir = ws.teacher / split
    folders = teacher_folders(logits_dir)
    several = folders != [logits_dir]
    targets_outs = [targets_out / folder.name for folder in folders] if several else [targets_out]
    stats, shards, seconds = align_split(split, runs.runs, runs.total, tokenizer, student_params, features_out,
                                         targets_outs, [teacher_windows(ws.features / split, f) for f in folders],
                                         runs.source, ws.features / split)
    write_manifests(split, features_out, targets_out, shards,
                    {**base, **runs.manifest_keys, "split": split, "source": runs.source, "examples": runs.total},
                    logits_dir, teacher_fp)
    features = stats[0].features
    target_bytes = sum(p.stat().st_size for p in targets_out.rglob("part-*.parquet")) / max(features, 1)
    if not several:
        log.info("%s: aligned %d student features in %.1fs (%d pieced from two teacher windows or more, mean "
                 "covered mass %.4f, %.0f bytes/feature of targets)", split, features, seconds, stats[0].pieced,
                 stats[0].mean_covered, target_bytes)
        return {"features": features, "seconds": round(seconds, 2), "pieced": stats[0].pieced,
                "mean_covered": round(stats[0].mean_covered, 6), "target_bytes_per_feature": round(target_bytes, 1)}
    log.info("%s: aligned %d student features for each of %d teachers in %.1fs (%.0f bytes/feature of targets): %s",
             split, features, len(folders), seconds, target_bytes,
             "; ".join(f"{f.name}: {t.pieced} pieced from two of its windows or more, mean covered mass "
                       f"{t.mean_covered:.4f}" for f, t in zip(folders, stats)))
    return {"features": features, "seconds": round(seconds, 2), "target_bytes_per_feature": round(target_bytes, 1),
            "teachers": {f.name: {"pieced": t.pieced, "mean_covered": round(t.mean_covered, 6)}
                         for f, t in zip(folders, stats)}}
