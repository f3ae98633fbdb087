"""How extra shards join the labelled ones, epoch by epoch (pipeline/training/mixing.py)."""

from __future__ import annotations

from collections import Counter

import pytest

from pipeline.training.mixing import extra_quota, extra_shards_by_epoch


def test_each_epoch_reaches_its_quota_with_whole_shards():
    rows = [40, 40, 40, 40, 40, 40, 40, 40, 17]
    plan = extra_shards_by_epoch(rows, quota=100, seed=3, epochs=6)
    for taken in plan:
        total = sum(rows[i] for i in taken)
        assert 100 <= total < 100 + max(rows[i] for i in taken)  # overshoot: less than the last shard
        assert len(set(taken)) == len(taken)


def test_every_shard_is_read_before_any_is_read_twice():
    rows = [10] * 7
    plan = extra_shards_by_epoch(rows, quota=30, seed=0, epochs=7)  # 3 shards an epoch, 21 reads in all
    reads = [i for taken in plan for i in taken]
    assert sorted(reads[:7]) == list(range(7))
    assert sorted(reads[7:14]) == list(range(7))
    assert Counter(reads) == {i: 3 for i in range(7)}
    for taken in plan:  # even where one shuffle ends and the next begins inside an epoch
        assert len(set(taken)) == 3


def test_a_quota_above_the_extra_set_reads_it_all_once():
    plan = extra_shards_by_epoch([5, 6, 7], quota=1000, seed=1, epochs=3)
    assert all(sorted(taken) == [0, 1, 2] for taken in plan)


@pytest.mark.parametrize("rows,quota", [([], 10), ([5, 5], 0)])
def test_no_extra_rows(rows, quota):
    assert extra_shards_by_epoch(rows, quota, seed=0, epochs=2) == [[], []]


def test_the_plan_depends_on_the_seed_only():
    rows = [8, 9, 10, 11, 12, 13]
    assert extra_shards_by_epoch(rows, 20, 5, 4) == extra_shards_by_epoch(rows, 20, 5, 4)
    assert extra_shards_by_epoch(rows, 20, 5, 4) != extra_shards_by_epoch(rows, 20, 6, 4)
    # Asking for more epochs does not change the first ones (a resumed or longer run sees the same data).
    assert extra_shards_by_epoch(rows, 20, 5, 6)[:4] == extra_shards_by_epoch(rows, 20, 5, 4)


def test_quota_is_the_ratio_of_labelled_rows():
    assert extra_quota(1000, 1.0) == 1000 and extra_quota(1000, 0.25) == 250 and extra_quota(1000, 0) == 0
