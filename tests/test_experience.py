"""What a user meets: `--help` and exit codes, `-q`, the model card, a student cut from the teacher's layers,
`kdqa inspect --json`. (DVC experiments, metrics and plots: test_dvc.py; predict: test_pipeline.py.)"""

from __future__ import annotations

import json
import math
import re

import pytest
import yaml

from conftest import INPUTS, copy_run, make_run_dir, run_cli

COMMANDS = ["prepare", "teacher", "align", "student", "evaluate", "export", "predict", "inspect"]


# --- terminal manners ---

def test_help_of_kdqa_and_of_every_command(tmp_path):
    from pipeline.cli import cli

    assert sorted(cli.commands) == sorted(COMMANDS)  # a new command gets a line here
    top = run_cli(["--help"], tmp_path)
    assert top.exit_code == 0
    for command in COMMANDS:
        assert re.search(rf"^\s+{command}\s+\S", top.output, re.M), f"{command} missing from kdqa --help"
    epilog = top.output[top.output.index("Exit codes:"):]
    for code, meaning in (("0", "success"), ("1", "one line"), ("2", "usage"), ("130", "interrupted")):
        assert re.search(rf"^\s+{code}\s+.*{meaning}", epilog, re.M), (code, epilog)
    for flag in ("--quiet", "--verbose", "--params", "--version"):
        assert flag in top.output
    helps = {}
    for command in COMMANDS:
        result = run_cli([command, "--help"], tmp_path)
        assert result.exit_code == 0 and f"Usage: kdqa {command}" in result.output
        helps[command] = result.output
    # What each stage reads and writes.
    for command, paths in {"prepare": ["data/features"], "teacher": ["data/features", "data/teacher"],
                           "align": ["data/teacher/train", "student.model", "data/aligned/features",
                                     "data/aligned/teacher/train"],
                           "student": ["data/features/train", "data/teacher/train", "models/student",
                                       "logs/student/train.tsv", "student.*"],
                           "evaluate": ["models/student", "data/teacher/dev", "metrics/eval.json",
                                        "metrics/teacher.json", "results/predictions.json"],
                           "export": ["models/student", "data/features/dev", "export.*", "models/student-onnx",
                                      "metrics/export.json"]}.items():
        assert "Reads:" in helps[command] and "Writes:" in helps[command], helps[command]
        for path in paths:
            assert path in helps[command], (command, path)
    assert "--json" in helps["predict"] and "--json" in helps["inspect"]
    assert run_cli(["-h"], tmp_path).output == top.output


def test_usage_errors_exit_2(tmp_path):
    for args in (["student", "--no-such-option"], ["no-such-command"], ["predict", "--model", "m"], ["inspect"]):
        result = run_cli(args, tmp_path, expect_ok=False)
        assert result.exit_code == 2, (args, result.output)
        assert "Traceback" not in result.output


def test_quiet_hides_progress_bars_and_info_logs(tmp_path, tiny_assets):
    loud = run_cli(["prepare"], make_run_dir(tmp_path / "loud", tiny_assets))
    assert "tokenize train" in loud.stderr and "%|" in loud.stderr  # tqdm's bar
    quiet = run_cli(["-q", "prepare"], make_run_dir(tmp_path / "quiet", tiny_assets))
    assert quiet.stderr.strip() == "" and quiet.stdout.strip() == ""
    assert (tmp_path / "quiet/data/features/train/manifest.json").is_file()


# --- a student cut from the teacher's layers, and its model card ---

LAYERS = [0, 2]


@pytest.fixture(scope="module")
def layered_run(prepared_run, tmp_path_factory):
    """`kdqa student` with student.model = the 3-layer tiny teacher and student.init_layers [0, 2]."""
    run = copy_run(prepared_run, tmp_path_factory.mktemp("layered") / "run")
    params = yaml.safe_load((run / "params.yaml").read_text())
    params["student"].update(model=f"./{INPUTS}/teacher", init_layers=LAYERS, max_steps=2)
    (run / "params.yaml").write_text(yaml.safe_dump(params))
    run_cli(["-q", "student"], run)
    return run


def test_init_layers_copies_the_chosen_layers(tiny_assets):
    import torch
    from transformers import AutoModelForQuestionAnswering

    from pipeline.params import StudentParams
    from pipeline.stages.student import build_student

    source = AutoModelForQuestionAnswering.from_pretrained(tiny_assets.teacher)
    assert source.config.num_hidden_layers == 3
    student = build_student(StudentParams(model=str(tiny_assets.teacher), init_layers=LAYERS), torch.device("cpu"))
    assert student.config.num_hidden_layers == len(student.bert.encoder.layer) == len(LAYERS)
    src, dst = source.state_dict(), student.state_dict()
    for new, old in enumerate(LAYERS):  # encoder layer `new` of the student is layer `old` of the source
        prefix_new, prefix_old = f"bert.encoder.layer.{new}.", f"bert.encoder.layer.{old}."
        names = [k for k in dst if k.startswith(prefix_new)]
        assert names
        for name in names:
            assert torch.equal(dst[name], src[prefix_old + name[len(prefix_new):]]), name
    for name in dst:  # embeddings and the QA head come along unchanged
        if not name.startswith("bert.encoder."):
            assert torch.equal(dst[name], src[name]), name
    assert not [k for k in dst if k.startswith(f"bert.encoder.layer.{len(LAYERS)}.")]


def test_init_layers_student_saves_and_reloads(layered_run):
    from transformers import AutoModelForQuestionAnswering, AutoTokenizer

    model_dir = layered_run / "models/student"
    assert json.loads((model_dir / "config.json").read_text())["num_hidden_layers"] == len(LAYERS)
    model, info = AutoModelForQuestionAnswering.from_pretrained(model_dir, output_loading_info=True)
    assert model.config.num_hidden_layers == len(model.bert.encoder.layer) == len(LAYERS)
    assert not info["missing_keys"] and not info["unexpected_keys"], info  # every weight saved, none extra
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    enc = tokenizer("who built it?", "alice built the red tower.", return_tensors="pt")
    assert model(**enc).start_logits.shape == enc["input_ids"].shape
    training = json.loads((model_dir / "kdqa_training.json").read_text())
    assert training["student"]["init_layers"] == LAYERS


def test_model_card(layered_run):
    """Teacher, data, hyperparameters, EM/F1 with HasAns/NoAns, kdqa version; scores reproducible."""
    import torch
    from transformers import AutoModelForQuestionAnswering, AutoTokenizer

    from pipeline import __version__
    from pipeline.runtime.workspace import Workspace
    from pipeline.model.scoring import evaluate_model
    from pipeline.stages.student import CARD_EVALUATION

    params = yaml.safe_load((layered_run / "params.yaml").read_text())
    card = (layered_run / "models/student/README.md").read_text()
    assert card.startswith("---\n") and "library_name: transformers" in card
    assert f"kdqa {__version__}" in card
    here = Workspace(layered_run).local  # `kdqa -C RUN` reads (and records) the params' paths under the run
    assert f"**Teacher:** `{here(params['teacher']['model'])}`" in card
    assert here(params["data"]["train"]) in card and here(params["data"]["dev"]) in card
    assert f"`{here(params['student']['model'])}` (layers {LAYERS})" in card
    assert "default post-processing" in card and "n_best 20" in card and "null_threshold 0.0" in card
    for key in ("temperature", "distillation_weight", "learning_rate", "batch_size", "epochs", "init_layers"):
        assert re.search(rf"^{key}: {re.escape(str(params['student'][key]))}$", card, re.M), key
    assert "Optimizer steps:** 2" in card
    rows = dict(re.findall(r"^\| ([^|]+?) \| ([-\d.]+) \|$", card, re.M))
    for label in ("Exact match", "F1", "HasAns EM", "HasAns F1", "NoAns EM", "NoAns F1"):
        assert label in rows, (label, card)
    # The card's figures are the dev scores of the saved model with the default post-processing.
    model = AutoModelForQuestionAnswering.from_pretrained(layered_run / "models/student")
    pad = AutoTokenizer.from_pretrained(layered_run / "models/student").pad_token_id
    metrics, *_ = evaluate_model(model, pad, layered_run / "data/features/dev", CARD_EVALUATION, torch.device("cpu"),
                                 layered_run / "data/features/dev_examples.parquet")
    for label, key in (("Exact match", "exact"), ("F1", "f1"), ("HasAns F1", "HasAns_f1"), ("NoAns F1", "NoAns_f1")):
        assert float(rows[label]) == pytest.approx(metrics[key], abs=0.006), label
    assert int(rows["questions"]) == metrics["total"]


# --- kdqa inspect ---

def test_inspect_json_reports_every_field(prepared_run):
    manifest = json.loads((prepared_run / "data/teacher/train/manifest.json").read_text())
    info = json.loads(run_cli(["inspect", "data/teacher/train", "--json"], prepared_run).stdout)
    assert info["shards"] == len(manifest["shards"]) >= 1
    assert info["rows"] == manifest["rows"] and info["bytes"] == manifest["bytes"]
    assert info["fingerprint"] == manifest["fingerprint"]
    assert 0 <= info["teacher_span_accuracy"] <= info["teacher_start_accuracy"] <= 100
    max_len = yaml.safe_load((prepared_run / "params.yaml").read_text())["prepare"]["max_seq_len"]
    for side in ("start", "end"):
        assert 0 < info[f"{side}_entropy_mean"] <= math.log(max_len)  # nats over at most max_len positions
    text = run_cli(["inspect", "data/teacher/train"], prepared_run).stdout
    for key in ("shards", "rows", "bytes", "fingerprint", "teacher_span_accuracy", "start_entropy_mean",
                "end_entropy_mean"):
        assert re.search(rf"^{key}\s+\S", text, re.M), key
    features = json.loads(run_cli(["inspect", "data/features/train", "--json"], prepared_run).stdout)
    assert features["rows"] == manifest["rows"] and "teacher_span_accuracy" not in features
    missing = run_cli(["inspect", "data/nowhere"], prepared_run, expect_ok=False)
    assert missing.exit_code == 1 and "data/nowhere" in missing.stderr and "Traceback" not in missing.output


def test_local_data_outside_data_raw_is_flagged_in_a_dvc_project(tmp_path, caplog):
    """DVC watches data/raw/ for prepare; a local JSON elsewhere gets a warning that says what to do."""
    import logging
    from pipeline.runtime.workspace import Workspace
    from pipeline.stages.prepare import warn_if_dvc_cannot_see

    (tmp_path / "data" / "raw").mkdir(parents=True)
    (tmp_path / "data" / "raw" / "train.json").write_text("{}")
    (tmp_path / "elsewhere.json").write_text("{}")
    ws = Workspace(tmp_path)
    with caplog.at_level(logging.WARNING, logger="pipeline.stages.prepare"):
        warn_if_dvc_cannot_see(ws.local("elsewhere.json"), ws)  # not a DVC project yet: nothing to say
        assert not caplog.records
        (tmp_path / "dvc.yaml").write_text("stages: {}\n")
        warn_if_dvc_cannot_see(ws.local("data/raw/train.json"), ws)
        warn_if_dvc_cannot_see(str(tmp_path / "data" / "raw" / "train.json"), ws)
        warn_if_dvc_cannot_see("squad_v2", ws)  # a hub dataset: a param, not a file
        assert not caplog.records
        warn_if_dvc_cannot_see(ws.local("elsewhere.json"), ws)
    (record,) = caplog.records
    assert f"elsewhere.json is outside {tmp_path / 'data/raw'}/" in record.getMessage() and "dvc repro -f prepare" in record.getMessage()
