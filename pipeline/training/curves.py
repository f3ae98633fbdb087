"""Training curves as TSV files in the layout `dvc plots` reads (one file per curve family, a `step` column).

`logs/student/train.tsv`: step, epoch, loss, kd_loss, ce_loss, lr. `logs/student/eval.tsv`: step, f1,
exact, f1_forced (every `student.eval_every` steps, and once after the last step when there is a dev set).
After a resume, rows past the checkpoint's step are dropped so the curves never show the same step twice.

A fresh run leaves the previous run's curves in place until it logs its first row, and `previous_curves_kept`
puts them back if the run then fails: a failed or interrupted run never leaves empty curves beside the
previous run's model.
"""

from __future__ import annotations

import contextlib
import csv
import logging
import os
from pathlib import Path

from pipeline.runtime.write_errors import writing

log = logging.getLogger(__name__)

COLUMNS = {
    "train.tsv": ["step", "epoch", "loss", "kd_loss", "ce_loss", "lr"],
    "eval.tsv": ["step", "f1", "exact", "f1_forced"],
}


class TrainingLog:
    def __init__(self, folder: Path, resume_step: int | None, enabled: bool = True):
        self.folder = folder
        self.enabled = enabled
        self.started = False  # the files hold this run's curves (headers written)
        self.eval_steps: set[int] = set()
        if not enabled or resume_step is None:
            return
        # Resuming: the curves so far are this run's, up to the checkpoint's step.
        kept = {}
        for name in COLUMNS:
            path = folder / name
            rows = list(csv.DictReader(path.open(), delimiter="\t")) if path.exists() else []
            kept[name] = [r for r in rows if int(r["step"]) <= resume_step]
        self.eval_steps = {int(r["step"]) for r in kept["eval.tsv"]}
        self._start(kept)

    def _start(self, kept: dict[str, list[dict]]) -> None:
        # Both files always exist once the run logs (header at least): dvc.yaml declares them as outputs.
        for name, fields in COLUMNS.items():
            self._rewrite(self.folder / name, fields, kept.get(name, []))
        self.started = True

    @staticmethod
    def _rewrite(path: Path, fields, rows) -> None:
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        with writing(path):
            path.parent.mkdir(parents=True, exist_ok=True)
            with tmp.open("w", newline="") as f:
                writer = csv.DictWriter(f, fieldnames=list(fields), delimiter="\t")
                writer.writeheader()
                writer.writerows(rows)
            os.replace(tmp, path)

    def _append(self, name: str, row: dict) -> None:
        if not self.enabled:
            return
        if not self.started:
            self._start({})  # the first row of a fresh run: now the previous run's curves are replaced
        path = self.folder / name
        with writing(path), path.open("a", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=COLUMNS[name], delimiter="\t")
            writer.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()})

    def log_step(self, step: int, epoch: int, **values) -> None:
        self._append("train.tsv", {"step": step, "epoch": epoch, **values})

    def log_eval(self, step: int, **values) -> None:
        if step in self.eval_steps:  # resumed from the final checkpoint after this point was logged
            return
        self.eval_steps.add(step)
        self._append("eval.tsv", {"step": step, **values})


@contextlib.contextmanager
def previous_curves_kept(folder: Path):
    """If the block fails (error, Ctrl-C), put back the curves `folder` held before it: the model beside them
    is still the previous run's. (A resumable checkpoint keeps its own copy of the failed run's curves.)"""
    before = {name: (folder / name).read_bytes() for name in COLUMNS if (folder / name).is_file()}
    try:
        yield
    except BaseException:
        for name in COLUMNS:
            path = folder / name
            try:
                if name in before:
                    path.write_bytes(before[name])
                else:
                    path.unlink(missing_ok=True)
            except OSError as exc:
                log.warning("%s: could not restore the previous run's curve (%s)", path, exc.strerror)
        raise
