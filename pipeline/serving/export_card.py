"""The model card of an ONNX export (`README.md` in models/student-onnx): the export section, then the
student's own card (what was distilled from what, how, and how well)."""

from __future__ import annotations

from pathlib import Path

USAGE = """```python
from pipeline import QuestionAnswerer

qa = QuestionAnswerer("{path}")                      # float32: the PyTorch student's answers
qa_int8 = QuestionAnswerer("{path}", precision="int8")  # smaller and faster, checked on dev (above)
qa("Who wrote it?", "It was written by Ada Lovelace in 1843.")
```

or `kdqa predict --model {path} [--precision int8] --question ... --context ...`. Any ONNX runtime can run
the files directly: inputs `input_ids`, `token_type_ids`, `attention_mask` (int64, [batch, sequence]),
outputs `start_logits`, `end_logits` (float32, [batch, sequence]); tokenize with the tokenizer in this
folder and post-process the spans as kdqa does (`pipeline/text/postprocess.py`). With ONNX Runtime, load them with
`disabled_optimizers=["SkipLayerNormFusion"]`, as kdqa does: that fused kernel is slower on x86 CPUs."""


def _rows(manifest: dict, metrics: dict) -> str:
    lines = ["| model | file | MiB | EM | F1 | forced span F1 | same answers as PyTorch |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    m = metrics["pytorch"]
    lines.append(f"| PyTorch student (float32) | `*.safetensors` | {metrics['mib']['pytorch']:.1f} | {m['exact']:.2f} "
                 f"| {m['f1']:.2f} | {m.get('HasAns_f1_forced', float('nan')):.2f} | – |")
    for precision, entry in manifest["files"].items():
        m = metrics[f"onnx_{precision}"]
        same = f"{metrics[f'{precision}_same_answers']} of {metrics['questions']}"
        lines.append(f"| ONNX {precision} | `{entry['name']}` | {entry['bytes'] / 2**20:.1f} | {m['exact']:.2f} "
                     f"| {m['f1']:.2f} | {m.get('HasAns_f1_forced', float('nan')):.2f} | {same} |")
    return "\n".join(lines)


def _student_card_body(model_dir: Path) -> str:
    """The student's card without its YAML front matter (this card has its own)."""
    card = model_dir / "README.md"
    if not card.is_file():
        return ""
    text = card.read_text(encoding="utf-8")
    if text.startswith("---\n"):
        end = text.find("\n---\n", 4)
        text = text[end + 5:] if end != -1 else text
    return text.lstrip()


def write_export_card(folder: Path, model_dir: Path, manifest: dict, metrics: dict) -> None:
    gate = f"float32 reproduces every PyTorch logit to within {metrics['float32_max_logit_difference']:.2g}"
    if "int8_f1_drop" in metrics:
        gate += (f"; int8 F1 drop {metrics['int8_f1_drop']:.2f} (allowed: {metrics['max_f1_drop']:g}), "
                 f"forced span F1 drop {metrics['int8_forced_f1_drop']:.2f}")
    text = f"""---
library_name: onnx
pipeline_tag: question-answering
tags: [extractive-qa, squad_v2, knowledge-distillation, kdqa, onnx]
---

# ONNX export of `{manifest['source']['model']}` (kdqa {manifest['kdqa_version']})

- **Exporter:** {manifest['exporter']}, opset {manifest['opset']}
- **int8:** {manifest['quantizer']}
- **Exported from:** `{manifest['source']['model']}` (fingerprint `{manifest['source']['fingerprint']}`); this
  folder's fingerprint `{manifest['fingerprint']}`. Loading refuses the folder if that student has changed since.
- **Checked on dev** ({metrics['questions']} questions, `kdqa evaluate`'s windowing and post-processing): {gate}

{_rows(manifest, metrics)}

## Use

{USAGE.format(path="models/student-onnx")}

{_student_card_body(model_dir)}"""
    (folder / "README.md").write_text(text.rstrip() + "\n", encoding="utf-8")
