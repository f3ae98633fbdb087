"""Training curves as TSV files in the layout `dvc plots` reads (one file per curve family, a `step` column).

`logs/student/train.tsv`: step, epoch, loss, kd_loss, ce_loss, lr. `logs/student/eval.tsv`: step, f1,
exact, f1_forced (when `student.eval_every` is set). After a resume, rows past the checkpoint's step are
dropped so the curves never show the same step twice.
"""

from __future__ import annotations

import csv
from pathlib import Path


class TrainingLog:
    def __init__(self, folder: Path, resume_step: int | None, enabled: bool = True):
        self.folder = folder
        self.enabled = enabled
        if not enabled:
            return
        folder.mkdir(parents=True, exist_ok=True)
        for name in ("train.tsv", "eval.tsv"):
            path = folder / name
            if resume_step is None:
                path.unlink(missing_ok=True)
            elif path.exists():
                rows = list(csv.DictReader(path.open(), delimiter="\t"))
                kept = [r for r in rows if int(r["step"]) <= resume_step]
                self._rewrite(path, rows[0].keys() if rows else [], kept)

    @staticmethod
    def _rewrite(path: Path, fields, rows) -> None:
        with path.open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(fields), delimiter="\t")
            writer.writeheader()
            writer.writerows(rows)

    def _append(self, name: str, row: dict) -> None:
        if not self.enabled:
            return
        path = self.folder / name
        new = not path.exists() or path.stat().st_size == 0
        with path.open("a", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(row), delimiter="\t")
            if new:
                writer.writeheader()
            writer.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()})

    def log_step(self, step: int, epoch: int, **values) -> None:
        self._append("train.tsv", {"step": step, "epoch": epoch, **values})

    def log_eval(self, step: int, **values) -> None:
        self._append("eval.tsv", {"step": step, **{k: v for k, v in values.items() if v is not None}})
