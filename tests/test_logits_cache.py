"""The content-addressed teacher logits store (pipeline/store/logits_cache.py), on its own."""

from __future__ import annotations

from pipeline.store.logits_cache import LogitsCache
from pipeline.store.shards import sha256_file

PARTS = {"teacher": "t1", "vocab": "v1", "precision": "bfloat16", "logits_format": 1}


def shard(tmp_path, name="logits.parquet", content=b"PAR1 some logits PAR1"):
    path = tmp_path / name
    path.write_bytes(content)
    return path


def test_a_stored_shard_comes_back_byte_for_byte(tmp_path):
    cache = LogitsCache(tmp_path / "cache", PARTS)
    src = shard(tmp_path)
    cache.put("f" * 64, src, rows=3, sha256=sha256_file(src))
    dest = tmp_path / "out.parquet"
    assert cache.fetch("f" * 64, 3, dest) == {"rows": 3, "sha256": sha256_file(src)}
    assert dest.read_bytes() == src.read_bytes()


def test_any_part_of_the_key_changes_the_address(tmp_path):
    cache = LogitsCache(tmp_path / "cache", PARTS)
    src = shard(tmp_path)
    cache.put("f" * 64, src, rows=3, sha256=sha256_file(src))
    dest = tmp_path / "out.parquet"
    assert cache.fetch("e" * 64, 3, dest) is None  # other features bytes
    for name in PARTS:
        other = LogitsCache(tmp_path / "cache", {**PARTS, name: "changed"})
        assert other.fetch("f" * 64, 3, dest) is None
    assert not dest.exists()


def test_a_damaged_entry_is_a_miss_and_is_removed(tmp_path):
    cache = LogitsCache(tmp_path / "cache", PARTS)
    src = shard(tmp_path)
    cache.put("f" * 64, src, rows=3, sha256=sha256_file(src))
    (entry,) = (tmp_path / "cache").rglob("*.parquet")
    entry.write_bytes(b"PAR1 truncated")
    assert cache.fetch("f" * 64, 3, tmp_path / "out.parquet") is None
    assert not list((tmp_path / "cache").rglob("*.*"))
    # A wrong row count (the features shard is not the one recorded) is a miss too.
    cache.put("f" * 64, src, rows=3, sha256=sha256_file(src))
    assert cache.fetch("f" * 64, 4, tmp_path / "out.parquet") is None
