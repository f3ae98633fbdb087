"""One owner per on-disk format: schemas are versioned in pipeline/formats.yaml, and no module outside a format's
owner (pipeline/store/{features,logits,aligned,examples}.py) reads or declares its columns."""

from __future__ import annotations

import hashlib
import re

import pytest
import yaml

from conftest import REPO_ROOT

FORMATS = yaml.safe_load((REPO_ROOT / "pipeline" / "formats.yaml").read_text(encoding="utf-8"))
OWNERS = {"features": "pipeline/store/features.py", "logits": "pipeline/store/logits.py",
          "aligned": "pipeline/store/aligned.py", "examples": "pipeline/store/examples.py"}


def schema_fingerprint(schema) -> str:
    return hashlib.sha256(str(schema.remove_metadata()).encode()).hexdigest()[:16]


def schemas() -> dict:
    from pipeline.store.aligned import ALIGNED_SCHEMA
    from pipeline.store.features import FEATURES_SCHEMA
    from pipeline.store.logits import LOGITS_SCHEMA

    return {"features": FEATURES_SCHEMA, "logits": LOGITS_SCHEMA, "aligned": ALIGNED_SCHEMA}


@pytest.mark.parametrize("kind", ["features", "logits", "aligned"])
def test_a_schema_change_comes_with_a_format_bump(kind):
    """Changing a format's columns without bumping `{kind}_format` would let DVC keep hours-old shards of the old
    layout (prepare and teacher list the version, not their code): bump it and record the schema under it."""
    version = FORMATS[f"{kind}_format"]
    recorded = FORMATS["schemas"][kind]
    found = schema_fingerprint(schemas()[kind])
    assert recorded.get(version) == found, (
        f"pipeline/formats.yaml: the {kind} schema is now {found} but {kind}_format {version} records "
        f"{recorded.get(version)}: bump {kind}_format and add `{version + 1}: {found}` under schemas.{kind}")
    assert len(set(recorded.values())) == len(recorded), "two versions with one schema"


def column_names() -> set[str]:
    names = {field.name for schema in schemas().values() for field in schema}
    return names | {"id", "context", "answers", "question", "title", "is_impossible"}


# Reading a column or declaring a list of them: what drifts when a second module knows a format.
ACCESS = re.compile(r"""\.column\(\s*["'](\w+)["']|columns\s*=\s*[\[(]([^\])]*)[\])]|_COLUMNS\s*=\s*[\[(]([^\])]*)""")


def test_no_module_outside_a_formats_owner_reads_or_lists_its_columns():
    names = column_names()
    offenders = []
    for path in sorted((REPO_ROOT / "pipeline").rglob("*.py")):
        relative = str(path.relative_to(REPO_ROOT))
        if relative in OWNERS.values() or relative == "pipeline/store/shards.py":  # shards.py: format-agnostic IO
            continue
        for match in ACCESS.finditer(path.read_text(encoding="utf-8")):
            if set(re.findall(r"""["'](\w+)["']""", match.group(0))) & names:
                offenders.append(f"{relative}: {match.group(0)[:80]}")
    assert not offenders, offenders


def test_the_owners_round_trip_their_rows(tmp_path):
    """Each writer's output reads back through its readers, row for row."""
    import numpy as np

    from pipeline.store.features import read_model_inputs, read_training_rows, read_windows, write_features_shard
    from pipeline.store.logits import read_logits, write_logits_shard

    rows = [{"feature_id": f"q{i}#0", "example_id": f"q{i}", "window": 0,
             "input_ids": np.arange(2, 7 + i, dtype=np.int32), "token_type_ids": np.zeros(5 + i, dtype=np.int8),
             "context_start": 2, "context_end": 4 + i, "start_position": -1 if i else 3, "end_position": -1 if i else 3,
             "offset_start": np.arange(3 + i, dtype=np.int32), "offset_end": np.arange(1, 4 + i, dtype=np.int32)}
            for i in range(3)]
    write_features_shard(rows, tmp_path / "f.parquet", row_group_size=2)
    windows, inputs, training = (read(tmp_path / "f.parquet") for read in (read_windows, read_model_inputs,
                                                                             read_training_rows))
    assert windows.feature_ids == [r["feature_id"] for r in rows] == inputs.feature_ids.to_pylist()
    assert [list(o) for o in windows.offset_end] == [list(r["offset_end"]) for r in rows]
    assert list(training.start_positions) == [3, -1, -1]
    logits = [np.linspace(0, 1, len(r["input_ids"]), dtype=np.float32) for r in rows]
    write_logits_shard(tmp_path / "l.parquet", windows.feature_ids, logits, logits)
    ids, start, end = read_logits(tmp_path / "l.parquet")
    assert ids.to_pylist() == windows.feature_ids
    assert all(np.allclose(a, b, atol=1e-3) for a, b in zip(start, logits))
