"""An exported model folder (`kdqa export`) and running it with ONNX Runtime.

The folder holds `model.onnx` (float32), optionally `model-int8.onnx` (dynamic int8 quantisation), the
student's `config.json` and tokenizer, a model card and `kdqa_export.json`, the manifest: the sha256 of
every ONNX file and the fingerprint of the student it was exported from. The folder is published whole
(staging, then rename), so a folder without a manifest, or whose files differ from it, is half-written or
tampered with and is refused before ONNX Runtime sees it. A folder exported from another student than
the one beside it (`models/student` for `models/student-onnx`) is stale and refused too, as the student
stage refuses teacher logits computed for other features.

`OnnxQAModel` wraps an ONNX Runtime session in the small part of the transformers model interface that
`pipeline.model.inference.model_logits` and `pipeline.stages.evaluate.evaluate_model` use (call with
input_ids/token_type_ids/attention_mask, `.start_logits`/`.end_logits`, `.config`, `.eval()`), so exported
models go through exactly the same batching, windowing and post-processing as PyTorch ones.
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch

from pipeline.runtime.errors import KdqaError
from pipeline.store.shards import fingerprint_of, read_json, sha256_file

MANIFEST = "kdqa_export.json"
ONNX_FILES = {"float32": "model.onnx", "int8": "model-int8.onnx"}
INPUT_NAMES = ("input_ids", "token_type_ids", "attention_mask")
OUTPUT_NAMES = ("start_logits", "end_logits")
# ONNX Runtime fuses each residual Add + LayerNormalization into its SkipLayerNormalization kernel when it loads a
# model; on x86 CPUs that kernel is slower than the two plain ops it replaces (bench.serving's
# "SkipLayerNormalization fused" row measures the difference), so the fusion is left out.
DISABLED_OPTIMIZERS = ("SkipLayerNormFusion",)
# ONNX Runtime's worker threads spin while they wait for work, which saves waking them for each of the graph's
# operators (faster at batch 1: bench.serving); at ONNX Runtime's default they go on spinning long after a run,
# taking the cores that tokenising, span selection and the caller's own work (another model in the process) need
# between runs. So they spin for at most 100 microseconds before sleeping: enough to bridge the gap between two
# operators of a run, short against the work between two answers.
THREAD_POOL_SETTINGS = {"session.intra_op.allow_spinning": "1", "session.intra_op.spin_duration_us": "100"}


def is_export(name: str | Path) -> bool:
    """A folder `kdqa export` wrote (or began to write): it has a manifest or an ONNX file."""
    path = Path(name).expanduser()
    return path.is_dir() and ((path / MANIFEST).exists() or any(path.glob("*.onnx")))


def exported_precisions(folder: str | Path) -> set[str]:
    """The precisions an export folder's manifest lists (empty when it has none that reads: loading it then
    says what is wrong, naming the file)."""
    try:
        manifest = read_json(Path(folder).expanduser() / MANIFEST)
    except (KdqaError, OSError):  # missing or damaged: verify_export says so, naming the file, at loading
        return set()
    files = manifest.get("files") if isinstance(manifest, dict) else None
    return set(files) if isinstance(files, dict) else set()


def student_fingerprint(folder: Path) -> str:
    """Identity of a saved PyTorch model: the bytes of its config and safetensors weights."""
    files = sorted([*folder.glob("*.safetensors"), folder / "config.json"])
    return fingerprint_of({p.name: sha256_file(p) for p in files if p.is_file()})


def verify_export(folder: Path, precision: str = "float32", student: Path | None = None) -> dict:
    """Check an export folder before loading it; returns its manifest.

    The ONNX file for `precision` must be listed in the manifest and have its sha256. The student it was
    exported from must still be the one at `student` (default: the folder the manifest names, relative to
    the export, when it exists: models/student beside models/student-onnx).
    """
    manifest_path = folder / MANIFEST
    if not folder.is_dir():
        raise KdqaError(f"{folder}: export directory does not exist")
    if not manifest_path.exists():
        raise KdqaError(f"{folder}: incomplete ONNX export (no {MANIFEST}: half-written or not made by "
                        "`kdqa export`); run `kdqa export` again")
    manifest = read_json(manifest_path)
    files = manifest.get("files") if isinstance(manifest, dict) else None
    if not isinstance(files, dict) or "float32" not in files:
        raise KdqaError(f"{manifest_path}: not a kdqa export manifest; run `kdqa export` again")
    if precision not in files:
        raise KdqaError(f"{folder}: has no {precision} model (exported with export.int8: false?); "
                        f"it has {', '.join(sorted(files))}")
    entry = files[precision]
    path = folder / str(entry.get("name"))
    if not path.is_file():
        raise KdqaError(f"{path}: missing from the ONNX export (half-written?); run `kdqa export` again")
    if sha256_file(path) != entry.get("sha256"):
        raise KdqaError(f"{path}: differs from {manifest_path} (truncated, or copied from another export); "
                        "run `kdqa export` again")
    source = manifest.get("source", {})
    if student is None and source.get("relative_path"):
        candidate = folder / source["relative_path"]
        student = candidate if (candidate / "config.json").is_file() else None
    if student is not None:
        found = student_fingerprint(Path(student))
        if found != source.get("fingerprint"):
            raise KdqaError(f"{folder}: stale export: made from a student with fingerprint "
                            f"{source.get('fingerprint')}, but {student} now holds {found}; run `kdqa export` "
                            "(or `dvc repro export`)")
    return manifest


class OnnxQAModel:
    """An exported QA model run by ONNX Runtime on the CPU, callable like a transformers QA model."""

    training = False

    def __init__(self, path: Path, config, threads: int | None = None,
                 disabled_optimizers: tuple[str, ...] = DISABLED_OPTIMIZERS,
                 thread_pool_settings: dict[str, str] = THREAD_POOL_SETTINGS):
        import onnxruntime as ort

        options = ort.SessionOptions()
        if threads:  # None: ONNX Runtime's default, one thread per physical core
            options.intra_op_num_threads = threads
            options.inter_op_num_threads = 1
        for key, value in thread_pool_settings.items():
            options.add_session_config_entry(key, value)
        try:
            self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"],
                                                disabled_optimizers=list(disabled_optimizers))
        except Exception as exc:  # onnxruntime raises its own types (InvalidProtobuf, NoSuchFile, Fail...)
            raise KdqaError(f"{path}: ONNX Runtime cannot load it ({type(exc).__name__}: "
                            f"{(str(exc).strip().splitlines() or [''])[0]}); run `kdqa export` again") from None
        self.inputs = [i.name for i in self.session.get_inputs()]
        missing = sorted(set(self.inputs) - set(INPUT_NAMES))
        if missing:
            raise KdqaError(f"{path}: asks for inputs kdqa does not give ({', '.join(missing)})")
        self.config = config
        self.path = path

    def __call__(self, input_ids, token_type_ids, attention_mask):
        given = {"input_ids": input_ids, "token_type_ids": token_type_ids, "attention_mask": attention_mask}
        feeds = {name: given[name].cpu().numpy().astype(np.int64, copy=False) for name in self.inputs}
        start, end = self.session.run(list(OUTPUT_NAMES), feeds)
        return SimpleNamespace(start_logits=torch.from_numpy(start), end_logits=torch.from_numpy(end))

    def eval(self):
        return self

    def train(self, mode: bool = True):
        return self

    def to(self, device):
        if torch.device(device).type != "cpu":
            raise KdqaError(f"{self.path}: ONNX exports run on the CPU (ONNX Runtime), not on {device}")
        return self


def load_onnx_qa_model(folder: str | Path, precision: str = "float32", threads: int | None = None,
                       student: Path | None = None) -> OnnxQAModel:
    """The verified ONNX model of an export folder, at `precision` (float32 or int8)."""
    from transformers import AutoConfig

    folder = Path(folder).expanduser()
    manifest = verify_export(folder, precision, student)
    try:
        config = AutoConfig.from_pretrained(folder, trust_remote_code=False)  # an export kdqa wrote: no code
    except Exception as exc:
        raise KdqaError(f"{folder / 'config.json'}: unreadable ({type(exc).__name__}); "
                        "run `kdqa export` again") from None
    path = folder / manifest["files"][precision]["name"]
    check_finite_initializers(path)
    return OnnxQAModel(path, config, threads)


def check_finite_initializers(path: Path) -> None:
    """Refuse an ONNX model with a NaN or infinite weight (what a diverged run exports), as PyTorch models are
    refused on loading (`pipeline.model.loading.check_finite_weights`)."""
    import onnx
    from onnx import numpy_helper

    try:
        graph = onnx.load(str(path)).graph
    except Exception:
        return  # unreadable: ONNX Runtime says so, naming the file
    for initializer in graph.initializer:
        values = numpy_helper.to_array(initializer)
        if values.dtype.kind == "f" and not np.isfinite(values).all():
            raise KdqaError(f"{path}: weights are not finite ({initializer.name} has "
                            f"{int((~np.isfinite(values)).sum())} NaN or infinite values): exported from a diverged "
                            "model; retrain the student and run `kdqa export` again")
