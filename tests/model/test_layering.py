"""The model package depends on nothing above it: only torch, the standard library, lunaris.config, errors and
metrics (the metric names it reports).

Export embeds the model package's files as the remote modeling code, and a reader of the model should never
have to open the trainer; so no file under lunaris/model imports any other part of Lunaris, at any level
(inside functions too), but the checkpoint reader that `model_from_checkpoint` uses, and that only inside the
function (the export leaves it out). tests/test_import_layers.py checks the layers of the whole package.
"""

import ast
from pathlib import Path

import lunaris.model

ALLOWED = ("lunaris.model", "lunaris.config", "lunaris.errors", "lunaris.metrics")
INSIDE_FUNCTIONS_ONLY = ("lunaris.checkpoints",)


def lunaris_imports(path: Path) -> list:
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.level == 0:
            names = [node.module or ""]
        elif isinstance(node, ast.ImportFrom):  # relative: resolve against the package
            names = ["lunaris.model" + ("." + node.module if node.module else "")] if node.level == 1 else ["lunaris"]
        elif isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        else:
            continue
        found += [(node.lineno, name) for name in names if name.split(".")[0] == "lunaris"]
    return found


def top_level_import_lines(path: Path) -> set:
    return {node.lineno for node in ast.parse(path.read_text(encoding="utf-8")).body
            if isinstance(node, (ast.Import, ast.ImportFrom))}


def upward_imports(path: Path) -> list:
    """'file:line imports name' for every import of `path` that the model package may not make."""
    top_level, found = top_level_import_lines(path), []
    for line, name in lunaris_imports(path):
        allowed = ALLOWED if line in top_level else ALLOWED + INSIDE_FUNCTIONS_ONLY
        if not any(name == a or name.startswith(a + ".") for a in allowed):
            found.append(f"{path.name}:{line} imports {name}")
    return found


def test_model_files_import_only_the_model_package_config_errors_and_metrics():
    files = sorted(Path(lunaris.model.__file__).parent.glob("*.py"))
    assert len(files) >= 5
    upward = [problem for path in files for problem in upward_imports(path)]
    assert not upward, upward


def test_the_check_sees_imports_inside_functions(tmp_path):
    path = tmp_path / "example.py"
    path.write_text("def f():\n    from lunaris.train.checkpoint import load_checkpoint_file\n")
    assert lunaris_imports(path) == [(2, "lunaris.train.checkpoint")]
    assert upward_imports(path) == ["example.py:2 imports lunaris.train.checkpoint"]


def test_the_checkpoint_reader_is_allowed_inside_functions_only(tmp_path):
    path = tmp_path / "example.py"
    path.write_text("from lunaris.checkpoints import read_model_checkpoint\n\n\n"
                    "def f():\n    from lunaris.checkpoints import read_model_checkpoint\n")
    assert upward_imports(path) == ["example.py:1 imports lunaris.checkpoints"]
