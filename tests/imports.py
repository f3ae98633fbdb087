"""The project's import graph, read from the source (every import, at module level or inside a function)."""

from __future__ import annotations

import ast
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
PACKAGE = REPO_ROOT / "pipeline"
# Modules that cannot change a result and so are no stage's code dependency: the command line and the runtime
# machinery (workspace paths, locks, preflight, error reporting, progress, allocator, hub probing).
EXEMPT = ("pipeline/cli.py", "pipeline/__main__.py", "pipeline/runtime/")


def module_path(module: str) -> Path | None:
    base = REPO_ROOT / module.replace(".", "/")
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def direct_imports(module: str, top_level_only: bool = False) -> set[str]:
    """The project modules `module` imports (`from pipeline.x import y` counts pipeline.x.y when that is a module)."""
    path = module_path(module)
    tree = ast.parse(path.read_text(encoding="utf-8"))
    nodes = tree.body if top_level_only else ast.walk(tree)
    found = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module, *(f"{node.module}.{a.name}" for a in node.names)]
        else:
            continue
        found |= {n for n in names if n.split(".")[0] == "pipeline" and module_path(n)}
    return found - {module}


def with_parents(module: str) -> set[str]:
    """Importing pipeline.a.b runs pipeline/__init__.py and pipeline/a/__init__.py too."""
    parts = module.split(".")
    return {".".join(parts[:i]) for i in range(1, len(parts) + 1)}


def import_closure(module: str) -> set[str]:
    seen, todo = set(), [module]
    while todo:
        current = todo.pop()
        for name in with_parents(current):
            if name not in seen:
                seen.add(name)
                # A package's __init__ counts at module level only: pipeline/__init__.py's lazy attributes
                # (QuestionAnswerer) are imported when asked for, not by importing a module below it.
                todo.extend(direct_imports(name, top_level_only=module_path(name).name == "__init__.py"))
    return seen


def code_files(module: str) -> list[str]:
    """The repository paths of the project modules a stage's process imports, less the exempt ones and empty
    package markers."""
    files = []
    for name in import_closure(module):
        path = module_path(name)
        relative = str(path.relative_to(REPO_ROOT))
        if relative.startswith(EXEMPT) or not path.read_text(encoding="utf-8").strip():
            continue
        files.append(relative)
    return sorted(files)
