"""Issue 4, bad input: every malformed input ends in one clear line (file + record), exit 1, no partial output.

Policy under test: structural problems stop the stage (exit 1, `kdqa: error: FILE: RECORD: what`, no Python
traceback, nothing written under data/features); per-answer problems are repaired or skipped, counted in
data/features/report.json and printed; `prepare.strict: true` turns them into errors. Also bad model
directories, a student whose tokenizer is not the teacher's, and bad params files.
"""

from __future__ import annotations

import copy
import json
import random
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import tiny
from reliability_kit import (
    World,
    assert_one_line_error,
    clone,
    get_world,
    kdqa,
    run_python,
    subprocess_env,
    write_params,
)


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> World:
    return get_world(tmp_path_factory)


@pytest.fixture(scope="module")
def squad(world) -> dict:
    """A small valid SQuAD 2.0 document to break (2 paragraphs, 8 questions, some unanswerable)."""
    return json.loads(tiny.make_squad(world.root / "small.json", articles=1, paragraphs=2, seed=3).read_text())


def fresh_workspace(world: World, ws: Path, train, dev=None, **overrides) -> tuple[Path, Path]:
    """An empty workspace whose data.train (and optionally data.dev) is `train` (a dict, or raw bytes)."""
    ws.mkdir(parents=True)
    paths = {}
    for split, content in (("train", train), ("dev", dev)):
        if content is None:
            paths[split] = world.dev
            continue
        paths[split] = ws / f"{split}.json"
        paths[split].write_bytes(content if isinstance(content, bytes) else json.dumps(content).encode())
    write_params(world, ws, data__train=str(paths["train"]), data__dev=str(paths["dev"]), **overrides)
    return ws, paths["train"]


def assert_no_features(ws: Path) -> None:
    assert not (ws / "data/features").exists(), sorted(str(p) for p in (ws / "data").rglob("*"))


def first_answerable(doc: dict) -> dict:
    return next(qa for p in doc["data"][0]["paragraphs"] for qa in p["qas"] if qa["answers"])


def paragraph_of(doc: dict, qa: dict) -> dict:
    return next(p for p in doc["data"][0]["paragraphs"] if qa in p["qas"])


# ---------------------------------------------------------------------------------------------------------
# Structural problems: one line naming file and record, exit 1, nothing written
# ---------------------------------------------------------------------------------------------------------


def _set(path, value):
    def mutate(doc):
        *parents, last = path
        node = doc
        for key in parents:
            node = node[key]
        if value is _DELETE:
            del node[last]
        else:
            node[last] = value
        return doc
    return mutate


_DELETE = object()
P0, Q1 = ("data", 0, "paragraphs", 0), ("data", 0, "paragraphs", 0, "qas", 1)


def _duplicate_id(doc):
    doc["data"][0]["paragraphs"][1]["qas"][2]["id"] = doc["data"][0]["paragraphs"][0]["qas"][0]["id"]
    return doc


def _non_utf8(doc):
    raw = json.dumps(doc, ensure_ascii=False).encode()
    cut = raw.index(b'"context"') + 15
    return raw[:cut] + "café".encode("latin-1") + raw[cut:]


STRUCTURAL = [
    # (name, mutation, fragments the error line must hold besides the file name)
    ("malformed JSON", lambda d: json.dumps(d).encode()[:-40], ["malformed JSON at line 1, column"]),
    ("not an object", lambda d: [d], ["expected a top-level object with a 'data' list"]),
    ("missing data", _set(("data",), _DELETE), ["expected a top-level object with a 'data' list"]),
    ("data not a list", _set(("data",), {"x": 1}), ["expected a top-level object with a 'data' list"]),
    ("empty data", _set(("data",), []), ["no usable questions"]),
    ("missing paragraphs", _set(("data", 0, "paragraphs"), _DELETE), ["data[0]: missing 'paragraphs'"]),
    ("paragraph not an object", _set(P0, "text"), ["data[0].paragraphs[0]: expected an object"]),
    ("missing context", _set(P0 + ("context",), _DELETE), ["data[0].paragraphs[0]: missing 'context'"]),
    ("context not a string", _set(P0 + ("context",), 42), ["data[0].paragraphs[0]: 'context' must be a string"]),
    ("empty context", _set(P0 + ("context",), "  "), ["data[0].paragraphs[0].qas[0]", "empty 'context'"]),
    ("missing qas", _set(P0 + ("qas",), _DELETE), ["data[0].paragraphs[0]: missing 'qas'"]),
    ("qa not an object", _set(Q1, None), ["data[0].paragraphs[0].qas[1]: expected an object"]),
    ("missing id", _set(Q1 + ("id",), _DELETE), ["data[0].paragraphs[0].qas[1]: missing 'id'"]),
    ("id not a string", _set(Q1 + ("id",), 7), ["data[0].paragraphs[0].qas[1]: 'id' must be a string, got int"]),
    ("empty id", _set(Q1 + ("id",), ""), ["data[0].paragraphs[0].qas[1]: empty 'id'"]),
    ("duplicate id", _duplicate_id, ["data[0].paragraphs[1].qas[2]", "duplicate id, first seen at",
                                     "data[0].paragraphs[0].qas[0]"]),
    ("missing question", _set(Q1 + ("question",), _DELETE), ["qas[1] (id a0p0q1): missing 'question'"]),
    ("empty question", _set(Q1 + ("question",), " \t"), ["qas[1] (id a0p0q1): empty 'question'"]),
    ("question not a string", _set(Q1 + ("question",), ["why"]), ["qas[1] (id a0p0q1): 'question' must be a string"]),
    ("answers not a list", _set(Q1 + ("answers",), {"text": "x"}), ["qas[1] (id a0p0q1): 'answers' must be a list"]),
    ("is_impossible not a bool", _set(Q1 + ("is_impossible",), "no"),
     ["qas[1] (id a0p0q1): 'is_impossible' must be true or false"]),
    ("non-UTF-8 bytes", _non_utf8, ["not UTF-8 (invalid byte at offset"]),
]


@pytest.mark.parametrize("name, mutate, fragments", STRUCTURAL, ids=[s[0] for s in STRUCTURAL])
def test_structural_problem_stops_prepare(world, squad, tmp_path, name, mutate, fragments):
    ws, train = fresh_workspace(world, tmp_path / "ws", mutate(copy.deepcopy(squad)))
    assert_one_line_error(kdqa(ws, "-q", "prepare"), str(train), *fragments)
    assert_no_features(ws)


def test_bad_dev_file_leaves_no_train_output(world, squad, tmp_path):
    """Both splits are validated before anything is written: train is not left looking complete."""
    bad = _set(Q1 + ("question",), _DELETE)(copy.deepcopy(squad))
    ws, _ = fresh_workspace(world, tmp_path / "ws", squad, dev=bad)
    assert_one_line_error(kdqa(ws, "-q", "prepare"), str(ws / "dev.json"), "missing 'question'")
    assert_no_features(ws)


def test_failed_prepare_leaves_previous_output_untouched(world, tmp_path):
    ws = clone(world, tmp_path / "ws")
    before = {p: p.read_bytes() for p in (ws / "data/features").rglob("*") if p.is_file()}
    broken = tmp_path / "broken.json"
    broken.write_text('{"data": [')
    write_params(world, ws, data__train=str(broken))
    assert_one_line_error(kdqa(ws, "-q", "prepare"), str(broken), "malformed JSON")
    after = {p: p.read_bytes() for p in (ws / "data/features").rglob("*") if p.is_file()}
    assert after == before


def test_byte_order_mark_is_accepted(world, squad, tmp_path):
    """A byte-order mark some editors add changes nothing: the same features as the file without it."""
    features = {}
    for name, prefix in (("plain", b""), ("bom", b"\xef\xbb\xbf")):
        ws, _ = fresh_workspace(world, tmp_path / name, prefix + json.dumps(squad).encode())
        result = kdqa(ws, "-q", "prepare")
        assert result.exit_code == 0, result.output
        features[name] = {p.relative_to(ws): p.read_bytes() for p in (ws / "data/features/train").glob("part-*")}
    assert features["bom"] == features["plain"] and features["plain"]


def test_missing_data_file(world, tmp_path):
    ws = tmp_path / "ws"
    ws.mkdir()
    write_params(world, ws, data__train=str(tmp_path / "nowhere.json"))
    assert_one_line_error(kdqa(ws, "-q", "prepare"), str(tmp_path / "nowhere.json"), "file not found")
    assert_no_features(ws)


def test_real_process_prints_one_line_and_no_traceback(world, squad, tmp_path):
    """The CLI as a user runs it: exit code 1 and exactly one line on stderr."""
    ws, train = fresh_workspace(world, tmp_path / "ws", json.dumps(squad).encode()[:-40])
    proc = run_python("from pipeline.cli import main; main()", ws, "-q", "prepare")
    assert proc.returncode == 1, proc.stderr
    assert proc.stderr.splitlines() == [proc.stderr.strip()], proc.stderr
    assert proc.stderr.startswith(f"kdqa: error: {train}: malformed JSON")
    assert "Traceback" not in proc.stderr
    assert_no_features(ws)


# ---------------------------------------------------------------------------------------------------------
# Per-answer problems: repaired or skipped, counted, printed; errors under prepare.strict
# ---------------------------------------------------------------------------------------------------------


def _shift_start(delta):
    def mutate(doc):
        # An answer whose text occurs once in its context, so the repair has one right target.
        qa = next(qa for p in doc["data"][0]["paragraphs"] for qa in p["qas"]
                  if qa["answers"] and len(qa["answers"][0]["text"]) >= 4
                  and p["context"].count(qa["answers"][0]["text"]) == 1)
        qa["answers"][0]["answer_start"] += delta
        return doc
    return mutate


def _answer(field, value):
    def mutate(doc):
        first_answerable(doc)["answers"][0][field] = value
        return doc
    return mutate


def _outside(doc):
    qa = first_answerable(doc)
    context = paragraph_of(doc, qa)["context"]
    qa["answers"][0] = {"text": "zzz qqq", "answer_start": len(context) + 10}
    return doc


def _second_answer_bad(doc):
    qa = first_answerable(doc)
    qa["answers"].append({"text": "not in here at all", "answer_start": 0})
    return doc


def _answerable_without_answers(doc):
    qa = first_answerable(doc)
    qa["answers"], qa["is_impossible"] = [], False
    return doc


PER_ANSWER = [
    # (name, mutation, expected report counts, strict error fragment)
    ("answer_start 3 too far", _shift_start(3), {"answers_repaired": 1}, "answer_start"),
    ("answer_start 2 too early", _shift_start(-2), {"answers_repaired": 1}, "answer_start"),
    ("answer outside the context", _outside, {"answers_skipped": 1, "questions_dropped": 1},
     "lies outside the context"),
    ("answer text not in context", _answer("text", "castle castle castle"),
     {"answers_skipped": 1, "questions_dropped": 1}, "not found near answer_start"),
    ("negative answer_start", _answer("answer_start", -4), {"answers_skipped": 1, "questions_dropped": 1},
     "invalid answer_start"),
    ("answer_start a string", _answer("answer_start", "12"), {"answers_skipped": 1, "questions_dropped": 1},
     "invalid answer_start"),
    ("empty answer text", _answer("text", ""), {"answers_skipped": 1, "questions_dropped": 1}, "has no text"),
    ("one of two answers bad", _second_answer_bad, {"answers_skipped": 1, "questions_dropped": 0},
     "not found near answer_start"),
    ("answerable without answers", _answerable_without_answers, {"questions_dropped": 1}, "has no answers"),
]


@pytest.mark.parametrize("name, mutate, counts, strict_fragment", PER_ANSWER, ids=[p[0] for p in PER_ANSWER])
def test_per_answer_problem_is_repaired_or_skipped_and_counted(world, squad, tmp_path, name, mutate, counts,
                                                               strict_fragment):
    doc = mutate(copy.deepcopy(squad))
    questions = sum(len(p["qas"]) for p in doc["data"][0]["paragraphs"])
    ws, train = fresh_workspace(world, tmp_path / "ws", doc)
    result = kdqa(ws, "-q", "prepare")
    assert result.exit_code == 0, result.output
    report = json.loads((ws / "data/features/report.json").read_text())["train"]
    expected = {"answers_repaired": 0, "answers_skipped": 0, "questions_dropped": 0, **counts}
    assert {k: report[k] for k in expected} == expected
    assert report["questions"] == questions - expected["questions_dropped"]
    assert report["details"] and "(id a0p" in report["details"][0]
    # Printed too (a warning, so even -q shows it), pointing at the report.
    assert (f"{expected['answers_repaired']} answer offsets repaired, {expected['answers_skipped']} answers "
            f"skipped, {expected['questions_dropped']} questions dropped") in result.stderr
    assert "data/features/report.json" in result.stderr
    assert (ws / "data/features/train/manifest.json").exists()

    for flag in ("params", "cli"):  # prepare.strict: true, or `kdqa prepare --strict`
        strict_ws, strict_train = fresh_workspace(world, tmp_path / f"strict-{flag}", doc,
                                                  prepare__strict=flag == "params")
        args = ["-q", "prepare"] + (["--strict"] if flag == "cli" else [])
        line = assert_one_line_error(kdqa(strict_ws, *args), str(strict_train), strict_fragment)
        assert "data[0].paragraphs[" in line and "(id a0p" in line
        assert_no_features(strict_ws)


def test_repaired_offset_points_at_the_answer(world, squad, tmp_path):
    """A repaired answer_start gives the same features as the correct one."""
    good_ws, _ = fresh_workspace(world, tmp_path / "good", squad)
    bad_ws, _ = fresh_workspace(world, tmp_path / "bad", _shift_start(3)(copy.deepcopy(squad)))
    for ws in (good_ws, bad_ws):
        assert kdqa(ws, "-q", "prepare").exit_code == 0
    import pyarrow.parquet as pq

    columns = ["feature_id", "start_position", "end_position"]
    for name in ("part-00000.parquet", "part-00001.parquet"):
        good = pq.read_table(good_ws / "data/features/train" / name, columns=columns).to_pylist()
        bad = pq.read_table(bad_ws / "data/features/train" / name, columns=columns).to_pylist()
        assert good == bad


# ---------------------------------------------------------------------------------------------------------
# Fuzz: many random malformed variants, each a success with a report or one clear line and no output
# ---------------------------------------------------------------------------------------------------------

FUZZ_VARIANTS = 120
WRONG_VALUES = [None, 0, -1, 3.5, True, "", " ", "x", [], [1], {}, {"a": 1}]


def _nodes(node, path=()):
    yield path, node
    if isinstance(node, dict):
        for k, v in node.items():
            yield from _nodes(v, path + (k,))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from _nodes(v, path + (i,))


def random_variant(doc: dict, rng: random.Random):
    """One random corruption of a SQuAD document: of its tree, its JSON text or its bytes."""
    doc = copy.deepcopy(doc)
    kind = rng.choice(["delete", "retype", "retype", "shift", "duplicate", "truncate", "bytes"])
    nodes = [(p, n) for p, n in _nodes(doc) if p]
    path, _ = rng.choice(nodes)
    parent = doc
    for key in path[:-1]:
        parent = parent[key]
    if kind == "delete":
        del parent[path[-1]]
    elif kind == "retype":
        parent[path[-1]] = copy.deepcopy(rng.choice(WRONG_VALUES))
    elif kind == "shift":
        starts = [(p, n) for p, n in _nodes(doc) if p and p[-1] == "answer_start"]
        p, n = rng.choice(starts)
        node = doc
        for key in p[:-1]:
            node = node[key]
        node["answer_start"] = n + rng.choice([-5, -3, -1, 1, 2, 4, 100, 10_000])
    elif kind == "duplicate":
        qas = rng.choice(doc["data"][0]["paragraphs"])["qas"]
        qas.append(copy.deepcopy(rng.choice(qas)))
    raw = json.dumps(doc).encode()
    if kind == "truncate":
        raw = raw[: rng.randrange(1, len(raw))]
    elif kind == "bytes":
        at = rng.randrange(len(raw))
        raw = raw[:at] + rng.choice([b"\xff", b"\xc3\x28", b"\x80\x80", b"\x00", b"}", b'"']) + raw[at:]
    return kind, raw


def test_fuzz_malformed_variants(world, squad, tmp_path):
    rng = random.Random(20240404)
    outcomes = {"ok": 0, "error": 0}
    for i in range(FUZZ_VARIANTS):
        kind, raw = random_variant(squad, rng)
        ws, train = fresh_workspace(world, tmp_path / f"v{i}", raw)
        result = kdqa(ws, "-q", "prepare")
        label = f"variant {i} ({kind})"
        if result.exit_code == 0:
            outcomes["ok"] += 1
            report = json.loads((ws / "data/features/report.json").read_text())
            assert report["train"]["questions"] > 0, label
            assert (ws / "data/features/train/manifest.json").exists(), label
            assert (ws / "data/features/dev/manifest.json").exists(), label
        else:
            outcomes["error"] += 1
            assert_one_line_error(result, str(train))
            assert_no_features(ws)
    assert outcomes["error"] >= 15 and outcomes["ok"] >= 3, outcomes  # the fuzz exercised both paths


# ---------------------------------------------------------------------------------------------------------
# Models: missing directories, no weights, pickled weights, a student with another tokenizer
# ---------------------------------------------------------------------------------------------------------


def model_copy(src: Path, dst: Path, drop: tuple[str, ...] = ()) -> Path:
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns(*drop))
    return dst


def test_teacher_directory_that_does_not_exist(world, tmp_path):
    ws = tmp_path / "ws"
    ws.mkdir()
    write_params(world, ws, teacher__model=str(tmp_path / "no-such-model"))
    assert_one_line_error(kdqa(ws, "-q", "prepare"), str(tmp_path / "no-such-model"), "directory does not exist")
    write_params(world, ws, teacher__model="no-such-model-dir")  # relative: looked up on the hub, offline
    assert_one_line_error(kdqa(ws, "-q", "prepare"), "no-such-model-dir", "no local directory 'no-such-model-dir'")
    assert_no_features(ws)


def test_teacher_directory_without_weights(world, tmp_path):
    ws = clone(world, tmp_path / "ws")
    shutil.rmtree(ws / "data/teacher")
    bare = model_copy(world.teacher, tmp_path / "bare", drop=("*.safetensors",))
    write_params(world, ws, teacher__model=str(bare))
    assert_one_line_error(kdqa(ws, "-q", "teacher"), str(bare), "no safetensors weights")
    assert not (ws / "data/teacher").exists()


def test_pickled_weights_are_never_loaded(world, tmp_path):
    """Only pytorch_model.bin (a pickle): refused as having no safetensors weights, and never unpickled."""
    import torch

    ws = clone(world, tmp_path / "ws")
    shutil.rmtree(ws / "data/teacher")
    pickled = model_copy(world.teacher, tmp_path / "pickled", drop=("*.safetensors",))
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (Path.touch, (marker,))

    torch.save({"payload": Payload()}, pickled / "pytorch_model.bin")
    write_params(world, ws, teacher__model=str(pickled))
    assert_one_line_error(kdqa(ws, "-q", "teacher"), str(pickled), "no safetensors weights")
    assert not marker.exists()


def test_student_directory_problems(world, tmp_path):
    ws = clone(world, tmp_path / "ws")
    no_weights = model_copy(world.student, tmp_path / "no-weights", drop=("*.safetensors",))
    no_config = model_copy(world.student, tmp_path / "no-config", drop=("config.json",))
    for model, fragment in ((tmp_path / "absent", "directory does not exist"),
                            (no_weights, "no safetensors weights"), (no_config, "no config.json")):
        write_params(world, ws, student__model=str(model))
        assert_one_line_error(kdqa(ws, "-q", "student"), str(model), fragment)
        assert not (ws / "models/student").exists()


def test_student_of_another_tokenizer_needs_kdqa_align_first(world, tmp_path):
    ws = clone(world, tmp_path / "ws")
    write_params(world, ws, student__model=str(world.student_other_vocab))
    assert_one_line_error(kdqa(ws, "-q", "student"), str(world.student_other_vocab), "run `kdqa align`")
    assert not (ws / "models/student").exists()


# ---------------------------------------------------------------------------------------------------------
# params.yaml
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, fragments",
    [
        ("student:\n  lerning_rate: 0.1\n", ["unknown key(s) in section 'student': lerning_rate"]),
        ("prepare:\n  doc_strid: 3\n  max_seq: 9\n", ["section 'prepare': doc_strid, max_seq"]),
        ("student:\n  batch_size: six\n", ["student.batch_size must be a number, got 'six'"]),
        ("prepare:\n  strict: yes please\n", ["prepare.strict must be true or false"]),
        ("student: [1, 2]\n", ["section 'student' must be a mapping"]),
        ("student:\n  batch_size: [\n", ["not valid YAML"]),
        ("student:\n  batch_size: 0\n", ["student.batch_size must be at least 1, got 0"]),
        ("student:\n  batch_size: 2.5\n", ["student.batch_size must be a whole number"]),
        ("student:\n  temperature: 0\n", ["student.temperature must be greater than 0"]),
        ("student:\n  distillation_weight: 1.5\n", ["student.distillation_weight must be at least 0 and at most 1"]),
        ("student:\n  max_steps: ten\n", ["student.max_steps must be a number"]),
        ("student:\n  init_layers: 3\n", ["student.init_layers must be a list of layer indices"]),
        ("teacher:\n  model: 5\n", ["teacher.model must be a string"]),
        ("teacher:\n  precision: fp8\n", ["teacher.precision must be one of auto, bfloat16, float16, float32, got 'fp8'"]),
        ("data:\n  train: null\n", ["data.train must be set"]),
        ("studnet:\n  batch_size: 4\n", ["unknown section 'studnet' (did you mean 'student'?)"]),
    ],
)
def test_bad_params_file(tmp_path, text, fragments):
    ws = tmp_path / "ws"
    ws.mkdir()
    (ws / "params.yaml").write_text(text)
    assert_one_line_error(kdqa(ws, "-q", "prepare"), "params.yaml", *fragments)
    assert_no_features(ws)


def test_other_tools_sections_are_left_alone(tmp_path):
    from pipeline.params import load_params

    path = tmp_path / "params.yaml"
    path.write_text("train:\n  lr: 1\ndvclive:\n  x: 1\nstudent:\n  batch_size: 4\n")
    assert load_params(path).student.batch_size == 4


def test_window_without_room_for_context(world, squad, tmp_path):
    """doc_stride too large for max_seq_len: refused up front (the tokenizer would panic mid-run)."""
    ws, _ = fresh_workspace(world, tmp_path / "ws", squad, prepare__doc_stride=40)
    assert_one_line_error(kdqa(ws, "-q", "prepare"), "prepare.doc_stride (40) must be less than", "= 33")
    assert_no_features(ws)


def test_prepare_refuses_sequences_longer_than_the_teacher_reads(world, tmp_path):
    """Issue 16 case 5: max_seq_len past the teacher's position table is refused by prepare itself, before it
    replaces good features (not one stage later)."""
    ws = clone(world, tmp_path / "ws")
    before = {p: p.read_bytes() for p in (ws / "data/features").rglob("*") if p.is_file()}
    write_params(world, ws, prepare__max_seq_len=200)
    assert_one_line_error(kdqa(ws, "-q", "prepare"), "prepare.max_seq_len 200", str(world.teacher),
                          "128 positions")
    assert {p: p.read_bytes() for p in (ws / "data/features").rglob("*") if p.is_file()} == before


def test_teacher_refuses_features_longer_than_it_reads(world, squad, tmp_path):
    """Features prepared for a longer teacher, then teacher.model switched to a shorter one (same vocabulary):
    the teacher stage refuses, naming the model."""
    long_teacher = tiny.make_model(tmp_path / "long-teacher", layers=1, positions=256)
    ws, _ = fresh_workspace(world, tmp_path / "ws", squad, prepare__max_seq_len=200,
                            teacher__model=str(long_teacher))
    assert kdqa(ws, "-q", "prepare").exit_code == 0
    write_params(world, ws, data__train=str(ws / "train.json"), prepare__max_seq_len=200)
    assert_one_line_error(kdqa(ws, "-q", "teacher"), str(world.teacher), "reads at most 128 tokens",
                          "prepare.max_seq_len 200")
    assert not (ws / "data/teacher").exists()


def test_params_file_not_found(tmp_path):
    assert_one_line_error(kdqa(tmp_path, "--params", "other.yaml", "prepare"), "other.yaml: params file not found")


# ---------------------------------------------------------------------------------------------------------
# Issue 16: contradictory labels, empty passages, params stories, no hub (more cases: test_fault_table.py)
# ---------------------------------------------------------------------------------------------------------


def _impossible_with_answers(doc):
    qa = first_answerable(doc)
    qa["is_impossible"] = True
    return doc, qa


def test_impossible_with_answers_is_trained_unanswerable_counted_and_scored_like_the_official_script(
        world, squad, tmp_path):
    """Case 7: not strict: the flag wins for training (CLS labels), report.json counts it, and dev scoring
    keeps its answers as gold (the official script decides answerability from the answers alone)."""
    import pyarrow.parquet as pq

    doc, qa = _impossible_with_answers(copy.deepcopy(squad))
    ws, train = fresh_workspace(world, tmp_path / "ws", doc, dev=doc)
    result = kdqa(ws, "-q", "prepare")
    assert result.exit_code == 0, result.output
    assert "1 marked impossible despite answers" in result.stderr
    report = json.loads((ws / "data/features/report.json").read_text())
    for split in ("train", "dev"):
        assert report[split]["contradictory_labels"] == 1
        assert any(f"(id {qa['id']}): is_impossible true with 1 answer(s)" in d for d in report[split]["details"])
    labels = [(r["start_position"], r["end_position"])
              for shard in sorted((ws / "data/features/train").glob("part-*"))
              for r in pq.read_table(shard, columns=["example_id", "start_position", "end_position"]).to_pylist()
              if r["example_id"] == qa["id"]]
    assert labels and set(labels) == {(0, 0)}
    gold = {r["id"]: r["answers"] for r in pq.read_table(ws / "data/features/dev_examples.parquet").to_pylist()}
    assert gold[qa["id"]] == [qa["answers"][0]["text"]]


def test_empty_passage_in_answer_many_gets_no_answer_and_the_rest_are_unchanged(world):
    """Case 4: a blank question or an empty context does not fail the batch; a single call refuses it."""
    from pipeline.runtime.errors import KdqaError
    from pipeline.serving.qa import NO_ANSWER, QuestionAnswerer

    qa = QuestionAnswerer(str(world.student), device="cpu")
    pairs = [("who built it?", "alice built the red tower in paris."), ("who built it?", ""),
             ("what is it?", "the old bridge is north of the city."), ("  ", "a castle."), ("who?", "\u200b \n")]
    answers = qa.answer_many(pairs)
    assert answers[1] == answers[3] == answers[4] == NO_ANSWER
    assert answers[1].no_answer_probability == 1.0 and answers[1].text == "" and not answers[1].has_answer
    assert answers[0] == qa(*pairs[0]) and answers[2] == qa(*pairs[2])
    for question, context, problem in (("who?", "", "the context is empty"), (" ", "a castle.", "question is empty")):
        with pytest.raises(KdqaError, match=problem):
            qa(question, context)
    assert qa.answer_many([("who?", "")]) == [NO_ANSWER]


def test_missing_params_file_is_all_defaults_with_a_warning(tmp_path, caplog):
    """Case 9: no params.yaml: every section at its defaults, and the stage says so (naming them)."""
    import logging
    from pipeline.params import Params, load_params

    with caplog.at_level(logging.WARNING, logger="pipeline.params"):
        assert load_params(tmp_path / "params.yaml", ("prepare",)) == Params()
        assert load_params(tmp_path / "params.yaml") == Params()  # no stage named: nothing to warn about
    (record,) = caplog.records
    assert "params.yaml not found: every setting is its default" in record.getMessage()
    assert "prepare.max_seq_len=384" in record.getMessage()
    (tmp_path / "params.yaml").write_text("prepare:\n  max_seq_len: 64\n")
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="pipeline.params"):
        assert load_params(tmp_path / "params.yaml", ("prepare",)).prepare.max_seq_len == 64
    assert not caplog.records  # its own section is there: nothing to say


def test_first_readme_command_without_hub_access_fails_fast_with_what_to_do(tmp_path):
    """Case 10: the repository's params.yaml (hub teacher and dataset) on a machine where the hub does not
    answer, and HF_HUB_OFFLINE not set: one line naming teacher.model, data.* and the offline example, in
    seconds rather than a minute of retries (huggingface_hub retries 5 times per file with backoff)."""
    import socket
    import time

    with socket.socket() as s:  # a local port nothing listens on: connections are refused at once
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ws = tmp_path / "ws"
    ws.mkdir()
    shutil.copy2(Path(__file__).resolve().parent.parent / "params.yaml", ws / "params.yaml")
    env = {k: v for k, v in subprocess_env().items() if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE",
                                                                     "HF_DATASETS_OFFLINE")}
    env.update(HF_ENDPOINT=f"http://127.0.0.1:{port}", HF_HOME=str(tmp_path / "hf-home"))
    started = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", "from pipeline.cli import main; main()", "prepare"], cwd=ws,
                          env=env, capture_output=True, text=True, timeout=300)
    elapsed = time.perf_counter() - started
    assert proc.returncode == 1, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("kdqa: error:")]
    assert len(errors) == 1 and "Traceback" not in proc.stderr, proc.stderr
    for fragment in ("deepset/bert-large-uncased-whole-word-masking-squad2", "teacher.model", "data.train",
                     "README.md: 'An offline example'"):
        assert fragment in errors[0], errors[0]
    assert "Retry" not in proc.stderr and len(proc.stderr.splitlines()) <= 3, proc.stderr
    assert elapsed < 40, f"{elapsed:.0f}s"  # backoff alone: 1+2+4+8+8 s per file, and two files are tried
