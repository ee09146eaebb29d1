"""Imports point down the layers and never go in a circle.

The import-linter contracts in pyproject.toml (what CI's `lint-imports` checks) run here too, so `pytest` alone
catches an upward import or a cycle, imports inside functions included; they are also shown to catch each kind of
violation in a copy of the package. A cycle check over every module, the package's own `__init__` included (which
import-linter's sibling check does not see), completes them.
"""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import grimp
import pytest

pytest.importorskip("importlinter", reason="import-linter is not installed: pip install -e '.[dev]'")

ROOT = Path(__file__).resolve().parent.parent
SRC = ROOT / "src"


def lint_imports(src: Path, cwd: Path) -> subprocess.CompletedProcess:
    """`lint-imports` with the project's contracts over the package found in `src`."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(src), os.environ.get("PYTHONPATH", "")])}
    code = "import sys; from importlinter.cli import lint_imports_command; sys.exit(lint_imports_command())"
    return subprocess.run([sys.executable, "-c", code, "--config", str(ROOT / "pyproject.toml"), "--no-cache"],
                          cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def test_the_import_contracts_hold(tmp_path):
    result = lint_imports(SRC, tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Contracts: 2 kept, 0 broken." in result.stdout


@pytest.mark.parametrize("file, code, broken", [
    ("checkpoints.py", "def f():\n    from lunaris.generate import load_model\n", "is not allowed to import"),
    ("tasks/types.py", "def f():\n    from lunaris.tasks.formats import LAYOUTS\n", "No cycles are allowed in"),
    ("model/layers.py", "def f():\n    from lunaris.data import ShardDataset\n", "is not allowed to import"),
], ids=["upward", "cycle-in-a-package", "siblings"])
def test_the_contracts_catch_imports_inside_functions(tmp_path, file, code, broken):
    copy = tmp_path / "src"
    shutil.copytree(SRC / "lunaris", copy / "lunaris", ignore=shutil.ignore_patterns("__pycache__"))
    with open(copy / "lunaris" / file, "a", encoding="utf-8") as f:
        f.write("\n\n" + code)
    result = lint_imports(copy, tmp_path)
    assert result.returncode != 0 and broken in result.stdout, result.stdout + result.stderr


def import_cycles(graph) -> list:
    """Every strongly connected set of two or more modules (Tarjan's algorithm), each sorted."""
    index, low, stack, on_stack, cycles = {}, {}, [], set(), []

    def visit(module):
        index[module] = low[module] = len(index)
        stack.append(module)
        on_stack.add(module)
        for imported in graph.find_modules_directly_imported_by(module):
            if imported not in index:
                visit(imported)
                low[module] = min(low[module], low[imported])
            elif imported in on_stack:
                low[module] = min(low[module], index[imported])
        if low[module] == index[module]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == module:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for module in sorted(graph.modules):
        if module not in index:
            visit(module)
    return cycles


def test_no_module_imports_itself_through_others():
    graph = grimp.build_graph("lunaris", cache_dir=None)   # every import, those inside functions included
    assert {"lunaris", "lunaris.cli", "lunaris.checkpoints", "lunaris.model.model"} <= graph.modules
    assert import_cycles(graph) == []


def test_the_cycle_check_finds_a_cycle():
    graph = grimp.ImportGraph()
    for module in ("p", "p.a", "p.b", "p.c"):
        graph.add_module(module)
    graph.add_import(importer="p.a", imported="p.b")
    graph.add_import(importer="p.b", imported="p")          # through the package's __init__
    graph.add_import(importer="p", imported="p.a")
    graph.add_import(importer="p.c", imported="p.a")
    assert import_cycles(graph) == [["p", "p.a", "p.b"]]
