"""Extra data end to end on tiny models: unlabeled files and augmented views through prepare, the teacher's
logits cache and the student's per-epoch mix (docs/extra-data.md)."""

from __future__ import annotations

import csv
import json
import random
import shutil
from pathlib import Path

import pyarrow.parquet as pq
import pytest

import tiny
from conftest import make_run_dir, run_cli
from pipeline.text.augment import AugmentReport, make_views
from pipeline.text.features import NO_LABEL
from pipeline.text.squad import load_examples
from reliability_kit import assert_one_line_error, kdqa
from tiny import set_params

WORDS = tiny.WORDS[:40]


def make_sentence_squad(path: Path, articles: int, seed: int, id_prefix: str = "", answers: bool = True) -> Path:
    """SQuAD JSON whose paragraphs have several capitalised sentences (so every kind of view applies);
    answers are spans inside one sentence, a third of the questions unanswerable."""
    rng = random.Random(seed)
    data = []
    for a in range(articles):
        paragraphs = []
        for p in range(2):
            sentences = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 7))) for _ in range(4)]
            context = " ".join(s[0].upper() + s[1:] + "." for s in sentences)
            qas = []
            for q in range(3):
                qa = {"id": f"{id_prefix}a{a}p{p}q{q}", "question": " ".join(rng.choice(tiny.WORDS) for _ in range(4)) + "?"}
                if answers and q != 2:
                    sentence = rng.choice(sentences)
                    words = sentence.split()
                    text = " ".join(words[1:3])
                    start = context.index(sentence[0].upper() + sentence[1:]) + len(words[0]) + 1
                    assert context[start : start + len(text)] == text
                    qa["answers"] = [{"text": text, "answer_start": start}]
                else:
                    qa["answers"] = []
                qas.append(qa)
            paragraphs.append({"context": context, "qas": qas})
        data.append({"title": f"article {a}", "paragraphs": paragraphs})
    path.write_text(json.dumps({"version": "v2.0", "data": data}))
    return path


def shard_digests(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.glob("part-*.parquet"))}


@pytest.fixture(scope="module")
def extra_run(tmp_path_factory, tiny_assets) -> Path:
    """A run with one unlabeled file and 2 views per training question, after prepare and teacher. Read-only."""
    run = make_run_dir(tmp_path_factory.mktemp("extra") / "run", tiny_assets)
    make_sentence_squad(run / "inputs" / "train.json", articles=2, seed=0, id_prefix="t-")
    make_sentence_squad(run / "inputs" / "unlabeled.json", articles=2, seed=1, id_prefix="u-", answers=False)
    run_cli(["-q", "prepare"], run)  # labelled only first: train's shards must not change when extras come
    (run / "plain-train").mkdir()
    for path in (run / "data/features/train").iterdir():
        shutil.copy2(path, run / "plain-train" / path.name)
    set_params(run, data__unlabeled=["./inputs/unlabeled.json"], prepare__augment_views=2)
    run_cli(["-q", "prepare"], run)
    run_cli(["-q", "teacher"], run)
    return run


@pytest.fixture
def extra_copy(extra_run, tmp_path) -> Path:
    return Path(shutil.copytree(extra_run, tmp_path / "run", symlinks=True))


def features(run: Path, split: str) -> list[dict]:
    return [row for path in sorted((run / "data/features" / split).glob("part-*.parquet"))
            for row in pq.read_table(path).to_pylist()]


def test_prepare_writes_unlabeled_and_augmented_splits_beside_an_unchanged_train(extra_run):
    assert shard_digests(extra_run / "data/features/train") == shard_digests(extra_run / "plain-train")
    unlabeled = features(extra_run, "unlabeled")
    assert unlabeled and all(r["start_position"] == r["end_position"] == NO_LABEL for r in unlabeled)
    assert all(r["feature_id"].startswith("u-") for r in unlabeled)

    train, _ = load_examples(str(extra_run / "inputs/train.json"), "train")
    augmented = features(extra_run, "augmented")
    ids = {ex.id for ex in train}
    for row in augmented:
        example, view, window = row["feature_id"].split("#")
        assert example in ids and view in ("0", "1") and row["example_id"] == f"{example}#{view}"
        assert row["feature_id"] == f"{row['example_id']}#{row['window']}"
    # The labels that were kept point at the answer's text in the view (views rebuilt here: deterministic).
    report = AugmentReport()
    views = {v.id: v for view in range(2) for v in make_views(train, view, 0, ["sentences", "other_paragraph",
                                                                             "distractor"], report)}
    labelled = [r for r in augmented if r["start_position"] > 0]
    assert labelled
    for row in labelled:
        view = views[row["example_id"]]
        text = view.context[row["offset_start"][row["start_position"]] : row["offset_end"][row["end_position"]]]
        assert view.labelled and text == view.answer_texts[0]
    assert all(not views[r["example_id"]].labelled for r in augmented if r["start_position"] == NO_LABEL)

    saved = json.loads((extra_run / "data/features/report.json").read_text())
    assert saved["augmented"] == report.to_dict() and set(report.by_kind) == {"sentences", "other_paragraph",
                                                                             "distractor"}
    assert report.labelled > 0 and report.teacher_only > 0
    # `kdqa -C RUN` reads (and records) the params' relative paths under the run
    assert saved["unlabeled"] == [{"source": str(extra_run / "inputs/unlabeled.json"), "questions": 12, "answers_ignored": 0,
                                   "contexts_in_dev": 0}]
    manifest = json.loads((extra_run / "data/features/augmented/manifest.json").read_text())
    assert sum(run["examples"] for run in manifest["runs"]) == report.views
    assert manifest["augment"]["augment_views"] == 2


def test_each_view_number_starts_its_own_shards(extra_run):
    manifest = json.loads((extra_run / "data/features/augmented/manifest.json").read_text())
    assert len(manifest["runs"]) == 2
    for number, run in enumerate(manifest["runs"]):
        for name in run["shards"]:
            rows = pq.read_table(extra_run / "data/features/augmented" / name, columns=["example_id"]).to_pylist()
            assert {r["example_id"].rsplit("#", 1)[1] for r in rows} == {str(number)}


def test_adding_data_computes_only_the_new_shards_and_keeps_the_old_logits(extra_copy):
    run = extra_copy
    before = {split: shard_digests(run / "data/teacher" / split) for split in ("train", "dev", "unlabeled", "augmented")}
    make_sentence_squad(run / "inputs" / "more.json", articles=1, seed=2, id_prefix="m-", answers=False)
    set_params(run, data__unlabeled=["./inputs/unlabeled.json", "./inputs/more.json"], prepare__augment_views=3)
    run_cli(["-q", "prepare"], run)
    shutil.rmtree(run / "data/teacher")  # as `dvc repro` does before rerunning the stage
    result = kdqa(run, "teacher")
    assert result.exit_code == 0, result.output
    new = {"unlabeled": len(json.loads((run / "data/features/unlabeled/manifest.json").read_text())["runs"][1]["shards"]),
           "augmented": len(json.loads((run / "data/features/augmented/manifest.json").read_text())["runs"][2]["shards"])}
    for split, digests in before.items():
        computed = new.get(split, 0)
        total = len(digests) + computed
        assert f"{split}: {computed} of {total} shards to compute, {len(digests)} copied" in result.stderr
        after = shard_digests(run / "data/teacher" / split)
        assert {name: after[name] for name in digests} == digests  # byte for byte
        assert len(after) == total
    manifest = json.loads((run / "data/teacher/unlabeled/manifest.json").read_text())
    assert manifest["shards_from_cache"] == len(before["unlabeled"])


def test_a_damaged_cache_entry_is_computed_again(extra_copy):
    run = extra_copy
    train_logits = shard_digests(run / "data/teacher/train")
    for entry in (run / ".kdqa/teacher-cache").rglob("*.parquet"):
        entry.write_bytes(b"PAR1 damaged")
    shutil.rmtree(run / "data/teacher")
    result = kdqa(run, "teacher")
    assert result.exit_code == 0, result.output
    assert f"train: {len(train_logits)} of {len(train_logits)} shards to compute, 0 copied" in result.stderr
    assert shard_digests(run / "data/teacher/train") == train_logits  # the same teacher computes the same bytes


def read_curve(run: Path) -> list[dict]:
    with open(run / "logs/student/train.tsv") as f:
        return list(csv.DictReader(f, delimiter="\t"))


def steps_taken(run: Path) -> int:
    return json.loads((run / "models/student/kdqa_training.json").read_text())["steps"]


def test_student_mixes_extra_rows_by_shard_and_logs_ce_over_labelled_rows(extra_copy):
    from pipeline.training.mixing import extra_quota, extra_shards_by_epoch

    run = extra_copy
    set_params(run, student__epochs=2, student__extra_ratio=1.0, student__extra_splits=["unlabeled"])
    result = kdqa(run, "student")
    assert result.exit_code == 0, result.output
    assert "labelled rows + about" in result.stderr
    manifest = lambda split: json.loads((run / "data/features" / split / "manifest.json").read_text())  # noqa: E731
    train_rows = [s["rows"] for s in manifest("train")["shards"]]
    extra_rows = [s["rows"] for s in manifest("unlabeled")["shards"]]
    plan = extra_shards_by_epoch(extra_rows, extra_quota(sum(train_rows), 1.0), seed=1, epochs=2)
    batches = lambda rows: sum(-(-r // 4) for r in rows)  # noqa: E731  (batch_size 4)
    assert steps_taken(run) == 2 * batches(train_rows) + sum(batches([extra_rows[i] for i in p]) for p in plan)
    curve = read_curve(run)
    unlabeled_only = [r for r in curve if r["ce_loss"] == ""]  # batches of unlabeled rows: no CE to log
    assert len(unlabeled_only) == sum(batches([extra_rows[i] for i in p]) for p in plan)
    assert all(float(r["kd_loss"]) > 0 for r in curve)
    card = (run / "models/student/README.md").read_text()
    assert f"plus rows only the teacher labelled (unlabeled `{run / 'inputs/unlabeled.json'}`), 1 per labelled row" in card


@pytest.mark.parametrize("changes", [{"student__extra_ratio": 0.0}, {"student__distillation_weight": 0.0},
                                     {"student__extra_splits": []}])
def test_without_extra_rows_the_student_trains_on_the_labelled_rows_only(extra_copy, changes):
    run = extra_copy
    set_params(run, student__epochs=1, **changes)
    result = kdqa(run, "student")
    assert result.exit_code == 0, result.output
    train_rows = [s["rows"] for s in json.loads((run / "data/features/train/manifest.json").read_text())["shards"]]
    assert steps_taken(run) == sum(-(-r // 4) for r in train_rows)
    if changes.get("student__distillation_weight") == 0.0:
        assert "trains on the labelled rows only" in result.stderr
    assert "only the teacher labelled" not in (run / "models/student/README.md").read_text()


def test_extra_splits_no_longer_asked_for_are_removed(extra_copy):
    run = extra_copy
    set_params(run, data__unlabeled=[], prepare__augment_views=0)
    run_cli(["-q", "prepare"], run)
    run_cli(["-q", "teacher"], run)
    for folder in ("features", "teacher"):
        assert sorted(p.name for p in (run / "data" / folder).iterdir() if p.is_dir()) == ["dev", "train"]


# --- bad input: one line naming the file and the problem, and nothing written ---

def test_unlabeled_id_equal_to_a_training_id_names_both_files(extra_copy):
    run = extra_copy
    shutil.rmtree(run / "data/features")
    clash = make_sentence_squad(run / "inputs" / "clash.json", articles=1, seed=3, id_prefix="t-", answers=False)
    set_params(run, data__unlabeled=["./inputs/unlabeled.json", "./inputs/clash.json"])
    assert_one_line_error(kdqa(run, "-q", "prepare"), "clash.json", "train.json", "'t-a0p0q0'", "id of its own")
    assert not (run / "data/features").exists()
    assert clash.exists()


@pytest.mark.parametrize("content,fragment", [("", "empty file"), ('{"data": []}', "no questions")])
def test_empty_unlabeled_file_is_one_clear_error(extra_copy, content, fragment):
    run = extra_copy
    (run / "inputs" / "empty.json").write_text(content)
    set_params(run, data__unlabeled=["./inputs/empty.json"])
    before = shard_digests(run / "data/features/unlabeled")
    assert_one_line_error(kdqa(run, "-q", "prepare"), "empty.json", fragment)
    assert shard_digests(run / "data/features/unlabeled") == before  # the previous output is untouched


def test_unlabeled_answers_are_ignored_and_counted(extra_copy):
    run = extra_copy
    set_params(run, data__unlabeled=["./inputs/train.json"], data__train="./inputs/other-train.json")
    make_sentence_squad(run / "inputs" / "other-train.json", articles=1, seed=4, id_prefix="o-")
    run_cli(["-q", "prepare"], run)
    (report,) = json.loads((run / "data/features/report.json").read_text())["unlabeled"]
    assert report["answers_ignored"] == 8 and report["questions"] == 12  # 2 of 3 questions answered
    assert all(r["start_position"] == NO_LABEL for r in features(run, "unlabeled"))


@pytest.mark.parametrize("key,value,fragment", [
    ("prepare__augment_kinds", ["sentences", "shuffle"], "unknown 'shuffle'"),
    ("student__extra_splits", ["unlabelled"], "unknown 'unlabelled'"),
    ("data__unlabeled", ["a.json", "a.json"], "lists 'a.json' twice"),
    ("data__unlabeled", "a.json", "must be a list"),
    ("student__extra_ratio", -1, "at least 0"),
])
def test_bad_extra_data_params(extra_copy, key, value, fragment):
    set_params(extra_copy, **{key: value})
    assert_one_line_error(kdqa(extra_copy, "-q", "prepare"), "params.yaml", fragment)


def rows_by_example(folder: Path) -> dict[str, list[int]]:
    """Example id -> start positions of its features, in shard order."""
    out: dict[str, list[int]] = {}
    for path in sorted(folder.glob("part-*.parquet")):
        for row in pq.read_table(path, columns=["example_id", "start_position"]).to_pylist():
            out.setdefault(row["example_id"], []).append(row["start_position"])
    return out


def test_an_aligned_student_gets_the_extra_rows_on_its_own_windows(extra_copy):
    """Issues 14 and 17 together: `kdqa align` carries the unlabeled and augmented splits' logits onto the
    student's own windows as well, and the student mixes them in exactly as it mixes the teacher's."""
    from pipeline.training.mixing import extra_quota, extra_shards_by_epoch

    run = extra_copy
    set_params(run, student__max_seq_len=24, student__doc_stride=6, student__epochs=2, student__extra_ratio=1.0)
    run_cli(["-q", "align"], run)
    aligned = run / "data/aligned"
    manifest = json.loads((aligned / "manifest.json").read_text())
    for split in ("train", "unlabeled", "augmented"):
        teacher, student = rows_by_example(run / "data/features" / split), rows_by_example(aligned / "features" / split)
        assert list(student) == list(teacher)  # every example, in prepare's order (views made again identically)
        assert sum(map(len, student.values())) > sum(map(len, teacher.values()))  # shorter windows: more rows
        # Hard labels where, and only where, the teacher's features had them (teacher-only views stay so).
        assert ({e for e, starts in student.items() if set(starts) == {NO_LABEL}}
                == {e for e, starts in teacher.items() if set(starts) == {NO_LABEL}})
        assert manifest[split]["mean_covered"] == pytest.approx(1.0)
        targets = json.loads((aligned / "teacher" / split / "manifest.json").read_text())
        assert targets["split"] == split and targets["rows"] == manifest[split]["features"]
    assert set(rows_by_example(aligned / "features/unlabeled")["u-a0p0q0"]) == {NO_LABEL}

    result = kdqa(run, "student")
    assert result.exit_code == 0, result.output
    shard_rows = lambda split: [s["rows"] for s in json.loads(  # noqa: E731
        (aligned / "features" / split / "manifest.json").read_text())["shards"]]
    train_rows, extra_rows = shard_rows("train"), shard_rows("unlabeled") + shard_rows("augmented")
    plan = extra_shards_by_epoch(extra_rows, extra_quota(sum(train_rows), 1.0), seed=1, epochs=2)
    batches = lambda rows: sum(-(-r // 4) for r in rows)  # noqa: E731  (batch_size 4)
    assert steps_taken(run) == 2 * batches(train_rows) + sum(batches([extra_rows[i] for i in p]) for p in plan)


def test_extra_splits_made_after_the_alignment_make_it_stale(extra_copy):
    """Aligned targets made before the teacher labelled more rows are refused, naming `kdqa align`."""
    run = extra_copy
    set_params(run, student__max_seq_len=40, student__doc_stride=8, prepare__augment_views=0, student__extra_ratio=1.0)
    run_cli(["-q", "prepare"], run)
    run_cli(["-q", "teacher"], run)
    run_cli(["-q", "align"], run)
    set_params(run, prepare__augment_views=1)
    run_cli(["-q", "prepare"], run)
    run_cli(["-q", "teacher"], run)
    assert_one_line_error(kdqa(run, "-q", "student"), "data/aligned", "extra_splits", "kdqa align")
    run_cli(["-q", "align"], run)
    result = kdqa(run, "-q", "student")
    assert result.exit_code == 0, result.output
