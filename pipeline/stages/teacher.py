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

Incremental: every computed shard is also kept in `.kdqa/teacher-cache/`, addressed by its features shard's
bytes, the teacher, the vocabulary, the precision and the logits format (pipeline/store/logits_cache.py). A shard
found there is copied instead of computed, so adding an unlabeled file or more augmented views costs teacher
time for the new shards only, and the existing logits stay byte for byte the same.
"""

from __future__ import annotations

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
from pipeline.params import Params
from pipeline.store.logits_cache import LogitsCache
from pipeline.runtime.workspace import EXTRA_SPLITS, Workspace, staged_folder
from pipeline.model.inference import autocast_dtype, precision_name, shard_logits
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
class ComputedSplit:
    """One teacher's logits of one split, computed (or found) in its work folder: what publishing needs."""

    split: str
    shards: list[Path]  # the features shards, whose names the logits shards take
    work: Path
    resume_key: dict
    fingerprint_parts: dict
    throughput: float | None
    computed: int  # shards this rank computed now (the rest: a finished earlier run's, or the logits cache's)


def compute_split(model, tokenizer, split: str, params: Params, ws: Workspace, teacher_identity: dict,
                  device: torch.device, work: Path) -> ComputedSplit:
    """Compute this rank's missing shards of a split into `work` (shards already there, or in the logits cache,
    are not computed again)."""
    rank, world = distributed.rank(), distributed.world_size()
    features_dir = ws.features / split
    shards = list_shards(features_dir)
    if not shards:
        raise KdqaError(f"{features_dir}: no feature shards (run `kdqa prepare`)")
    features_manifest = verify_shards(features_dir, "kdqa prepare")  # intact features, or a named error
    check_format(features_manifest.get("features_format"), "features", features_dir, "kdqa prepare")
    dtype = autocast_dtype(device, params.teacher.precision)
    precision = precision_name(dtype)
    # The logits' meaning (checked by the student): teacher, vocabulary, features, the precision they were
    # computed in and the format version of the code that computed them; the resume key adds the device type.
    fingerprint_parts = {**teacher_identity, "features": features_manifest["bytes_fingerprint"], "precision": precision,
                         "logits_format": output_format("logits")}
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
    cache = LogitsCache(ws.teacher_cache, {k: v for k, v in fingerprint_parts.items() if k != "features"})
    features_sha = {e["name"]: e.get("sha256") or sha256_file(features_dir / e["name"]) for e in features_manifest["shards"]}
    cached = [p for p in todo if reuse_cached(cache, features_sha[p.name], expected_rows[p.name], work / p.name, resume_key)]
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
            ids, start, end = shard_logits(model, path, tokenizer.pad_token_id, device,
                                           params.teacher.batch_size, params.teacher.max_tokens_per_batch, dtype,
                                           multiple=params.teacher.pad_to_multiple_of)
            if pending is not None:
                pending.result()  # at most one shard waiting to be written: bounded memory
            # Writing shard k (compression, fsync) overlaps the teacher's compute on shard k+1.
            pending = writer.submit(write_logits_shard, work / path.name, ids, start, end, resume_key, cache,
                                    features_sha[path.name])
            n_rows += len(ids)
            bar.update(len(ids))  # tqdm shows features/s
        if pending is not None:
            pending.result()
    elapsed = time.perf_counter() - started
    throughput = n_rows / elapsed if n_rows else None
    distributed.barrier()
    return ComputedSplit(split, shards, work, resume_key, fingerprint_parts, throughput, len(todo))


def run_split(model, tokenizer, split: str, params: Params, ws: Workspace, teacher_identity: dict,
              device: torch.device) -> dict | None:
    """One teacher's split computed and published (by rank 0; returns its manifest there): what the stage does for
    each split with one teacher, and what bench.performance times."""
    computed = compute_split(model, tokenizer, split, params, ws, teacher_identity, device, ws.teacher_work / split)
    manifest = publish_split(ws.teacher / split, [computed], params.teacher.teachers, device) if distributed.is_main() else None
    distributed.barrier()
    return manifest


def write_logits_shard(path: Path, ids, start, end, resume_key: dict, cache: LogitsCache | None = None,
                       features_sha256: str | None = None) -> None:
    """A computed shard into the work folder, its done record, and a copy into the logits cache."""
    logits_format.write_logits_shard(path, ids, start, end)
    digest = sha256_file(path)
    write_json_atomic(done_record_path(path), {"rows": len(ids), "sha256": digest, "key": resume_key})
    if cache is not None:
        cache.put(features_sha256, path, len(ids), digest)


def reuse_cached(cache: LogitsCache, features_sha256: str, rows: int, path: Path, resume_key: dict) -> bool:
    """Copy this shard's logits from the cache into the work folder (with its done record), if there."""
    record = cache.fetch(features_sha256, rows, path)
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
            parts = {"features": first["features"], "logits_format": first["logits_format"],
                     "teachers": [e["fingerprint"] for e in entries]}
            manifest = {"kdqa_version": __version__, "split": computed[0].split, "fingerprint": fingerprint_of(parts),
                        "fingerprint_parts": parts, "teachers": entries,
                        "rows": sum(r["rows"] for r in records[0].values())}
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
    write_json_atomic(folder / "manifest.json", manifest)
    return manifest


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
    computed: dict[str, list[ComputedSplit]] = {split: [] for split in splits}
    weights_seen: dict[str, int] = {}
    reused, made = [], []
    for index, name in enumerate(teachers):
        key = f"teacher.models[{index}]" if params.teacher.models else "teacher.model"
        started = time.perf_counter()
        model, tokenizer, identity = load_teacher(params, name, key, index, features_manifest, device)
        if identity["teacher"] in weights_seen:
            first = weights_seen[identity["teacher"]]
            raise KdqaError(f"{name}: {key} has the same weights as teacher.models[{first}] ({teachers[first]}): "
                            "a teacher listed twice would only count twice in the mean; list it once (or give it "
                            "a larger student.teacher_weights entry)")
        weights_seen[identity["teacher"]] = index
        # Each teacher's work folder is its own: a teacher that fails half-way leaves the others' finished
        # shards there (and in the logits cache), and a rerun computes only what is missing.
        work = ws.teacher_work if len(teachers) == 1 else ws.teacher_work / logits_format.teacher_folder_name(index)
        with torch.inference_mode():
            for split in splits:
                computed[split].append(compute_split(model, tokenizer, split, params, ws, identity, device,
                                                     work / split))
        del model
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


def load_teacher(params: Params, name: str, key: str, index: int, features_manifest: dict, device):
    """One teacher, checked against the features: (model on `device`, tokenizer, identity for the fingerprints)."""
    tokenizer = load_tokenizer(name, params.teacher.trust_remote_code)
    if features_manifest.get("vocab_fingerprint") != vocab_fingerprint(tokenizer):
        if index == 0:
            raise KdqaError(f"{name}: tokenizer differs from the one data/features was prepared with "
                            f"({features_manifest.get('tokenizer')}); run `kdqa prepare` again")
        # Features are tokenized once, with the first teacher's tokenizer; carrying another teacher's logits
        # onto them (through characters, as `kdqa align` does for a student) is not built yet.
        raise KdqaError(f"{name}: {key}'s tokenizer differs from the one data/features was prepared with "
                        f"({features_manifest.get('tokenizer')}, teacher.models[0]): every teacher of an ensemble "
                        "must share that tokenizer (teachers of other tokenizers are not supported yet)")
    model = load_qa_model(name, params.teacher.trust_remote_code, TRAINED)
    check_sequence_length(model, features_manifest.get("prepare", {}).get("max_seq_len", 0), name)
    model.to(device).eval()
    return model, tokenizer, {"teacher": weights_fingerprint(model), "vocab": vocab_fingerprint(tokenizer)}
