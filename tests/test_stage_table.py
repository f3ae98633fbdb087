"""One stage table (pipeline/stage_table.py): dvc.yaml, .gitignore, docs/pipeline.md, the CLI and preflight
agree with it, the code each stage's process imports included; and the import graph has its layers."""

from __future__ import annotations

import subprocess

import pytest
import yaml

from conftest import REPO_ROOT
from imports import EXEMPT, PACKAGE, code_files, direct_imports, module_path
from pipeline.stage_table import SPLITS, STAGES

DVC = yaml.safe_load((REPO_ROOT / "dvc.yaml").read_text(encoding="utf-8"))["stages"]


def dvc_entries(entries) -> list[str]:
    """dvc.yaml's list items as plain strings ("path", or "file:key" for a key of another params file)."""
    out = []
    for entry in entries or []:
        if isinstance(entry, str):
            out.append(entry)
        elif isinstance(entry, dict):
            for name, value in entry.items():
                out += [f"{name}:{key}" for key in value] if isinstance(value, list) else [name]
    return out


def dvc_outs(stage: dict, cached: bool) -> list[str]:
    out = []
    for kind in ("outs", "metrics"):
        for entry in stage.get(kind) or []:
            path, options = (entry, {}) if isinstance(entry, str) else next(iter(entry.items()))
            if (options or {}).get("cache", True) == cached:
                out.append(path)
    return out


def test_dvc_yaml_has_exactly_the_stages_of_the_table():
    assert list(DVC) == list(STAGES)
    for name, stage in DVC.items():
        assert stage["cmd"] == f"kdqa {name}"


@pytest.mark.parametrize("name", list(STAGES))
def test_dvc_yaml_stage_agrees_with_the_table(name):
    stage, dvc = STAGES[name], DVC[name]
    deps = dvc_entries(dvc.get("deps"))
    assert [d for d in deps if not d.startswith("pipeline/")] == list(stage.deps)
    assert dvc_entries(dvc.get("params")) == list(stage.params)
    assert dvc_outs(dvc, cached=True) == list(stage.outs)
    assert dvc_outs(dvc, cached=False) == list(stage.git_outs)


@pytest.mark.parametrize("name", [n for n, s in STAGES.items() if s.lists_code])
def test_dvc_yaml_lists_every_module_the_stage_imports(name):
    """Its code deps are exactly the project modules its process imports (every import in the source, at module
    level or in a function), less the exemption: the CLI and pipeline/runtime/. An edit to any of them reruns
    the stage under `dvc repro`."""
    listed = [d for d in dvc_entries(DVC[name].get("deps")) if d.startswith("pipeline/")]
    imported = code_files(STAGES[name].module)
    assert sorted(listed) == imported, (f"{name}: missing {sorted(set(imported) - set(listed))}, "
                                        f"not imported {sorted(set(listed) - set(imported))}")
    assert "pipeline/model/attention.py" in code_files(STAGES["student"].module)  # the CPU training step's


def test_stages_without_code_deps_stand_on_format_versions():
    formats = yaml.safe_load((PACKAGE / "formats.yaml").read_text(encoding="utf-8"))
    for name, stage in STAGES.items():
        versions = [p.split(":")[1] for p in stage.params if p.startswith("pipeline/formats.yaml:")]
        assert bool(versions) != stage.lists_code, name
        assert set(versions) <= set(formats), name


def test_gitignore_ignores_every_cached_output_and_work_folder_from_the_start(tmp_path):
    """A stage run by hand, then `git add -A`, must leave DVC's outputs out of git (dvc repro would refuse them),
    and keep metrics and curves (cache: false, committed with each experiment) in."""
    repo = tmp_path / "repo"
    repo.mkdir()
    (repo / ".gitignore").write_bytes((REPO_ROOT / ".gitignore").read_bytes())
    subprocess.run(["git", "init", "-q"], cwd=repo, check=True)

    def ignored(path: str) -> bool:
        probe = repo / path / "part-00000.parquet" if not path.endswith((".json", ".tsv")) else repo / path
        return subprocess.run(["git", "check-ignore", "-q", str(probe)], cwd=repo).returncode == 0

    for stage in STAGES.values():
        for path in (*stage.outs, *stage.work):
            assert ignored(path), f"{path} ({stage.name}) is not in .gitignore"
        for path in stage.git_outs:
            assert not ignored(path), f"{path} ({stage.name}) is kept in git (cache: false) but ignored"


def stage_rows() -> str:
    """docs/pipeline.md's stage table, made from the stage table."""
    def cell(paths):
        return ", ".join(f"`{p}`" for p in paths) or "-"
    rows = ["| stage | what it does | reads | writes (DVC cache) | writes (git) | params |",
            "| --- | --- | --- | --- | --- | --- |"]
    for s in STAGES.values():
        rows.append(f"| `kdqa {s.name}` | {s.summary} | {cell(s.deps)} | {cell(s.outs)} | {cell(s.git_outs)} | "
                    f"{cell(s.params)} |")
    return "\n".join(rows)


def test_docs_stage_table_is_the_stage_table():
    docs = (REPO_ROOT / "docs" / "pipeline.md").read_text(encoding="utf-8")
    assert stage_rows() in docs, "docs/pipeline.md's stage table differs; paste:\n" + stage_rows()


def test_cli_commands_are_the_stages():
    from click.testing import CliRunner

    from pipeline.cli import cli

    shown = CliRunner().invoke(cli, ["--help"]).output
    for stage in STAGES.values():
        assert stage.name in cli.commands and cli.commands[stage.name].short_help == stage.summary
        assert callable(stage.function())
    assert "Tokenize SQuAD data" in shown


def test_preflight_covers_every_output_folder_extra_splits_included():
    from pathlib import Path

    from pipeline.runtime.preflight import SPACE_NEEDED, output_folders, staged_folders
    from pipeline.runtime.workspace import Workspace

    ws = Workspace()
    assert set(SPACE_NEEDED) == set(STAGES)
    for stage in STAGES.values():
        folders = output_folders(stage.name, ws)
        for path in stage.writes:
            assert Path(path) in folders or Path(path).parent in folders, (stage.name, path)
    for split in SPLITS:  # prepare and teacher write every split through staging, unlabeled and augmented too
        assert Path(f"data/features/{split}") in staged_folders("prepare", ws)
        assert Path(f"data/teacher/{split}") in staged_folders("teacher", ws)


def all_modules() -> list[str]:
    return sorted(".".join(p.relative_to(PACKAGE.parent).with_suffix("").parts).removesuffix(".__init__")
                  for p in PACKAGE.rglob("*.py"))


def test_no_stage_imports_another_stage():
    stages = {m for m in all_modules() if m.startswith("pipeline.stages.")}
    for module in stages:
        assert not (direct_imports(module) & (stages - {module})), module


def test_module_level_imports_have_no_cycles():
    graph = {m: direct_imports(m, top_level_only=True) for m in all_modules()}
    state: dict[str, int] = {}

    def visit(module, path):
        state[module] = 1
        for target in graph.get(module, ()):
            if state.get(target) == 1:
                raise AssertionError("import cycle: " + " -> ".join([*path, module, target]))
            if not state.get(target):
                visit(target, [*path, module])
        state[module] = 2
    for module in graph:
        if not state.get(module):
            visit(module, [])


def test_runtime_package_stays_below_the_library():
    """The exempt package cannot change a result, so it never reaches into the code that computes one (it may read
    the store's manifests, as preflight does to size a stage's output)."""
    computing = ("pipeline.stages", "pipeline.text", "pipeline.model", "pipeline.training", "pipeline.serving")
    for module in all_modules():
        if str(module_path(module).relative_to(PACKAGE.parent)).startswith(EXEMPT[2]):
            assert not {m for m in direct_imports(module) if m.startswith(computing)}, module


def test_top_of_the_package_keeps_at_most_a_dozen_modules():
    top = [p.name for p in PACKAGE.glob("*.py")]
    assert len(top) <= 12, top


def test_every_path_of_the_table_is_a_workspace_path():
    """The stage table and the Workspace name the same places (a file of a named folder counts)."""
    from pathlib import Path

    from pipeline.runtime.workspace import Workspace

    ws = Workspace()
    named = {getattr(ws, name) for name, value in vars(Workspace).items() if isinstance(value, property)}
    for stage in STAGES.values():
        for path in (*stage.deps, *stage.outs, *stage.git_outs, *stage.work, *stage.staged):
            assert Path(path) in named or Path(path).parent in named, (stage.name, path)
