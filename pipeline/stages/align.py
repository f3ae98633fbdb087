"""Stage align: the teacher's logits on the student's own features, when its tokenizer or windows differ.

When `student.model`'s tokenizer has the vocabulary data/features was tokenized with and the student's windows
(`student.max_seq_len`, `student.doc_stride`; null: the teacher's) are the teacher's, there is nothing to do:
`data/aligned/manifest.json` says `direct`, and the student trains on data/features and data/teacher as it
would without this stage (pipeline/training/student_data.py decides). Otherwise the stage tokenizes train, dev (and validation,
when data.validation names it) and the extra splits the teacher labelled (unlabeled, augmented: their examples made again exactly as prepare made them)
with the student's tokenizer and windows into `data/aligned/features/<split>/`, and writes for every student
training feature the teacher's start/end targets over the student's tokens into `data/aligned/teacher/<split>/`
(same shard names and rows as the features; pipeline/text/alignment.py says how they are made and stored). The
student streams those pairs exactly as it streams features and logits, extra rows included.

The whole of data/aligned/ is built in a staging folder and swapped in when complete; the manifest records
the fingerprint of what it was made from (teacher logits, features, student vocabulary, windows), which the
student checks. The teacher is never run again: one teacher run serves students of any tokenizer.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path


from pipeline import __version__
from pipeline.text.alignment import Window, align_example
from pipeline.runtime.errors import KdqaError
from pipeline.text.features import check_contexts_have_tokens, tokenize_examples
from pipeline.store.fingerprints import check_teacher_logits
from pipeline.model.loading import check_position_table, load_tokenizer
from pipeline.params import Params
from pipeline.runtime.workspace import DEV_SPLIT, UNLABELED_SPLIT, VALIDATION_SPLIT, Workspace, staged_folder
from pipeline.text.augment import AugmentReport
from pipeline.text.augment import augmented_runs
from pipeline.text.features import TOKENIZE_CHUNK, check_window, tokenize_into
from pipeline.runtime.progress import progress
from pipeline.store.aligned import write_aligned_shard
from pipeline.store.features import read_windows, write_features_shard
from pipeline.store.logits import read_logits, teacher_folders
from pipeline.store.shards import (
    check_format,
    features_fingerprint,
    fingerprint_of,
    list_shards,
    output_format,
    sha256_file,
    shard_name,
    verify_shards,
    write_json_atomic,
)
from pipeline.text.squad import Example, load_examples
from pipeline.training.student_data import aligned, student_plan, teacher_labelled_splits
from pipeline.text.unlabeled import load_unlabeled
from pipeline.runtime.write_errors import writing

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
            windows.append((start[i], end[i], Window(f.offset_start[i], f.offset_end[i], int(f.context_start[i]),
                                                     int(f.context_end[i]))))
    if windows:
        yield current, windows


def student_features(tokenizer, examples: list[Example], params: Params) -> Iterator[tuple[Example, list[dict]]]:
    """(example, its student features) in order, tokenized `TOKENIZE_CHUNK` examples at a time."""
    p = params.prepare
    for i in range(0, len(examples), TOKENIZE_CHUNK):
        chunk = examples[i : i + TOKENIZE_CHUNK]
        by_example: dict[str, list[dict]] = {ex.id: [] for ex in chunk}
        for feature in tokenize_examples(tokenizer, chunk, p.max_seq_len, p.doc_stride, p.max_query_len):
            by_example[feature["example_id"]].append(feature)
        for ex in chunk:
            yield ex, by_example[ex.id]


@dataclass
class AlignStats:
    features: int = 0
    pieced: int = 0  # student features whose targets came from more than one teacher window
    covered: float = 0.0  # sum over features of the mean start/end covered mass
    seconds: float = 0.0


def align_split(split: str, runs: Iterable[list[Example]], total: int, tokenizer, params: Params,
                features_out: Path, targets_out: Path, teacher: Iterator[tuple[str, list]],
                source, teacher_features: Path) -> tuple[AlignStats, list[dict]]:
    """One training split's student features and their aligned targets, written side by side in shards of
    `shard_size`; `runs`: its examples in the order prepare tokenized them for the teacher (`teacher`: its
    windows, from `teacher_windows`, over `teacher_features`)."""
    p, stats, started = params.prepare, AlignStats(), time.perf_counter()
    features_out.mkdir(parents=True)
    targets_out.mkdir(parents=True)
    features, targets, shards = [], [], []

    def flush():
        name = shard_name(len(shards))
        write_features_shard(features, features_out / name, p.row_group_size)
        write_aligned_shard(targets_out / name, [f["feature_id"] for f in features], targets, p.row_group_size)
        shards.append({"name": name, "rows": len(features)})
        features.clear()
        targets.clear()

    changed = "the data changed since `kdqa prepare`; run it (and `kdqa teacher`) again"
    with progress(total=total, desc=f"align {split}", unit="ex") as bar:
        for examples in runs:
            for ex, own in student_features(tokenizer, examples, params):
                example_id, windows = next(teacher, (None, None))
                if example_id != ex.id:
                    raise KdqaError(f"{teacher_features}: holds example {example_id!r} where {source} has "
                                    f"{ex.id!r}: {changed}")
                aligned = align_example(windows, [(Window.of(f), len(f["input_ids"])) for f in own])
                for feature, target in zip(own, aligned):
                    features.append(feature)
                    targets.append(target)
                    stats.features += 1
                    stats.pieced += target.teacher_windows > 1
                    stats.covered += (target.start_covered + target.end_covered) / 2
                    if len(features) == p.shard_size:
                        flush()
                bar.update(1)
    if features:
        flush()
    leftover = next(teacher, None)
    if leftover is not None:
        raise KdqaError(f"{teacher_features}: holds example {leftover[0]!r} that {source} does not: {changed}")
    stats.seconds = time.perf_counter() - started
    return stats, shards


def write_manifests(split: str, features_out: Path, targets_out: Path, shards: list[dict], base: dict,
                    teacher_fp: str) -> None:
    """The features manifest (as prepare writes it) and the targets manifest (as the teacher writes it)."""
    for entry in shards:
        entry["sha256"] = sha256_file(features_out / entry["name"])
    rows = sum(e["rows"] for e in shards)
    features_fp = features_fingerprint(features_out)
    write_json_atomic(features_out / "manifest.json", {**base, "features_format": output_format("features"),
                                                       "features": rows, "fingerprint": features_fp, "shards": shards})
    parts = {"features": features_fp, "teacher_logits": teacher_fp, "logits_format": output_format("logits"),
             "aligned_format": output_format("aligned")}
    target_shards = [{"name": e["name"], "rows": e["rows"], "sha256": sha256_file(targets_out / e["name"])}
                     for e in shards]
    write_json_atomic(targets_out / "manifest.json", {
        "kdqa_version": __version__, "split": split, "fingerprint": fingerprint_of(parts),
        "fingerprint_parts": parts, "rows": rows,
        "bytes": sum((targets_out / e["name"]).stat().st_size for e in shards), "shards": target_shards,
    })


def run_align(params: Params, ws: Workspace) -> None:
    s = params.student
    tokenizer = load_tokenizer(s.model, s.trust_remote_code)  # a slow tokenizer (no offsets) stops here
    features_dir, logits_dir = ws.features / "train", ws.teacher / "train"
    features_manifest = verify_shards(features_dir, "kdqa prepare")
    check_format(features_manifest.get("features_format"), "features", features_dir, "kdqa prepare")
    parts = {**student_plan(params, tokenizer, features_manifest), "features": features_manifest["bytes_fingerprint"]}
    if parts["mode"] == "aligned":
        teachers = len(teacher_folders(logits_dir))
        if teachers > 1:  # each teacher's logits would need carrying over, and the stream combining them: not yet
            raise KdqaError(f"{logits_dir}: holds the logits of {teachers} teachers (teacher.models), and carrying "
                            f"several teachers' logits onto a student of another tokenizer or other windows is not "
                            f"supported yet: give the student the teachers' tokenizer, with student.max_seq_len and "
                            f"student.doc_stride null")
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
    the training splits' aligned targets, under `staging`. Returns what was aligned, per training split."""
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
    scored = [(DEV_SPLIT, data.dev)] + ([(VALIDATION_SPLIT, data.validation)] if data.validation else [])
    loaded = {split: load_examples(source, split, strict=params.prepare.strict)[0]
              for split, source in (("train", data.train), *scored)}
    splits = {"train": ([loaded["train"]], len(loaded["train"]), data.train, {}, parts["teacher_logits"])}
    for split, made in parts["extra_splits"].items():
        splits[split] = extra_split_runs(split, params, ws, loaded["train"]) + (made["teacher_logits"],)
    for split, (runs, _, source, _, _) in splits.items():
        if split in ("train", UNLABELED_SPLIT):  # augmented views are cut from train's contexts
            for examples in runs:
                check_contexts_have_tokens(tokenizer, examples, source)
    for split, source in scored:
        check_contexts_have_tokens(tokenizer, loaded[split], source)
    summary = {}
    for split, (runs, total, source, extra_keys, teacher_fp) in splits.items():
        student_data = aligned(ws).split(split)
        features_out, targets_out = (staging / path.relative_to(ws.aligned) for path in student_data)
        teacher = teacher_windows(ws.features / split, ws.teacher / split)
        stats, shards = align_split(split, runs, total, tokenizer, student_params, features_out, targets_out,
                                    teacher, source, ws.features / split)
        write_manifests(split, features_out, targets_out, shards,
                        {**base, **extra_keys, "split": split, "source": source, "examples": total}, teacher_fp)
        target_bytes = sum(p.stat().st_size for p in list_shards(targets_out))
        log.info("%s: aligned %d student features in %.1fs (%d pieced from two teacher windows or more, mean "
                 "covered mass %.4f, %.0f bytes/feature of targets)", split, stats.features, stats.seconds,
                 stats.pieced, stats.covered / max(stats.features, 1), target_bytes / max(stats.features, 1))
        summary[split] = {"features": stats.features, "seconds": round(stats.seconds, 2), "pieced": stats.pieced,
                          "mean_covered": round(stats.covered / max(stats.features, 1), 6),
                          "target_bytes_per_feature": round(target_bytes / max(stats.features, 1), 1)}
    for split, source in scored:
        out = staging / aligned(ws).dev_features.parent.relative_to(ws.aligned) / split
        out.mkdir(parents=True)
        tokenize_into(out, [loaded[split]], tokenizer, student_params, split,
                      {**base, "split": split, "source": source}, total=len(loaded[split]))
    return summary


def extra_split_runs(split: str, params: Params, ws: Workspace, train: list[Example]) -> tuple[Iterable[list[Example]], int, object, dict]:
    """An extra split's examples as prepare made them: (runs, examples, source, manifest keys). Unlabeled: one run
    per file of data.unlabeled; augmented: one run per view number, made again from train (deterministic)."""
    data = params.data
    if split == UNLABELED_SPLIT:
        if not data.unlabeled:
            raise KdqaError(f"{ws.features / split}: made from unlabeled files data.unlabeled no longer lists: "
                            "run `kdqa prepare` (and `kdqa teacher`) again")
        runs = [load_unlabeled(source)[0] for source in data.unlabeled]
        return runs, sum(map(len, runs)), list(data.unlabeled), {}
    if not params.prepare.augment_views:
        raise KdqaError(f"{ws.features / split}: made from augmented views, but prepare.augment_views is 0: "
                        "run `kdqa prepare` (and `kdqa teacher`) again")
    settings = {k: v for k, v in vars(params.prepare).items() if k.startswith("augment_")}
    total = params.prepare.augment_views * len(train)
    return augmented_runs(train, params, AugmentReport()), total, data.train, {"augment": settings}
