"""`QuestionAnswerer`: answers questions with any extractive QA model directory or hub name.

transformers 5 removed the extractive `question-answering` pipeline; this is kdqa's replacement, built on
the same windowing (`features.py`) and post-processing (`postprocess.py`) that the evaluation uses, so an
answer here is exactly what `kdqa evaluate` would score. Given an ONNX export folder (`kdqa export`) it
runs that with ONNX Runtime instead, through the same windowing, batching and post-processing.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence, Sized
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from pipeline.runtime.errors import KdqaError
from pipeline.text.features import context_token_counts, tokenize_examples
from pipeline.model.inference import cpu_has_native_bf16, model_logits
from pipeline.model.answering import null_threshold_of
from pipeline.model.loading import TRAINED, load_qa_model, load_tokenizer
from pipeline.serving.onnx_model import exported_precisions, is_export, load_onnx_qa_model
from pipeline.text.postprocess import WindowLogits, predict_example
from pipeline.params import check_setting, check_window
from pipeline.text.squad import Example, check_text


@dataclass
class Answer:
    text: str  # "" when the model says the context holds no answer
    score: float  # best span score (start + end logit)
    no_answer_probability: float
    span_text: str  # the best span even when the model abstains

    @property
    def has_answer(self) -> bool:
        return self.text != ""


NO_ANSWER = Answer("", float("-inf"), 1.0, "")  # what answer_many gives a pair with nothing to read


def check_pair(where: str, question, context) -> None:
    """A question and a context must both be strings of valid text (`pipeline.text.squad.check_text`)."""
    prefix = f"{where}: " if where else ""
    for field, value in (("question", question), ("context", context)):
        if not isinstance(value, str):
            raise KdqaError(f"{prefix}the {field} must be a string, got {type(value).__name__}")
        check_text(where or "cannot answer", f"the {field}", value)


def checked_pairs(pairs) -> list[tuple[str, str]]:
    """`answer_many`'s input as a list of (question, context) string pairs, or a KdqaError naming what is wrong."""
    if isinstance(pairs, (str, bytes)) or not isinstance(pairs, Iterable):
        raise KdqaError(f"answer_many takes an iterable of (question, context) pairs, got {type(pairs).__name__}")
    checked = []
    for i, pair in enumerate(pairs):
        if isinstance(pair, (str, bytes)) or not isinstance(pair, Sequence) or len(pair) != 2:
            raise KdqaError(f"answer_many: pairs[{i}] must be a (question, context) pair, got "
                            f"{type(pair).__name__}{f' of length {len(pair)}' if isinstance(pair, Sized) else ''}")
        check_pair(f"answer_many: pairs[{i}]", *pair)
        checked.append((pair[0], pair[1]))
    return checked


# Each argument of QuestionAnswerer is checked by the rules of the params.yaml key that sets the same thing in
# the pipeline (`pipeline.params.check_setting`), so the API and params.yaml accept and refuse the same values.
ARGUMENT_RULES = {"max_seq_len": "prepare.max_seq_len", "doc_stride": "prepare.doc_stride",
                  "max_query_len": "prepare.max_query_len", "n_best": "evaluate.n_best",
                  "max_answer_len": "evaluate.max_answer_len", "null_threshold": "evaluate.null_threshold",
                  "batch_size": "evaluate.batch_size"}
PRECISIONS = ("float32", "bfloat16", "int8")


def fastest_precision(model: str, device: torch.device) -> str:
    """What `QuestionAnswerer` runs when no precision is asked for: the fastest of what the folder holds on this
    machine, as bench.serving measured it (docs/serving.md, per CPU family). An ONNX export: int8 where `kdqa
    export` wrote it (its dev F1 was checked against the PyTorch student before the folder was published), else
    float32. A PyTorch model: bfloat16 on CUDA and on CPUs that multiply bfloat16 in hardware (AVX512-BF16,
    AMX), float32 elsewhere, where bfloat16 is emulated and slower."""
    if is_export(model):
        return "int8" if "int8" in exported_precisions(model) else "float32"
    if device.type == "cuda" or (device.type == "cpu" and cpu_has_native_bf16()):
        return "bfloat16"
    return "float32"


class QuestionAnswerer:
    def __init__(self, model: str, device: str | None = None, max_seq_len: int = 384, doc_stride: int | None = None,
                 max_query_len: int | None = None, n_best: int = 20, max_answer_len: int = 30,
                 null_threshold: float | None = None, batch_size: int = 32, trust_remote_code: bool = False,
                 precision: str | None = None, threads: int | None = None):
        """Windows: `max_seq_len` tokens (at most the model's positions), overlapping by `doc_stride` tokens, the
        question cut to `max_query_len`; left at None, these two follow the window (at most 128 and 64, and
        always leaving context room beyond the overlap). precision: None (default) runs the fastest this folder
        and machine allow (`fastest_precision`, kept in `.precision`); float32 or int8 for an ONNX export,
        float32 or bfloat16 for a PyTorch model. threads: ONNX Runtime threads for an export (default one per
        physical core). null_threshold: None (default) answers with the threshold stored with the model
        (`kdqa_answering.json`: chosen on the validation split by `kdqa student`, copied by `kdqa export`), else
        0.0; kept in `.null_threshold`. A bad argument is a KdqaError (a ValueError) naming it."""
        where = "QuestionAnswerer"
        given = {"max_seq_len": max_seq_len, "doc_stride": doc_stride, "max_query_len": max_query_len,
                 "n_best": n_best, "max_answer_len": max_answer_len, "null_threshold": null_threshold,
                 "batch_size": batch_size}
        for name, value in given.items():
            if value is not None or name not in ("doc_stride", "max_query_len", "null_threshold"):
                check_setting(where, name, value, ARGUMENT_RULES[name])
        if not isinstance(model, (str, Path)):
            raise KdqaError(f"{where}: model must be a model folder or hub name (str), got {type(model).__name__}")
        if precision is not None and precision not in PRECISIONS:
            raise KdqaError(f"{where}: precision must be one of {', '.join(PRECISIONS)} (or None: the fastest "
                            f"this machine runs), got {precision!r}")
        if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 1):
            raise KdqaError(f"{where}: threads must be a whole number at least 1 (or None), got {threads!r}")
        model = str(model)
        if is_export(model):
            if precision == "bfloat16":
                raise KdqaError(f"{model}: an ONNX export runs in float32 or int8; bfloat16 is for PyTorch models")
            self.device = torch.device("cpu")
            self.precision = precision or fastest_precision(model, self.device)
            self.model = load_onnx_qa_model(model, self.precision, threads).to(device or "cpu")
        elif precision == "int8" or threads is not None:
            raise KdqaError(f"{model}: int8 and threads apply to ONNX exports (`kdqa export`), not to PyTorch models")
        else:
            self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
            self.precision = precision or fastest_precision(model, self.device)
            self.model = load_qa_model(model, trust_remote_code, TRAINED).to(self.device).eval()
        # bfloat16 runs under autocast: the weights stay float32, as saved, and every matrix product that
        # bfloat16 speeds up runs in it; layer norms and softmax stay float32.
        self.autocast = torch.bfloat16 if self.precision == "bfloat16" else None
        self.tokenizer = load_tokenizer(model, trust_remote_code)
        # Never ask for more positions than the model has (small models often have fewer than 384); windows set
        # for the longer sequence shrink with it, to at most half of it each.
        positions = getattr(self.model.config, "max_position_embeddings", max_seq_len)
        specials = self.tokenizer.num_special_tokens_to_add(pair=True)
        if max_seq_len > positions:
            max_seq_len = positions
            if max_query_len is not None:
                max_query_len = max(1, min(max_query_len, max_seq_len // 2))
            if doc_stride is not None:
                doc_stride = max(1, min(doc_stride, max_seq_len // 2,
                                        max_seq_len - (max_query_len or max_seq_len // 2) - specials - 1))
        if max_query_len is None:  # up to 64, and at most half the window, leaving 2 tokens of context room
            max_query_len = max(1, min(64, max_seq_len // 2, max_seq_len - specials - 2))
        if doc_stride is None:  # the largest overlap up to 128 that still leaves context room beyond it
            doc_stride = max(1, min(128, max_seq_len // 2, max_seq_len - max_query_len - specials - 1))
        check_window(where, max_seq_len, doc_stride, max_query_len, specials,
                     ("max_seq_len", "doc_stride", "max_query_len"))
        self.max_seq_len, self.doc_stride, self.max_query_len = max_seq_len, doc_stride, max_query_len
        self.n_best, self.max_answer_len = n_best, max_answer_len
        # None: the no-answer threshold stored with the model (chosen on its validation split), else 0.0
        self.null_threshold, self.null_threshold_source = null_threshold_of(model, null_threshold, "null_threshold")
        self.batch_size = batch_size

    def __call__(self, question: str, context: str) -> Answer:
        """Answer one question; a blank question or an empty context is a KdqaError."""
        check_pair("", question, context)
        problem = self.unreadable([(question, context)])[0]
        if problem:
            raise KdqaError(f"cannot answer: {problem}")
        return self._answer_readable([(question, context)])[0]  # checked once: not again through answer_many

    def unreadable(self, pairs: list[tuple[str, str]]) -> list[str | None]:
        """For each (checked) pair, why it cannot be read at all (blank question; context without tokens), else None."""
        contexts = [c for _, c in pairs]
        # A letter or digit always gives a token (or [UNK]); only contexts without one are tokenised to count
        # (punctuation alone gives tokens, whitespace, control and zero-width characters give none). Tokenising
        # every context here would read each one twice: a noticeable share of a batch-1 answer.
        unsure = [i for i, c in enumerate(contexts) if not any(ch.isalnum() for ch in c)]
        counted = dict(zip(unsure, context_token_counts(self.tokenizer, [contexts[i] for i in unsure]))) if unsure else {}
        problems = []
        for i, (question, _) in enumerate(pairs):
            if not question.strip():
                problems.append("the question is empty")
            elif counted.get(i, 1) == 0:
                problems.append("the context is empty (no text to find an answer in)")
            else:
                problems.append(None)
        return problems

    def answer_many(self, pairs: Iterable[tuple[str, str]]) -> list[Answer]:
        """Answer (question, context) pairs, from any iterable, in batches; long contexts are read in overlapping
        windows.

        A pair with a blank question or an empty context does not fail the batch: it gets the no-answer
        result NO_ANSWER (text "", score -inf, no_answer_probability 1.0, span_text ""). A pair that is not two
        strings, or text with a lone surrogate, is a KdqaError naming the pair.
        """
        pairs = checked_pairs(pairs)
        readable = [i for i, problem in enumerate(self.unreadable(pairs)) if problem is None]
        answers = [NO_ANSWER] * len(pairs)
        for i, answer in zip(readable, self._answer_readable([pairs[i] for i in readable])):
            answers[i] = answer
        return answers

    def _answer_readable(self, pairs: list[tuple[str, str]]) -> list[Answer]:
        if not pairs:
            return []
        examples = [Example(str(i), "", c, q, [], [], True) for i, (q, c) in enumerate(pairs)]
        features = list(tokenize_examples(self.tokenizer, examples, self.max_seq_len, self.doc_stride,
                                          self.max_query_len))
        start, end = model_logits(
            self.model,
            [f["input_ids"].astype(np.int64) for f in features],
            [f["token_type_ids"].astype(np.int64) for f in features],
            np.array([f["context_start"] for f in features]),
            np.array([f["context_end"] for f in features]),
            self.tokenizer.pad_token_id, self.device, self.batch_size, 1 << 30, self.autocast,
            # float32: an answer's score as the model computed it (float16 is the shards' storage format; its
            # rounding would put two backends' equal scores a whole float16 step apart)
            logits_dtype=torch.float32,
        )
        windows: dict[str, list[WindowLogits]] = {ex.id: [] for ex in examples}
        for feature, start_logits, end_logits in zip(features, start, end):
            windows[feature["example_id"]].append(WindowLogits(start_logits, end_logits, feature["context_start"],
                                                               feature["context_end"], feature["offset_start"],
                                                               feature["offset_end"]))
        answers = []
        for ex in examples:
            prediction = predict_example(windows[ex.id], ex.context, self.n_best, self.max_answer_len,
                                         self.null_threshold)
            answers.append(Answer(prediction.text, prediction.span_score, prediction.na_prob, prediction.span_text))
        return answers
