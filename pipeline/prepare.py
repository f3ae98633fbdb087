"""Stage 1, prepare: SQuAD examples -> tokenized feature shards.

Writes, for each split, `data/features/{split}/part-NNNNN.parquet` (`prepare.shard_size` features each)
plus `manifest.json` (counts, tokenizer, fingerprint), `data/features/dev_examples.parquet` (what
post-processing and scoring need: context and gold answers) and `data/features/report.json` (what was
repaired or skipped in the data).
"""

from __future__ import annotations

import logging
from pathlib import Path

import pyarrow as pa

from pipeline import __version__
from pipeline.errors import KdqaError
from pipeline.features import check_contexts_have_tokens, tokenize_examples
from pipeline.models import check_position_table, load_tokenizer, vocab_fingerprint
from pipeline.params import Params
from pipeline.paths import DATA_REPORT, DEV_EXAMPLES, FEATURES_DIR, RAW_DATA_DIR, staged_folder
from pipeline.progress import progress
from pipeline.shards import (
    features_fingerprint,
    features_table,
    output_format,
    sha256_file,
    shard_name,
    write_json_atomic,
    write_table_atomic,
)
from pipeline.squad_data import Example, load_examples
from pipeline.write_errors import writes_into

log = logging.getLogger(__name__)

TOKENIZE_CHUNK = 1000  # examples tokenized per call (bounded memory, fast batch tokenization)


@writes_into("out_dir")
def write_feature_shards(examples: list[Example], tokenizer, params: Params, out_dir: Path, manifest: dict) -> dict:
    """Tokenize examples into shards of `shard_size` features, streaming: one shard in memory at a time.

    The split is built in a staging folder, manifest last, and swapped in whole, so a crash at any point
    leaves the previous output untouched and never a folder that looks complete but is not.
    """
    with staged_folder(out_dir) as staging:
        return tokenize_into(staging, examples, tokenizer, params, out_dir.name, manifest)


def tokenize_into(folder: Path, examples: list[Example], tokenizer, params: Params, split: str, manifest: dict) -> dict:
    """The shards and manifest of one split, written into `folder` (the staging folder)."""
    settings = params.prepare
    shards, buffer, n_features = [], [], 0

    def flush():
        path = folder / shard_name(len(shards))
        write_table_atomic(features_table(buffer), path, row_group_size=settings.row_group_size)
        shards.append({"name": path.name, "rows": len(buffer), "sha256": sha256_file(path)})
        buffer.clear()

    with progress(total=len(examples), desc=f"tokenize {split}", unit="ex") as bar:
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
    manifest = {**manifest, "features_format": output_format("features"), "examples": len(examples),
                "features": n_features, "fingerprint": features_fingerprint(folder), "shards": shards}
    write_json_atomic(folder / "manifest.json", manifest)
    return manifest


def write_dev_examples(examples: list[Example], path: Path) -> None:
    table = pa.table(
        {
            "id": [ex.id for ex in examples],
            "title": [ex.title for ex in examples],
            "question": [ex.question for ex in examples],
            "context": [ex.context for ex in examples],
            "answers": pa.array([ex.gold_texts for ex in examples], type=pa.list_(pa.string())),
            "is_impossible": [ex.is_impossible for ex in examples],
        }
    )
    write_table_atomic(table, path, row_group_size=10000)


def check_window(params: Params, tokenizer) -> None:
    """Windows must leave room for context beyond the overlap, even next to the longest allowed question."""
    settings = params.prepare
    specials = tokenizer.num_special_tokens_to_add(pair=True)
    room = settings.max_seq_len - settings.max_query_len - specials
    if room <= settings.doc_stride:
        raise KdqaError(
            f"params: prepare.doc_stride ({settings.doc_stride}) must be less than the context room of a window, "
            f"max_seq_len - max_query_len - {specials} special tokens = {room}; lower doc_stride or "
            "max_query_len, or raise max_seq_len"
        )


def warn_if_dvc_cannot_see(source: str) -> None:
    """A local file outside data/raw/ is read fine, but under DVC editing it would not rerun prepare."""
    path = Path(source)
    if not (path.is_file() and Path("dvc.yaml").is_file()):
        return  # a hub dataset name, or not a DVC project
    try:
        path.resolve().relative_to(RAW_DATA_DIR.resolve())
    except ValueError:
        log.warning("%s is outside %s/: DVC will not rerun prepare when it changes (move it there, or run "
                    "`dvc repro -f prepare` after editing it)", source, RAW_DATA_DIR)


def run_prepare(params: Params) -> None:
    for source in (params.data.train, params.data.dev):
        warn_if_dvc_cannot_see(source)
    tokenizer = load_tokenizer(params.teacher.model, params.teacher.trust_remote_code)
    check_window(params, tokenizer)
    check_position_table(params.teacher.model, params.prepare.max_seq_len, params.teacher.trust_remote_code)
    # Read and validate both splits before writing anything: bad input in dev must not leave train rewritten.
    loaded = {split: load_examples(source, split, strict=params.prepare.strict)
              for split, source in (("train", params.data.train), ("dev", params.data.dev))}
    for split, source in (("train", params.data.train), ("dev", params.data.dev)):
        check_contexts_have_tokens(tokenizer, loaded[split][0], source)
    reports = {}
    for split, source in (("train", params.data.train), ("dev", params.data.dev)):
        examples, report = loaded[split]
        fixed = report.answers_repaired + report.answers_skipped + report.questions_dropped + report.contradictory_labels
        log.log(logging.WARNING if fixed else logging.INFO, "%s%s", report.summary(),
                f" (details in {DATA_REPORT})" if fixed else "")
        reports[split] = report.to_dict()
        out_dir = FEATURES_DIR / split
        base = {
            "kdqa_version": __version__,
            "split": split,
            "source": source,
            "tokenizer": params.teacher.model,
            "vocab_fingerprint": vocab_fingerprint(tokenizer),
            # What shaped the features; not `strict`, which can only stop a run, never change its output.
            "prepare": {k: v for k, v in vars(params.prepare).items() if k != "strict"},
        }
        summary = write_feature_shards(examples, tokenizer, params, out_dir, base)
        if split == "dev":
            write_dev_examples(examples, DEV_EXAMPLES)
        log.info("%s: %d examples -> %d features in %d shards", split, summary["examples"],
                 summary["features"], len(summary["shards"]))
    write_json_atomic(DATA_REPORT, reports)
