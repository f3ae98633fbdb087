"""Stage 1, prepare: SQuAD examples -> tokenized feature shards.

Writes, for each split, `data/features/{split}/part-NNNNN.parquet` (`prepare.shard_size` features each)
plus `manifest.json` (counts, tokenizer, fingerprint), `data/features/dev_examples.parquet` (what
post-processing and scoring need: context and gold answers) and `data/features/report.json` (what was
repaired or skipped in the data). Splits: train and dev; `unlabeled` when `data.unlabeled` lists files,
`augmented` when `prepare.augment_views` > 0 (rows without hard labels: start/end position NO_LABEL).
"""

from __future__ import annotations

import logging
import shutil
from collections.abc import Iterable, Iterator
from pathlib import Path

import pyarrow as pa

from pipeline import __version__
from pipeline.errors import KdqaError
from pipeline.text.features import check_contexts_have_tokens, tokenize_examples
from pipeline.model.loading import check_position_table, load_tokenizer, vocab_fingerprint
from pipeline.params import Params
from pipeline.params import check_window as check_window_sizes
from pipeline.runtime.workspace import (
    AUGMENTED_SPLIT,
    DATA_REPORT,
    DEV_EXAMPLES,
    FEATURES_DIR,
    RAW_DATA_DIR,
    UNLABELED_SPLIT,
    staged_folder,
)
from pipeline.runtime.progress import progress
from pipeline.store.shards import (
    features_fingerprint,
    features_table,
    output_format,
    sha256_file,
    shard_name,
    write_json_atomic,
    write_table_atomic,
)
from pipeline.text.augment import AugmentReport, make_views
from pipeline.text.squad import Example, load_examples
from pipeline.text.unlabeled import check_ids_distinct, count_dev_contexts, load_unlabeled
from pipeline.runtime.write_errors import writes_into

log = logging.getLogger(__name__)

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
        write_table_atomic(features_table(buffer), path, row_group_size=settings.row_group_size)
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


def check_window(params: Params, tokenizer, section: str = "prepare") -> None:
    """Windows must leave room for context beyond the overlap (`pipeline.params.check_window`).
    `section`: where the user set these windows (the student's own: `student`)."""
    settings = params.prepare
    check_window_sizes("params", settings.max_seq_len, settings.doc_stride, settings.max_query_len,
                       tokenizer.num_special_tokens_to_add(pair=True),
                       (f"{section}.max_seq_len", f"{section}.doc_stride", "prepare.max_query_len"))


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
    data = params.data
    for source in (data.train, data.dev, *data.unlabeled):
        warn_if_dvc_cannot_see(source)
    tokenizer = load_tokenizer(params.teacher.model, params.teacher.trust_remote_code)
    check_window(params, tokenizer)
    check_position_table(params.teacher.model, params.prepare.max_seq_len, params.teacher.trust_remote_code)
    # Read and validate every source before writing anything: bad input in dev must not leave train rewritten.
    loaded = {split: load_examples(source, split, strict=params.prepare.strict)
              for split, source in (("train", data.train), ("dev", data.dev))}
    unlabeled = [load_unlabeled(source) for source in data.unlabeled]
    check_ids_distinct([(f"data.unlabeled[{i}] ({source})", examples)
                        for i, (source, (examples, _)) in enumerate(zip(data.unlabeled, unlabeled))],
                       [(f"data.{split} ({source})", loaded[split][0]) for split, source in
                        (("train", data.train), ("dev", data.dev))])
    for source, (examples, _) in [(data.train, loaded["train"]), (data.dev, loaded["dev"]), *zip(data.unlabeled, unlabeled)]:
        check_contexts_have_tokens(tokenizer, examples, source)
    reports = {}
    for split, source in (("train", data.train), ("dev", data.dev)):
        examples, report = loaded[split]
        fixed = report.answers_repaired + report.answers_skipped + report.questions_dropped + report.contradictory_labels
        log.log(logging.WARNING if fixed else logging.INFO, "%s%s", report.summary(),
                f" (details in {DATA_REPORT})" if fixed else "")
        reports[split] = report.to_dict()
        summary = write_feature_shards([examples], tokenizer, params, FEATURES_DIR / split,
                                       manifest_base(split, source, params, tokenizer), total=len(examples))
        if split == "dev":
            write_dev_examples(examples, DEV_EXAMPLES)
        log_split(split, summary)
    for examples, report in unlabeled:
        count_dev_contexts(examples, loaded["dev"][0], report)
        log.info("%s", report.summary())
    reports[UNLABELED_SPLIT] = [report.to_dict() for _, report in unlabeled]
    reports[AUGMENTED_SPLIT] = write_extra_splits(params, tokenizer, loaded["train"][0], [ex for ex, _ in unlabeled])
    write_json_atomic(DATA_REPORT, reports)


def manifest_base(split: str, source, params: Params, tokenizer) -> dict:
    """What every features manifest says about where its rows come from and how they were tokenized."""
    return {
        "kdqa_version": __version__,
        "split": split,
        "source": source,
        "tokenizer": params.teacher.model,
        "vocab_fingerprint": vocab_fingerprint(tokenizer),
        # What shaped the features: not `strict`, which can only stop a run, and not the augmentation
        # settings, which shape the augmented split only (its manifest records them).
        "prepare": {k: v for k, v in vars(params.prepare).items() if k != "strict" and not k.startswith("augment_")},
    }


def write_extra_splits(params: Params, tokenizer, train: list[Example], unlabeled: list[list[Example]]) -> dict | None:
    """The unlabeled split (one run of shards per file) and the augmented split (one run per view number);
    a split not asked for is removed, so nothing stale is labelled or trained on. Returns the augmentation
    report (None without views)."""
    data, settings = params.data, params.prepare
    if unlabeled:
        summary = write_feature_shards(unlabeled, tokenizer, params, FEATURES_DIR / UNLABELED_SPLIT,
                                       manifest_base(UNLABELED_SPLIT, list(data.unlabeled), params, tokenizer),
                                       total=sum(map(len, unlabeled)))
        log_split(UNLABELED_SPLIT, summary)
    else:
        shutil.rmtree(FEATURES_DIR / UNLABELED_SPLIT, ignore_errors=True)
    if not settings.augment_views:
        shutil.rmtree(FEATURES_DIR / AUGMENTED_SPLIT, ignore_errors=True)
        return None
    report = AugmentReport()
    runs = augmented_runs(train, params, report)
    base = manifest_base(AUGMENTED_SPLIT, data.train, params, tokenizer)
    base["augment"] = {k: v for k, v in vars(settings).items() if k.startswith("augment_")}
    summary = write_feature_shards(runs, tokenizer, params, FEATURES_DIR / AUGMENTED_SPLIT, base)
    log_split(AUGMENTED_SPLIT, summary)
    log.log(logging.WARNING if report.remap_failed else logging.INFO,
            "augmented: %d views (%s), %d keep their hard labels, %d teacher-only (%d whose answer did not survive "
            "the change exactly)", report.views, ", ".join(f"{k} {n}" for k, n in report.by_kind.items()),
            report.labelled, report.teacher_only, report.remap_failed)
    return report.to_dict()


def augmented_runs(train: list[Example], params: Params, report: AugmentReport) -> Iterator[list[Example]]:
    """The augmented split's examples, one run per view number, one run in memory at a time (each is about as
    many examples as train). Deterministic: `kdqa align` makes them again, in the same order, for its student."""
    settings = params.prepare
    for view in range(settings.augment_views):
        yield list(make_views(train, view, settings.augment_seed, settings.augment_kinds, report))


def log_split(split: str, summary: dict) -> None:
    log.info("%s: %d examples -> %d features in %d shards", split, summary["examples"], summary["features"],
             len(summary["shards"]))
