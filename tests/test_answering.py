"""The no-answer threshold is part of the model (issue 32, item 3): chosen on the validation split by the student
stage with the official script's semantics, stored in the model folder, used by evaluate, export and
QuestionAnswerer; without a validation split nothing changes."""

from __future__ import annotations

import json
import math
import random
import shutil
from pathlib import Path

import pytest
import yaml
from conftest import INPUTS, copy_run, make_run_dir, run_cli

import tiny
from pipeline.model.answering import ANSWERING_FILE, choose_null_threshold, null_threshold_of, read_answering
from pipeline.runtime.errors import KdqaError
from pipeline.text.postprocess import margin_threshold, na_probability
from pipeline.text.squad_metrics import squad_v2_metrics

# ---------------------------------------------------------------- the threshold, without models


def test_margin_threshold_answers_exactly_what_the_official_threshold_answers():
    """At margin threshold t = margin_threshold(p), a question is answered (margin <= t) exactly when the official
    script answers it at p (na_prob <= p): for margins that made p themselves, and the next float above t does not."""
    rng = random.Random(0)
    for _ in range(5000):
        margin = rng.uniform(-50, 50) if rng.random() < 0.8 else rng.uniform(-900, 900)
        p = na_probability(margin)
        t = margin_threshold(p)
        assert margin <= t and na_probability(t) <= p
        if p < 1.0:
            assert na_probability(math.nextafter(t, math.inf)) > p


def test_margin_threshold_edges():
    # p = 1: every question answered; JSON has no infinity, the largest float stands in
    assert margin_threshold(1.0) == 1.7976931348623157e308
    # p = 0: only margins whose na_prob underflows to 0 are answered (below about -745), not -inf
    t = margin_threshold(0.0)
    assert -746 < t < -745 and na_probability(t) == 0.0 and na_probability(math.nextafter(t, 0)) > 0.0
    assert margin_threshold(0.5) == pytest.approx(0.0, abs=1e-12)


def _golds_and_answers(seed: int, n: int = 200):
    """Random questions: golds, forced spans, na_probs (a model that is right more often when confident)."""
    rng = random.Random(seed)
    golds, forced, na_probs = {}, {}, {}
    for i in range(n):
        q = f"q{i}"
        answerable = rng.random() < 0.6
        golds[q] = ["red tower"] if answerable else []
        forced[q] = rng.choice(["red tower", "tower", "old castle", "paris"])
        margin = rng.gauss(-1.0 if answerable else 1.0, 2.0)
        na_probs[q] = na_probability(margin)
    return golds, forced, na_probs


def _f1_at(threshold: float, golds, forced, na_probs) -> float:
    """F1 of the answers post-processing gives at a margin threshold (margin > threshold: abstain)."""
    preds = {q: ("" if math.log(p / (1 - p)) > threshold else forced[q]) if 0 < p < 1 else
             ("" if p == 1.0 else forced[q]) for q, p in na_probs.items()}
    return squad_v2_metrics(golds, preds)["f1"]


def test_chosen_threshold_reaches_the_best_f1_and_no_other_threshold_beats_it():
    golds, forced, na_probs = _golds_and_answers(0)
    record = choose_null_threshold(forced, na_probs, golds, "validation")
    assert record["chosen_on"] == "validation" and record["questions"] == 200
    reached = _f1_at(record["null_threshold"], golds, forced, na_probs)
    assert reached == pytest.approx(record["best_f1"], abs=1e-3)
    # the official search over every threshold: none of the margins does better
    margins = [math.log(p / (1 - p)) for p in na_probs.values()]
    assert max(_f1_at(m, golds, forced, na_probs) for m in margins) <= record["best_f1"] + 1e-3
    assert record["best_f1"] > _f1_at(0.0, golds, forced, na_probs)  # the point of choosing it


def test_abstaining_on_everything_best_gives_the_underflow_margin():
    golds = {f"q{i}": [] for i in range(5)}  # nothing answerable: any answer costs
    forced = {q: "tower" for q in golds}
    na_probs = {q: 0.3 for q in golds}
    record = choose_null_threshold(forced, na_probs, golds, "validation")
    assert record["na_prob_threshold"] == 0.0 and record["best_f1"] == 100.0
    assert record["null_threshold"] < -745  # every real margin is above it: abstain


def test_stored_threshold_reader_refuses_a_damaged_file(tmp_path):
    assert read_answering(tmp_path) is None and null_threshold_of(tmp_path)[0] == 0.0
    assert null_threshold_of("some/hub-name")[0] == 0.0  # a hub name has no folder, so no stored threshold
    path = tmp_path / ANSWERING_FILE
    for text, problem in (("{not json", "unreadable JSON"), ("[1, 2]", "expected a JSON object"),
                          ('{"questions": 3}', "null_threshold must be a finite number, got None"),
                          ('{"null_threshold": "high"}', "null_threshold must be a finite number, got 'high'"),
                          ('{"null_threshold": NaN}', "null_threshold must be a finite number, got nan")):
        path.write_text(text)
        with pytest.raises(KdqaError, match="kdqa_answering.json") as error:
            null_threshold_of(tmp_path)
        assert problem in str(error.value)
    path.write_text('{"null_threshold": -2.5}')
    assert null_threshold_of(tmp_path) == (-2.5, str(path))
    assert null_threshold_of(tmp_path, 1.0, "evaluate.null_threshold") == (1.0, "evaluate.null_threshold")


# ---------------------------------------------------------------- the pipeline, tiny models


@pytest.fixture(scope="module")
def validated_run(tiny_assets, tmp_path_factory) -> Path:
    """prepare (with a validation split), teacher, student, evaluate at `auto`, export."""
    run = tmp_path_factory.mktemp("validated") / "run"
    make_run_dir(run, tiny_assets, evaluate__null_threshold="auto")
    tiny.make_squad(run / INPUTS / "validation.json", articles=2, paragraphs=2, questions=6, seed=7)
    params = yaml.safe_load((run / "params.yaml").read_text())
    params["data"]["validation"] = f"./{INPUTS}/validation.json"
    (run / "params.yaml").write_text(yaml.safe_dump(params))
    for stage in ("prepare", "teacher", "student", "evaluate", "export"):
        run_cli([stage], run)
    return run


def _stored(run: Path, folder: str = "models/student") -> dict:
    return json.loads((run / folder / ANSWERING_FILE).read_text())


def test_student_stage_chooses_the_threshold_on_validation_and_stores_it(validated_run):
    import torch

    from pipeline.model.answering import at_threshold
    from pipeline.model.loading import TRAINED, load_qa_model, load_tokenizer
    from pipeline.model.scoring import evaluate_model
    from pipeline.params import Params

    run = validated_run
    assert (run / "data/features/validation/manifest.json").exists()
    assert (run / "data/features/validation_examples.parquet").exists()
    record = _stored(run)
    assert record["chosen_on"] == "validation" and record["questions"] == 24  # 2 articles x 2 paragraphs x 6
    # Answering validation at the stored margin gives the best F1 the official search found there: the margin
    # answers exactly the questions the official na_prob threshold answers.
    model = load_qa_model(str(run / "models/student"), purpose=TRAINED)
    tokenizer = load_tokenizer(str(run / "models/student"))
    # the student stage answers validation with the default post-processing (it never reads evaluate.*)
    params = at_threshold(Params(), record["null_threshold"])
    metrics, *_ = evaluate_model(model, tokenizer.pad_token_id, run / "data/features/validation", params,
                                 torch.device("cpu"), run / "data/features/validation_examples.parquet")
    assert metrics["f1"] == pytest.approx(record["best_f1"], abs=1e-3)
    assert metrics["best_f1"] == pytest.approx(record["best_f1"], abs=1e-3)
    assert "no-answer threshold" in (run / "models/student/README.md").read_text()


def test_evaluate_answers_at_the_stored_threshold(validated_run):
    run = validated_run
    record = _stored(run)
    metrics = json.loads((run / "metrics/eval.json").read_text())
    assert metrics["null_threshold"] == record["null_threshold"]
    assert metrics["null_threshold_source"].endswith(f"models/student/{ANSWERING_FILE}")
    preds = json.loads((run / "results/predictions.json").read_text())
    forced = json.loads((run / "results/forced_predictions.json").read_text())
    na_probs = json.loads((run / "results/na_probs.json").read_text())
    # answered exactly where na_prob <= the official threshold it stands for
    for q, p in na_probs.items():
        assert preds[q] == (forced[q] if p <= record["na_prob_threshold"] else ""), q
    teacher = json.loads((run / "metrics/teacher.json").read_text())
    assert teacher["null_threshold"] == 0.0 and teacher["null_threshold_source"].startswith("untuned")


def test_a_number_overrides_the_stored_threshold(validated_run, tmp_path):
    run = copy_run(validated_run, tmp_path / "run")
    params = yaml.safe_load((run / "params.yaml").read_text())
    params["evaluate"]["null_threshold"] = -1e9  # abstain on everything
    (run / "params.yaml").write_text(yaml.safe_dump(params))
    run_cli(["evaluate"], run)
    metrics = json.loads((run / "metrics/eval.json").read_text())
    assert metrics["null_threshold"] == -1e9 and metrics["null_threshold_source"] == "evaluate.null_threshold"
    assert not any(json.loads((run / "results/predictions.json").read_text()).values())


def test_export_carries_the_stored_threshold_and_question_answerer_uses_it(validated_run, tmp_path):
    from pipeline.serving.qa import QuestionAnswerer

    run = validated_run
    record = _stored(run)
    assert _stored(run, "models/student-onnx") == record
    export_metrics = json.loads((run / "metrics/export.json").read_text())
    assert export_metrics["null_threshold"] == record["null_threshold"]
    for folder in ("models/student", "models/student-onnx"):
        qa = QuestionAnswerer(str(run / folder))
        assert qa.null_threshold == record["null_threshold"], folder
        assert QuestionAnswerer(str(run / folder), null_threshold=3.0).null_threshold == 3.0
    # Used for answering, not only kept: a stored threshold far below every margin abstains on everything.
    model = shutil.copytree(run / "models/student", tmp_path / "student")
    (model / ANSWERING_FILE).write_text(json.dumps({**record, "null_threshold": -1e9}))
    context = "alice built the red tower in paris and bob founded the old castle of rome."
    answer = QuestionAnswerer(str(model))("who built the tower?", context)
    assert answer.text == "" and answer.span_text
    assert QuestionAnswerer(str(model), null_threshold=1e9)("who built the tower?", context).text == answer.span_text
    shown = run_cli(["predict", "--model", str(model), "--question", "who built the tower?", "--context", context,
                     "--json"], run)
    assert json.loads(shown.stdout)["answer"] == ""


def test_without_validation_nothing_is_stored_and_the_threshold_stays_zero(validated_run, tmp_path):
    run = copy_run(validated_run, tmp_path / "run")
    params = yaml.safe_load((run / "params.yaml").read_text())
    params["data"]["validation"] = None
    (run / "params.yaml").write_text(yaml.safe_dump(params))
    run_cli(["prepare"], run)  # removes the validation split the earlier run made
    assert not (run / "data/features/validation").exists()
    assert not (run / "data/features/validation_examples.parquet").exists()
    shutil.rmtree(run / "data/teacher")
    run_cli(["teacher"], run)
    assert "no validation split (data.validation)" in run_cli(["student"], run).stderr
    assert not (run / "models/student" / ANSWERING_FILE).exists()
    run_cli(["evaluate"], run)
    metrics = json.loads((run / "metrics/eval.json").read_text())
    assert metrics["null_threshold"] == 0.0 and metrics["null_threshold_source"].startswith("untuned")
    preds = json.loads((run / "results/predictions.json").read_text())
    na_probs = json.loads((run / "results/na_probs.json").read_text())
    assert all(preds[q] == "" for q, p in na_probs.items() if p > 0.5)  # 0.0 margin: na_prob 1/2, as before
