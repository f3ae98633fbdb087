"""The peer's side of `bench.peer`: Haystack v1's own knowledge distillation, in the peer's virtualenv.

    python -m bench.peer_haystack distil CONFIG.json RESULT.json   # the timed job
    python -m bench.peer_haystack convert FARM_DIR OUT_DIR          # its student as a transformers model

`distil` is the whole job as Haystack's documentation runs it: `FARMReader(teacher)`, `FARMReader(student)`,
then `student.distil_prediction_layer_from(teacher, ...)`, which tokenizes the training file, runs the teacher
over every feature once (its DistillationDataSilo), trains, and saves the student. RESULT.json splits the time
into those parts (the split comes from timing Haystack's own DistillationDataSilo and DistillationTrainer
calls; nothing else is changed). `convert` is run afterwards, untimed: Haystack's `convert_to_transformers`,
checked against the FARM model's own logits, so that `kdqa evaluate` scores both students the same way.

Standard library and haystack only: this file never imports kdqa. bench.peer starts it by its file with the
peer's interpreter (`OUT/venv/bin/python bench/peer_haystack.py distil ...`), whose import path lacks this
checkout.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path


def timed(cls, method: str, record: dict, key: str, after=None) -> None:
    """Wrap cls.method so that each call's wall time lands in record[key] (and `after(self)` runs after it)."""
    original = getattr(cls, method)

    def wrapper(self, *args, **kwargs):
        started = time.perf_counter()
        value = original(self, *args, **kwargs)
        record[key] = record.get(key, 0.0) + time.perf_counter() - started
        if after is not None:
            after(self)
        return value

    setattr(cls, method, wrapper)


def distil(config_path: Path, result_path: Path) -> None:
    started = time.perf_counter()
    cfg = json.loads(config_path.read_text())
    from haystack.modeling.data_handler.data_silo import DistillationDataSilo
    from haystack.modeling.training.base import DistillationTrainer
    from haystack.nodes import FARMReader

    record: dict = {}

    def silo_sizes(silo) -> None:
        record["features"] = len(silo.data["train"])
        record["batches_per_epoch"] = len(silo.loaders["train"])

    # Tokenization of the training file + the teacher's forward pass over every feature happen in here.
    timed(DistillationDataSilo, "__init__", record, "data_and_teacher_s", after=silo_sizes)
    timed(DistillationTrainer, "train", record, "train_s")

    reader_args = {"use_gpu": cfg["use_gpu"], "max_seq_len": cfg["max_seq_len"], "doc_stride": cfg["doc_stride"],
                   "max_query_length": cfg["max_query_len"], "progress_bar": False}
    t = time.perf_counter()
    teacher = FARMReader(model_name_or_path=cfg["teacher"], **reader_args)
    student = FARMReader(model_name_or_path=cfg["student"], **reader_args)
    record["load_models_s"] = time.perf_counter() - t
    t = time.perf_counter()
    student.distil_prediction_layer_from(
        teacher, data_dir=cfg["data_dir"], train_filename=cfg["train_filename"], use_gpu=cfg["use_gpu"],
        batch_size=cfg["batch_size"], teacher_batch_size=cfg["teacher_batch_size"], n_epochs=cfg["epochs"],
        learning_rate=cfg["learning_rate"], warmup_proportion=cfg["warmup"], save_dir=cfg["save_dir"],
        checkpoint_root_dir=Path(cfg["save_dir"]).parent / "checkpoints",
        distillation_loss_weight=cfg["distillation_weight"], temperature=cfg["temperature"],
    )
    record["distil_call_s"] = time.perf_counter() - t
    record["steps"] = record.get("batches_per_epoch", 0) * cfg["epochs"]
    record["in_process_s"] = time.perf_counter() - started  # after interpreter start (the parent times that too)
    result_path.write_text(json.dumps(record, indent=2))


def convert(farm_dir: Path, out_dir: Path) -> None:
    """The trained FARM model as a transformers BertForQuestionAnswering, logits checked against Haystack's.

    Haystack's QA head divides its logits by `temperature_for_confidence`, a parameter its optimizer trains
    along with the rest (it leaves 1.0 during distillation); `convert_to_transformers` drops it, so it is folded
    into the converted head's weights here: the transformers model gives Haystack's own logits."""
    import torch
    from haystack.nodes import FARMReader

    model = FARMReader(model_name_or_path=str(farm_dir), use_gpu=False, progress_bar=False).inferencer.model.eval()
    vocab = model.language_model.model.config.vocab_size
    ids = torch.randint(min(100, vocab // 2), vocab, (2, 24))  # past the special tokens
    segments = torch.zeros_like(ids)
    segments[:, 12:] = 1
    mask = torch.ones_like(ids)
    with torch.no_grad():
        farm_logits = model(input_ids=ids, segment_ids=segments, padding_mask=mask)[0]  # [batch, tokens, 2]
        hf = model.convert_to_transformers()[0].eval()
        temperature = float(model.prediction_heads[0].temperature_for_confidence)
        hf.qa_outputs.weight.div_(temperature)
        hf.qa_outputs.bias.div_(temperature)
        out = hf(input_ids=ids, token_type_ids=segments, attention_mask=mask)
    diff = max(float((farm_logits[..., 0] - out.start_logits).abs().max()),
               float((farm_logits[..., 1] - out.end_logits).abs().max()))
    if diff > 1e-4:
        sys.exit(f"convert: the transformers model's logits differ from Haystack's by {diff:.3g}")
    hf.save_pretrained(out_dir)


def main(argv: list[str]) -> None:
    if len(argv) == 3 and argv[0] == "distil":
        distil(Path(argv[1]), Path(argv[2]))
    elif len(argv) == 3 and argv[0] == "convert":
        convert(Path(argv[1]), Path(argv[2]))
    elif argv[:1] in (["-h"], ["--help"]):
        print(__doc__)
    else:
        sys.exit(__doc__.split("\n\n")[1])


if __name__ == "__main__":
    main(sys.argv[1:])
