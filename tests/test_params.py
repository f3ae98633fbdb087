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


def test_first_run_preset_sets_every_key_and_loads():
    """presets/first-run.yaml is a whole params file (DVC needs every key its stages list) that kdqa accepts."""
    preset_path = REPO_ROOT / "presets" / "first-run.yaml"
    preset = yaml.safe_load(preset_path.read_text(encoding="utf-8"))
    defaults = dataclasses.asdict(Params())
    assert {s: set(v) for s, v in preset.items()} == {s: set(v) for s, v in defaults.items()}
    assert load_params(preset_path).student.init_layers == preset["student"]["init_layers"]
