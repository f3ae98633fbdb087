"""`staged_folder`: a stage's output folder appears whole or not at all."""

from __future__ import annotations

import pytest

from pipeline.runtime.workspace import previous_path, staged_folder, staging_path


def test_staged_folder_swaps_in_whole_and_cleans_what_a_crash_left(tmp_path):
    final = tmp_path / "out" / "train"
    stale = staging_path(final)
    stale.mkdir(parents=True)
    (stale / "half-written.parquet").write_text("x")  # left by a killed run
    final.mkdir()
    (final / "old.parquet").write_text("old")

    with staged_folder(final) as staging:
        assert staging == stale and list(staging.iterdir()) == []  # the stale content is gone
        (staging / "new.parquet").write_text("new")
        assert (final / "old.parquet").read_text() == "old"  # untouched until the block completes
    assert [p.name for p in final.iterdir()] == ["new.parquet"]
    assert sorted(p.name for p in final.parent.iterdir()) == ["train"]  # no staging or previous left


def test_staged_folder_leaves_the_previous_output_when_the_block_fails(tmp_path):
    final = tmp_path / "train"
    final.mkdir()
    (final / "old.parquet").write_text("old")
    with pytest.raises(RuntimeError), staged_folder(final) as staging:
        (staging / "new.parquet").write_text("new")
        raise RuntimeError("disk full")
    assert [p.name for p in final.iterdir()] == ["old.parquet"]
    assert not staging_path(final).exists() and not previous_path(final).exists()
