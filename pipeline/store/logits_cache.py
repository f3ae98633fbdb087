"""A content-addressed store of teacher logits shards, kept across runs in `.kdqa/teacher-cache/`.

A logits shard is a function of five things only: its features shard's bytes, the teacher's weights, the
vocabulary, the precision it was computed in, and the logits format version (pipeline/formats.yaml); a teacher
carried onto the features from its own tokenizer adds its windows, the alignment's format version and the text of
the shard's examples (pipeline/model/carried.py). Their hash is the shard's address here, so the teacher stage computes a shard once and afterwards copies it,
byte for byte, whatever the run: adding an unlabeled file or more augmented views leaves the existing
feature shards as they were (each source starts its own run of shards) and only the new ones cost teacher
time. The store lives outside every DVC output (`dvc repro` deletes those before rerunning a stage) and
can be deleted at any time: it only saves time.

Each entry is `<address>.parquet` plus `<address>.json` (rows, sha256, and what was recorded about the shard's
computation: a carried teacher's alignment stats), written in that order, each atomically; an entry whose bytes do not match its record is ignored and removed.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from pathlib import Path

from pipeline.runtime.errors import KdqaError
from pipeline.store.shards import read_json, sha256_file, write_json_atomic

log = logging.getLogger(__name__)


class LogitsCache:
    """Logits shards of one teacher setup. `parts`: what the logits depend on besides the shard (teacher weights
    and vocabulary fingerprints, precision, logits format version; a carried teacher's windows and alignment).
    Shards are addressed by their `shard_key`: the features shard's sha256 (a carried teacher's: with its
    examples' text, `pipeline.model.carried.shard_key`)."""

    def __init__(self, root: Path, parts: dict):
        self.root = Path(root)
        self.parts = dict(parts)

    def address(self, shard_key: str) -> str:
        described = json.dumps({**self.parts, "features_shard": shard_key}, sort_keys=True)
        return hashlib.sha256(described.encode()).hexdigest()

    def _paths(self, shard_key: str) -> tuple[Path, Path]:
        address = self.address(shard_key)
        folder = self.root / address[:2]
        return folder / f"{address}.parquet", folder / f"{address}.json"

    def fetch(self, shard_key: str, rows: int, dest: Path) -> dict | None:
        """Copy the cached logits of this shard to `dest` (atomically); returns its record (rows, sha256 and the
        details given to `put`), or None when there is no whole entry for it."""
        shard, record_path = self._paths(shard_key)
        if not (shard.is_file() and record_path.is_file()):
            return None
        try:
            record = read_json(record_path)
        except KdqaError:
            record = None
        if not isinstance(record, dict) or record.get("rows") != rows or record.get("sha256") != sha256_file(shard):
            log.warning("%s: damaged logits cache entry; removing it and computing the shard again", shard)
            record_path.unlink(missing_ok=True)
            shard.unlink(missing_ok=True)
            return None
        tmp = dest.with_name(f".{dest.name}.tmp-{os.getpid()}")
        shutil.copyfile(shard, tmp)
        os.replace(tmp, dest)
        return {"rows": rows, "sha256": record["sha256"], **record.get("details", {})}

    def put(self, shard_key: str, logits_shard: Path, rows: int, sha256: str, details: dict | None = None) -> None:
        """Keep a copy of a freshly computed logits shard (whose bytes hash to `sha256`), with `details` about it."""
        shard, record_path = self._paths(shard_key)
        shard.parent.mkdir(parents=True, exist_ok=True)
        tmp = shard.with_name(f".{shard.name}.tmp-{os.getpid()}")
        shutil.copyfile(logits_shard, tmp)
        os.replace(tmp, shard)
        write_json_atomic(record_path, {"rows": rows, "sha256": sha256, **({"details": details} if details else {}),
                                        **self.parts, "features_shard": shard_key})
