"""Every es_kernels module imports on its own, and the imports between es_kernels modules form no cycle."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "es_kernels"


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = sorted(_module_name(path) for path in PACKAGE.rglob("*.py") if "_csrc" not in path.parts)


def _imports(path: Path, name: str) -> set[str]:
    """es_kernels modules a module imports, at module level or inside functions (a deferred import is still a
    dependency; only ``if TYPE_CHECKING:`` blocks, which never run, are left out)."""
    tree = ast.parse(path.read_text())
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    type_only = {
        id(inner)
        for node in ast.walk(tree)
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)
        for inner in ast.walk(node)
    }
    found: set[str] = set()
    for node in ast.walk(tree):
        if id(node) in type_only:
            continue
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            # ``from es_kernels import seeds`` needs the submodule es_kernels.seeds; ``from es_kernels import
            # EvolvedState`` needs the package's __init__ to have run.
            for alias in node.names:
                submodule = f"{base}.{alias.name}"
                found.add(submodule if submodule in MODULES else base)
    return {module for module in found if module in MODULES}


def import_graph() -> dict[str, set[str]]:
    graph = {}
    for path in PACKAGE.rglob("*.py"):
        if "_csrc" in path.parts:
            continue
        name = _module_name(path)
        # A package's __init__ is imported before any of its submodules: an edge to the parent is implied.
        graph[name] = _imports(path, name) - {name}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for successor in sorted(graph.get(node, ())):
            if state.get(successor) == 1:
                return [*stack[stack.index(successor) :], successor]
            if successor not in state and (cycle := visit(successor)):
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_imports_have_no_cycle():
    # ``from es_kernels import _checks`` in a submodule is an edge to es_kernels._checks, not to the package; an
    # edge back to a package's __init__ (a name it defines) is a real cycle.
    graph = import_graph()
    cycle = find_cycle(graph)
    assert cycle is None, " -> ".join(cycle)


def test_the_cycle_finder_finds_a_planted_cycle():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}
    assert find_cycle(graph) == ["a", "b", "c", "a"]


def _fresh_interpreter_environment() -> dict[str, str]:
    environment = {**os.environ, "PYTHONPATH": str(PACKAGE.parent)}
    environment.pop("TRITON_INTERPRET", None)  # compiled mode, as a user's interpreter has
    return environment


# Imports every module into one fresh interpreter, reporting each failure: the fast tier's check that nothing fails
# to import. A module that imports only because another ran first is caught by the per-module test below.
_IMPORT_EACH = r"""
import importlib, sys, traceback
failed = []
for name in sys.argv[1:]:
    try:
        importlib.import_module(name)
    except BaseException:
        failed.append(f"{name}:\n{traceback.format_exc()}")
sys.stderr.write("\n".join(failed))
sys.exit(1 if failed else 0)
"""


def test_every_module_imports_in_one_interpreter():
    done = subprocess.run(
        [sys.executable, "-c", _IMPORT_EACH, *MODULES],
        env=_fresh_interpreter_environment(),
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr[-6000:]


@pytest.mark.slow  # one fresh interpreter (and torch import) per module
@pytest.mark.parametrize("module", MODULES)
def test_each_module_imports_alone(module):
    done = subprocess.run(
        [sys.executable, "-c", f"import {module}"], env=_fresh_interpreter_environment(), capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr[-3000:]
