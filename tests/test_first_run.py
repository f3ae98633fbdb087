"""The first-run preset (presets/first-run.yaml, docs/first-run.md), wired end to end offline.

Stand-ins for the hub: the preset's model name is also a local folder in the run directory (a tiny 12-layer
BERT; kdqa loads a local folder of that name before asking the hub), and `datasets.load_dataset("squad_v2")`
reads a local copy in the hub's layout, sliced by datasets itself.
"""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq
import yaml

import tiny
from conftest import REPO_ROOT, run_cli

PRESET = REPO_ROOT / "presets" / "first-run.yaml"


def write_hub_copy(squad_json: Path, out: Path) -> list[dict]:
    """A SQuAD JSON file as the hub's squad_v2 rows (id, title, context, question, answers), one per line."""
    rows = [{"id": qa["id"], "title": article["title"], "context": paragraph["context"], "question": qa["question"],
             "answers": {"text": [a["text"] for a in qa["answers"]],
                         "answer_start": [a["answer_start"] for a in qa["answers"]]}}
            for article in json.loads(squad_json.read_text())["data"]
            for paragraph in article["paragraphs"] for qa in paragraph["qas"]]
    out.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return rows


def test_first_run_preset_runs_every_stage_on_the_slices_it_names(tmp_path, monkeypatch):
    import datasets

    preset = yaml.safe_load(PRESET.read_text())
    assert (preset["data"]["train"], preset["data"]["dev"]) == ("squad_v2:train[:1%]", "squad_v2:validation[:5%]")
    run = tmp_path / "run"
    tiny.make_model(run / preset["teacher"]["model"], layers=12, positions=512)
    assert preset["student"]["model"] == preset["teacher"]["model"]  # the student is cut from the teacher
    files = {split: tmp_path / "squad_v2" / f"{split}.jsonl" for split in ("train", "validation")}
    files["train"].parent.mkdir()
    train = write_hub_copy(tiny.make_squad(tmp_path / "train.json", articles=10, paragraphs=5, seed=0), files["train"])
    dev = write_hub_copy(tiny.make_squad(tmp_path / "dev.json", articles=3, paragraphs=5, seed=1), files["validation"])
    assert (len(train), len(dev)) == (200, 60)

    calls, load_dataset = [], datasets.load_dataset

    def local_squad_v2(name, split):
        calls.append((name, split))
        return load_dataset("json", data_files={k: str(v) for k, v in files.items()}, split=split,
                            cache_dir=str(tmp_path / "datasets-cache"))

    monkeypatch.setattr(datasets, "load_dataset", local_squad_v2)
    for stage in ("prepare", "teacher", "student", "evaluate"):
        run_cli(["-q", "--params", str(PRESET), stage], run)

    assert calls == [("squad_v2", "train[:1%]"), ("squad_v2", "validation[:5%]")]
    report = json.loads((run / "data/features/report.json").read_text())
    assert report["train"]["questions"] + report["train"]["questions_dropped"] == 2  # 1% of 200
    dev_ids = pq.read_table(run / "data/features/dev_examples.parquet").column("id").to_pylist()
    assert dev_ids == [row["id"] for row in dev[:3]]  # 5% of 60: the first three
    assert json.loads((run / "models/student/config.json").read_text())["num_hidden_layers"] == 3
    assert json.loads((run / "metrics/eval.json").read_text())["total"] == 3
