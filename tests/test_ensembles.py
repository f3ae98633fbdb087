"""Issue 33: several teachers, each one's logits stored once, combined into one target for the student.

The combination against a computation by hand (mean of softmaxes at T, per-row loops, math only); the teacher
stage computing only a new teacher's shards and leaving the others' byte for byte; the stream's one target;
evaluate's and inspect's per-teacher and ensemble scores; a carried teacher that really leaves feature positions
unseen (format characters its BERT normalizer deletes), through the teacher stage, the student's target and
align. Bad input is in tests/test_fault_table.py.
"""

from __future__ import annotations

import csv
import hashlib
import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

import tiny
from conftest import INPUTS, copy_run
from reliability_kit import kdqa
from tiny import set_params

from pipeline.model.batching import answer_mask
from pipeline.model.ensemble import Combination, agreement, ensemble_targets, mixture_logits, same_answerability
from pipeline.model.losses import distillation_loss, masked_kl


def softmax_at(values: list[float], temperature: float) -> list[float]:
    exps = [math.exp(v / temperature - max(values) / temperature) for v in values]
    return [e / sum(exps) for e in exps]


# Two rows of width 6: row 0 has its context at 3..5 (1, 2 are question tokens), row 1 at 2..3 (4, 5 padding).
SPANS = [(3, 5), (2, 3)]
ALLOWED = [[0, 3, 4, 5], [0, 2, 3]]
TEACHERS = torch.tensor([[[2.0, 9.0, 9.0, 1.0, 0.5, -1.0], [0.0, 5.0, 1.0, 3.0, 7.0, 7.0]],
                         [[-1.0, 0.0, 4.0, 3.0, 2.0, 0.0], [1.5, 0.0, 2.0, -2.0, 0.0, 0.0]]])  # [K=2, B=2, W=6]


def mask() -> torch.Tensor:
    return answer_mask([s for s, _ in SPANS], [e for _, e in SPANS], 6)


def hand_mixture(row: int, weights: list[float], temperature: float) -> list[float]:
    """sum_k w_k softmax(t_k / T) over the row's allowed positions, weights normalized: by hand."""
    total = sum(weights)
    per_teacher = [softmax_at([float(TEACHERS[k, row, j]) for j in ALLOWED[row]], temperature)
                   for k in range(len(weights))]
    return [sum(w / total * p[i] for w, p in zip(weights, per_teacher)) for i in range(len(ALLOWED[row]))]


@pytest.mark.parametrize("weights,temperature", [([1.0, 1.0], 2.0), ([3.0, 1.0], 5.0), ([0.0, 2.0], 1.0)])
def test_the_combined_target_is_the_weighted_mean_of_the_teachers_softmaxes_at_t(weights, temperature):
    combined = mixture_logits(TEACHERS, mask(), Combination(tuple(weights), temperature))
    assert combined.shape == (2, 6)  # one target per row, whatever the number of teachers
    for row in range(2):
        got = softmax_at([float(combined[row, j]) for j in ALLOWED[row]], temperature)
        assert got == pytest.approx(hand_mixture(row, weights, temperature), abs=1e-6)
        assert sum(got) == pytest.approx(1.0)


def test_the_kd_loss_against_the_combined_target_is_the_kl_to_the_mixture_by_hand():
    temperature, weights = 3.0, [1.0, 2.0]
    student = torch.tensor([[0.3, 1.0, -2.0, 0.7, 2.2, 5.0], [1.0, 0.0, -0.5, 0.25, 3.0, 3.0]])
    combined = mixture_logits(TEACHERS, mask(), Combination(tuple(weights), temperature))
    expected = 0.0
    for row in range(2):
        p_t = hand_mixture(row, weights, temperature)
        p_s = softmax_at([float(student[row, j]) for j in ALLOWED[row]], temperature)
        expected += sum(t * (math.log(t) - math.log(s)) for t, s in zip(p_t, p_s)) / 2
    assert float(masked_kl(student, combined, mask(), temperature)) == pytest.approx(expected, rel=1e-5)
    # Row weights (an agreement option): a weighted mean of the rows' KL; a row of weight 0 adds nothing.
    row0 = float(masked_kl(student[:1], combined[:1], mask()[:1], temperature))
    weighted = masked_kl(student, combined, mask(), temperature, torch.tensor([1.0, 0.0]))
    assert float(weighted) == pytest.approx(row0, rel=1e-6)
    labels = torch.zeros(2, dtype=torch.long)
    parts = distillation_loss(student, student, labels, labels, mask(), combined, combined, temperature, 1.0,
                              target_weight=torch.tensor([1.0, 0.0]))
    assert float(parts.kd) == pytest.approx(row0, rel=1e-6)


def test_agreement_is_one_for_teachers_that_agree_and_falls_as_they_part():
    same = torch.stack([TEACHERS[0], TEACHERS[0]])
    combination = Combination((1.0, 1.0), 2.0, "weight")
    assert agreement(same, same, mask(), combination).tolist() == pytest.approx([1.0, 1.0])
    # Each teacher sure of another position: a divergence near its largest value, log 2 for two equal weights.
    apart = torch.full((2, 2, 6), -50.0)
    apart[0, :, 0] = apart[1, 0, 3] = apart[1, 1, 2] = 50.0
    assert agreement(apart, apart, mask(), Combination((1.0, 1.0), 1.0, "weight")).tolist() == pytest.approx([0, 0],
                                                                                                             abs=1e-6)
    # Halfway: the JS divergence by hand over its largest value, H(w) = log 2.
    partial = agreement(TEACHERS, TEACHERS, mask(), combination)
    for row in range(2):
        p = [softmax_at([float(TEACHERS[k, row, j]) for j in ALLOWED[row]], 2.0) for k in range(2)]
        mix = [(a + b) / 2 for a, b in zip(*p)]
        entropy = lambda q: -sum(x * math.log(x) for x in q if x > 0)  # noqa: E731
        js = entropy(mix) - (entropy(p[0]) + entropy(p[1])) / 2
        assert float(partial[row]) == pytest.approx(1 - js / math.log(2), abs=1e-5)
    # A teacher of weight 0 takes no part: one teacher left agrees with itself.
    assert agreement(apart, apart, mask(), Combination((0.0, 1.0), 1.0, "weight")).tolist() == [1.0, 1.0]


def test_rows_whose_teachers_disagree_on_answerability_are_dropped():
    start = torch.zeros(2, 2, 6)
    end = torch.zeros(2, 2, 6)
    start[0, :, 0] = end[0, :, 0] = 5.0  # teacher 0: no answer in either row (null 10 > best 0)
    start[1, 0, 4] = end[1, 0, 5] = 8.0  # teacher 1: an answer in row 0 (best 16 > null 0)...
    start[1, 1, 0] = end[1, 1, 0] = 3.0  # ...and none in row 1
    combination = Combination((1.0, 1.0), 2.0, "drop")
    assert same_answerability(start, end, mask(), combination).tolist() == [0.0, 1.0]
    targets = ensemble_targets(start, end, mask(), combination)
    assert set(targets) == {"teacher_start", "teacher_end", "target_weight"}
    assert targets["target_weight"].tolist() == [0.0, 1.0]
    assert "target_weight" not in ensemble_targets(start, end, mask(), Combination((1.0, 1.0), 2.0))


def test_a_position_one_teacher_did_not_see_leaves_every_teachers_distribution():
    """A carried teacher's NaN (no window of it saw the position): each teacher renormalised over the positions
    all saw, the mixture over those, `teacher_mask` False there only; agreement and drop on the same positions."""
    start, end = TEACHERS.clone(), TEACHERS.clone()
    start[1, 0, 4] = end[1, 0, 4] = float("nan")  # teacher 1 never saw row 0's position 4 (a context token)
    weights, temperature = [1.0, 3.0], 2.0
    seen = [[0, 3, 5], ALLOWED[1]]
    targets = ensemble_targets(start, end, mask(), Combination(tuple(weights), temperature, "weight"))
    assert targets["teacher_mask"].tolist() == [[True, True, True, True, False, True], [True] * 6]
    entropy = lambda q: -sum(x * math.log(x) for x in q if x > 0)  # noqa: E731
    for row in range(2):
        per_teacher = [softmax_at([float(TEACHERS[k, row, j]) for j in seen[row]], temperature) for k in range(2)]
        mixture = [(weights[0] * a + weights[1] * b) / 4 for a, b in zip(*per_teacher)]
        for side in ("teacher_start", "teacher_end"):
            got = softmax_at([float(targets[side][row, j]) for j in seen[row]], temperature)
            assert got == pytest.approx(mixture, abs=1e-6)
            assert torch.isfinite(targets[side][row]).all()
        js = entropy(mixture) - sum(w / 4 * entropy(p) for w, p in zip(weights, per_teacher))
        largest = entropy([w / 4 for w in weights])
        assert float(targets["target_weight"][row]) == pytest.approx(1 - js / largest, abs=1e-5)
    # The KD term leaves the unseen position out of both distributions (the loss's teacher_mask).
    student = torch.randn(2, 6)
    kd = masked_kl(student, targets["teacher_start"], mask() & targets["teacher_mask"], temperature)
    by_hand = 0.0
    for row in range(2):
        p_t = softmax_at([float(targets["teacher_start"][row, j]) for j in seen[row]], temperature)
        p_s = softmax_at([float(student[row, j]) for j in seen[row]], temperature)
        by_hand += sum(t * (math.log(t) - math.log(s)) for t, s in zip(p_t, p_s)) / 2
    assert float(kd) == pytest.approx(by_hand, rel=1e-5)
    # drop: teacher 1's row 0 is sure of its unseen position 4 (an answer) and of nothing else: on the seen
    # positions it says "no answer", as teacher 0 does; with position 4 seen the two would disagree.
    sure = torch.zeros(2, 2, 6)
    sure[:, :, 0] = 1.0
    sure[1, 0, 4] = 9.0
    both_seen = same_answerability(sure, sure, mask(), Combination((1.0, 1.0), 1.0, "drop"))
    sure[1, 0, 4] = float("nan")
    dropped = ensemble_targets(sure, sure, mask(), Combination((1.0, 1.0), 1.0, "drop"))["target_weight"]
    assert both_seen.tolist() == [0.0, 1.0] and dropped.tolist() == [1.0, 1.0]
    # With every position seen there is no mask: the batch is what it was.
    assert "teacher_mask" not in ensemble_targets(TEACHERS, TEACHERS, mask(), Combination((1.0, 1.0), 2.0))


def test_combined_rows_of_a_teacher_with_unseen_positions_score_only_the_seen_ones():
    from pipeline.model.batching import MASKED
    from pipeline.model.ensemble import combine_rows

    rows = [[np.array([0.0, 1.0, 2.0, 3.0])], [np.array([0.5, np.nan, 1.0, 2.0])]]  # context 1..3
    [combined] = combine_rows(rows, [1], [3], Combination.equal(2))
    assert combined[1] == MASKED
    p0, p1 = softmax_at([0.0, 2.0, 3.0], 1.0), softmax_at([0.5, 1.0, 2.0], 1.0)
    assert softmax_at([float(combined[j]) for j in (0, 2, 3)], 1.0) == pytest.approx(
        [(a + b) / 2 for a, b in zip(p0, p1)], abs=1e-6)


# ---------------------------------------------------------------------------------------------------------
# The pipeline with tiny teachers
# ---------------------------------------------------------------------------------------------------------

def digests(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.glob("part-*.parquet"))}


def splits(run: Path) -> list[str]:
    return sorted(p.name for p in (run / "data/teacher").iterdir())


@pytest.fixture(scope="module")
def more_teachers(tmp_path_factory) -> list[Path]:
    """Two more teachers of the tiny vocabulary, other seeds (the run's own teacher is ./inputs/teacher)."""
    root = tmp_path_factory.mktemp("more-teachers")
    return [tiny.make_model(root / f"teacher-{seed}", layers=3, seed=seed) for seed in (7, 11)]


@pytest.fixture(scope="module")
def ensemble_run(prepared_run, more_teachers, tmp_path_factory) -> tuple[Path, str]:
    """The prepared one-teacher run with a second teacher added (and its teacher stage's log). Read-only."""
    run = copy_run(prepared_run, tmp_path_factory.mktemp("ensemble") / "run")
    set_params(run, teacher__model=None, teacher__models=[f"./{INPUTS}/teacher", str(more_teachers[0])])
    shutil.rmtree(run / "data/teacher")  # as `dvc repro` does before rerunning the stage
    result = kdqa(run, "teacher")
    assert result.exit_code == 0, result.output
    return run, result.stderr


def test_one_teacher_keeps_its_layout_and_a_second_adds_only_its_own_shards(prepared_run, ensemble_run):
    run, log = ensemble_run
    assert "1 reused from earlier runs (teacher.models[0] (" in log  # every shard copied from the logits cache
    assert "teacher.models[1]" in log and "shards computed in" in log.split("teacher.models[1]")[1]
    for split in splits(prepared_run):
        single = prepared_run / "data/teacher" / split
        assert "teachers" not in json.loads((single / "manifest.json").read_text())  # one teacher: as ever
        manifest = json.loads((run / "data/teacher" / split / "manifest.json").read_text())
        assert [t["folder"] for t in manifest["teachers"]] == ["teacher-0", "teacher-1"]
        first = run / "data/teacher" / split / "teacher-0"
        assert digests(first) == digests(single)  # the first teacher's logits, byte for byte (sha256)
        assert json.loads((first / "manifest.json").read_text())["fingerprint"] == \
            json.loads((single / "manifest.json").read_text())["fingerprint"]
        assert digests(run / "data/teacher" / split / "teacher-1").keys() == digests(single).keys()
        assert digests(run / "data/teacher" / split / "teacher-1") != digests(single)  # another teacher


@pytest.fixture(scope="module")
def carried_teachers(tmp_path_factory) -> list[Path]:
    """Two teachers of other tokenizers than the features': every word split into characters, and the features'
    own vocabulary with one more token (other vocabulary, the same tokens: carried exactly)."""
    root = tmp_path_factory.mktemp("carried-teachers")
    vocab = (tiny.write_vocab(root / "vocab").read_text().split())
    return [tiny.make_model(root / "characters", layers=2, seed=5, vocab=tiny.CHARACTER_VOCAB),
            tiny.make_model(root / "one-more-token", layers=2, seed=9, vocab=[*vocab, "zzz"])]


@pytest.fixture(scope="module")
def carried_run(ensemble_run, carried_teachers, tmp_path_factory) -> tuple[Path, str]:
    """The two-teacher run with the two carried teachers added (teacher.models[2], [3]), and that run's log."""
    run = copy_run(ensemble_run[0], tmp_path_factory.mktemp("carried") / "run")
    models = yaml.safe_load((run / "params.yaml").read_text())["teacher"]["models"]
    set_params(run, teacher__models=[*models, *map(str, carried_teachers)])
    shutil.rmtree(run / "data/teacher")
    result = kdqa(run, "teacher")
    assert result.exit_code == 0, result.output
    return run, result.stderr


def test_teachers_added_to_a_finished_run_compute_only_their_shards_and_the_others_stay_byte_identical(
        ensemble_run, carried_run, tmp_path):
    run, log = carried_run
    assert "2 reused from earlier runs" in log and "2 computed now (teacher.models[2]" in log
    for split in splits(run):
        for i in range(2):
            assert digests(run / "data/teacher" / split / f"teacher-{i}") == \
                digests(ensemble_run[0] / "data/teacher" / split / f"teacher-{i}")
        assert digests(run / "data/teacher" / split / "teacher-2").keys() == digests(run / "data/features" / split).keys()
    # Run again from scratch: the carried teachers' shards too come from the logits cache, byte for byte.
    again = copy_run(run, tmp_path / "run")
    shutil.rmtree(again / "data/teacher")
    result = kdqa(again, "teacher")
    assert result.exit_code == 0, result.output
    assert "4 reused from earlier runs" in result.stderr
    for split in splits(run):
        for i in (2, 3):
            assert digests(again / "data/teacher" / split / f"teacher-{i}") == \
                digests(run / "data/teacher" / split / f"teacher-{i}")


def test_a_teacher_of_another_tokenizer_is_carried_onto_the_features(carried_run, carried_teachers):
    from pipeline.store.features import read_windows
    from pipeline.store.logits import read_logits

    run, log = carried_run
    assert f"teacher-2 (tokenizer {carried_teachers[0]}) carried onto the features' tokens: train:" in log
    pieced = 0
    for split in splits(run):
        folder = run / "data/teacher" / split / "teacher-2"
        carried = json.loads((folder / "manifest.json").read_text())["carried"]
        assert carried["tokenizer"] == str(carried_teachers[0]) and carried["vocab_fingerprint"]
        assert 0 < carried["mean_covered"] <= 1 and carried["features"] == sum(
            len(read_windows(p).feature_ids) for p in sorted((run / "data/features" / split).glob("part-*")))
        pieced += carried["features_pieced"]
        for shard in sorted((run / "data/features" / split).glob("part-*.parquet")):
            windows = read_windows(shard)
            ids, start, end = read_logits(folder / shard.name)
            assert ids.to_pylist() == windows.feature_ids
            for i in range(len(start)):
                answer = np.r_[0, np.arange(windows.context_start[i], windows.context_end[i] + 1)]
                assert len(start[i]) == len(windows.offset_start[i])
                assert not np.isnan(np.delete(start[i], answer)).any()  # NaN only where an answer could be
                for row in (start[i], end[i]):
                    p = np.exp(row[answer][~np.isnan(row[answer])].astype(np.float64))
                    assert p.sum() == pytest.approx(1.0, abs=2e-2)  # float16 log-probabilities
    assert pieced > 0  # character tokens: its 48-token windows read less text than the features' windows


def test_a_carried_teacher_with_the_features_tokens_gives_its_own_distributions(carried_run, carried_teachers):
    """The same tokens under another vocabulary: carrying is exact, the stored values are the teacher's own
    softmax over the answer positions, run directly on the features (its ids are theirs)."""
    from pipeline.model.inference import autocast_dtype, shard_logits
    from pipeline.model.loading import load_qa_model
    from pipeline.store.features import read_windows
    from pipeline.store.logits import read_logits

    run, _ = carried_run
    model = load_qa_model(str(carried_teachers[1])).eval()
    manifest = json.loads((run / "data/teacher/dev/teacher-3/manifest.json").read_text())
    assert manifest["carried"]["features_pieced"] == 0 and manifest["carried"]["mean_covered"] == pytest.approx(1.0)
    dtype = autocast_dtype(torch.device("cpu"), manifest["fingerprint_parts"]["precision"])  # as the stage ran it
    for shard in sorted((run / "data/features/dev").glob("part-*.parquet")):
        windows = read_windows(shard)
        _, direct_start, direct_end = shard_logits(model, shard, 0, torch.device("cpu"), 8, 1 << 20, dtype)
        _, stored_start, stored_end = read_logits(run / "data/teacher/dev/teacher-3" / shard.name)
        for i in range(len(stored_start)):
            answer = np.r_[0, np.arange(windows.context_start[i], windows.context_end[i] + 1)]
            for direct, stored in ((direct_start[i], stored_start[i]), (direct_end[i], stored_end[i])):
                expected = torch.log_softmax(torch.tensor(direct[answer], dtype=torch.float64), -1).numpy()
                assert np.ptp(expected) > 0.05  # positions differ enough that a misplaced one would show
                np.testing.assert_allclose(stored[answer], expected, atol=1e-2)  # float16 log-probabilities


def test_a_teacher_failing_half_way_leaves_the_others_for_the_rerun(prepared_run, more_teachers, tmp_path,
                                                                    monkeypatch):
    import pyarrow.parquet as pq

    run = copy_run(prepared_run, tmp_path / "run")
    shutil.rmtree(run / ".kdqa")  # no logits cache: the first teacher computes its shards in this run
    shutil.rmtree(run / "data/teacher")
    set_params(run, teacher__model=None, teacher__models=[f"./{INPUTS}/teacher", str(more_teachers[0])])
    original, writes = pq.write_table, []

    def write_table(table, path, *a, **k):
        if "teacher-work/teacher-1" in str(path):
            writes.append(path)
            if len(writes) == 2:
                raise OSError(28, "No space left on device")
        return original(table, path, *a, **k)

    monkeypatch.setattr(pq, "write_table", write_table)
    failed = kdqa(run, "teacher")
    monkeypatch.undo()
    assert failed.exit_code == 1 and "teacher-work/teacher-1/train" in failed.stderr
    assert not (run / "data/teacher/train").exists()  # nothing published half-way
    rerun = kdqa(run, "teacher")
    assert rerun.exit_code == 0, rerun.output
    assert "1 reused from earlier runs (teacher.models[0]" in rerun.stderr  # its finished shards, not recomputed
    assert "resuming, 1 of" in rerun.stderr  # the failed teacher's one finished shard
    assert digests(run / "data/teacher/train/teacher-0") == digests(prepared_run / "data/teacher/train")


def test_the_stream_carries_one_combined_target_per_batch(ensemble_run):
    from pipeline.store.logits import read_logits
    from pipeline.training.stream import ShardStream, find_shard_pairs

    run, _ = ensemble_run
    pairs = find_shard_pairs(run / "data/features/train", run / "data/teacher/train")
    assert [p.name for p in pairs[0].teacher_shards] == ["part-00000.parquet"] * 2
    combination = Combination((2.0, 1.0), 2.0, "drop")
    stream = ShardStream(pairs[:1], batch_size=4, seed=0, pad_token_id=0, combination=combination)
    batch = next(iter(stream))
    assert batch["teacher_start"].shape == batch["input_ids"].shape and batch["target_weight"].shape == (4,)
    # The batch's first row, found by its tokens, against the two teachers' stored logits combined by hand.
    from pipeline.store.features import read_training_rows

    rows = read_training_rows(pairs[0].features_path)
    row = next(i for i, ids in enumerate(rows.input_ids)
               if len(ids) <= batch["input_ids"].shape[1] and np.array_equal(batch["input_ids"][0, :len(ids)], ids))
    allowed = [0, *range(int(rows.context_start[row]), int(rows.context_end[row]) + 1)]
    per_teacher = [softmax_at([float(read_logits(shard)[1][row][j]) for j in allowed], 2.0)
                   for shard in pairs[0].teacher_shards]
    expected = [(2 * a + b) / 3 for a, b in zip(*per_teacher)]
    got = softmax_at([float(batch["teacher_start"][0, j]) for j in allowed], 2.0)
    assert got == pytest.approx(expected, abs=1e-5)


def test_the_stream_leaves_out_positions_a_carried_teacher_did_not_see(ensemble_run, tmp_path):
    """teacher-1's logits with NaN at each row's first context token (as a carried teacher holds where none of its
    windows saw it): the batch's teacher_mask is False exactly there and the target is the mixture over the rest."""
    from pipeline.store.features import read_training_rows
    from pipeline.store.logits import read_logits, write_logits_shard
    from pipeline.training.stream import ShardPair, ShardStream, find_shard_pairs

    run, _ = ensemble_run
    [pair, *_] = find_shard_pairs(run / "data/features/train", run / "data/teacher/train")
    rows = read_training_rows(pair.features_path)
    ids, start, end = read_logits(pair.more_logits[0])
    for i, first in enumerate(rows.context_start):
        start[i][first] = end[i][first] = np.nan
    write_logits_shard(tmp_path / "carried.parquet", ids.to_pylist(), start, end)
    carried = ShardPair(pair.features_path, pair.logits_path, pair.rows, (tmp_path / "carried.parquet",))
    batch = next(iter(ShardStream([carried], batch_size=4, seed=0, pad_token_id=0,
                                  combination=Combination.equal(2, temperature=2.0))))
    row = next(i for i, ids in enumerate(rows.input_ids)
               if len(ids) <= batch["input_ids"].shape[1] and np.array_equal(batch["input_ids"][0, :len(ids)], ids))
    first, last = int(rows.context_start[row]), int(rows.context_end[row])
    assert (~batch["teacher_mask"]).sum(-1).tolist() == [1] * 4 and not batch["teacher_mask"][0, first]
    seen = [0, *range(first + 1, last + 1)]
    per_teacher = [softmax_at([float(read_logits(shard)[1][row][j]) for j in seen], 2.0)
                   for shard in pair.teacher_shards]
    got = softmax_at([float(batch["teacher_start"][0, j]) for j in seen], 2.0)
    assert got == pytest.approx([(a + b) / 2 for a, b in zip(*per_teacher)], abs=1e-5)
    assert torch.isfinite(batch["teacher_start"]).all() and torch.isfinite(batch["teacher_end"]).all()


def test_student_trains_on_the_ensemble_and_evaluate_and_inspect_score_each_teacher(carried_run, carried_teachers,
                                                                                      tmp_path):
    """Four teachers, two of them carried from their own tokenizers."""
    from pipeline.model.scoring import score_logit_shards
    from pipeline.params import load_params

    run = copy_run(carried_run[0], tmp_path / "run")
    set_params(run, student__max_steps=3, student__teacher_weights=[2, 1, 1, 1], student__teacher_agreement="weight")
    result = kdqa(run, "student")
    assert result.exit_code == 0, result.output
    assert "target: the mean of 4 teachers' probabilities at T=2.0, weights [2.0, 1.0, 1.0, 1.0]" in result.stderr
    card = json.loads((run / "models/student/kdqa_training.json").read_text())
    assert card["teachers"][0].endswith("inputs/teacher") and card["teachers"][1].endswith("teacher-7")
    result = kdqa(run, "evaluate")
    assert result.exit_code == 0, result.output
    scores = json.loads((run / "metrics/teacher.json").read_text())
    assert set(scores) == {"teacher-0", "teacher-1", "teacher-2", "teacher-3", "ensemble"}
    params = load_params(run / "params.yaml")
    dev = run / "data/teacher/dev"
    for teacher in ("teacher-1", "teacher-2"):  # teacher-2: carried, scored on the features' windows
        alone = score_logit_shards(run / "data/features/dev", [dev / teacher], params,
                                   run / "data/features/dev_examples.parquet")
        assert {k: scores[teacher][k] for k in alone} == alone  # as if it were the only teacher
        assert 0 <= alone["f1"] <= 100
    assert f"teacher-2 on dev: EM {scores['teacher-2']['exact']:.2f}" in result.stderr
    assert f"(carried from tokenizer {carried_teachers[0]}: as seen through the features' tokens)" in result.stderr
    assert scores["ensemble"]["null_threshold_source"] == scores["teacher-0"]["null_threshold_source"]
    assert "ensemble on dev: EM" in result.stderr
    inspected = json.loads(kdqa(run, "inspect", "--json", "data/teacher/dev").stdout)
    assert inspected["teachers"] == 4 and inspected["teacher-1"]["model"].endswith("teacher-7")
    for key in ("ensemble_span_accuracy", "ensemble_start_accuracy"):
        assert isinstance(inspected[key], float)
    assert isinstance(inspected["teacher-2"]["teacher_span_accuracy"], float)
    assert inspected["teacher-2"]["carried"]["tokenizer"] == str(carried_teachers[0])
    assert "carried" not in inspected["teacher-0"]
    text = kdqa(run, "inspect", "data/teacher/dev").stdout
    assert "teacher-0.teacher_span_accuracy" in text and "ensemble_span_accuracy" in text
    assert "teacher-2.carried.tokenizer" in text


def test_a_student_of_other_windows_learns_from_every_teacher_carried_onto_them(prepared_run, carried_run, tmp_path):
    """kdqa align with several teachers: each one's targets in a folder of its own, the first one's byte for byte
    what aligning it alone gives; the student combines them."""
    alone = copy_run(prepared_run, tmp_path / "alone")
    set_params(alone, student__max_seq_len=40)
    assert kdqa(alone, "align").exit_code == 0
    run = copy_run(carried_run[0], tmp_path / "run")
    set_params(run, student__max_seq_len=40, student__max_steps=2)
    result = kdqa(run, "align")
    assert result.exit_code == 0, result.output
    assert "for each of 4 teachers" in result.stderr and "teacher-2: " in result.stderr
    for split in ("train",):
        targets = run / "data/aligned/teacher" / split
        manifest = json.loads((targets / "manifest.json").read_text())
        assert [t["folder"] for t in manifest["teachers"]] == [f"teacher-{i}" for i in range(4)]
        features = digests(run / "data/aligned/features" / split)
        assert features == digests(alone / "data/aligned/features" / split)
        assert digests(targets / "teacher-0") == digests(alone / "data/aligned/teacher" / split)
        for i in range(1, 4):
            assert digests(targets / f"teacher-{i}").keys() == features.keys()
            assert digests(targets / f"teacher-{i}") != digests(targets / "teacher-0")
    inspected = json.loads(kdqa(run, "inspect", "--json", "data/aligned/teacher/train").stdout)
    assert inspected["teachers"] == 4 and inspected["teacher-1"]["model"].endswith("teacher-7")
    assert isinstance(inspected["ensemble_span_accuracy"], float)  # against the student's own features' labels
    result = kdqa(run, "student")
    assert result.exit_code == 0, result.output
    assert "target: the mean of 4 teachers' probabilities" in result.stderr


def test_teacher_models_names_the_teachers_and_teacher_model_a_list_of_one(tmp_path):
    from pipeline.params import load_params

    path = tmp_path / "params.yaml"
    path.write_text("teacher:\n  models: [a, b]\n")
    assert load_params(path).teacher.teachers == ["a", "b"] and load_params(path).teacher.model is None
    path.write_text("teacher:\n  model: a\n")
    assert load_params(path).teacher.teachers == ["a"]
    path.write_text("teacher:\n  model: null\n  models: [a]\nstudent:\n  teacher_weights: [1, 2]\n")
    assert load_params(path).student.teacher_weights == [1.0, 2.0]


# ---------------------------------------------------------------------------------------------------------
# A carried teacher that never sees some of the features' tokens (a real case, not injected NaN)
# ---------------------------------------------------------------------------------------------------------

# Format characters (Unicode category Cf): BERT's normalizer (clean_text) deletes them, a tokenizer without that
# normalizer keeps each one, between spaces, as an [UNK] token with its own offsets.
ZERO_WIDTH_SPACE, SOFT_HYPHEN = "\u200b", "\u00ad"


def with_format_characters(source: Path, out: Path) -> Path:
    """`source`'s SQuAD file with format characters in every context: a zero-width space at each end (tokens of
    the features' tokenizer outside every window of the BERT teacher: unseen), a soft hyphen before the final
    period (inside the teacher's windows but on no token of it: seen, no mass), and the first context opening
    with enough zero-width spaces to fill a whole features window."""
    doc = json.loads(source.read_text())
    paragraphs = [p for article in doc["data"] for p in article["paragraphs"]]
    for n, paragraph in enumerate(paragraphs):
        lead = f"{ZERO_WIDTH_SPACE} " * (40 if n == 0 else 1)
        assert paragraph["context"].endswith(".")
        paragraph["context"] = f"{lead}{paragraph['context'][:-1]} {SOFT_HYPHEN}. {ZERO_WIDTH_SPACE}"
        for qa in paragraph["qas"]:
            for answer in qa["answers"]:
                answer["answer_start"] += len(lead)
    out.write_text(json.dumps(doc))
    return out


@pytest.fixture(scope="module")
def unseen_run(tmp_path_factory) -> tuple[Path, str]:
    """prepare + teacher of two teachers: teacher.models[0] (the features') reads format characters as [UNK]
    tokens, teacher.models[1] is a BERT whose normalizer deletes them (carried). Its log too. Read-only."""
    run = tmp_path_factory.mktemp("unseen") / "run"
    inputs = run / INPUTS
    vocab = tiny.write_vocab(inputs / "vocab").read_text().split()
    for name, layers, seed in (("teacher", 2, 3), ("student", 1, 4)):
        tiny.make_model(inputs / name, layers=layers, seed=seed)
        tiny.make_stripping_tokenizer(inputs / name, vocab, keep=None)  # the same ids, no normalizer
    tiny.make_model(inputs / "carried", layers=2, seed=5)
    train = with_format_characters(tiny.make_squad(inputs / "squad-train.json", articles=2, questions=3, seed=2),
                                   inputs / "train.json")
    dev = with_format_characters(tiny.make_squad(inputs / "squad-dev.json", articles=1, questions=3, seed=3),
                                 inputs / "dev.json")
    tiny.write_params(run / "params.yaml", f"./{INPUTS}/teacher", f"./{INPUTS}/student", train, dev,
                      teacher__model=None, teacher__models=[f"./{INPUTS}/teacher", f"./{INPUTS}/carried"])
    assert kdqa(run, "prepare").exit_code == 0
    result = kdqa(run, "teacher")
    assert result.exit_code == 0, result.output
    return run, result.stderr


def contexts_by_id(path: Path) -> dict[str, str]:
    doc = json.loads(path.read_text())
    return {qa["id"]: p["context"] for a in doc["data"] for p in a["paragraphs"] for qa in p["qas"]}


def unseen_positions(windows, row: int, seen_chars: tuple[int, int]) -> list[int]:
    """The context positions of a features row whose characters all lie outside [lo, hi)."""
    lo, hi = seen_chars
    return [k for k in range(windows.context_start[row], windows.context_end[row] + 1)
            if windows.offset_end[row][k] <= lo or windows.offset_start[row][k] >= hi]


def token_offsets(tokenizer, text: str) -> list[tuple[int, int]]:
    return tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]


def seen_chars(tokenizer, context: str) -> tuple[int, int]:
    """The characters [lo, hi) a teacher's windows of `context` read: its windows overlap, so together they read
    from its first token of the context to its last."""
    offsets = token_offsets(tokenizer, context)
    return offsets[0][0], offsets[-1][1]


def test_a_carried_teacher_holds_nan_exactly_where_none_of_its_tokens_covers_a_feature_position(unseen_run):
    from transformers import AutoTokenizer

    from pipeline.store.features import read_windows
    from pipeline.store.logits import read_logits
    from pipeline.text.alignment import NO_MASS

    run, log = unseen_run
    assert f"{INPUTS}/carried) carried onto the features' tokens: train:" in log  # teacher-1 is carried
    features_tokenizer = AutoTokenizer.from_pretrained(run / INPUTS / "teacher")
    carried_tokenizer = AutoTokenizer.from_pretrained(run / INPUTS / "carried")
    unseen, whole_rows, no_mass = 0, 0, 0
    for split in ("train", "dev"):
        contexts = contexts_by_id(run / INPUTS / f"{split}.json")
        folder = run / "data/teacher" / split / "teacher-1"
        for shard in sorted((run / "data/features" / split).glob("part-*.parquet")):
            windows = read_windows(shard)
            ids, start, end = read_logits(folder / shard.name)
            assert ids.to_pylist() == windows.feature_ids
            for row, example_id in enumerate(windows.example_ids):
                expected = unseen_positions(windows, row, seen_chars(carried_tokenizer, contexts[example_id]))
                for values in (start[row], end[row]):
                    assert np.flatnonzero(np.isnan(values)).tolist() == expected, windows.feature_ids[row]
                unseen += len(expected)
                whole_rows += len(expected) == windows.context_end[row] - windows.context_start[row] + 1
                # The soft hyphen: inside the teacher's windows, on none of its tokens: seen, with no mass.
                hyphen = [k for k in range(windows.context_start[row], windows.context_end[row] + 1)
                          if contexts[example_id][windows.offset_start[row][k]] == SOFT_HYPHEN]
                assert all(start[row][k] == NO_MASS == end[row][k] for k in hyphen)
                no_mass += len(hyphen)
        # Mass coverage (the manifest's figure): every character a teacher token starts or ends on is inside a
        # features token here (the features' tokenizer keeps every non-space character), so no teacher mass is
        # lost, unseen positions or not: they hold none of it.
        manifest = json.loads((folder / "manifest.json").read_text())["carried"]
        assert manifest["mean_covered"] == 1.0
        assert manifest["features"] == sum(len(read_windows(p).feature_ids)
                                           for p in (run / "data/features" / split).glob("part-*.parquet"))
        for context in set(contexts.values()):
            held = np.zeros(len(context), dtype=bool)
            for s, e in token_offsets(features_tokenizer, context):
                held[s:e] = True
            assert all(held[s] and held[e - 1] for s, e in token_offsets(carried_tokenizer, context))
    # The case exists: unseen positions, a whole row of them (the first context's leading run), seen ones without mass.
    assert unseen > 0 and whole_rows >= 1 and no_mass > 0


def test_the_student_target_renormalises_each_teacher_over_the_positions_all_teachers_saw(unseen_run, tmp_path):
    from pipeline.store.features import read_training_rows
    from pipeline.store.logits import read_logits
    from pipeline.training.stream import ShardStream, find_shard_pairs

    run, _ = unseen_run
    weights, temperature = (1.0, 3.0), 2.0
    pairs = find_shard_pairs(run / "data/features/train", run / "data/teacher/train")
    stream = ShardStream(pairs, batch_size=1000, seed=0, pad_token_id=0,
                         combination=Combination(weights, temperature))
    checked, masked = 0, 0
    for shard_index, pair in enumerate(pairs):
        rows = read_training_rows(pair.features_path)
        row_of = {tuple(ids): row for row, ids in enumerate(rows.input_ids)}
        assert len(row_of) == len(rows.input_ids)  # every row found by its tokens
        teachers = [read_logits(shard) for shard in pair.teacher_shards]
        for batch in stream.shard_batches(shard_index):
            assert torch.isfinite(batch["teacher_start"]).all() and torch.isfinite(batch["teacher_end"]).all()
            for b, ids in enumerate(batch["input_ids"]):
                row = row_of[tuple(ids[: int(batch["attention_mask"][b].sum())].tolist())]
                context = range(int(rows.context_start[row]), int(rows.context_end[row]) + 1)
                unseen = [j for j in context if np.isnan(teachers[1][1][row][j])]
                seen = [0, *(j for j in context if j not in unseen)]
                assert np.flatnonzero(~batch["teacher_mask"][b].numpy()).tolist() == unseen
                for side, name in ((1, "teacher_start"), (2, "teacher_end")):
                    per_teacher = [softmax_at([float(t[side][row][j]) for j in seen], temperature) for t in teachers]
                    mixture = [sum(w * p[i] for w, p in zip(weights, per_teacher)) / sum(weights)
                               for i in range(len(seen))]
                    got = softmax_at([float(batch[name][b, j]) for j in seen], temperature)
                    assert got == pytest.approx(mixture, abs=1e-5)
                checked += 1
                masked += bool(unseen)
    assert checked == sum(p.rows for p in pairs) and masked > 0
    # The student trains on that target: finite losses, the KD term included.
    student = copy_run(run, tmp_path / "run")
    set_params(student, student__max_steps=3, student__teacher_weights=list(weights))
    result = kdqa(student, "student")
    assert result.exit_code == 0, result.output
    assert "target: the mean of 2 teachers' probabilities" in result.stderr
    log = list(csv.DictReader((student / "logs/student/train.tsv").open(), delimiter="\t"))
    assert len(log) == 3 and all(math.isfinite(float(r[k])) for r in log for k in ("loss", "kd_loss", "ce_loss"))


def test_align_keeps_a_carried_teachers_unseen_positions_unseen_on_a_students_windows(unseen_run, tmp_path):
    """kdqa align carries teacher-1 on from the features (where it holds NaN) onto a student's other windows: the
    student's tokens none of teacher-1's own tokens covers stay NaN, not "seen, no mass" (nor a window it never
    saw a sure "no answer"); teacher-0 saw every token. The student trains on both with finite losses."""
    from transformers import AutoTokenizer

    from pipeline.store.features import read_windows
    from pipeline.store.logits import read_logits

    run = copy_run(unseen_run[0], tmp_path / "run")
    set_params(run, student__max_seq_len=40, student__max_steps=2)
    assert kdqa(run, "align").exit_code == 0
    carried_tokenizer = AutoTokenizer.from_pretrained(run / INPUTS / "carried")
    contexts = contexts_by_id(run / INPUTS / "train.json")
    unseen, whole_rows = 0, 0
    for shard in sorted((run / "data/aligned/features/train").glob("part-*.parquet")):
        windows = read_windows(shard)
        targets = [read_logits(run / "data/aligned/teacher/train" / f"teacher-{k}" / shard.name) for k in (0, 1)]
        for row, example_id in enumerate(windows.example_ids):
            expected = unseen_positions(windows, row, seen_chars(carried_tokenizer, contexts[example_id]))
            for side in (1, 2):
                assert not np.isnan(targets[0][side][row]).any()
                assert np.flatnonzero(np.isnan(targets[1][side][row])).tolist() == expected, windows.feature_ids[row]
            unseen += len(expected)
            whole_rows += len(expected) == windows.context_end[row] - windows.context_start[row] + 1
    assert unseen > 0 and whole_rows >= 1
    result = kdqa(run, "student")
    assert result.exit_code == 0, result.output
    log = list(csv.DictReader((run / "logs/student/train.tsv").open(), delimiter="\t"))
    assert len(log) == 2 and all(math.isfinite(float(r[k])) for r in log for k in ("loss", "kd_loss", "ce_loss"))
