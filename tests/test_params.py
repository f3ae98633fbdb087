"""One source of defaults: the dataclasses in pipeline/params.py and the shipped params.yaml agree."""

from __future__ import annotations

import dataclasses

import yaml

from conftest import REPO_ROOT
from pipeline.params import Params, load_params


def test_params_yaml_holds_exactly_the_dataclass_defaults():
    shipped = yaml.safe_load((REPO_ROOT / "params.yaml").read_text(encoding="utf-8"))
    defaults = dataclasses.asdict(Params())
    assert set(shipped) == set(defaults), "sections differ"
    for section, values in defaults.items():
        assert set(shipped[section]) - set(values) == set(), f"params.yaml keys without a dataclass field: {section}"
        assert set(values) - set(shipped[section]) == set(), f"dataclass fields missing from params.yaml: {section}"
        for key, default in values.items():
            found = shipped[section][key]
            assert found == default and type(found) is type(default), f"{section}.{key}: {found!r} vs {default!r}"
    assert load_params(REPO_ROOT / "params.yaml") == Params()  # what a stage reads
