"""The model card (`README.md` in the model folder): what was distilled from what, how, and how well."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

from pipeline import __version__
from pipeline.runtime.workspace import AUGMENTED_SPLIT, UNLABELED_SPLIT, Workspace

USAGE = """```python
from pipeline import QuestionAnswerer

qa = QuestionAnswerer("{path}")
qa("Who wrote it?", "It was written by Ada Lovelace in 1843.")
```"""


def _score_rows(metrics: dict) -> str:
    rows = [("Exact match", "exact"), ("F1", "f1"), ("HasAns EM", "HasAns_exact"), ("HasAns F1", "HasAns_f1"),
            ("NoAns EM", "NoAns_exact"), ("NoAns F1", "NoAns_f1"), ("best F1 (tuned null threshold)", "best_f1"),
            ("span F1 on answerable, forced answer", "HasAns_f1_forced")]
    lines = ["| metric | value |", "| --- | --- |"]
    lines += [f"| {label} | {metrics[key]:.2f} |" for label, key in rows if key in metrics]
    lines.append(f"| questions | {metrics.get('total', '?')} |")
    return "\n".join(lines)


def write_model_card(folder: Path, params, ws: Workspace, steps: int, dev_metrics: dict | None,
                     answering: dict | None = None) -> None:
    from pipeline.model.answering import ANSWERING_FILE, UNTUNED_NULL_THRESHOLD
    from pipeline.params import EvaluateParams

    student = params.student
    # the card's scores use the defaults at the untuned threshold (pipeline.stages.student.CARD_EVALUATION)
    card_evaluation = EvaluateParams(null_threshold=UNTUNED_NULL_THRESHOLD)
    if answering:
        threshold = (f"It answers with the no-answer threshold {answering['null_threshold']:.4g} (null score - best "
                     f"span score; the official na_prob threshold {answering['na_prob_threshold']:.4g}), chosen on "
                     f"the {answering['questions']} questions of `{params.data.validation}` (F1 there "
                     f"{answering['best_f1']:.2f}) and kept in `{ANSWERING_FILE}`: `kdqa evaluate` and "
                     "`QuestionAnswerer` use it unless given another.")
    else:
        threshold = (f"No no-answer threshold was chosen (no `data.validation`): it answers at "
                     f"{UNTUNED_NULL_THRESHOLD}.")
    hyper = {k: v for k, v in asdict(student).items() if k not in ("trust_remote_code",)}
    teachers = ", ".join(f"`{t}`" for t in params.teacher.teachers)
    method = ("supervised fine-tuning on hard labels (distillation_weight 0)" if student.distillation_weight == 0 else
              f"offline knowledge distillation from {teachers} (precomputed logits), "
              f"loss = {student.distillation_weight}·T²·KL + {1 - student.distillation_weight:g}·CE, "
              f"T = {student.temperature}")
    scores = _score_rows(dev_metrics) if dev_metrics else "No dev evaluation was run."
    extra = [split for split in student.extra_splits if (ws.features / split).is_dir()]
    if extra and student.extra_ratio and student.distillation_weight:  # what pipeline.stages.student.extra_splits mixes in
        sources = {UNLABELED_SPLIT: f"unlabeled {', '.join(f'`{u}`' for u in params.data.unlabeled)}",
                   AUGMENTED_SPLIT: f"{params.prepare.augment_views} augmented views per question"}
        extra_line = (f"; plus rows only the teacher labelled ({'; '.join(sources[s] for s in extra)}), "
                      f"{student.extra_ratio:g} per labelled row each epoch")
    else:
        extra_line = ""
    text = f"""---
library_name: transformers
pipeline_tag: question-answering
tags: [extractive-qa, squad_v2, knowledge-distillation, kdqa]
---

# Extractive QA student trained with kdqa {__version__}

- **Base model:** `{student.model}`{f" (layers {list(student.init_layers)})" if student.init_layers else ""}
- **Method:** {method}
- **Teacher{"s" if len(params.teacher.teachers) > 1 else ""}:** {teachers}
- **Training data:** `{params.data.train}`{extra_line}; evaluated on `{params.data.dev}`
- **Features:** max_seq_len {params.prepare.max_seq_len}, doc_stride {params.prepare.doc_stride}, max_query_len {params.prepare.max_query_len}
- **Optimizer steps:** {steps}
- **Made with:** kdqa {__version__}

## Dev scores (official SQuAD 2.0 semantics)

Scored on `{params.data.dev}` at the end of training with kdqa's **default post-processing**
(n_best {card_evaluation.n_best}, max_answer_len {card_evaluation.max_answer_len}, null_threshold \
{card_evaluation.null_threshold}), not this run's
`evaluate.*` settings; `kdqa evaluate` (`metrics/eval.json`) gives the figures with those settings.

{scores}

{threshold}

## Hyperparameters

```
{chr(10).join(f"{k}: {v}" for k, v in hyper.items())}
```

## Use

Loads with `AutoModelForQuestionAnswering` / `AutoTokenizer`. Answers with kdqa:

{USAGE.format(path="models/student")}
"""
    (folder / "README.md").write_text(text, encoding="utf-8")
