"""Training curves as TSV files in the layout `dvc plots` reads (one file per curve family, a `step` column).

`logs/student/train.tsv`: step, epoch, loss, kd_loss, ce_loss, lr. `logs/student/eval.tsv`: step, f1,
exact, f1_forced (every `student.eval_every` steps, and once after the last step when there is a dev set).
After a resume, rows past the checkpoint's step are dropped so the curves never show the same step twice.
"""

from __future__ import annotations

import csv
from pathlib import Path


COLUMNS = {
    "train.tsv": ["step", "epoch", "loss", "kd_loss", "ce_loss", "lr"],
    "eval.tsv": ["step", "f1", "exact", "f1_forced"],
}


class TrainingLog:
    def __init__(self, folder: Path, resume_step: int | None, enabled: bool = True):
        self.folder = folder
        self.enabled = enabled
        if not enabled:
            return
        folder.mkdir(parents=True, exist_ok=True)
        # Both files always exist (header at least): dvc.yaml declares them as outputs of the student stage.
        for name, fields in COLUMNS.items():
            path = folder / name
            kept = []
            if resume_step is not None and path.exists():
                kept = [r for r in csv.DictReader(path.open(), delimiter="\t") if int(r["step"]) <= resume_step]
            self._rewrite(path, fields, kept)

    @staticmethod
    def _rewrite(path: Path, fields, rows) -> None:
        with path.open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(fields), delimiter="\t")
            writer.writeheader()
            writer.writerows(rows)

    def _append(self, name: str, row: dict) -> None:
        if not self.enabled:
            return
        with (self.folder / name).open("a", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=COLUMNS[name], delimiter="\t")
            writer.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()})

    def log_step(self, step: int, epoch: int, **values) -> None:
        self._append("train.tsv", {"step": step, "epoch": epoch, **values})

    def log_eval(self, step: int, **values) -> None:
        self._append("eval.tsv", {"step": step, **values})
