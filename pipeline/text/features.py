"""Turn (question, context) examples into model features: sliding windows over long contexts.

One example becomes one or more features `[CLS] question [SEP] context-window [SEP]`. Only the context is
truncated; consecutive windows overlap by `doc_stride` tokens so every answer lies whole in some window.
Each feature keeps the span of its context tokens (`context_start`..`context_end`, inclusive) and, for
those tokens, their character offsets in the context, which post-processing needs to turn token spans back
into answer text. Positions that can hold an answer are the CLS token (meaning "no answer") and the
context tokens; everything else is masked in the losses and in post-processing.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import numpy as np

from pipeline.params import Params
from pipeline.params import check_window as check_window_sizes
from pipeline.runtime.errors import KdqaError
from pipeline.runtime.progress import progress
from pipeline.runtime.workspace import staged_folder
from pipeline.runtime.write_errors import writes_into
from pipeline.store.features import write_features_shard
from pipeline.store.shards import (
    features_fingerprint,
    output_format,
    sha256_file,
    shard_name,
    write_json_atomic,
)
from pipeline.text.squad import Example

CLS_INDEX = 0  # BERT-style tokenizers put [CLS] first; it is the "no answer" position
# start/end position of a feature without a hard label (unlabeled data, teacher-only views): the student
# learns it from the teacher's logits alone. Not a token position, so it can never be mistaken for one.
NO_LABEL = -1


def feature_id(example_id: str, window: int) -> str:
    """Stable id of a feature: its example's id and the index of its window."""
    return f"{example_id}#{window}"


def truncate_questions(tokenizer, questions: Sequence[str], max_query_len: int) -> list[str]:
    """Cut each question to `max_query_len` tokens at a character boundary, keeping its text intact.
    One tokenizer call for all of them: per-question calls cost a batch-1 answer a noticeable share."""
    enc = tokenizer(list(questions), add_special_tokens=False, return_offsets_mapping=True)
    return [q if len(ids) <= max_query_len else q[: offsets[max_query_len - 1][1]]
            for q, ids, offsets in zip(questions, enc["input_ids"], enc["offset_mapping"])]


def context_token_counts(tokenizer, contexts: Sequence[str]) -> list[int]:
    """How many tokens each context has (0 for text made only of whitespace, control or zero-width characters)."""
    return [len(ids) for ids in tokenizer(list(contexts), add_special_tokens=False)["input_ids"]]


def check_contexts_have_tokens(tokenizer, examples: Sequence[Example], source: str) -> None:
    """Every context must give at least one token: a window without context tokens cannot hold an answer."""
    first_of = {}
    for ex in examples:
        first_of.setdefault(ex.context, ex)  # paragraphs share a context: tokenize each once
    counts = context_token_counts(tokenizer, list(first_of))
    for ex, n in zip(first_of.values(), counts):
        if n == 0:
            # Which tokenizer matters: prepare's, a student's (align) or a carried teacher's may each see no text.
            raise KdqaError(f"{source}: question id {ex.id}: its context {ex.context[:40]!r} has no tokens under "
                            f"{getattr(tokenizer, 'name_or_path', None) or 'the tokenizer'}'s tokenizer (to it, only "
                            "whitespace, control or zero-width characters); fix or remove that paragraph")


def tokenize_examples(
    tokenizer,
    examples: Sequence[Example],
    max_seq_len: int,
    doc_stride: int,
    max_query_len: int,
) -> Iterator[dict]:
    """Yield one dict per feature, in example order then window order (the order shards keep)."""
    if not getattr(tokenizer, "is_fast", False):
        raise ValueError("a fast tokenizer is required (offset mappings)")
    if not examples:
        return
    questions = truncate_questions(tokenizer, [ex.question.lstrip() for ex in examples], max_query_len)
    enc = tokenizer(
        questions,
        [ex.context for ex in examples],
        truncation="only_second",
        max_length=max_seq_len,
        stride=doc_stride,
        return_overflowing_tokens=True,
        return_offsets_mapping=True,
        return_token_type_ids=True,
        padding=False,
    )
    window_of_example: dict[int, int] = {}
    for i, example_index in enumerate(enc["overflow_to_sample_mapping"]):
        ex = examples[example_index]
        window = window_of_example.get(example_index, 0)
        window_of_example[example_index] = window + 1

        sequence_ids = enc.sequence_ids(i)
        context_positions = [k for k, s in enumerate(sequence_ids) if s == 1]
        context_start, context_end = context_positions[0], context_positions[-1]
        offsets = enc["offset_mapping"][i]
        # Character offsets only for context tokens; -1 elsewhere so nothing else can become an answer.
        offset_start = np.full(len(sequence_ids), -1, dtype=np.int32)
        offset_end = np.full(len(sequence_ids), -1, dtype=np.int32)
        for k in context_positions:
            offset_start[k], offset_end[k] = offsets[k]

        start_position, end_position = answer_token_span(
            ex, offset_start, offset_end, context_start, context_end
        )
        yield {
            "feature_id": feature_id(ex.id, window),
            "example_id": ex.id,
            "window": window,
            "input_ids": np.asarray(enc["input_ids"][i], dtype=np.int32),
            "token_type_ids": np.asarray(enc["token_type_ids"][i], dtype=np.int8),
            "context_start": context_start,
            "context_end": context_end,
            "start_position": start_position,
            "end_position": end_position,
            "offset_start": offset_start,
            "offset_end": offset_end,
        }


def answer_token_span(ex: Example, offset_start, offset_end, context_start: int, context_end: int) -> tuple[int, int]:
    """Token labels of the (first) gold answer in this window, or (CLS, CLS), or (NO_LABEL, NO_LABEL).

    Unanswerable questions point at CLS. So do answerable ones whose answer is not wholly inside this
    window: the window cannot contain it, so "no answer here" is the right target for it. Examples without
    labels get NO_LABEL in every window.
    """
    if not ex.labelled:
        return NO_LABEL, NO_LABEL
    if ex.is_impossible or not ex.answer_texts:
        return CLS_INDEX, CLS_INDEX
    start_char = ex.answer_starts[0]
    end_char = start_char + len(ex.answer_texts[0])
    if not (offset_start[context_start] <= start_char and offset_end[context_end] >= end_char):
        return CLS_INDEX, CLS_INDEX
    start = context_start
    while start <= context_end and offset_end[start] <= start_char:
        start += 1
    end = context_end
    while end >= context_start and offset_start[end] >= end_char:
        end -= 1
    if start > end:  # the answer falls inside whitespace between tokens; cannot be labelled
        return CLS_INDEX, CLS_INDEX
    return start, end


# ---------------------------------------------------------------------------------------------------------
# A split of examples into feature shards: what prepare writes for the teacher and align for a student
# ---------------------------------------------------------------------------------------------------------

TOKENIZE_CHUNK = 1000  # examples tokenized per call (bounded memory, fast batch tokenization)


@writes_into("out_dir")
def write_feature_shards(runs: Iterable[list[Example]], tokenizer, params: Params, out_dir: Path, manifest: dict,
                         total: int | None = None) -> dict:
    """Tokenize runs of examples (lists; most splits are one run) into shards of `shard_size` features,
    streaming: one shard in memory at a time. `total`: how many examples, for the progress bar.

    Each run starts a shard of its own, so the shards of one run never change when another run is added or
    removed (an unlabeled file, a number of augmented views): the teacher's logits cache reuses them.
    The split is built in a staging folder, manifest last, and swapped in whole, so a crash at any point
    leaves the previous output untouched and never a folder that looks complete but is not.
    """
    with staged_folder(out_dir) as staging:
        return tokenize_into(staging, runs, tokenizer, params, out_dir.name, manifest, total)


def tokenize_into(folder: Path, runs: Iterable[list[Example]], tokenizer, params: Params, split: str, manifest: dict,
                  total: int | None = None) -> dict:
    """The shards and manifest of one split, written into `folder` (the staging folder)."""
    settings = params.prepare
    shards, buffer, n_features, n_examples, run_shards = [], [], 0, 0, []

    def flush():
        path = folder / shard_name(len(shards))
        write_features_shard(buffer, path, settings.row_group_size)
        shards.append({"name": path.name, "rows": len(buffer), "sha256": sha256_file(path)})
        buffer.clear()

    with progress(total=total, desc=f"tokenize {split}", unit="ex") as bar:
        for examples in runs:
            first = len(shards)
            for i in range(0, len(examples), TOKENIZE_CHUNK):
                chunk = examples[i : i + TOKENIZE_CHUNK]
                for feature in tokenize_examples(tokenizer, chunk, settings.max_seq_len, settings.doc_stride,
                                                 settings.max_query_len):
                    buffer.append(feature)
                    n_features += 1
                    if len(buffer) == settings.shard_size:
                        flush()
                bar.update(len(chunk))
            if buffer:
                flush()
            n_examples += len(examples)
            run_shards.append({"examples": len(examples), "shards": [e["name"] for e in shards[first:]]})
    manifest = {**manifest, "features_format": output_format("features"), "examples": n_examples,
                "features": n_features, "fingerprint": features_fingerprint(folder), "shards": shards}
    if len(run_shards) > 1:
        manifest["runs"] = run_shards
    write_json_atomic(folder / "manifest.json", manifest)
    return manifest


def features_by_example(tokenizer, examples: list[Example], settings) -> Iterator[tuple[Example, list[dict]]]:
    """(example, its features) in order, tokenized `TOKENIZE_CHUNK` examples at a time at `settings`' windows
    (max_seq_len, doc_stride, max_query_len: prepare's, or a student's own)."""
    for i in range(0, len(examples), TOKENIZE_CHUNK):
        chunk = examples[i : i + TOKENIZE_CHUNK]
        by_example: dict[str, list[dict]] = {ex.id: [] for ex in chunk}
        for feature in tokenize_examples(tokenizer, chunk, settings.max_seq_len, settings.doc_stride,
                                         settings.max_query_len):
            by_example[feature["example_id"]].append(feature)
        for ex in chunk:
            yield ex, by_example[ex.id]


def check_window(params: Params, tokenizer, section: str = "prepare") -> None:
    """Windows must leave room for context beyond the overlap (`pipeline.params.check_window`).
    `section`: where the user set these windows (the student's own: `student`)."""
    settings = params.prepare
    check_window_sizes("params", settings.max_seq_len, settings.doc_stride, settings.max_query_len,
                       tokenizer.num_special_tokens_to_add(pair=True),
                       (f"{section}.max_seq_len", f"{section}.doc_stride", "prepare.max_query_len"))
