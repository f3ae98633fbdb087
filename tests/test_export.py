"""`kdqa export`: ONNX float32 and int8 beside the PyTorch student, the accuracy gate, serving with ONNX Runtime,
and what a user meets with a stale, half-written or unsupported model."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

import tiny
from conftest import INPUTS, REPO_ROOT, copy_run, run_cli
from reliability_kit import assert_one_line_error, kdqa

QUESTIONS = [("who built the tower?", "alice built the red tower in paris and bob founded the old castle of rome."),
             ("where is the castle?", "alice built the red tower in paris and bob founded the old castle of rome."),
             ("what was named after the king?", " ".join(["the old bridge was named after the great king."] * 12))]


@pytest.fixture(scope="module")
def exported_run(prepared_run, tmp_path_factory) -> Path:
    """A copy of the prepared run after `kdqa student` (2 steps), `kdqa evaluate` and `kdqa export`."""
    run = copy_run(prepared_run, tmp_path_factory.mktemp("exported") / "run")
    params = yaml.safe_load((run / "params.yaml").read_text())
    params["student"]["max_steps"] = 2
    (run / "params.yaml").write_text(yaml.safe_dump(params))
    for stage in ("student", "evaluate", "export"):
        run_cli(["-q", stage], run)
    return run


def scores_of(evaluated: dict) -> dict:
    """eval.json's scores, without the no-answer threshold it reports them at (export.json has that once)."""
    return {k: v for k, v in evaluated.items() if k not in ("null_threshold", "null_threshold_source")}


def test_export_writes_a_complete_folder_and_the_accuracy_gate(exported_run):
    folder = exported_run / "models/student-onnx"
    for name in ("model.onnx", "model-int8.onnx", "config.json", "tokenizer.json", "README.md", "kdqa_export.json"):
        assert (folder / name).is_file(), name
    assert not list(folder.parent.glob(".*partial*"))  # staging removed

    metrics = json.loads((exported_run / "metrics/export.json").read_text())
    # The PyTorch figures are exactly `kdqa evaluate`'s: same windowing, post-processing and rounding.
    evaluated = json.loads((exported_run / "metrics/eval.json").read_text())
    assert metrics["pytorch"] == scores_of(evaluated)
    assert metrics["null_threshold"] == evaluated["null_threshold"]  # both at the same no-answer threshold
    for name in ("pytorch", "onnx_float32", "onnx_int8"):
        assert {"exact", "f1", "HasAns_f1_forced", "total"} <= set(metrics[name]), name
        assert metrics[name]["total"] == metrics["questions"] == evaluated["total"]
    assert metrics["float32_max_logit_difference"] < 1e-3
    assert metrics["float32_same_answers"] == metrics["questions"]
    assert metrics["onnx_float32"]["f1"] == pytest.approx(metrics["pytorch"]["f1"], abs=1e-6)
    assert metrics["int8_f1_drop"] == pytest.approx(metrics["pytorch"]["f1"] - metrics["onnx_int8"]["f1"], abs=1e-3)
    assert metrics["int8_forced_f1_drop"] == pytest.approx(
        metrics["pytorch"]["HasAns_f1_forced"] - metrics["onnx_int8"]["HasAns_f1_forced"], abs=1e-3)
    assert metrics["mib"]["onnx_int8"] < metrics["mib"]["onnx_float32"]

    manifest = json.loads((folder / "kdqa_export.json").read_text())
    assert manifest["source"]["relative_path"] == "../student"
    assert set(manifest["files"]) == {"float32", "int8"}
    card = (folder / "README.md").read_text()
    assert "# ONNX export of" in card and "| ONNX int8 | `model-int8.onnx`" in card
    assert "Extractive QA student trained with kdqa" in card  # the student's own card follows
    assert card.count("\n---\n") == 1  # one front matter (the student's is dropped)


def test_onnx_float32_reproduces_the_pytorch_forward_pass(exported_run):
    """Independent of the stage's own check: raw ONNX Runtime against the PyTorch model on padded dev batches."""
    import onnxruntime as ort

    from pipeline.model.batching import pad_batch
    from pipeline.model.loading import load_qa_model
    from pipeline.store.shards import list_column_to_numpy, list_shards, read_table

    model = load_qa_model(str(exported_run / "models/student")).eval()
    session = ort.InferenceSession(str(exported_run / "models/student-onnx/model.onnx"))
    table = read_table(list_shards(exported_run / "data/features/dev")[0])
    ids = list_column_to_numpy(table.column("input_ids"), np.int64)
    types = list_column_to_numpy(table.column("token_type_ids"), np.int64)
    batch = pad_batch(ids[:5], types[:5], table.column("context_start").to_numpy()[:5],
                      table.column("context_end").to_numpy()[:5], pad_token_id=0, multiple=16)
    inputs = {k: batch[k] for k in ("input_ids", "token_type_ids", "attention_mask")}
    with torch.inference_mode():
        expected = model(**inputs)
    start, end = session.run(["start_logits", "end_logits"], {k: v.numpy() for k, v in inputs.items()})
    real = batch["attention_mask"].numpy() == 1
    assert not real.all()  # some rows are padded: the mask is honoured, not just full rows
    assert np.abs(start - expected.start_logits.numpy())[real].max() < 1e-4
    assert np.abs(end - expected.end_logits.numpy())[real].max() < 1e-4
    # kdqa's own session (ONNX Runtime's SkipLayerNormalization fusion off) computes the same logits.
    from pipeline.serving.onnx_model import OnnxQAModel

    ours = OnnxQAModel(exported_run / "models/student-onnx/model.onnx", model.config)(**inputs)
    assert np.abs(ours.start_logits.numpy() - start)[real].max() < 1e-4
    # Traced from plain attention: no guards for fully masked rows (sdpa's export adds IsNaN/Where per layer),
    # and the student itself keeps the attention it was loaded with.
    import onnx

    ops = {node.op_type for node in onnx.load(str(exported_run / "models/student-onnx/model.onnx")).graph.node}
    assert "Softmax" in ops and "IsNaN" not in ops


def test_question_answerer_on_the_export_gives_the_pytorch_answers(exported_run):
    from pipeline import QuestionAnswerer

    settings = {"max_seq_len": 64, "doc_stride": 16}
    pytorch = QuestionAnswerer(str(exported_run / "models/student"), device="cpu", precision="float32", **settings)
    onnx = QuestionAnswerer(str(exported_run / "models/student-onnx"), precision="float32", **settings)
    int8 = QuestionAnswerer(str(exported_run / "models/student-onnx"), precision="int8", threads=1, **settings)
    expected, got = pytorch.answer_many(QUESTIONS), onnx.answer_many(QUESTIONS)
    for want, have in zip(expected, got):
        assert have.text == want.text and have.span_text == want.span_text
        assert have.score == pytest.approx(want.score, abs=1e-4)  # float32 scores: only summation order differs
        assert have.no_answer_probability == pytest.approx(want.no_answer_probability, abs=1e-3)
    for (question, context), answer in zip(QUESTIONS, int8.answer_many(QUESTIONS)):
        assert answer.span_text and answer.span_text in context and answer.text in ("", answer.span_text)
    assert onnx(*QUESTIONS[0]) == got[0]  # one question at a time: the same answer as in a batch


def test_question_answerer_runs_the_fastest_precision_unless_asked(exported_run, monkeypatch):
    """With no precision argument an export runs its int8 model, and a PyTorch model runs bfloat16 where the CPU
    multiplies it in hardware (float32 where it would be emulated); `.precision` says which. An export without
    an int8 model runs float32, and bfloat16 is refused for an export."""

    from pipeline import QuestionAnswerer
    from pipeline.runtime.errors import KdqaError
    from pipeline.serving import qa as qa_module
    from pipeline.store.shards import read_json

    export = exported_run / "models/student-onnx"
    assert QuestionAnswerer(str(export), max_seq_len=64).precision == "int8"
    for native, expected in ((True, "bfloat16"), (False, "float32")):
        monkeypatch.setattr(qa_module, "cpu_has_native_bf16", lambda native=native: native)
        student = QuestionAnswerer(str(exported_run / "models/student"), device="cpu", max_seq_len=64)
        assert student.precision == expected and student.autocast == (torch.bfloat16 if native else None)
    float32_only = exported_run.parent / "float32-only-export"
    shutil.copytree(export, float32_only)
    manifest = read_json(float32_only / "kdqa_export.json")
    del manifest["files"]["int8"]
    (float32_only / "kdqa_export.json").write_text(json.dumps(manifest))
    (float32_only / "model-int8.onnx").unlink()
    assert QuestionAnswerer(str(float32_only), max_seq_len=64).precision == "float32"
    with pytest.raises(KdqaError, match="an ONNX export runs in float32 or int8"):
        QuestionAnswerer(str(export), precision="bfloat16")
    # ONNX Runtime's threads spin only briefly: long spins would take the cores the caller's own work needs
    options = QuestionAnswerer(str(export), max_seq_len=64).model.session.get_session_options()
    assert options.get_session_config_entry("session.intra_op.allow_spinning") == "1"
    assert options.get_session_config_entry("session.intra_op.spin_duration_us") == "100"


def test_kdqa_predict_on_the_export(exported_run):
    question, context = QUESTIONS[0]
    args = ["predict", "--question", question, "--context", context, "--json", "--precision", "float32"]
    pytorch = json.loads(run_cli([*args, "--model", "models/student"], exported_run).stdout)
    onnx = json.loads(run_cli([*args, "--model", "models/student-onnx"], exported_run).stdout)
    assert onnx["best_span"] == pytorch["best_span"] and onnx["answer"] == pytorch["answer"]
    assert onnx["score"] == pytest.approx(pytorch["score"], abs=1e-3)
    int8 = json.loads(run_cli([*args, "--model", "models/student-onnx", "--precision", "int8"], exported_run).stdout)
    assert int8["best_span"] in context
    # int8 is a property of an export, not of a PyTorch model
    assert_one_line_error(kdqa(exported_run, *args, "--model", "models/student", "--precision", "int8"),
                          "models/student", "ONNX exports")


# --- bad input: stale, half-written, unsupported ---

def test_stale_export_is_refused_by_fingerprint(exported_run, tmp_path):
    from pipeline import QuestionAnswerer
    from pipeline.runtime.errors import KdqaError

    run = copy_run(exported_run, tmp_path / "run")
    # The student changes after the export (here: other weights of the same shape land in models/student).
    weights = run / "models/student/model.safetensors"
    exported_weights = weights.read_bytes()
    shutil.copy2(run / INPUTS / "student" / "model.safetensors", weights)
    with pytest.raises(KdqaError, match="stale export"):
        QuestionAnswerer(str(run / "models/student-onnx"))
    assert_one_line_error(kdqa(run, "predict", "--model", "models/student-onnx", "--question", "who?",
                               "--context", "alice."), "models/student-onnx", "stale export", "kdqa export")
    # The student it was exported from back in place: it serves again. An export copied away from any
    # student is checked for its own files only.
    weights.write_bytes(exported_weights)
    QuestionAnswerer(str(run / "models/student-onnx"))
    shutil.copytree(run / "models/student-onnx", tmp_path / "elsewhere" / "served")
    QuestionAnswerer(str(tmp_path / "elsewhere" / "served"))


@pytest.mark.parametrize("damage, precision, fragments", [
    ("no manifest", "float32", ["incomplete ONNX export", "kdqa_export.json"]),
    ("truncated int8", "int8", ["model-int8.onnx", "differs from"]),
    ("missing float32", "float32", ["model.onnx", "missing"]),
    ("foreign onnx file", "float32", ["model.onnx", "differs from"]),
    ("exported without int8", "int8", ["has no int8 model", "export.int8"]),
])
def test_half_written_export_folder_gives_a_clear_error(exported_run, tmp_path, damage, precision, fragments):
    folder = tmp_path / "served"
    shutil.copytree(exported_run / "models/student-onnx", folder)
    if damage == "no manifest":
        (folder / "kdqa_export.json").unlink()
    elif damage == "truncated int8":
        data = (folder / "model-int8.onnx").read_bytes()
        (folder / "model-int8.onnx").write_bytes(data[: len(data) // 2])
    elif damage == "missing float32":
        (folder / "model.onnx").unlink()
    elif damage == "exported without int8":  # what export.int8: false writes
        manifest = json.loads((folder / "kdqa_export.json").read_text())
        del manifest["files"]["int8"]
        (folder / "kdqa_export.json").write_text(json.dumps(manifest))
        (folder / "model-int8.onnx").unlink()
    else:  # another export's graph dropped into this folder
        shutil.copy2(exported_run / "models/student-onnx/model-int8.onnx", folder / "model.onnx")
    result = kdqa(tmp_path, "predict", "--model", "served", "--precision", precision, "--question", "who?",
                  "--context", "alice built it.")
    assert_one_line_error(result, "served", *fragments)


def test_unsupported_architecture_is_named_in_one_line(exported_run, tmp_path):
    from transformers import DistilBertConfig, DistilBertForQuestionAnswering

    run = copy_run(exported_run, tmp_path / "run")
    folder = run / "distilbert"
    tok = tiny.make_tokenizer(folder)  # the same vocabulary as the features: only the architecture differs
    config = DistilBertConfig(vocab_size=len(tok.get_vocab()), dim=32, n_layers=1, n_heads=2, hidden_dim=64,
                              max_position_embeddings=128)
    DistilBertForQuestionAnswering(config).save_pretrained(folder, safe_serialization=True)
    result = kdqa(run, "export", "--model", "distilbert", "--out", "distilbert-onnx")
    assert_one_line_error(result, "distilbert", "DistilBertForQuestionAnswering", "token_type_ids")
    assert not (run / "distilbert-onnx").exists() and not list(run.glob(".distilbert-onnx*"))


# --- the gate ---

def test_a_float32_export_that_differs_from_pytorch_fails_and_publishes_nothing(exported_run, tmp_path, monkeypatch):
    import pipeline.stages.export as export

    run = copy_run(exported_run, tmp_path / "run")
    before = (run / "models/student-onnx/kdqa_export.json").read_bytes()
    exporter = export.export_float32

    def export_another_graph(model, path, opset, name):
        import copy

        other = copy.deepcopy(model)
        with torch.no_grad():
            other.qa_outputs.bias += 0.5  # every logit off by 0.5: what a wrong graph looks like
        exporter(other, path, opset, name)

    monkeypatch.setattr(export, "export_float32", export_another_graph)
    metrics_before = (run / "metrics/export.json").read_bytes()
    line = assert_one_line_error(kdqa(run, "export"), "models/student-onnx", "does not reproduce", "not published")
    assert float(line.split("differs by ")[1].split()[0]) == pytest.approx(0.5, abs=1e-3)
    # The previous export and its figures stay as they were; no staging is left.
    assert (run / "models/student-onnx/kdqa_export.json").read_bytes() == before
    assert (run / "metrics/export.json").read_bytes() == metrics_before
    assert not list((run / "models").glob(".*partial*"))


def test_int8_gate_fails_above_max_f1_drop_and_says_which_knob():
    from pipeline.runtime.errors import KdqaError
    from pipeline.stages.export import check_gate

    metrics = {"float32_max_logit_difference": 1e-6, "pytorch": {"f1": 60.0}, "onnx_int8": {"f1": 58.5},
               "int8_f1_drop": 1.5}
    with pytest.raises(KdqaError) as info:
        check_gate(metrics, 1.0, Path("models/student-onnx"))
    for fragment in ("loses 1.50 F1", "PyTorch 60.00", "int8 58.50", "export.max_f1_drop 1", "not published",
                     "export.int8: false"):
        assert fragment in str(info.value)
    check_gate(metrics, 1.5, Path("models/student-onnx"))  # at the limit: passes
    check_gate({**metrics, "int8_f1_drop": -0.3}, 0.0, Path("models/student-onnx"))  # int8 better: passes


def test_export_params_defaults_are_params_yaml_and_checked(tmp_path):
    from dataclasses import asdict

    from pipeline.runtime.errors import KdqaError
    from pipeline.params import ExportParams, load_params

    assert yaml.safe_load((REPO_ROOT / "params.yaml").read_text())["export"] == asdict(ExportParams())
    for bad, fragment in (({"opset": 17}, "export.opset must be at least 18"),
                          ({"max_f1_drop": -1}, "export.max_f1_drop must be at least 0"),
                          ({"int8": "yes"}, "export.int8 must be true or false"),
                          ({"precision": "int4"}, "unknown key(s) in section 'export': precision")):
        (tmp_path / "p.yaml").write_text(yaml.safe_dump({"export": bad}))
        with pytest.raises(KdqaError, match=fragment.replace("(", r"\(").replace(")", r"\)")):
            load_params(tmp_path / "p.yaml")


def test_a_student_of_another_tokenizer_is_checked_on_its_own_dev_features(run_copy):
    """After `kdqa align`, the export's check reads the student's own dev features, as `kdqa evaluate` does."""
    tiny.make_model(run_copy / "inputs/char-student", layers=1, seed=1, vocab=tiny.CHARACTER_VOCAB)
    params = yaml.safe_load((run_copy / "params.yaml").read_text())
    params["student"].update(model="./inputs/char-student", max_seq_len=64, doc_stride=16, epochs=1, max_steps=2)
    (run_copy / "params.yaml").write_text(yaml.safe_dump(params))
    for stage in ("align", "student", "evaluate", "export"):
        run_cli(["-q", stage], run_copy)
    metrics = json.loads((run_copy / "metrics/export.json").read_text())
    assert metrics["pytorch"] == scores_of(json.loads((run_copy / "metrics/eval.json").read_text()))
    assert metrics["float32_same_answers"] == metrics["questions"]


def test_an_export_with_non_finite_weights_is_refused(exported_run, tmp_path):
    """Reliability 3: an ONNX model with a NaN weight (exported from a diverged model, by hand or an older kdqa)
    is refused by QuestionAnswerer as a PyTorch one is, even with a manifest that matches its bytes."""
    import onnx
    from onnx import numpy_helper

    from pipeline import QuestionAnswerer
    from pipeline.runtime.errors import KdqaError
    from pipeline.store.shards import sha256_file

    served = Path(shutil.copytree(exported_run / "models/student-onnx", tmp_path / "served"))
    model = onnx.load(str(served / "model.onnx"))
    target = next(i for i in model.graph.initializer if numpy_helper.to_array(i).dtype == np.float32)
    values = numpy_helper.to_array(target).copy()
    values.flat[0] = np.nan
    target.CopyFrom(numpy_helper.from_array(values, target.name))
    onnx.save(model, str(served / "model.onnx"))
    manifest = json.loads((served / "kdqa_export.json").read_text())
    manifest["files"]["float32"]["sha256"] = sha256_file(served / "model.onnx")
    (served / "kdqa_export.json").write_text(json.dumps(manifest))
    with pytest.raises(KdqaError, match=f"{target.name} has 1 NaN or infinite values"):
        QuestionAnswerer(str(served), precision="float32")  # the damaged file (the default runs int8)
