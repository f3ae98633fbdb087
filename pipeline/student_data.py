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

from pipeline.errors import KdqaError
from pipeline.models import vocab_fingerprint
from pipeline.params import Params
from pipeline.shards import read_json

FEATURES_DIR = Path("data/features")
TEACHER_DIR = Path("data/teacher")
ALIGNED_DIR = Path("data/aligned")  # manifest.json; features/{train,dev}/ and teacher/train/ when aligned


def student_plan(params: Params, tokenizer, features_manifest: dict) -> dict:
    """What the student's data must be: `mode` direct (the teacher's features) or aligned, and what decides it."""
    teacher_windows = features_manifest.get("prepare", {})
    s = params.student
    plan = {
        "student_vocab": vocab_fingerprint(tokenizer),
        "teacher_vocab": features_manifest.get("vocab_fingerprint"),
        "max_seq_len": s.max_seq_len or teacher_windows.get("max_seq_len", params.prepare.max_seq_len),
        "doc_stride": s.doc_stride or teacher_windows.get("doc_stride", params.prepare.doc_stride),
    }
    same = (plan["student_vocab"] == plan["teacher_vocab"]
            and plan["max_seq_len"] == teacher_windows.get("max_seq_len")
            and plan["doc_stride"] == teacher_windows.get("doc_stride"))
    return {"mode": "direct" if same else "aligned", **plan}


@dataclass(frozen=True)
class StudentData:
    mode: str  # "direct" or "aligned"
    train_features: Path
    teacher_targets: Path  # logits shards (direct) or aligned targets, same names and rows as train_features
    dev_features: Path
    regenerate: str  # the command that rebuilds them


DIRECT = StudentData("direct", FEATURES_DIR / "train", TEACHER_DIR / "train", FEATURES_DIR / "dev", "kdqa teacher")
ALIGNED = StudentData("aligned", ALIGNED_DIR / "features/train", ALIGNED_DIR / "teacher/train",
                      ALIGNED_DIR / "features/dev", "kdqa align")


def student_data(params: Params, tokenizer) -> StudentData:
    """The data `params.student` trains on; an error naming `kdqa align` when that is missing or stale."""
    features_manifest = read_json(FEATURES_DIR / "train" / "manifest.json")
    plan = student_plan(params, tokenizer, features_manifest)
    if plan["mode"] == "direct":
        return DIRECT
    s = params.student
    why = (f"{s.model}: its tokenizer or windows (max_seq_len {plan['max_seq_len']}, doc_stride "
           f"{plan['doc_stride']}) differ from the teacher's")
    manifest_path = ALIGNED_DIR / "manifest.json"
    if not manifest_path.exists():
        raise KdqaError(f"{why}: run `kdqa align` to carry the teacher's logits onto them ({manifest_path} not found)")
    made_for = read_json(manifest_path).get("fingerprint_parts", {})
    teacher_manifest = TEACHER_DIR / "train" / "manifest.json"
    logits = read_json(teacher_manifest).get("fingerprint") if teacher_manifest.exists() else None
    expected = {**{k: plan[k] for k in ("mode", "student_vocab", "max_seq_len", "doc_stride")},
                "features": features_manifest.get("fingerprint"), "teacher_logits": logits}
    stale = sorted(k for k, v in expected.items() if made_for.get(k) != v)
    if stale:
        raise KdqaError(f"{ALIGNED_DIR}: made for another {', '.join(stale)} than this student's; {why}: run "
                        "`kdqa align` again")
    return ALIGNED


def evaluation_features(model_tokenizer) -> Path:
    """The dev features a model with this tokenizer reads: the student's own (data/aligned) when they were
    made for its vocabulary, else the teacher's, which must then have been made with its vocabulary."""
    vocab = vocab_fingerprint(model_tokenizer)
    manifest_path = ALIGNED_DIR / "manifest.json"
    if manifest_path.exists():
        made_for = read_json(manifest_path).get("fingerprint_parts", {})
        if made_for.get("mode") == "aligned" and made_for.get("student_vocab") == vocab:
            return ALIGNED.dev_features
    teacher_manifest = FEATURES_DIR / "dev" / "manifest.json"
    if teacher_manifest.exists() and read_json(teacher_manifest).get("vocab_fingerprint") not in (None, vocab):
        raise KdqaError(f"{FEATURES_DIR / 'dev'}: tokenized with another tokenizer than the model's, and "
                        f"{ALIGNED_DIR} holds no features for it: set student.model to it and run `kdqa align`")
    return DIRECT.dev_features
