"""Where stored logits or a model meet features: they must have been made for exactly those features.

Teacher logits carry the fingerprint of the features they were computed from (`fingerprint_parts.features`
in their manifest); features carry the fingerprint of the vocabulary that tokenized them. Feature ids alone
are not enough: re-preparing with another `doc_stride` or edited data keeps many ids and changes the
tokens under them, so scores or training targets would silently be wrong.
"""

from __future__ import annotations

from pathlib import Path

from pipeline.runtime.errors import KdqaError
from pipeline.model.loading import vocab_fingerprint
from pipeline.store.logits import teacher_folders
from pipeline.store.shards import check_format, read_json, verify_shards


def check_teacher_logits(features_dir: Path, expected: str, logits_dir: Path) -> str:
    """The logits must have been computed from exactly these features (fingerprint `expected`), every shard
    whole; returns the logits' own fingerprint. Several teachers: the same of each teacher's folder, and the
    fingerprint of all of them."""
    manifest_path = logits_dir / "manifest.json"
    if not manifest_path.exists():
        raise KdqaError(f"{manifest_path}: no teacher logits (run `kdqa teacher`)")
    manifest = read_json(manifest_path)
    found = manifest.get("fingerprint_parts", {}).get("features")
    if found != expected:
        raise KdqaError(
            f"{logits_dir}: teacher logits were computed for features {found}, but {features_dir} holds "
            f"features {expected}; regenerate them with `kdqa teacher` (or `dvc repro teacher`)"
        )
    check_format(manifest.get("fingerprint_parts", {}).get("logits_format"), "logits", logits_dir, "kdqa teacher")
    folders = teacher_folders(logits_dir)
    if folders == [logits_dir]:
        verify_shards(logits_dir, "kdqa teacher")  # every logits shard whole: checksums from the manifest
    for folder in folders:
        if folder != logits_dir:  # one teacher of several: its own folder, held to the same
            check_teacher_logits(features_dir, expected, folder)
    return manifest["fingerprint"]


def check_model_vocabulary(tokenizer, name: str, features_manifest: dict, features_dir: Path) -> None:
    """A model reads features only if its tokenizer is the one they were tokenized with, token for token."""
    if vocab_fingerprint(tokenizer) != features_manifest.get("vocab_fingerprint"):
        raise KdqaError(
            f"{name}: its tokenizer differs from the one {features_dir} was prepared with "
            f"({features_manifest.get('tokenizer')}): the token ids would mean other words to it; evaluate a model "
            "that shares that tokenizer, or give it features of its own: `kdqa align` with student.model set to it"
        )
