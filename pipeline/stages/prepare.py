"""Stage 1, prepare: SQuAD examples -> tokenized feature shards.

Writes, for each split, `data/features/{split}/part-NNNNN.parquet` (`prepare.shard_size` features each)
plus `manifest.json` (counts, tokenizer, fingerprint), `data/features/dev_examples.parquet` (what
post-processing and scoring need: context and gold answers) and `data/features/report.json` (what was
repaired or skipped in the data). Splits: train and dev; `validation` (features and
`validation_examples.parquet`, like dev) when `data.validation` names the questions the no-answer threshold is
chosen on; `unlabeled` when `data.unlabeled` lists files,
`augmented` when `prepare.augment_views` > 0 (rows without hard labels: start/end position NO_LABEL).
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

from pipeline import __version__
from pipeline.text.features import check_contexts_have_tokens, check_window, write_feature_shards
from pipeline.model.loading import check_position_table, load_tokenizer, vocab_fingerprint
from pipeline.params import Params
from pipeline.runtime.workspace import (AUGMENTED_SPLIT, DEV_SPLIT, SCORED_SPLITS, UNLABELED_SPLIT, VALIDATION_SPLIT,
                                        Workspace)
from pipeline.store.examples import write_dev_examples
from pipeline.store.shards import write_json_atomic
from pipeline.text.augment import AugmentReport, augmented_runs
from pipeline.text.squad import Example, load_examples
from pipeline.text.unlabeled import check_ids_distinct, count_dev_contexts, load_unlabeled

log = logging.getLogger(__name__)

def warn_if_dvc_cannot_see(source: str, ws: Workspace) -> None:
    """A local file outside data/raw/ is read fine, but under DVC editing it would not rerun prepare."""
    path = Path(source)
    if not (path.is_file() and ws.path("dvc.yaml").is_file()):
        return  # a hub dataset name, or not a DVC project
    try:
        path.resolve().relative_to(ws.raw_data.resolve())
    except ValueError:
        log.warning("%s is outside %s/: DVC will not rerun prepare when it changes (move it there, or run "
                    "`dvc repro -f prepare` after editing it)", source, ws.raw_data)


def run_prepare(params: Params, ws: Workspace) -> None:
    data = params.data
    # The labelled splits: train, dev, and validation when data.validation names the questions the no-answer
    # threshold is chosen on (without it, a validation split left by an earlier run is removed).
    labelled = [("train", data.train), (DEV_SPLIT, data.dev)] + ([(VALIDATION_SPLIT, data.validation)]
                                                                 if data.validation else [])
    for source in (*(source for _, source in labelled), *data.unlabeled):
        warn_if_dvc_cannot_see(source, ws)
    # Several teachers share one set of features, tokenized with the first teacher's tokenizer (the teacher
    # stage carries a teacher of another vocabulary onto them: pipeline/model/carried.py).
    teacher = params.teacher.teachers[0]
    tokenizer = load_tokenizer(teacher, params.teacher.trust_remote_code)
    check_window(params, tokenizer)
    for name in params.teacher.teachers:  # every teacher reads these windows
        check_position_table(name, params.prepare.max_seq_len, params.teacher.trust_remote_code)
    # Read and validate every source before writing anything: bad input in dev must not leave train rewritten.
    loaded = {split: load_examples(source, split, strict=params.prepare.strict) for split, source in labelled}
    unlabeled = [load_unlabeled(source) for source in data.unlabeled]
    check_ids_distinct([(f"data.unlabeled[{i}] ({source})", examples)
                        for i, (source, (examples, _)) in enumerate(zip(data.unlabeled, unlabeled))],
                       [(f"data.{split} ({source})", loaded[split][0]) for split, source in labelled])
    for source, (examples, _) in [*((source, loaded[split]) for split, source in labelled), *zip(data.unlabeled, unlabeled)]:
        check_contexts_have_tokens(tokenizer, examples, source)
    if data.validation:
        warn_if_validation_is_dev(loaded[VALIDATION_SPLIT][0], loaded[DEV_SPLIT][0], data.validation)
    reports = {}
    for split, source in labelled:
        examples, report = loaded[split]
        fixed = report.answers_repaired + report.answers_skipped + report.questions_dropped + report.contradictory_labels
        log.log(logging.WARNING if fixed else logging.INFO, "%s%s", report.summary(),
                f" (details in {ws.data_report})" if fixed else "")
        reports[split] = report.to_dict()
        summary = write_feature_shards([examples], tokenizer, params, ws.features / split,
                                       manifest_base(split, source, params, tokenizer), total=len(examples))
        if split in SCORED_SPLITS:
            write_dev_examples(examples, ws.examples(split))
        log_split(split, summary)
    if not data.validation:
        shutil.rmtree(ws.features / VALIDATION_SPLIT, ignore_errors=True)
        ws.validation_examples.unlink(missing_ok=True)
    for examples, report in unlabeled:
        count_dev_contexts(examples, loaded[DEV_SPLIT][0], report)
        log.info("%s", report.summary())
    reports[UNLABELED_SPLIT] = [report.to_dict() for _, report in unlabeled]
    reports[AUGMENTED_SPLIT] = write_extra_splits(params, ws, tokenizer, loaded["train"][0], [ex for ex, _ in unlabeled])
    write_json_atomic(ws.data_report, reports)


def warn_if_validation_is_dev(validation: list[Example], dev: list[Example], source: str) -> None:
    """A threshold chosen on dev questions makes the dev scores look better than unseen questions would."""
    dev_ids = {ex.id for ex in dev}
    shared = sum(ex.id in dev_ids for ex in validation)
    if shared:
        log.warning("data.validation (%s): %d of its %d questions are dev questions; the no-answer threshold chosen "
                    "on them makes the dev scores optimistic (choose it on questions of their own)", source, shared,
                    len(validation))


def manifest_base(split: str, source, params: Params, tokenizer) -> dict:
    """What every features manifest says about where its rows come from and how they were tokenized."""
    return {
        "kdqa_version": __version__,
        "split": split,
        "source": source,
        "tokenizer": params.teacher.teachers[0],
        "vocab_fingerprint": vocab_fingerprint(tokenizer),
        # What shaped the features: not `strict`, which can only stop a run, and not the augmentation
        # settings, which shape the augmented split only (its manifest records them).
        "prepare": {k: v for k, v in vars(params.prepare).items() if k != "strict" and not k.startswith("augment_")},
    }


def write_extra_splits(params: Params, ws: Workspace, tokenizer, train: list[Example], unlabeled: list[list[Example]]) -> dict | None:
    """The unlabeled split (one run of shards per file) and the augmented split (one run per view number);
    a split not asked for is removed, so nothing stale is labelled or trained on. Returns the augmentation
    report (None without views)."""
    data, settings = params.data, params.prepare
    if unlabeled:
        summary = write_feature_shards(unlabeled, tokenizer, params, ws.features / UNLABELED_SPLIT,
                                       manifest_base(UNLABELED_SPLIT, list(data.unlabeled), params, tokenizer),
                                       total=sum(map(len, unlabeled)))
        log_split(UNLABELED_SPLIT, summary)
    else:
        shutil.rmtree(ws.features / UNLABELED_SPLIT, ignore_errors=True)
    if not settings.augment_views:
        shutil.rmtree(ws.features / AUGMENTED_SPLIT, ignore_errors=True)
        return None
    report = AugmentReport()
    runs = augmented_runs(train, params, report)
    base = manifest_base(AUGMENTED_SPLIT, data.train, params, tokenizer)
    base["augment"] = {k: v for k, v in vars(settings).items() if k.startswith("augment_")}
    summary = write_feature_shards(runs, tokenizer, params, ws.features / AUGMENTED_SPLIT, base)
    log_split(AUGMENTED_SPLIT, summary)
    log.log(logging.WARNING if report.remap_failed else logging.INFO,
            "augmented: %d views (%s), %d keep their hard labels, %d teacher-only (%d whose answer did not survive "
            "the change exactly)", report.views, ", ".join(f"{k} {n}" for k, n in report.by_kind.items()),
            report.labelled, report.teacher_only, report.remap_failed)
    return report.to_dict()


def log_split(split: str, summary: dict) -> None:
    log.info("%s: %d examples -> %d features in %d shards", split, summary["examples"], summary["features"],
             len(summary["shards"]))
