"""Stage 2, teacher: run the teacher once over every features shard and write its logits as Parquet.

For each `data/features/{split}/part-NNNNN.parquet` it writes `data/teacher/{split}/part-NNNNN.parquet`
with the same rows in the same order: `feature_id`, `start_logits`, `end_logits` (float16, real tokens
only). `manifest.json` beside them records the fingerprint of what the logits depend on (features,
teacher weights, vocabulary, precision) and each shard's rows and checksum. The teacher runs under
`torch.inference_mode` with autocast in `teacher.precision` (auto: bfloat16 on CUDA and on CPUs with native
bfloat16, float32 elsewhere).

The teacher's own dev scores (`metrics/teacher.json`) are computed from the dev logits by `kdqa evaluate`,
with the same post-processing settings as the student's, so `evaluate.*` params never rerun the teacher.

Crash safety: shards are computed into a work folder outside the DVC output (`.kdqa/teacher-work/`), each
renamed into place when complete and followed by a small `.done.json` record (rows, sha256). A rerun
verifies the records and computes only what is missing; when every shard is done the split is moved into
`data/teacher/{split}/` and the manifest written. Under torchrun, rank r takes shards r, r+N, r+2N, ...

Several teachers (`teacher.models`): each is loaded in turn (one in memory at a time) and labels every split
into its own work folder (`.kdqa/teacher-work/teacher-N/`); the splits are published only when every teacher
is done, each teacher's logits in `data/teacher/{split}/teacher-N/` (pipeline/store/logits.py). A teacher's
logits do not depend on the others: adding one to a finished run copies the others' shards from the logits
cache below, byte for byte, and computes only the new teacher's (the log says which).

A teacher whose tokenizer is not teacher.models[0]'s (the features were tokenized with that one) is carried onto
the features: it reads its own windows of the same examples, and its distributions are aligned onto the features'
windows through characters, as `kdqa align` does for a student (pipeline/model/carried.py). Its folder holds the
aligned log-probabilities in the logits format (NaN where none of its windows saw a position) and its manifest
says `carried` (tokenizer, vocabulary, alignment stats). Every teacher's tokenizer is checked before any teacher
runs, so one that cannot be carried stops the stage at once.

Incremental: every computed shard is also kept in `.kdqa/teacher-cache/`, addressed by its features shard's
bytes, the teacher, the vocabulary, the precision and the logits format (pipeline/store/logits_cache.py). A shard
found there is copied instead of computed, so adding an unlabeled file or more augmented views costs teacher
time for the new shards only, and the existing logits stay byte for byte the same.
"""

from __future__ import annotations

import functools
import logging
import shutil
import time
from dataclasses import dataclass
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from pipeline import __version__

from pipeline.training import distributed
from pipeline.runtime.errors import KdqaError
from pipeline.model.loading import (
    check_sequence_length,
    TRAINED,
    load_qa_model,
    load_tokenizer,
    vocab_fingerprint,
    weights_fingerprint,
)
from pipeline.model.carried import CarriedTeacher, check_carriable, shard_key
from pipeline.params import Params
from pipeline.store.logits_cache import LogitsCache
from pipeline.runtime.workspace import EXTRA_SPLITS, Workspace, staged_folder
from pipeline.model.inference import autocast_dtype, features_logits, precision_name, shard_logits
from pipeline.runtime.progress import progress
from pipeline.runtime.write_errors import writes_into
from pipeline.store import logits as logits_format
from pipeline.store.shards import (
    check_format,
    fingerprint_of,
    list_shards,
    output_format,
    read_json,
    sha256_file,
    shard_rows,
    verify_shards,
    write_json_atomic,
)
from pipeline.text.alignment import AlignStats
from pipeline.text.splits import ShardedExamples, examples_by_split

log = logging.getLogger(__name__)


def done_record_path(path: Path) -> Path:
    return path.with_name(path.name + ".done.json")


def completed_shard(work: Path, name: str, resume_key: dict, rows: int | None = None) -> dict | None:
    """The record of a shard finished by an earlier (maybe crashed) run, if it is whole and made with `resume_key`.

    Whole means: the record is readable, was made with the same key (features, teacher, vocabulary,
    compute), the shard's bytes have the recorded sha256 and, when `rows` is given, it has that many rows.
    Anything else is recomputed (a record is written only after its shard, so a crash between the two
    just recomputes that shard).
    """
    shard, record_path = work / name, done_record_path(work / name)
    if not (shard.exists() and record_path.exists()):
        return None
    try:
        record = read_json(record_path)
    except KdqaError:
        log.warning("%s: unreadable done record; recomputing the shard", record_path)
        return None
    if not isinstance(record, dict) or record.get("key") != resume_key:
        return None  # made for other features or another teacher: not ours to reuse
    if record.get("sha256") != sha256_file(shard) or (rows is not None and record.get("rows") != rows):
        log.warning("%s: does not match its done record (corrupted?); recomputing it", shard)
        return None
    return record


def remove_stale_temporaries(work: Path, names: list[str]) -> None:
    """Half-written files a killed run left behind (`.part-NNNNN.parquet.tmp-PID`), for our shards only."""
    for name in names:
        for stale in work.glob(f".{name}*.tmp-*"):
            stale.unlink(missing_ok=True)


@dataclass
class Teacher:
    """One teacher, loaded: what labels the shards of every split."""

    model: object
    tokenizer: object
    identity: dict  # its weights' and vocabulary's fingerprints
    carried: CarriedTeacher | None = None  # a tokenizer other than the features': carried onto their tokens


@dataclass
class ComputedSplit:
    """One teacher's logits of one split, computed (or found) in its work folder: what publishing needs."""

    split: str
    shards: list[Path]  # the features shards, whose names the logits shards take
    work: Path
    resume_key: dict
    fingerprint_parts: dict
    throughput: float | None
    computed: int  # shards this rank computed now (the rest: a finished earlier run's, or the logits cache's)
    carried: dict | None = None  # a carried teacher's tokenizer and vocabulary (its manifest says so)


def compute_split(teacher: Teacher, split: str, params: Params, ws: Workspace, device: torch.device, work: Path,
                  examples: ShardedExamples | None = None) -> ComputedSplit:
    """Compute this rank's missing shards of a split into `work` (shards already there, or in the logits cache,
    are not computed again). `examples`: the split's, by features shard (a carried teacher reads them with its
    own tokenizer)."""
    rank, world = distributed.rank(), distributed.world_size()
    features_dir = ws.features / split
    shards = list_shards(features_dir)
    if not shards:
        raise KdqaError(f"{features_dir}: no feature shards (run `kdqa prepare`)")
    features_manifest = verify_shards(features_dir, "kdqa prepare")  # intact features, or a named error
    check_format(features_manifest.get("features_format"), "features", features_dir, "kdqa prepare")
    dtype = autocast_dtype(device, params.teacher.precision)
    precision = precision_name(dtype)
    fingerprint_parts, cache_parts, shard_keys = logits_identity(teacher, features_dir, features_manifest, precision,
                                                                 examples)
    resume_key = {**fingerprint_parts, "compute": f"{device.type}-{precision}"}

    # Whether to run at all is DVC's decision (the stage's deps); a run by hand computes what the logits cache
    # does not hold, and copies the rest.
    work.mkdir(parents=True, exist_ok=True)
    expected_rows = {e["name"]: e["rows"] for e in features_manifest["shards"]}
    mine = [p for i, p in enumerate(shards) if i % world == rank]
    remove_stale_temporaries(work, [p.name for p in mine])
    todo = [p for p in mine if completed_shard(work, p.name, resume_key, expected_rows.get(p.name)) is None]
    if len(todo) < len(mine):
        log.info("%s: resuming, %d of %d shards already done", split, len(mine) - len(todo), len(mine))
    # Shards whose features this teacher has labelled before (in any run here) are copied, not computed.
    cache = LogitsCache(ws.teacher_cache, cache_parts)
    cached = [p for p in todo if reuse_cached(cache, shard_keys[p.name], expected_rows[p.name], work / p.name, resume_key)]
    todo = [p for p in todo if p not in cached]
    log.info("%s: %d of %d shards to compute, %d copied from the logits cache (%s)%s", split, len(todo), len(mine),
             len(cached), ws.teacher_cache, f" on rank {rank}" if world > 1 else "")

    n_rows, started = 0, time.perf_counter()
    todo_rows = sum(expected_rows.get(p.name, 0) for p in todo)
    bar = progress(total=todo_rows, desc=f"teacher {split}" + (f" (rank 0 of {world})" if world > 1 else ""),
                   unit="feat", enabled=rank == 0)
    with ThreadPoolExecutor(max_workers=1) as writer, bar:
        pending = None
        for path in todo:
            ids, start, end, details = label_shard(teacher, path, params, device, dtype, examples)
            if pending is not None:
                pending.result()  # at most one shard waiting to be written: bounded memory
            # Writing shard k (compression, fsync) overlaps the teacher's compute on shard k+1.
            pending = writer.submit(write_logits_shard, work / path.name, ids, start, end, resume_key, cache,
                                    shard_keys[path.name], details)
            n_rows += len(ids)
            bar.update(len(ids))  # tqdm shows features/s
        if pending is not None:
            pending.result()
    elapsed = time.perf_counter() - started
    throughput = n_rows / elapsed if n_rows else None
    distributed.barrier()
    carried = None if teacher.carried is None else {"tokenizer": teacher.carried.name,
                                                    "vocab_fingerprint": teacher.identity["vocab"]}
    return ComputedSplit(split, shards, work, resume_key, fingerprint_parts, throughput, len(todo), carried)


def logits_identity(teacher: Teacher, features_dir: Path, features_manifest: dict, precision: str,
                    examples: ShardedExamples | None) -> tuple[dict, dict, dict[str, str]]:
    """What a teacher's logits of a split are made from: (fingerprint parts, the logits cache's parts, each shard's
    key in the cache)."""
    # The logits' meaning (checked by the student): teacher, vocabulary, features, the precision they were
    # computed in and the format version of the code that computed them (the resume key adds the device type).
    fingerprint_parts = {**teacher.identity, "features": features_manifest["bytes_fingerprint"], "precision": precision,
                         "logits_format": output_format("logits")}
    # The cache addresses a shard by its features' bytes (a carried teacher's: and its examples' text).
    cache_parts = {k: v for k, v in fingerprint_parts.items() if k != "features"}
    shard_keys = {e["name"]: e.get("sha256") or sha256_file(features_dir / e["name"]) for e in features_manifest["shards"]}
    if teacher.carried is not None:
        shard_keys = {name: shard_key(sha, examples.by_shard[name]) for name, sha in shard_keys.items()}
        cache_parts["carried"] = teacher.carried.parts()
        fingerprint_parts["carried"] = {**teacher.carried.parts(), "examples": fingerprint_of(shard_keys)}
    return fingerprint_parts, cache_parts, shard_keys


def label_shard(teacher: Teacher, path: Path, params: Params, device: torch.device, dtype,
                examples: ShardedExamples | None) -> tuple[list[str], list, list, dict | None]:
    """(feature ids, start, end, details for the shard's records) of one features shard: the teacher's logits, or
    a carried teacher's aligned log-probabilities (details: its alignment stats)."""
    if teacher.carried is None:
        t = params.teacher
        return (*shard_logits(teacher.model, path, teacher.tokenizer.pad_token_id, device, t.batch_size,
                              t.max_tokens_per_batch, dtype, multiple=t.pad_to_multiple_of), None)
    ids, start, end, stats = teacher.carried.label_shard(path, examples.by_shard[path.name])
    return ids, start, end, {"alignment": {"features": stats.features, "pieced": stats.pieced, "covered": stats.covered}}


def run_split(model, tokenizer, split: str, params: Params, ws: Workspace, teacher_identity: dict,
              device: torch.device) -> dict | None:
    """One teacher's split computed and published (by rank 0; returns its manifest there): what the stage does for
    each split with one teacher, and what bench.performance times."""
    computed = compute_split(Teacher(model, tokenizer, teacher_identity), split, params, ws, device,
                             ws.teacher_work / split)
    manifest = publish_split(ws.teacher / split, [computed], params.teacher.teachers, device) if distributed.is_main() else None
    distributed.barrier()
    return manifest


def write_logits_shard(path: Path, ids, start, end, resume_key: dict, cache: LogitsCache | None = None,
                       key: str | None = None, details: dict | None = None) -> None:
    """A computed shard into the work folder, its done record (with `details`), and a copy into the logits cache
    (under the shard's `key`)."""
    logits_format.write_logits_shard(path, ids, start, end)
    digest = sha256_file(path)
    write_json_atomic(done_record_path(path), {"rows": len(ids), "sha256": digest, **(details or {}), "key": resume_key})
    if cache is not None:
        cache.put(key, path, len(ids), digest, details)


def reuse_cached(cache: LogitsCache, key: str, rows: int, path: Path, resume_key: dict) -> bool:
    """Copy this shard's logits from the cache into the work folder (with its done record), if there."""
    record = cache.fetch(key, rows, path)
    if record is None:
        return False
    write_json_atomic(done_record_path(path), {**record, "key": resume_key, "from_cache": True})
    return True


@writes_into("out_dir")
def publish_split(out_dir: Path, computed: list[ComputedSplit], teachers: list[str], device) -> dict:
    """Check that every shard of every teacher is done, then move the split into the DVC output with its
    manifest: one teacher's shards in the split folder itself, several teachers' each in its own folder
    (pipeline/store/logits.py says the layout)."""
    records = [finished_records(c) for c in computed]
    with staged_folder(out_dir) as staging:
        if len(computed) == 1:
            manifest = fill_logits_folder(staging, computed[0], records[0], device)
        else:
            entries = []
            for index, (c, r) in enumerate(zip(computed, records)):
                folder = logits_format.teacher_folder_name(index)
                (staging / folder).mkdir()
                entries.append({"model": teachers[index], "folder": folder,
                                "fingerprint": fill_logits_folder(staging / folder, c, r, device)["fingerprint"]})
            first = computed[0].fingerprint_parts
            manifest = logits_format.teachers_manifest(
                computed[0].split, {"features": first["features"], "logits_format": first["logits_format"]}, entries,
                sum(r["rows"] for r in records[0].values()))
            write_json_atomic(staging / "manifest.json", manifest)
    for c in computed:
        shutil.rmtree(c.work, ignore_errors=True)
    rows = sum(r["rows"] for r in records[0].values())
    size = sum(p.stat().st_size for p in out_dir.rglob("*.parquet"))
    log.info("%s: %d rows in %d shards%s, %.0f bytes/feature", out_dir, rows, len(computed[0].shards),
             f" for each of {len(computed)} teachers" if len(computed) > 1 else "", size / max(rows, 1))
    return manifest


def finished_records(computed: ComputedSplit) -> dict[str, dict]:
    """The done record of every shard of the split (all ranks have finished): an error if one is missing."""
    records = {}
    for path in computed.shards:
        record = completed_shard(computed.work, path.name, computed.resume_key, shard_rows(path))
        if record is None:
            raise KdqaError(f"{computed.work / path.name}: logits shard missing or incomplete after all ranks finished")
        records[path.name] = record
    return records


def fill_logits_folder(folder: Path, computed: ComputedSplit, records: dict[str, dict], device) -> dict:
    """One teacher's logits shards of a split copied into `folder`, with their manifest; returns it."""
    for path in computed.shards:
        shutil.copy2(computed.work / path.name, folder / path.name)  # copy, not move: the work stays until published
    manifest = {
        "kdqa_version": __version__,
        "split": computed.split,
        "fingerprint": fingerprint_of(computed.fingerprint_parts),
        "fingerprint_parts": computed.fingerprint_parts,
        "compute": computed.resume_key["compute"],
        "device": device_name(device),
        "features_per_second": round(computed.throughput, 2) if computed.throughput else None,
        "shards_from_cache": sum(1 for r in records.values() if r.get("from_cache")),
        "rows_from_cache": sum(r["rows"] for r in records.values() if r.get("from_cache")),
        "rows": sum(r["rows"] for r in records.values()),
        "bytes": sum((folder / n).stat().st_size for n in records),
        "shards": [{"name": n, "rows": r["rows"], "sha256": r["sha256"]} for n, r in records.items()],
    }
    if computed.carried is not None:
        manifest["carried"] = carried_summary(folder.name, computed, records)
    write_json_atomic(folder / "manifest.json", manifest)
    return manifest


def carried_summary(name: str, computed: ComputedSplit, records: dict[str, dict]) -> dict:
    """A carried teacher's split: its tokenizer and how its distributions came out on the features' tokens (from
    every shard's record, computed now or earlier); logged."""
    stats = AlignStats()
    for record in records.values():
        stats += AlignStats(**record["alignment"])
    summary = {**computed.carried, "features": stats.features, "features_pieced": stats.pieced,
               "mean_covered": round(stats.mean_covered, 6)}
    log.info("%s (tokenizer %s) carried onto the features' tokens: %s: %d features, %d pieced from two of its windows "
             "or more, mean covered mass %.4f", name, summary["tokenizer"], computed.split, stats.features, stats.pieced,
             stats.mean_covered)
    return summary


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({torch.get_num_threads()} threads)"


def run_teacher(params: Params, ws: Workspace) -> None:
    distributed.init()
    device = distributed.device()
    teachers = params.teacher.teachers
    features_manifest = read_json(ws.features / "train" / "manifest.json")
    # Every split prepare made: train, dev, and the extra rows (unlabeled data, augmented views) if any.
    extra = [split for split in EXTRA_SPLITS if (ws.features / split / "manifest.json").exists()]
    splits = ("train", "dev", *extra)
    # Every teacher's tokenizer first: a teacher that cannot be carried onto the features stops the stage before
    # any teacher runs.
    keys = [f"teacher.models[{index}]" if params.teacher.models else "teacher.model" for index in range(len(teachers))]
    tokenizers = [teacher_tokenizer(params, name, index, features_manifest) for index, name in enumerate(teachers)]
    carried = [features_manifest.get("vocab_fingerprint") != vocab_fingerprint(t) for t in tokenizers]
    examples = examples_by_split(params, ws.features, splits) if any(carried) else {}
    for name, key, tokenizer, is_carried in zip(teachers, keys, tokenizers, carried):
        if is_carried:
            check_carriable(name, key, tokenizer, params, examples)
    computed: dict[str, list[ComputedSplit]] = {split: [] for split in splits}
    weights_seen: dict[tuple[str, str], int] = {}  # (weights, vocabulary) -> place in the list
    reused, made = [], []
    for index, (name, key) in enumerate(zip(teachers, keys)):
        started = time.perf_counter()
        teacher = load_teacher(params, name, key, tokenizers[index], carried[index], features_manifest, device)
        # A teacher is its weights read through its tokenizer: the same weights under another vocabulary read other
        # tokens and answer differently (an ensemble member of its own); under the same one they are a duplicate.
        identity = (teacher.identity["teacher"], teacher.identity["vocab"])
        if identity in weights_seen:
            first = weights_seen[identity]
            raise KdqaError(f"{name}: {key} has the same weights and tokenizer as teacher.models[{first}] "
                            f"({teachers[first]}): a teacher listed twice would only count twice in the mean; list it "
                            "once (or give it a larger student.teacher_weights entry)")
        weights_seen[identity] = index
        # Each teacher's work folder is its own: a teacher that fails half-way leaves the others' finished
        # shards there (and in the logits cache), and a rerun computes only what is missing.
        work = ws.teacher_work if len(teachers) == 1 else ws.teacher_work / logits_format.teacher_folder_name(index)
        with torch.inference_mode():
            for split in splits:
                computed[split].append(compute_split(teacher, split, params, ws, device, work / split,
                                                     examples.get(split)))
        del teacher
        shards = sum(computed[split][-1].computed for split in splits)
        (made if shards else reused).append(f"{key} ({name})")
        if shards:
            log.info("%s (%s): %d shards computed in %.1fs", key, name, shards, time.perf_counter() - started)
    if len(teachers) > 1:
        log.info("teachers: %d reused from earlier runs (%s), %d computed now (%s)", len(reused),
                 ", ".join(reused) or "none", len(made), ", ".join(made) or "none")
    if distributed.is_main():
        for split in splits:
            publish_split(ws.teacher / split, computed[split], teachers, device)
        # logits of extra rows prepare no longer makes: never trained on by mistake
        for split in set(EXTRA_SPLITS) - set(extra):
            shutil.rmtree(ws.teacher / split, ignore_errors=True)
    distributed.barrier()
    distributed.destroy()


def teacher_tokenizer(params: Params, name: str, index: int, features_manifest: dict):
    """A teacher's tokenizer; the first one's must be the features' (prepare tokenized them with it)."""
    tokenizer = load_tokenizer(name, params.teacher.trust_remote_code)  # a slow tokenizer (no offsets) stops here
    if index == 0 and features_manifest.get("vocab_fingerprint") != vocab_fingerprint(tokenizer):
        raise KdqaError(f"{name}: tokenizer differs from the one data/features was prepared with "
                        f"({features_manifest.get('tokenizer')}); run `kdqa prepare` again")
    return tokenizer


def load_teacher(params: Params, name: str, key: str, tokenizer, carried: bool, features_manifest: dict,
                 device) -> Teacher:
    """One teacher, checked against the features; `carried`: its tokenizer is not theirs."""
    model = load_qa_model(name, params.teacher.trust_remote_code, TRAINED)
    check_sequence_length(model, features_manifest.get("prepare", {}).get("max_seq_len", 0), name)
    model.to(device).eval()
    identity = {"teacher": weights_fingerprint(model), "vocab": vocab_fingerprint(tokenizer)}
    if not carried:
        return Teacher(model, tokenizer, identity)
    t = params.teacher
    run = functools.partial(features_logits, model, pad_token_id=tokenizer.pad_token_id, device=device,
                            max_batch=t.batch_size, max_tokens=t.max_tokens_per_batch,
                            dtype=autocast_dtype(device, t.precision), multiple=t.pad_to_multiple_of)
    return Teacher(model, tokenizer, identity, CarriedTeacher(name, key, tokenizer, params, run))
