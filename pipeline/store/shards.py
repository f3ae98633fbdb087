"""Parquet shards on disk, whatever their format: atomic writes, checksums, manifests and fingerprints.

Each format (its schema, writer and readers) has a module of its own beside this one: features.py, logits.py,
aligned.py, examples.py.

Every file is written to a temporary name beside its final one and renamed into place only when complete,
so a crash leaves either the old file or the new one, never half of one that looks finished.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
import re
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.runtime.errors import KdqaError
from pipeline.runtime.write_errors import writing

SHARD_PATTERN = re.compile(r"^part-\d{5}\.parquet$")

FORMATS_FILE = Path(__file__).parents[1] / "formats.yaml"


@functools.cache
def output_format(kind: str) -> int:
    """The version of the `features` or `logits` format this kdqa writes (pipeline/formats.yaml)."""
    import yaml

    return yaml.safe_load(FORMATS_FILE.read_text(encoding="utf-8"))[f"{kind}_format"]


def check_format(found: int | None, kind: str, folder: Path, regenerate: str) -> None:
    """Shards of another format than this kdqa's cannot be read as if they were ours: one error saying what
    to rerun (a manifest without a version is not one this kdqa wrote)."""
    expected = output_format(kind)
    if found != expected:
        made = f"{kind} format {found}" if found is not None else f"no {kind} format version"
        raise KdqaError(f"{folder}: {made}, but this kdqa reads {kind} format {expected} (run `{regenerate}`)")


def shard_name(index: int) -> str:
    return f"part-{index:05d}.parquet"


def list_shards(folder: Path) -> list[Path]:
    """The shards of a folder in order; nothing else in it counts."""
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if SHARD_PATTERN.match(p.name))


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def fingerprint_of(parts: dict) -> str:
    """A short stable hash of a JSON-able description."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:16]


def write_json_atomic(path: Path, obj) -> None:
    write_jsons_atomic({path: obj})


def write_jsons_atomic(files: dict[Path, object], remove: tuple[Path, ...] = ()) -> None:
    """JSON files replaced together: every one is written under a temporary name first and only then renamed,
    so a failed write (a full disk) leaves all of them as they were, never some new and some old. `remove`:
    outputs of an earlier run that this run does not make, deleted once the new files are in place, so no
    file from another run stays beside them."""
    temporaries = {path: path.with_name(f".{path.name}.tmp-{os.getpid()}") for path in files}
    with _removed_on_failure(*temporaries.values()):
        for path, obj in files.items():
            with writing(path):
                path.parent.mkdir(parents=True, exist_ok=True)
                with open(temporaries[path], "w", encoding="utf-8") as f:
                    json.dump(obj, f, indent=2, sort_keys=False)
                    f.write("\n")
                    f.flush()
                    os.fsync(f.fileno())
        for path, tmp in temporaries.items():
            with writing(path):
                os.replace(tmp, path)
    for path in remove:
        with writing(path):
            path.unlink(missing_ok=True)


@contextlib.contextmanager
def _removed_on_failure(*temporaries: Path):
    """Temporary files a failed write leaves are deleted at once (on a full disk they hold the space we need)."""
    try:
        yield
    except BaseException:
        for tmp in temporaries:
            tmp.unlink(missing_ok=True)
        raise


def read_json(path: Path) -> dict:
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise KdqaError(f"{path}: not found") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise KdqaError(f"{path}: unreadable JSON ({exc})") from None


def write_table_atomic(table: pa.Table, path: Path, row_group_size: int, float_columns=()) -> None:
    """zstd-compressed Parquet; float columns without dictionaries and with byte-stream split."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    dictionary_columns = [n for n in table.column_names if n not in float_columns]
    # Byte-stream split must name the leaf of a list column (`start_logits.list.element`): pyarrow silently
    # ignores a top-level list name. It makes float16 logits compress better once pages exceed zstd's block.
    split_columns = [f"{n}.list.element" if pa.types.is_list(table.schema.field(n).type) else n for n in float_columns]
    with writing(path), _removed_on_failure(tmp):
        path.parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(
            table,
            tmp,
            compression="zstd",
            row_group_size=row_group_size,
            use_dictionary=dictionary_columns,
            use_byte_stream_split=split_columns or False,
        )
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)


def list_array(arrays: list[np.ndarray], value_type: pa.DataType) -> pa.ListArray:
    """One Arrow list column from per-row numpy arrays, without a Python loop over values."""
    lengths = np.fromiter((len(a) for a in arrays), dtype=np.int32, count=len(arrays))
    offsets = np.zeros(len(arrays) + 1, dtype=np.int32)
    np.cumsum(lengths, out=offsets[1:])
    values = np.concatenate(arrays) if arrays else np.zeros(0)
    return pa.ListArray.from_arrays(pa.array(offsets), pa.array(values.astype(value_type.to_pandas_dtype())))


def read_table(path: Path, columns=None) -> pa.Table:
    """Read a shard, turning any Arrow/Parquet failure into an error that names the file."""
    try:
        # One file: ParquetFile reads it directly. pq.read_table would go through pyarrow.dataset, whose code and
        # thread pools add tens of MB to every process that reads a shard (the student and its loader worker).
        with pq.ParquetFile(path) as shard:
            return shard.read(columns=columns)
    except FileNotFoundError:
        raise KdqaError(f"{path}: shard not found") from None
    except (pa.ArrowException, OSError) as exc:
        raise KdqaError(f"{path}: corrupted or truncated Parquet shard ({str(exc).splitlines()[0]})") from None


def shard_rows(path: Path) -> int:
    try:
        return pq.ParquetFile(path).metadata.num_rows
    except (pa.ArrowException, OSError) as exc:
        raise KdqaError(f"{path}: corrupted or truncated Parquet shard ({str(exc).splitlines()[0]})") from None


def features_fingerprint(folder: Path) -> str:
    """Fingerprint of a split's features, computed from the shard bytes themselves (not a manifest)."""
    shards = list_shards(folder)
    if not shards:
        raise KdqaError(f"{folder}: no feature shards (run `kdqa prepare`)")
    return fingerprint_of({p.name: sha256_file(p) for p in shards})


def list_column_to_numpy(column: pa.ChunkedArray | pa.ListArray, dtype) -> list[np.ndarray]:
    """Per-row numpy views of a list column (zero-copy slices of one flat buffer)."""
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks()
    flat = column.flatten().to_numpy(zero_copy_only=False).astype(dtype, copy=False)
    offsets = column.offsets.to_numpy()
    offsets = offsets - offsets[0]
    return [flat[offsets[i] : offsets[i + 1]] for i in range(len(column))]


def verify_shards(folder: Path, regenerate: str) -> dict:
    """Check a split folder against its manifest: every shard listed, present, whole (rows, sha256).

    Returns the manifest, with `bytes_fingerprint` added: the fingerprint of the shards' bytes as verified
    (equal to `features_fingerprint(folder)`). Any difference is an error naming the file and the command (`regenerate`) that
    rebuilds it.
    """
    manifest_path = folder / "manifest.json"
    if not manifest_path.exists():
        raise KdqaError(f"{manifest_path}: not found (run `{regenerate}`)")
    manifest = read_json(manifest_path)
    listed = manifest.get("shards")
    if not isinstance(listed, list):
        raise KdqaError(f"{manifest_path}: no 'shards' list (run `{regenerate}`)")
    names = {entry.get("name") for entry in listed}
    extra = sorted(p.name for p in list_shards(folder) if p.name not in names)
    if extra:
        raise KdqaError(f"{folder / extra[0]}: shard not listed in {manifest_path} (run `{regenerate}`)")
    digests = {}
    for entry in listed:
        path = folder / str(entry.get("name"))
        if not path.is_file():
            raise KdqaError(f"{path}: shard listed in {manifest_path} is missing (run `{regenerate}`)")
        digests[path.name] = sha256_file(path)
        if digests[path.name] != entry.get("sha256"):
            raise KdqaError(f"{path}: corrupted or truncated shard (checksum differs from {manifest_path}; "
                            f"run `{regenerate}`)")
        if shard_rows(path) != entry.get("rows"):
            raise KdqaError(f"{path}: {shard_rows(path)} rows but {manifest_path} says {entry.get('rows')} "
                            f"(run `{regenerate}`)")
    # The same value features_fingerprint(folder) computes, from the hashes just taken (each file read once).
    manifest["bytes_fingerprint"] = fingerprint_of(digests)
    return manifest
