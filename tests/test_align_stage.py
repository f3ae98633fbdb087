"""`kdqa align` (pipeline/stages/align.py): the teacher's logits on a student's own tokenizer and windows."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pytest

from pipeline.runtime.workspace import Workspace
import yaml

import tiny
from conftest import run_cli
from pipeline.text.alignment import Window, answer_probabilities
from pipeline.store.shards import list_shards, read_json, read_table, shard_name, write_table_atomic
from reliability_kit import assert_one_line_error, kdqa

def set_params(run, **changes):
    """Edit the run's params.yaml: section__key=value."""
    params = yaml.safe_load((run / "params.yaml").read_text())
    for key, value in changes.items():
        section, name = key.split("__")
        params[section][name] = value
    (run / "params.yaml").write_text(yaml.safe_dump(params))


def rows(folder, columns):
    tables = [read_table(p, columns=columns) for p in list_shards(folder)]
    return {c: [v for t in tables for v in t.column(c).to_pylist()] for c in columns}


def kept_probabilities(row: np.ndarray, cs: int, ce: int) -> np.ndarray:
    p = np.exp(np.r_[row[0], row[cs : ce + 1]].astype(np.float64))
    return p[~np.isnan(p)]


def test_same_tokenizer_and_windows_need_no_alignment(run_copy):
    run_cli(["-q", "align"], run_copy)
    manifest = read_json(run_copy / "data/aligned/manifest.json")
    assert manifest["mode"] == "direct"
    assert sorted(p.name for p in (run_copy / "data/aligned").iterdir()) == ["manifest.json"]


def test_student_windows_of_their_own_get_the_teachers_logits(run_copy):
    set_params(run_copy, student__max_seq_len=32, student__doc_stride=8)
    run_cli(["-q", "align"], run_copy)
    aligned = run_copy / "data/aligned"
    manifest = read_json(aligned / "manifest.json")
    assert manifest["mode"] == "aligned"
    assert manifest["train"]["mean_covered"] == pytest.approx(1.0)
    features = rows(aligned / "features/train", ["feature_id", "input_ids", "context_start", "context_end"])
    targets = rows(aligned / "teacher/train", ["feature_id", "start_logits", "end_logits"])
    teacher_rows = len(rows(run_copy / "data/features/train", ["feature_id"])["feature_id"])
    assert features["feature_id"] == targets["feature_id"] and len(features["feature_id"]) > teacher_rows
    assert [p.name for p in list_shards(aligned / "features/train")] == [p.name for p in list_shards(aligned / "teacher/train")]
    for ids, cs, ce, start, end in zip(features["input_ids"], features["context_start"], features["context_end"],
                                       targets["start_logits"], targets["end_logits"]):
        assert len(ids) <= 32 and len(start) == len(ids)
        for head in (start, end):
            assert kept_probabilities(np.array(head, dtype=np.float16), cs, ce).sum() == pytest.approx(1, abs=5e-3)
    dev = rows(aligned / "features/dev", ["input_ids"])["input_ids"]
    assert dev and max(len(x) for x in dev) <= 32

    # Whether to rerun is DVC's call; a rerun by hand makes the same bytes again.
    before = {p: p.read_bytes() for p in sorted(aligned.rglob("*.parquet"))}
    run_cli(["-q", "align"], run_copy)
    assert {p: p.read_bytes() for p in sorted(aligned.rglob("*.parquet"))} == before


def test_the_stage_reads_the_teachers_windows_across_shards_in_order(run_copy):
    """Aligning onto the teacher's own tokenizer and windows gives back the teacher's logits, row for row."""
    from pipeline.stages.align import align_split, teacher_windows
    from pipeline.model.loading import load_tokenizer
    from pipeline.params import load_params
    from pipeline.text.squad import load_examples

    # Shards of 5 rows, so that some example's windows straddle two shards.
    for split_dir in ("features/train", "teacher/train"):
        table = pa.concat_tables(read_table(p) for p in list_shards(run_copy / "data" / split_dir))
        for i in range(0, table.num_rows, 5):
            write_table_atomic(table.slice(i, 5), run_copy / "resharded" / split_dir / shard_name(i // 5), 5)
    params = load_params(run_copy / "params.yaml", ws=Workspace(run_copy))
    examples, _ = load_examples(params.data.train, "train")
    tokenizer = load_tokenizer(params.teacher.model)
    [stats], _, _ = align_split("train", [examples], len(examples), tokenizer, params, run_copy / "f", [run_copy / "t"],
                                [teacher_windows(run_copy / "resharded/features/train",
                                                 run_copy / "resharded/teacher/train")],
                                params.data.train, run_copy / "resharded/features/train")
    assert stats.pieced == 0 and stats.covered == pytest.approx(stats.features)
    teacher = rows(run_copy / "data/teacher/train", ["feature_id", "start_logits"])
    ours = rows(run_copy / "t", ["feature_id", "start_logits"])
    features = rows(run_copy / "data/features/train", ["example_id", "context_start", "context_end"])
    shard_ids = [read_table(p, columns=["example_id"]).column("example_id").to_pylist()
                 for p in list_shards(run_copy / "resharded/features/train")]
    assert any(a[-1] == b[0] for a, b in zip(shard_ids, shard_ids[1:]))
    assert ours["feature_id"] == teacher["feature_id"]
    for z, got, cs, ce in zip(teacher["start_logits"], ours["start_logits"], features["context_start"],
                              features["context_end"]):
        window = Window(np.zeros(len(z)), np.zeros(len(z)), cs, ce)
        expected = answer_probabilities(np.array(z, dtype=np.float32), window)
        np.testing.assert_allclose(kept_probabilities(np.array(got, dtype=np.float16), cs, ce), expected, atol=2e-3)


def test_a_student_of_another_tokenizer_gets_features_of_its_own(run_copy):
    tiny.make_bert_tokenizer(run_copy / "inputs/char-student", tiny.CHARACTER_VOCAB)
    set_params(run_copy, student__model="./inputs/char-student")
    run_cli(["-q", "align"], run_copy)
    aligned = run_copy / "data/aligned"
    assert read_json(aligned / "manifest.json")["mode"] == "aligned"
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(run_copy / "inputs/char-student")
    ids = rows(aligned / "features/train", ["input_ids"])["input_ids"][0]
    words = [t for t in tok.convert_ids_to_tokens(ids) if not t.startswith("[")]
    assert words and all(len(t.removeprefix("##")) == 1 for t in words)  # every word split into characters
    assert read_json(aligned / "features/train/manifest.json")["tokenizer"] == str(run_copy / "inputs/char-student")


def test_slow_student_tokenizer_is_a_clear_error(run_copy, monkeypatch):
    import transformers

    slow = getattr(transformers, "BertTokenizerLegacy", None) or transformers.BertTokenizer  # v5 | v4 name
    vocab = run_copy / "inputs/student/vocab.txt"
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", lambda *a, **k: slow(vocab_file=str(vocab)))
    assert not slow(vocab_file=str(vocab)).is_fast
    set_params(run_copy, student__max_seq_len=32)
    assert_one_line_error(kdqa(run_copy, "-q", "align"), str(run_copy / "inputs/student"), "fast")
    assert not (run_copy / "data/aligned").exists()


def test_data_changed_since_prepare_is_a_clear_error(run_copy):
    train = run_copy / "inputs/train.json"
    data = json.loads(train.read_text())
    data["data"][0]["paragraphs"][0]["qas"].pop(0)
    train.write_text(json.dumps(data))
    set_params(run_copy, student__max_seq_len=32, student__doc_stride=8)
    assert_one_line_error(kdqa(run_copy, "-q", "align"), "data/features/train", "kdqa prepare")
    assert not (run_copy / "data/aligned").exists()


# --- students that train on aligned targets (kdqa align -> student -> evaluate) ---

def test_a_student_of_another_tokenizer_trains_and_is_scored_on_its_own_features(run_copy):
    tiny.make_model(run_copy / "inputs/char-student", layers=1, seed=1, vocab=tiny.CHARACTER_VOCAB)
    set_params(run_copy, student__model="./inputs/char-student", student__max_seq_len=64, student__doc_stride=16,
               student__epochs=1, student__max_steps=4)
    # Without the alignment: one line saying what to run (the old "must share a tokenizer" stop is gone).
    assert_one_line_error(kdqa(run_copy, "-q", "student"), str(run_copy / "inputs/char-student"), "kdqa align")
    run_cli(["-q", "align"], run_copy)
    run_cli(["-q", "student"], run_copy)
    run_cli(["-q", "evaluate"], run_copy)
    from transformers import AutoTokenizer

    saved = AutoTokenizer.from_pretrained(run_copy / "models/student")
    assert len(saved.get_vocab()) == len(AutoTokenizer.from_pretrained(run_copy / "inputs/char-student").get_vocab())
    dev_questions = len(read_table(run_copy / "data/features/dev_examples.parquet", columns=["id"]))
    for metrics in ("metrics/eval.json", "metrics/teacher.json"):
        assert json.loads((run_copy / metrics).read_text())["total"] == dev_questions
    # The student's answers came from its own dev features: the character tokenizer's, 64 tokens at most.
    assert max(len(x) for x in rows(run_copy / "data/aligned/features/dev", ["input_ids"])["input_ids"]) <= 64

    set_params(run_copy, student__max_seq_len=48)  # other windows than data/aligned was made for
    assert_one_line_error(kdqa(run_copy, "-q", "student"), "data/aligned", "max_seq_len", "kdqa align")


def test_the_teachers_own_tokenizer_and_windows_train_exactly_as_without_the_stage(run_copy):
    from safetensors.torch import load_file

    set_params(run_copy, student__epochs=1, student__max_steps=3)
    run_cli(["-q", "student"], run_copy)
    without = load_file(run_copy / "models/student/model.safetensors")
    run_cli(["-q", "align"], run_copy)
    assert read_json(run_copy / "data/aligned/manifest.json")["mode"] == "direct"
    run_cli(["-q", "student", "--no-resume"], run_copy)
    with_stage = load_file(run_copy / "models/student/model.safetensors")
    assert without.keys() == with_stage.keys()
    assert all((without[k] == with_stage[k]).all() for k in without)


def test_kdqa_inspect_reads_aligned_targets_against_the_students_own_features(run_copy):
    set_params(run_copy, student__max_seq_len=32, student__doc_stride=8)
    run_cli(["-q", "align"], run_copy)
    info = json.loads(run_cli(["inspect", "data/aligned/teacher/train", "--json"], run_copy).output)
    assert info["rows"] == len(rows(run_copy / "data/aligned/features/train", ["feature_id"])["feature_id"])
    assert 0 <= info["teacher_start_accuracy"] <= 100 and info["start_entropy_mean"] > 0


def test_features_whose_manifest_records_no_windows_are_refused(run_copy):
    """Which windows the features have decides whether the student needs alignment: a features manifest that
    does not record them (hand-made) is refused with what to run, never guessed from params."""
    from pipeline.runtime.errors import KdqaError
    from pipeline.model.loading import load_tokenizer
    from pipeline.params import load_params
    from pipeline.training.student_data import student_plan

    manifest = read_json(run_copy / "data/features/train/manifest.json")
    params = load_params(run_copy / "params.yaml", ws=Workspace(run_copy))
    tokenizer = load_tokenizer(params.student.model)
    assert student_plan(params, tokenizer, manifest)["mode"] == "direct"
    params.student.max_seq_len = params.prepare.max_seq_len // 2
    assert student_plan(params, tokenizer, manifest)["mode"] == "aligned"
    del manifest["prepare"]
    with pytest.raises(KdqaError, match="records no windows"):
        student_plan(params, tokenizer, manifest)
