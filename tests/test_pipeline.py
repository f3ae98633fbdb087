"""The whole pipeline through the CLI on tiny data: prepare -> teacher -> student -> evaluate, and friends."""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from conftest import INPUTS, copy_run, run_cli
from pipeline.text.squad_metrics import squad_v2_metrics

OFFICIAL_KEYS = {"exact", "f1", "total", "HasAns_exact", "HasAns_f1", "HasAns_total", "NoAns_exact", "NoAns_f1",
                 "NoAns_total", "best_exact", "best_exact_thresh", "best_f1", "best_f1_thresh"}


def dev_golds(dev_json: Path) -> dict[str, list[str]]:
    """Gold answers straight from the SQuAD JSON, as the official evaluate-v2.0.py reads them."""
    doc = json.loads(dev_json.read_text())
    return {qa["id"]: [a["text"] for a in qa["answers"]]
            for article in doc["data"] for p in article["paragraphs"] for qa in p["qas"]}


class LoadSpy:
    """Records every model/tokenizer/weights load and every Python-level file open while active."""

    def __init__(self):
        self.active = False
        self.reset()

    def reset(self):
        self.models, self.tokenizers, self.weights, self.opened = [], [], [], []

    def audit(self, event, args):
        if self.active and event == "open" and isinstance(args[0], (str, bytes, os.PathLike)):
            self.opened.append(os.path.abspath(os.fsdecode(args[0])))

    def install(self, monkeypatch):
        import transformers.modeling_utils as modeling_utils
        import transformers.tokenization_utils_base as tokenization_utils_base

        def wrap(cls, record):
            original = cls.from_pretrained.__func__

            def spy(klass, name, *args, **kwargs):
                record.append(os.path.abspath(str(name)))
                return original(klass, name, *args, **kwargs)

            monkeypatch.setattr(cls, "from_pretrained", classmethod(spy))

        wrap(modeling_utils.PreTrainedModel, self.models)
        wrap(tokenization_utils_base.PreTrainedTokenizerBase, self.tokenizers)
        if hasattr(modeling_utils, "safe_open"):  # where transformers reads *.safetensors (Rust, no audit event)
            original_open = modeling_utils.safe_open

            def safe_open(path, *args, **kwargs):
                self.weights.append(os.path.abspath(str(path)))
                return original_open(path, *args, **kwargs)

            monkeypatch.setattr(modeling_utils, "safe_open", safe_open)


_SPY = LoadSpy()
sys.addaudithook(_SPY.audit)  # audit hooks cannot be removed; it records only while `active`


def spied_student(run: Path) -> LoadSpy:
    """`kdqa student` in `run`, recording every model, tokenizer, weights file and file it loads."""
    spy = _SPY
    spy.reset()
    with pytest.MonkeyPatch.context() as mp:
        spy.install(mp)
        spy.active = True
        try:
            run_cli(["student"], run)
        finally:
            spy.active = False
    return spy


def assert_only_student_loaded(spy: LoadSpy, run: Path, teacher_paths: list[str]) -> None:
    student_dir = str((run / INPUTS / "student").resolve())
    # Loads happened (the spy works) and all of them were of the student.
    assert spy.models and spy.tokenizers
    assert all(path == student_dir for path in spy.models + spy.tokenizers), (spy.models, spy.tokenizers)
    if spy.weights:
        assert all(Path(w).parent == Path(student_dir) for w in spy.weights), spy.weights
    assert any(p.startswith(student_dir) for p in spy.opened)
    assert not [p for p in spy.opened if any(p.startswith(t) for t in teacher_paths)]


@pytest.fixture(scope="module")
def trained_run(prepared_run, tmp_path_factory):
    """A copy of the prepared run with the teacher model directory deleted, then student and evaluate."""
    run = copy_run(prepared_run, tmp_path_factory.mktemp("trained") / "run")
    teacher_dir = run / INPUTS / "teacher"
    assert yaml.safe_load((run / "params.yaml").read_text())["teacher"]["model"] == f"./{INPUTS}/teacher"
    # Move the teacher away, out of reach: the student must not need it.
    moved = tmp_path_factory.mktemp("teacher_moved_away") / "teacher"
    shutil.move(teacher_dir, moved)
    spy = spied_student(run)
    run_cli(["evaluate"], run)
    return {"run": run, "spy": spy, "teacher_paths": [str(teacher_dir.resolve()), str(moved.resolve())]}


def test_outputs_at_fixed_paths(trained_run):
    run = trained_run["run"]
    for split in ("train", "dev"):
        assert list((run / "data/features" / split).glob("part-*.parquet"))
        assert list((run / "data/teacher" / split).glob("part-*.parquet"))
        manifest = json.loads((run / "data/teacher" / split / "manifest.json").read_text())
        assert manifest["fingerprint"] and manifest["fingerprint_parts"]["features"]
        features = json.loads((run / "data/features" / split / "manifest.json").read_text())
        assert manifest["rows"] == features["features"] == sum(s["rows"] for s in manifest["shards"])
        assert [s["name"] for s in manifest["shards"]] == [s["name"] for s in features["shards"]]
    for path in ("models/student/config.json", "metrics/eval.json", "metrics/teacher.json",
                 "results/predictions.json", "results/na_probs.json", "logs/student/train.tsv"):
        assert (run / path).is_file(), path


def test_student_model_loads_with_auto_classes(trained_run):
    from transformers import AutoModelForQuestionAnswering, AutoTokenizer

    model_dir = trained_run["run"] / "models/student"
    model = AutoModelForQuestionAnswering.from_pretrained(model_dir)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    assert model.config.num_hidden_layers == 1  # the student, not the 3-layer teacher
    assert list(model_dir.glob("*.safetensors"))
    enc = tokenizer("who built it?", "alice built the red tower.", return_tensors="pt")
    out = model(**enc)
    assert out.start_logits.shape == enc["input_ids"].shape


def test_eval_json_has_official_keys_and_matches_a_recomputation(trained_run, tiny_assets):
    run = trained_run["run"]
    metrics = json.loads((run / "metrics/eval.json").read_text())
    assert OFFICIAL_KEYS <= set(metrics) and "HasAns_f1_forced" in metrics
    teacher = json.loads((run / "metrics/teacher.json").read_text())
    assert OFFICIAL_KEYS <= set(teacher)
    preds = json.loads((run / "results/predictions.json").read_text())
    na_probs = json.loads((run / "results/na_probs.json").read_text())
    golds = dev_golds(tiny_assets.dev)
    assert set(preds) == set(na_probs) == set(golds)
    assert all(isinstance(v, str) for v in preds.values())
    assert all(0.0 <= p <= 1.0 for p in na_probs.values())
    # null_threshold 0 and na_prob = sigmoid(null - best span): "" exactly when na_prob > 1/2
    assert all((preds[q] == "") == (na_probs[q] > 0.5) for q in preds)
    assert metrics["total"] == len(golds)
    recomputed = squad_v2_metrics(golds, preds, na_probs)
    for key, value in recomputed.items():
        assert metrics[key] == pytest.approx(value, abs=1e-9), key
    # spans come from the context
    contexts = {qa["id"]: p["context"] for a in json.loads(tiny_assets.dev.read_text())["data"]
                for p in a["paragraphs"] for qa in p["qas"]}
    assert all(text in contexts[q] for q, text in preds.items())
    # The forced spans are what HasAns_f1_forced scores: a non-empty span from the context for every question,
    # equal to the answer wherever the model answered.
    from pipeline.text.squad_metrics import forced_span_metrics

    forced = json.loads((run / "results/forced_predictions.json").read_text())
    assert set(forced) == set(golds) and all(text and text in contexts[q] for q, text in forced.items())
    assert all(forced[q] == preds[q] for q in preds if preds[q])
    assert forced_span_metrics(golds, forced)["HasAns_f1_forced"] == pytest.approx(metrics["HasAns_f1_forced"], abs=1e-9)


def test_logits_rows_align_with_features(prepared_run):
    for split in ("train", "dev"):
        feature_shards = sorted((prepared_run / "data/features" / split).glob("part-*.parquet"))
        logit_shards = sorted((prepared_run / "data/teacher" / split).glob("part-*.parquet"))
        assert [p.name for p in feature_shards] == [p.name for p in logit_shards]
        for fp, lp in zip(feature_shards, logit_shards):
            features = pq.read_table(fp, columns=["feature_id", "input_ids"])
            logits = pq.read_table(lp)
            assert logits.schema.field("start_logits").type == pa.list_(pa.float16())
            assert logits.schema.field("end_logits").type == pa.list_(pa.float16())
            assert logits.column("feature_id").to_pylist() == features.column("feature_id").to_pylist()
            for ids, s, e in zip(features.column("input_ids").to_pylist(), logits.column("start_logits").to_pylist(),
                                 logits.column("end_logits").to_pylist()):
                assert len(s) == len(e) == len(ids)
                assert np.isfinite(s).all() and np.isfinite(e).all()


def test_teacher_logits_match_a_direct_forward_pass(prepared_run):
    """The stored float16 logits are the teacher's own, row for row (batching and padding change nothing)."""
    import torch
    from transformers import AutoModelForQuestionAnswering

    model = AutoModelForQuestionAnswering.from_pretrained(prepared_run / INPUTS / "teacher").eval()
    features = pq.read_table(sorted((prepared_run / "data/features/dev").glob("part-*.parquet"))[0]).to_pylist()
    logits = pq.read_table(sorted((prepared_run / "data/teacher/dev").glob("part-*.parquet"))[0]).to_pylist()
    for f, t in list(zip(features, logits))[:6]:
        with torch.no_grad():
            out = model(input_ids=torch.tensor([f["input_ids"]]), token_type_ids=torch.tensor([f["token_type_ids"]]))
        np.testing.assert_allclose(t["start_logits"], out.start_logits[0].numpy(), atol=2e-2, rtol=1e-2)
        np.testing.assert_allclose(t["end_logits"], out.end_logits[0].numpy(), atol=2e-2, rtol=1e-2)


def test_rounded_batch_widths_leave_each_rows_logits_unchanged(prepared_run):
    """teacher.pad_to_multiple_of pads batches further; the rows' logits (real tokens only) stay the same."""
    import torch
    from transformers import AutoModelForQuestionAnswering

    from pipeline.model.inference import shard_logits

    model = AutoModelForQuestionAnswering.from_pretrained(prepared_run / INPUTS / "teacher").eval()
    shard = sorted((prepared_run / "data/features/dev").glob("part-*.parquet"))[0]
    lengths = [len(x) for x in pq.read_table(shard, columns=["input_ids"]).column("input_ids").to_pylist()]
    exact = shard_logits(model, shard, 0, torch.device("cpu"), 4, 1 << 20, dtype=None, logits_dtype=torch.float32)
    rounded = shard_logits(model, shard, 0, torch.device("cpu"), 4, 1 << 20, dtype=None, logits_dtype=torch.float32,
                           multiple=16)
    assert exact[0] == rounded[0] and any(n % 16 for n in lengths)  # some batches do get wider
    for n, a, b in zip(lengths + lengths, exact[1] + exact[2], rounded[1] + rounded[2]):
        assert len(a) == len(b) == n
        np.testing.assert_allclose(a, b, atol=1e-4)


def set_param(run: Path, section: str, key: str, value) -> None:
    params = yaml.safe_load((run / "params.yaml").read_text())
    params[section][key] = value
    (run / "params.yaml").write_text(yaml.safe_dump(params))


def test_teacher_precision_is_part_of_what_the_logits_mean(run_copy):
    """float32 and bfloat16 logits differ in their last digits: switching recomputes them, and the manifest
    (whose fingerprint the student checks) says which precision they were computed in."""
    def teacher_output(precision):
        set_param(run_copy, "teacher", "precision", precision)
        run_cli(["teacher"], run_copy)
        manifest = json.loads((run_copy / "data/teacher/dev/manifest.json").read_text())
        shard = sorted((run_copy / "data/teacher/dev").glob("part-*.parquet"))[0]
        return manifest, np.concatenate(pq.read_table(shard).column("start_logits").to_pylist())

    full, full_logits = teacher_output("float32")
    half, half_logits = teacher_output("bfloat16")
    assert full["fingerprint_parts"]["precision"] == "float32" and half["fingerprint_parts"]["precision"] == "bfloat16"
    assert full["fingerprint"] != half["fingerprint"]
    assert not np.array_equal(full_logits, half_logits)  # really recomputed, not reported up to date
    np.testing.assert_allclose(half_logits, full_logits, atol=2e-2, rtol=2e-2)  # ...and still the same model


def test_auto_precision_is_bfloat16_only_where_the_hardware_has_it(monkeypatch):
    import torch

    from pipeline.model import inference

    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert inference.autocast_dtype(cuda) is torch.bfloat16
    monkeypatch.setattr(inference, "cpu_has_native_bf16", lambda: False)
    assert inference.autocast_dtype(cpu) is None  # emulated bfloat16 would be slower than float32
    monkeypatch.setattr(inference, "cpu_has_native_bf16", lambda: True)
    assert inference.autocast_dtype(cpu) is torch.bfloat16
    assert inference.autocast_dtype(cpu, "float32") is None and inference.autocast_dtype(cuda, "float16") is torch.float16


def test_student_succeeds_without_the_teacher_model_directory(trained_run):
    run = trained_run["run"]
    assert not (run / INPUTS / "teacher").exists()
    assert (run / "models/student/model.safetensors").is_file()
    training = json.loads((run / "models/student/kdqa_training.json").read_text())
    assert training["student"]["distillation_weight"] == 0.5


def test_student_never_loads_the_teacher(trained_run, run_copy):
    assert_only_student_loaded(trained_run["spy"], trained_run["run"], trained_run["teacher_paths"])
    # ... and not even when the teacher is right there to be loaded
    teacher_dir = run_copy / INPUTS / "teacher"
    assert (teacher_dir / "model.safetensors").is_file()
    params = yaml.safe_load((run_copy / "params.yaml").read_text())
    params["student"].update(max_steps=2)
    (run_copy / "params.yaml").write_text(yaml.safe_dump(params))
    spy = spied_student(run_copy)
    assert_only_student_loaded(spy, run_copy, [str(teacher_dir.resolve())])
    assert saved_layers(run_copy / "models/student") == 1


def saved_layers(model_dir: Path) -> int:
    return json.loads((model_dir / "config.json").read_text())["num_hidden_layers"]


def test_training_log_has_loss_and_lr(trained_run):
    run = trained_run["run"]
    rows = list(csv.DictReader((run / "logs/student/train.tsv").open(), delimiter="\t"))
    params = yaml.safe_load((run / "params.yaml").read_text())["student"]
    assert rows and {"step", "loss", "kd_loss", "ce_loss", "lr"} <= set(rows[0])
    assert [int(r["step"]) for r in rows] == list(range(1, len(rows) + 1))  # log_every 1
    w, T = params["distillation_weight"], params["temperature"]
    for r in rows:
        loss, kd, ce, lr = (float(r[k]) for k in ("loss", "kd_loss", "ce_loss", "lr"))
        assert kd > 0 and ce > 0 and lr >= 0
        assert loss == pytest.approx(w * T**2 * kd + (1 - w) * ce, rel=1e-4)
    lrs = [float(r["lr"]) for r in rows]
    peak = lrs.index(max(lrs))
    assert max(lrs) <= params["learning_rate"] + 1e-12
    assert all(a <= b for a, b in zip(lrs[:peak], lrs[1:peak + 1]))  # warmup
    assert all(a >= b for a, b in zip(lrs[peak:], lrs[peak + 1:]))  # then linear decay
    assert lrs[-1] <= 0.1 * max(lrs)  # decayed (towards 0 at the last step)


def test_eval_curve_ends_with_the_final_models_dev_scores(trained_run):
    """The student stage's last dev evaluation is logged (eval.tsv), not only written into the model card."""
    import torch

    from pipeline.model.scoring import evaluate_model
    from pipeline.model.loading import load_qa_model
    from pipeline.stages.student import CARD_EVALUATION

    run = trained_run["run"]
    rows = list(csv.DictReader((run / "logs/student/eval.tsv").open(), delimiter="\t"))
    steps = json.loads((run / "models/student/kdqa_training.json").read_text())["steps"]
    assert rows and int(rows[-1]["step"]) == steps
    model = load_qa_model(str(run / "models/student")).eval()
    metrics, *_ = evaluate_model(model, 0, run / "data/features/dev", CARD_EVALUATION, torch.device("cpu"),
                                 run / "data/features/dev_examples.parquet")
    assert float(rows[-1]["f1"]) == pytest.approx(metrics["f1"], abs=1e-4)
    assert float(rows[-1]["f1_forced"]) == pytest.approx(metrics["HasAns_f1_forced"], abs=1e-4)


def test_question_answerer_on_the_student(trained_run):
    from pipeline import QuestionAnswerer

    qa = QuestionAnswerer(str(trained_run["run"] / "models/student"), device="cpu", max_seq_len=64, doc_stride=16)
    context = "alice built the red tower in paris and bob founded the old castle of rome."
    answer = qa("who built the tower?", context)
    assert 0.0 <= answer.no_answer_probability <= 1.0
    assert answer.span_text and answer.span_text in context
    assert answer.text in ("", answer.span_text)
    assert answer.has_answer == (answer.text != "")
    # a long context is read in windows; the answer still comes from the context
    long_context = " ".join([context] * 8)
    many = qa.answer_many([("who built the tower?", long_context), ("where is the castle?", context)])
    assert len(many) == 2 and many[0].span_text in long_context
    # an always-abstain threshold and a never-abstain one
    assert QuestionAnswerer(str(trained_run["run"] / "models/student"), null_threshold=-1e9)(
        "who?", context).text == ""
    assert QuestionAnswerer(str(trained_run["run"] / "models/student"), null_threshold=1e9)(
        "who?", context).text != ""


def _venv_env() -> dict:
    env = dict(os.environ)
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
    return env


def test_kdqa_predict_prints_an_answer_or_no_answer(trained_run):
    run = trained_run["run"]
    context = "alice built the red tower in paris."
    # (the `kdqa` console script itself runs every stage in test_dvc; in-process here saves a torch import)
    result = run_cli(["predict", "--model", "models/student", "--question", "who built the tower?",
                      "--context", context, "--null-threshold", "1e9"], run)
    text = result.stdout.strip().split("\t")[0]
    assert text and text in context and "(score" in result.stdout
    # the "no answer" branch (a threshold below any margin) and JSON output
    result = run_cli(["predict", "--model", "models/student", "--question", "who?", "--context", context,
                      "--null-threshold", "-1e9"], run)
    assert result.stdout.startswith("no answer")
    result = run_cli(["predict", "--model", "models/student", "--question", "who?", "--context", context,
                      "--json"], run)
    obj = json.loads(result.stdout)
    assert set(obj) == {"answer", "score", "no_answer_probability", "best_span"}


def test_python_m_pipeline_inspect_prints_rows_bytes_fingerprint(prepared_run):
    out = subprocess.run([sys.executable, "-m", "pipeline", "inspect", "data/teacher/train"], cwd=prepared_run,
                         env=_venv_env(), capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    fields = dict(line.split(None, 1) for line in out.stdout.strip().splitlines())
    manifest = json.loads((prepared_run / "data/teacher/train/manifest.json").read_text())
    assert int(fields["rows"]) == manifest["rows"]
    assert int(fields["bytes"]) == manifest["bytes"] > 0
    assert fields["fingerprint"].strip() == manifest["fingerprint"]
    info = json.loads(run_cli(["inspect", "data/teacher/train", "--json"], prepared_run).stdout)
    assert info["rows"] == manifest["rows"] and "teacher_span_accuracy" in info


def test_student_with_weight_zero_needs_no_teacher_logits(run_copy):
    shutil.rmtree(run_copy / "data/teacher")
    shutil.rmtree(run_copy / INPUTS / "teacher")
    params = yaml.safe_load((run_copy / "params.yaml").read_text())
    params["student"].update(distillation_weight=0.0, max_steps=3, log_every=0)  # log_every 0: last step only
    (run_copy / "params.yaml").write_text(yaml.safe_dump(params))
    run_cli(["student"], run_copy)
    assert (run_copy / "models/student/model.safetensors").is_file()
    rows = list(csv.DictReader((run_copy / "logs/student/train.tsv").open(), delimiter="\t"))
    assert [int(r["step"]) for r in rows] == [3]
    assert all(float(r["kd_loss"]) == 0 and float(r["loss"]) == pytest.approx(float(r["ce_loss"])) for r in rows)
    # evaluate still works without teacher logits (no metrics/teacher.json then)
    run_cli(["evaluate"], run_copy)
    assert (run_copy / "metrics/eval.json").is_file() and not (run_copy / "metrics/teacher.json").exists()


def test_student_refuses_logits_of_other_features(run_copy):
    """The manifest's features fingerprint must match the features being trained on."""
    manifest_path = run_copy / "data/teacher/train/manifest.json"
    manifest = json.loads(manifest_path.read_text())
    manifest["fingerprint_parts"]["features"] = "0" * 16
    manifest_path.write_text(json.dumps(manifest))
    result = run_cli(["student"], run_copy, expect_ok=False)
    assert result.exit_code == 1
    assert "kdqa: error:" in result.output and "data/teacher/train" in result.output
    assert "Traceback" not in result.output
    assert not (run_copy / "models/student").exists()


@pytest.mark.parametrize("folder, kind, command", [("data/features/train", "features", "kdqa prepare"),
                                                   ("data/teacher/train", "logits", "kdqa teacher")])
def test_student_refuses_shards_of_another_format_version(run_copy, folder, kind, command):
    """Shards written by a kdqa whose features or logits format differs (pipeline/formats.yaml) are not read."""
    manifest_path = run_copy / folder / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    assert manifest.get("features_format", manifest.get("fingerprint_parts", {}).get("logits_format")) == 1
    (manifest if kind == "features" else manifest["fingerprint_parts"])[f"{kind}_format"] = 99
    manifest_path.write_text(json.dumps(manifest))
    result = run_cli(["-q", "student"], run_copy, expect_ok=False)
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert f"kdqa: error: {run_copy / folder}: {kind} format 99, but this kdqa reads {kind} format 1 (run `{command}`)" \
        in result.output


# --- streaming (features shard, logits shard) pairs into training batches ---

def _stream(run: Path, batch_size=5, seed=7):
    from pipeline.training.stream import ShardStream, find_shard_pairs

    pairs = find_shard_pairs(run / "data/features/train", run / "data/teacher/train")
    return ShardStream(pairs, batch_size, seed, pad_token_id=0)


def _epoch_rows(stream, epoch):
    """(key of each row in batch order, batches); a row's key is its real input ids."""
    stream.epoch = epoch
    batches = list(stream)
    keys = [tuple(ids[mask.bool()].tolist()) for b in batches for ids, mask in zip(b["input_ids"], b["attention_mask"])]
    return keys, batches


def test_stream_batches_carry_each_features_own_teacher_logits(prepared_run):
    features = {}
    for split_dir in ("data/features/train",):
        for fp in sorted((prepared_run / split_dir).glob("part-*.parquet")):
            lp = prepared_run / "data/teacher/train" / fp.name
            for f, t in zip(pq.read_table(fp).to_pylist(), pq.read_table(lp).to_pylist()):
                assert f["feature_id"] == t["feature_id"]
                features[tuple(f["input_ids"])] = (f, t)
    stream = _stream(prepared_run)
    keys, batches = _epoch_rows(stream, 0)
    assert sorted(keys) == sorted(features)  # every feature exactly once per epoch
    assert len(batches) == stream.steps_in_epoch(0)
    for b in batches:
        lengths = b["attention_mask"].sum(1)
        assert b["input_ids"].shape[1] == int(lengths.max())  # padded to the longest feature of the batch
        for i in range(len(lengths)):
            n = int(lengths[i])
            f, t = features[tuple(b["input_ids"][i, :n].tolist())]
            np.testing.assert_array_equal(b["teacher_start"][i, :n].numpy(), np.asarray(t["start_logits"], np.float32))
            np.testing.assert_array_equal(b["teacher_end"][i, :n].numpy(), np.asarray(t["end_logits"], np.float32))
            assert int(b["start_positions"][i]) == f["start_position"] and int(b["end_positions"][i]) == f["end_position"]
            allowed = [0] + list(range(f["context_start"], f["context_end"] + 1))
            assert b["answer_mask"][i].nonzero().flatten().tolist() == allowed
            assert b["token_type_ids"][i, :n].tolist() == f["token_type_ids"]


def test_rounded_batch_width_changes_shapes_not_the_loss(prepared_run):
    """pad_to_multiple_of rounds each batch's width up (capped at the model's position table); the extra
    positions are padding in every input and mask, so the model's logits at real tokens and the loss match
    the exact-width batch."""
    import torch

    from pipeline.model.losses import distillation_loss
    from pipeline.model.loading import load_qa_model
    from pipeline.training.stream import ShardStream, find_shard_pairs

    pairs = find_shard_pairs(prepared_run / "data/features/train", prepared_run / "data/teacher/train")
    exact = list(ShardStream(pairs, 5, 7, pad_token_id=0))
    rounded = list(ShardStream(pairs, 5, 7, pad_token_id=0, pad_to_multiple_of=16))
    capped = list(ShardStream(pairs, 5, 7, pad_token_id=0, pad_to_multiple_of=16, max_width=44))
    model = load_qa_model(str(prepared_run / INPUTS / "student")).eval()
    assert len(exact) == len(rounded) == len(capped)
    for a, b, c in zip(exact, rounded, capped):
        w = a["input_ids"].shape[1]
        assert b["input_ids"].shape[1] == -(-w // 16) * 16
        assert c["input_ids"].shape[1] == max(w, min(-(-w // 16) * 16, 44))
        for key in a:  # same values at the real width (positions are per row), padding beyond it
            torch.testing.assert_close(b[key][:, :w] if a[key].dim() == 2 else b[key], a[key])
        assert not b["attention_mask"][:, w:].any() and not b["answer_mask"][:, w:].any()
        losses = []
        for batch in (a, b):
            with torch.no_grad():
                out = model(input_ids=batch["input_ids"], token_type_ids=batch["token_type_ids"],
                            attention_mask=batch["attention_mask"])
            losses.append(distillation_loss(out.start_logits, out.end_logits, batch["start_positions"],
                                            batch["end_positions"], batch["answer_mask"], batch["teacher_start"],
                                            batch["teacher_end"], 2.0, 0.5).total)
        torch.testing.assert_close(losses[1], losses[0], rtol=1e-5, atol=1e-5)


def test_stream_shuffles_every_epoch_reproducibly(prepared_run):
    stream = _stream(prepared_run)
    epoch0, _ = _epoch_rows(stream, 0)
    epoch1, _ = _epoch_rows(stream, 1)
    assert sorted(epoch0) == sorted(epoch1) and epoch0 != epoch1
    again, _ = _epoch_rows(_stream(prepared_run), 0)
    assert again == epoch0  # same seed, same order
    other, _ = _epoch_rows(_stream(prepared_run, seed=8), 0)
    assert other != epoch0
    # rows are shuffled within shards, not only the shard order
    file_order = [tuple(ids) for fp in sorted((prepared_run / "data/features/train").glob("part-*.parquet"))
                  for ids in pq.read_table(fp, columns=["input_ids"]).column("input_ids").to_pylist()]
    assert epoch0 != file_order and epoch0[:16] != file_order[:16] and epoch0[:16] != file_order[16:32]


def test_misaligned_logits_rows_are_refused(run_copy):
    from pipeline.runtime.errors import KdqaError
    from pipeline.training.stream import find_shard_pairs, verify_alignment

    shard = run_copy / "data/teacher/train/part-00000.parquet"
    table = pq.read_table(shard)
    pq.write_table(table.take(list(range(len(table)))[::-1]), shard)  # same rows, other order
    pairs = find_shard_pairs(run_copy / "data/features/train", run_copy / "data/teacher/train")
    with pytest.raises(KdqaError, match=r"part-00000\.parquet: row 0 holds feature"):
        verify_alignment(pairs)


def test_params_option_reads_another_file(tmp_path, tiny_assets):
    """`--params PATH` instead of ./params.yaml; outputs still land relative to the working directory."""
    import tiny

    cwd = tmp_path / "work"
    cwd.mkdir()
    (tmp_path / "conf").mkdir()
    elsewhere = tiny.write_params(tmp_path / "conf" / "p.yaml", tiny_assets.teacher, tiny_assets.student,
                                  tiny_assets.train, tiny_assets.dev, prepare__shard_size=1000)
    run_cli(["--params", str(elsewhere), "prepare"], cwd)
    assert not (cwd / "params.yaml").exists()
    manifest = json.loads((cwd / "data/features/train/manifest.json").read_text())
    assert manifest["prepare"]["shard_size"] == 1000 and len(manifest["shards"]) == 1
    result = run_cli(["--params", str(tmp_path / "missing.yaml"), "prepare"], cwd, expect_ok=False)
    assert result.exit_code == 1 and "missing.yaml" in result.output and "Traceback" not in result.output


def test_evaluate_refuses_a_damaged_teacher_dev_shard(run_copy):
    """metrics/teacher.json is scored from stored dev logits: a damaged shard must stop, not skew the scores."""
    params = yaml.safe_load((run_copy / "params.yaml").read_text())
    params["student"].update(max_steps=2)
    (run_copy / "params.yaml").write_text(yaml.safe_dump(params))
    run_cli(["student"], run_copy)
    shard = run_copy / "data/teacher/dev/part-00000.parquet"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one flipped byte that Parquet itself might not notice
    shard.write_bytes(bytes(data))
    result = run_cli(["evaluate"], run_copy, expect_ok=False)
    assert result.exit_code == 1
    assert "part-00000.parquet" in result.output and "kdqa teacher" in result.output
    assert not (run_copy / "metrics/teacher.json").exists() and not (run_copy / "metrics/eval.json").exists()


@pytest.mark.parametrize("change, fragment", [
    (lambda m: m.pop("features_format"), "no features format version"),
    (lambda m: m["shards"][0].pop("sha256"), "checksum differs"),
])
def test_manifests_without_what_this_kdqa_writes_are_refused(run_copy, change, fragment):
    """No compatibility branches for formats never released: a features manifest without its format version or a
    shard's checksum was not written by this kdqa, and the student says what to rerun."""
    manifest_path = run_copy / "data/features/train/manifest.json"
    manifest = json.loads(manifest_path.read_text())
    change(manifest)
    manifest_path.write_text(json.dumps(manifest))
    result = run_cli(["-q", "student"], run_copy, expect_ok=False)
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert fragment in result.output and "kdqa prepare" in result.output
