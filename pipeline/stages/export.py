"""Stage 5, export: the student as ONNX, float32 and dynamic int8, checked on the dev set before it is published.

Tools: `torch.onnx.export` with torch's own (torch.export-based) exporter writes the float32 graph;
`onnxruntime.quantization.quantize_dynamic` makes the int8 one (int8 weights, activations quantised at run
time: no calibration data needed). The exported models are then scored on the dev features with the same
windowing and post-processing as `kdqa evaluate` (its `evaluate.*` settings), beside the PyTorch student:

- float32 must reproduce PyTorch to within float rounding: every start/end logit within FLOAT32_TOLERANCE,
  or the stage fails (a wrong graph, never a rounding question);
- int8 may lose at most `export.max_f1_drop` F1 against the PyTorch student, or the stage fails.

Both are scored at the no-answer threshold `kdqa evaluate` uses (`evaluate.null_threshold`; `auto`: the one
stored with the student), and the stored threshold (`kdqa_answering.json`, chosen on the validation split by
the student stage) is copied into the export, so that `QuestionAnswerer` answers with it there too.

`models/student-onnx/` is written to a staging folder and swapped into place, and `metrics/export.json`
written, only when both checks pass; a failed check names its figures in the error. The manifest
(`kdqa_export.json`, see `pipeline.serving.onnx_model`) records the student it came from, so a stale export is
refused when loaded.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import os
import warnings
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

from pipeline import __version__
from pipeline.runtime.errors import KdqaError
from pipeline.model.answering import at_threshold, null_threshold_of, read_answering, write_answering
from pipeline.model.scoring import predict_split, score
from pipeline.store.fingerprints import check_model_vocabulary
from pipeline.model.inference import shard_logits
from pipeline.model.loading import TRAINED, load_qa_model, load_tokenizer, vocab_fingerprint
from pipeline.serving.onnx_model import INPUT_NAMES, MANIFEST, ONNX_FILES, OUTPUT_NAMES, OnnxQAModel, student_fingerprint
from pipeline.runtime.workspace import Workspace, staged_folder
from pipeline.runtime.progress import progress
from pipeline.training.student_data import evaluation_features
from pipeline.store.shards import fingerprint_of, list_shards, sha256_file, shard_rows, verify_shards, write_json_atomic
from pipeline.runtime.write_errors import writing

log = logging.getLogger(__name__)

# Float32 ONNX Runtime and PyTorch differ by reordered float sums (~1e-6 on a logit); a graph that computes
# something else differs by whole units.
FLOAT32_TOLERANCE = 1e-3


def check_architecture(model, name: str) -> None:
    """kdqa feeds input_ids, token_type_ids and attention_mask and reads start/end logits: refuse others now."""
    accepted = inspect.signature(model.forward).parameters
    missing = [n for n in INPUT_NAMES if n not in accepted]
    if missing:
        raise KdqaError(f"{name}: cannot export {type(model).__name__}: kdqa exports extractive QA models whose "
                        f"forward takes {', '.join(INPUT_NAMES)} (it has no {', '.join(missing)})")


@contextlib.contextmanager
def quiet_exporter():
    """The exporter and the quantiser log and warn about things that do not concern a user (torchvision ops,
    axis names, one INFO line per tensor on the root logger): only errors get through."""
    logging.disable(logging.WARNING)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        logging.disable(logging.NOTSET)


@contextlib.contextmanager
def eager_attention(model):
    """The graph is traced from the model's plain attention (matmul, additive mask, softmax), not from
    scaled_dot_product_attention: the latter exports with extra Where/IsNaN nodes guarding fully masked rows,
    which cost ONNX Runtime about a tenth of a batch-1 forward and compute nothing a padded QA batch needs."""
    previous = model.config._attn_implementation
    model.set_attn_implementation("eager")
    try:
        yield
    finally:
        model.set_attn_implementation(previous)


def export_float32(model, path: Path, opset: int, name: str) -> None:
    """The float32 graph, with batch and sequence length left dynamic (batches of any width run)."""
    limit = getattr(model.config, "max_position_embeddings", 512)
    width = min(16, limit)
    # Batch 2 and width 16: torch.export would fix an axis whose example size is 0 or 1.
    example = {k: torch.zeros(2, width, dtype=torch.long) for k in INPUT_NAMES}
    example["input_ids"] = torch.full((2, width), 100, dtype=torch.long)
    example["attention_mask"] = torch.ones(2, width, dtype=torch.long)
    batch, sequence = torch.export.Dim("batch"), torch.export.Dim("sequence", max=limit)
    try:
        with quiet_exporter(), eager_attention(model):
            torch.onnx.export(model.eval(), (), str(path), kwargs=example, input_names=list(INPUT_NAMES),
                              output_names=list(OUTPUT_NAMES), opset_version=opset, dynamo=True,
                              external_data=False, verbose=False,
                              dynamic_shapes={k: {0: batch, 1: sequence} for k in INPUT_NAMES})
    except Exception as exc:  # torch.export and the ONNX translation raise many types
        detail = (str(exc).strip().splitlines() or [""])[0]
        raise KdqaError(f"{name}: the ONNX exporter cannot export {type(model).__name__} "
                        f"({type(exc).__name__}: {detail})") from None


def quantize_int8(source: Path, path: Path) -> None:
    """Dynamic int8 quantisation: MatMul weights and embedding tables stored as int8. Per channel: one scale
    per output column, so a few large weights do not flatten the rest of their matrix; the file size and the
    kernels are those of one scale per tensor (docs/serving.md compares the two)."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    with quiet_exporter():
        quantize_dynamic(source, path, weight_type=QuantType.QInt8, per_channel=True)


def dev_logits(model, features_dir: Path, pad_token_id: int, batch_size: int, name: str) -> dict:
    """{shard name: (feature ids, start, end)} over the dev features, float32 logits, on the CPU."""
    shards, logits = list_shards(features_dir), {}
    with progress(total=sum(shard_rows(p) for p in shards), desc=f"check {name}", unit="feat") as bar:
        for shard in shards:
            logits[shard.name] = shard_logits(model, shard, pad_token_id, torch.device("cpu"), batch_size, 1 << 30,
                                              dtype=None, logits_dtype=torch.float32)
            bar.update(len(logits[shard.name][0]))
    return logits


def predictions(logits: dict, features_dir: Path, examples: Path, params, rounded: bool):
    """predict_split over stored logits; rounded=True rounds them to float16 first, exactly as `kdqa evaluate`
    does (so the PyTorch figures equal metrics/eval.json's)."""
    def lookup(shard: Path):
        ids, start, end = logits[shard.name]
        if rounded:
            start, end = [s.astype(np.float16) for s in start], [e.astype(np.float16) for e in end]
        return ids, start, end

    return predict_split(features_dir, lookup, params, examples)


def max_difference(a: dict, b: dict) -> float:
    worst = 0.0
    for name, (_, start_a, end_a) in a.items():
        _, start_b, end_b = b[name]
        for x, y in zip(start_a + end_a, start_b + end_b):
            worst = max(worst, float(np.max(np.abs(x - y))) if len(x) else 0.0)
    return worst


def same_answers(a, b) -> int:
    """Questions whose answer (text or abstention) and best span are the same in both predictions."""
    (preds_a, _, forced_a, _), (preds_b, _, forced_b, _) = a, b
    return sum(preds_a[q] == preds_b[q] and forced_a[q] == forced_b[q] for q in preds_a)


def accuracy_gate(student, onnx_models: dict, features_dir: Path, examples: Path, pad_token_id: int, params) -> dict:
    """Scores of the PyTorch student and each exported model on dev, and how closely they agree."""
    batch = params.evaluate.batch_size
    reference = dev_logits(student, features_dir, pad_token_id, batch, "PyTorch")
    reference_answers = predictions(reference, features_dir, examples, params, rounded=False)
    metrics = {"questions": len(reference_answers[0]),
               "pytorch": score(*predictions(reference, features_dir, examples, params, True))}
    for precision, model in onnx_models.items():
        logits = dev_logits(model, features_dir, pad_token_id, batch, f"ONNX {precision}")
        metrics[f"onnx_{precision}"] = score(*predictions(logits, features_dir, examples, params, True))
        metrics[f"{precision}_max_logit_difference"] = max_difference(reference, logits)
        metrics[f"{precision}_same_answers"] = same_answers(reference_answers,
                                                            predictions(logits, features_dir, examples, params, False))
        metrics[f"{precision}_f1_drop"] = round(metrics["pytorch"]["f1"] - metrics[f"onnx_{precision}"]["f1"], 4)
        # Span quality apart from when to abstain: F1 alone can rise while the spans get worse.
        metrics[f"{precision}_forced_f1_drop"] = round(metrics["pytorch"].get("HasAns_f1_forced", 0.0)
                                                       - metrics[f"onnx_{precision}"].get("HasAns_f1_forced", 0.0), 4)
    return metrics


def check_gate(metrics: dict, max_f1_drop: float, out_dir: Path) -> None:
    difference = metrics["float32_max_logit_difference"]
    if difference > FLOAT32_TOLERANCE:
        raise KdqaError(f"{out_dir}: the float32 ONNX model does not reproduce the PyTorch student (a logit differs "
                        f"by {difference:.3g} > {FLOAT32_TOLERANCE:g}); the export is broken, not published")
    if "int8_f1_drop" in metrics and metrics["int8_f1_drop"] > max_f1_drop:
        raise KdqaError(f"{out_dir}: the int8 model loses {metrics['int8_f1_drop']:.2f} F1 on dev "
                        f"(PyTorch {metrics['pytorch']['f1']:.2f}, int8 {metrics['onnx_int8']['f1']:.2f}), more than "
                        f"export.max_f1_drop {max_f1_drop:g}; not published. Set export.int8: false for float32 only, "
                        "or raise export.max_f1_drop")


def write_model_files(student, tokenizer, folder: Path, export, name: str) -> None:
    """Everything a served export needs: the ONNX file(s) for `export` (ExportParams), config and tokenizer."""
    export_float32(student, folder / ONNX_FILES["float32"], export.opset, name)
    if export.int8:
        quantize_int8(folder / ONNX_FILES["float32"], folder / ONNX_FILES["int8"])
    student.config.save_pretrained(folder)
    tokenizer.save_pretrained(folder)


def write_manifest(staging: Path, model_dir: Path, out_dir: Path, tokenizer, export, gate: dict,
                   answering: dict | None) -> dict:
    """kdqa_export.json: the student's fingerprint (and where it lies relative to `out_dir`, the folder's final
    place), each ONNX file's sha256, the gate's figures and the stored no-answer threshold."""
    local = model_dir.is_dir()
    source = {"model": str(model_dir),
              "relative_path": os.path.relpath(model_dir.resolve(), out_dir.resolve()) if local else None,
              "fingerprint": student_fingerprint(model_dir) if local else None}
    files = {p: {"name": n, "sha256": sha256_file(staging / n), "bytes": (staging / n).stat().st_size}
             for p, n in ONNX_FILES.items() if (staging / n).exists()}
    parts = {"source": source["fingerprint"], "vocab": vocab_fingerprint(tokenizer), "export": asdict(export),
             "files": {p: f["sha256"] for p, f in files.items()},
             "null_threshold": answering["null_threshold"] if answering else None}
    import onnxruntime

    manifest = {"kdqa_version": __version__, "fingerprint": fingerprint_of(parts), "fingerprint_parts": parts,
                "source": source, "files": files, "opset": export.opset,
                "exporter": f"torch.onnx (torch.export-based) in torch {torch.__version__}",
                "quantizer": "onnxruntime.quantization.quantize_dynamic (QInt8, per channel) in onnxruntime "
                             f"{onnxruntime.__version__}",
                "gate": {k: v for k, v in gate.items() if not isinstance(v, dict)}}
    write_json_atomic(staging / MANIFEST, manifest)
    return manifest


def run_export(params, ws: Workspace, model_dir: Path | None = None, out_dir: Path | None = None) -> dict:
    """Export `model_dir` (default: the workspace's student) to `out_dir` (default: models/student-onnx)."""
    from pipeline.serving.export_card import write_export_card

    model_dir = ws.student_model if model_dir is None else model_dir
    out_dir = ws.export if out_dir is None else out_dir
    if model_dir == ws.student_model and not model_dir.exists():
        raise KdqaError(f"{model_dir}: no model there yet (run `kdqa student`, or give --model a model folder)")
    tokenizer = load_tokenizer(str(model_dir))
    answering = read_answering(model_dir)  # a damaged threshold file: an error now, before any work
    threshold, threshold_source = null_threshold_of(model_dir, params.evaluate.null_threshold)
    # A student of another tokenizer or other windows is checked on its own dev features (`kdqa align`).
    features_dir = evaluation_features(ws, tokenizer)
    made_by = "kdqa prepare" if features_dir == ws.features / "dev" else "kdqa align"
    features_manifest = verify_shards(features_dir, made_by)  # a damaged shard: one error, never skewed scores
    check_model_vocabulary(tokenizer, str(model_dir), features_manifest, features_dir)
    student = load_qa_model(str(model_dir), purpose=TRAINED).eval()
    check_architecture(student, str(model_dir))

    # Swapped into place only if every check passes; a failed check or write leaves the previous export and
    # metrics/export.json as they were (the figures are in the log and the error line).
    with staged_folder(out_dir) as staging, writing(out_dir):
        write_model_files(student, tokenizer, staging, params.export, str(model_dir))
        onnx_models = {p: OnnxQAModel(staging / n, student.config) for p, n in ONNX_FILES.items()
                       if (staging / n).exists()}
        metrics = accuracy_gate(student, onnx_models, features_dir, ws.dev_examples, tokenizer.pad_token_id,
                                at_threshold(params, threshold))
        metrics.update(max_f1_drop=params.export.max_f1_drop, null_threshold=threshold,
                       null_threshold_source=threshold_source)
        metrics["mib"] = file_sizes(model_dir, staging)
        log_gate(metrics)
        check_gate(metrics, params.export.max_f1_drop, out_dir)
        if answering:
            write_answering(staging, answering)
        manifest = write_manifest(staging, model_dir, out_dir, tokenizer, params.export, metrics, answering)
        write_export_card(staging, model_dir, manifest, metrics)
        write_json_atomic(ws.export_metrics, metrics)
    log.info("exported %s to %s", model_dir, out_dir)
    return metrics


def file_sizes(model_dir: Path, staging: Path) -> dict:
    """Model file sizes in MiB: the student's safetensors weights and each ONNX file."""
    mib = {"pytorch": round(sum(p.stat().st_size for p in model_dir.glob("*.safetensors")) / 2**20, 2)}
    for precision, name in ONNX_FILES.items():
        if (staging / name).exists():
            mib[f"onnx_{precision}"] = round((staging / name).stat().st_size / 2**20, 2)
    return mib


def log_gate(metrics: dict) -> None:
    for name in ("pytorch", "onnx_float32", "onnx_int8"):
        if name in metrics:
            m = metrics[name]
            log.info("%-13s dev EM %.2f F1 %.2f forced span F1 %.2f", name, m["exact"], m["f1"],
                     m.get("HasAns_f1_forced", float("nan")))
    for precision in ("float32", "int8"):
        if f"{precision}_same_answers" in metrics:
            log.info("%s: largest logit difference from PyTorch %.2g, same answers on %d of %d questions, "
                     "F1 drop %.2f, forced span F1 drop %.2f", precision, metrics[f"{precision}_max_logit_difference"],
                     metrics[f"{precision}_same_answers"], metrics["questions"], metrics[f"{precision}_f1_drop"],
                     metrics[f"{precision}_forced_f1_drop"])
