"""Which features and teacher targets a student trains and is evaluated on: the teacher's, or its own.

A student whose tokenizer has the vocabulary data/features was tokenized with, and whose windows
(`student.max_seq_len`, `student.doc_stride`; null: the teacher's) are the teacher's, reads data/features and
data/teacher as they are (`direct`). Any other student reads the features and aligned targets that
`kdqa align` made for exactly its tokenizer and windows from exactly these teacher logits (`aligned`);
anything else is an error that says to run `kdqa align`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from pipeline.runtime.errors import KdqaError
from pipeline.model.loading import vocab_fingerprint
from pipeline.params import Params
from pipeline.runtime.workspace import DEV_SPLIT, EXTRA_SPLITS, VALIDATION_SPLIT, Workspace
from pipeline.store.shards import output_format, read_json


def student_plan(params: Params, tokenizer, features_manifest: dict) -> dict:
    """What the student's data must be: `mode` direct (the teacher's features) or aligned, and what decides it."""
    recorded = features_manifest.get("prepare") or {}  # the windows the features were made with
    if not {"max_seq_len", "doc_stride"} <= set(recorded):
        raise KdqaError("data/features/train/manifest.json: records no windows (prepare.max_seq_len, doc_stride): "
                        "not written by this kdqa; run `kdqa prepare` again")
    teacher_len, teacher_stride = recorded["max_seq_len"], recorded["doc_stride"]
    s = params.student
    plan = {
        "student_vocab": vocab_fingerprint(tokenizer),
        "teacher_vocab": features_manifest.get("vocab_fingerprint"),
        "max_seq_len": s.max_seq_len or teacher_len,
        "doc_stride": s.doc_stride or teacher_stride,
    }
    same = (plan["student_vocab"] == plan["teacher_vocab"] and plan["max_seq_len"] == teacher_len
            and plan["doc_stride"] == teacher_stride)
    return {"mode": "direct" if same else "aligned", **plan}


@dataclass(frozen=True)
class StudentData:
    mode: str  # "direct" or "aligned"
    train_features: Path
    teacher_targets: Path  # logits shards (direct) or aligned targets, same names and rows as train_features
    dev_features: Path
    regenerate: str  # the command that rebuilds them

    @property
    def validation_features(self) -> Path:
        """The validation split's features beside dev's (data.validation: the no-answer threshold is chosen there)."""
        return self.dev_features.parent / VALIDATION_SPLIT

    def split(self, name: str) -> tuple[Path, Path]:
        """(features, teacher targets) of a training split: train, or an extra split (unlabeled, augmented)."""
        return self.train_features.parent / name, self.teacher_targets.parent / name


def direct(ws: Workspace) -> StudentData:
    """The teacher's own features and logits."""
    return StudentData("direct", ws.features / "train", ws.teacher / "train", ws.features / "dev", "kdqa teacher")


def aligned(ws: Workspace) -> StudentData:
    """The student's own features and the teacher's targets on them (`kdqa align`)."""
    return StudentData("aligned", ws.aligned_features / "train", ws.aligned_targets / "train",
                       ws.aligned_features / "dev", "kdqa align")


def teacher_labelled_splits(ws: Workspace) -> dict[str, dict]:
    """The extra splits prepare made and the teacher labelled, with the fingerprints of both (as their manifests
    record them): what `kdqa align` carries onto a student's tokens besides train."""
    found = {}
    for split in EXTRA_SPLITS:
        features, logits = ws.features / split / "manifest.json", ws.teacher / split / "manifest.json"
        if features.exists():
            found[split] = {"features": read_json(features).get("fingerprint"),
                            "teacher_logits": read_json(logits).get("fingerprint") if logits.exists() else None}
    return found


def student_data(params: Params, ws: Workspace, tokenizer) -> StudentData:
    """The data `params.student` trains on; an error naming `kdqa align` when that is missing or stale."""
    manifest_path = ws.features / "train" / "manifest.json"
    if not manifest_path.exists():
        raise KdqaError(f"{manifest_path}: not found (run `kdqa prepare`)")
    features_manifest = read_json(manifest_path)
    plan = student_plan(params, tokenizer, features_manifest)
    if plan["mode"] == "direct":
        return direct(ws)
    s = params.student
    why = (f"{s.model}: its tokenizer or windows (max_seq_len {plan['max_seq_len']}, doc_stride "
           f"{plan['doc_stride']}) differ from the teacher's")
    manifest_path = ws.aligned / "manifest.json"
    if not manifest_path.exists():
        raise KdqaError(f"{why}: run `kdqa align` to carry the teacher's logits onto them ({manifest_path} not found)")
    made_for = read_json(manifest_path).get("fingerprint_parts", {})
    teacher_manifest = ws.teacher / "train" / "manifest.json"
    logits = read_json(teacher_manifest).get("fingerprint") if teacher_manifest.exists() else None
    expected = {**{k: plan[k] for k in ("mode", "student_vocab", "max_seq_len", "doc_stride")},
                "features": features_manifest.get("fingerprint"), "teacher_logits": logits,
                "extra_splits": teacher_labelled_splits(ws), "aligned_format": output_format("aligned")}
    stale = sorted(k for k, v in expected.items() if made_for.get(k) != v)
    if stale:
        raise KdqaError(f"{ws.aligned}: made for another {', '.join(stale)} than this student's; {why}: run "
                        "`kdqa align` again")
    return aligned(ws)


def evaluation_features(ws: Workspace, model_tokenizer, split: str = DEV_SPLIT) -> Path:
    """The features of a scored split (dev, validation) a model with this tokenizer reads: the student's own
    (data/aligned) when they were made for its vocabulary, else the teacher's (the caller checks that their
    vocabulary is the model's)."""
    manifest_path = ws.aligned / "manifest.json"
    if manifest_path.exists():
        made_for = read_json(manifest_path).get("fingerprint_parts", {})
        if made_for.get("mode") == "aligned" and made_for.get("student_vocab") == vocab_fingerprint(model_tokenizer):
            return aligned(ws).dev_features.parent / split
    return direct(ws).dev_features.parent / split
