"""Example conversations that need no download: a function's docstring asked for, the function written.

Built deterministically from the Python standard library of the interpreter that runs it (sorted files, a fixed
seed): for every function with a docstring and a body beyond it, the user message is the docstring (cleaned as
`inspect.cleandoc` does; of a long one, its first paragraph) and the assistant's reply the function without its
docstring (dedented, decorators left out). Functions whose code is long are left out, so that nearly every
conversation fits the demo model's 256-token windows.

The conversations come from packages `lunaris demo` leaves out of its corpus (TRAIN_PACKAGES: IDLE, lib2to3, the
turtle demos and the test suite, where this Python has them), so the demo's model has seen none of this code; the
built-in task `python_docstring` (lunaris.tasks.docstring: pick a docstring's function among four) is built the
same way from other packages, the ones `python_next_line` uses, so fine-tuning on these conversations never sees
the task's functions either. Some Linux distributions ship IDLE and the test suite as separate packages; with
neither installed there are few conversations, and `write_example_chat` says so.
"""

from __future__ import annotations

import ast
import json
import random
import sysconfig
import textwrap
import warnings
from pathlib import Path

from lunaris.errors import DataError
from lunaris.fileio import atomic_write_text

TRAIN_PACKAGES = ("idlelib", "lib2to3", "turtledemo", "test")
MAX_DOCSTRING, MAX_CODE = 320, 480   # characters: a docstring and its function fit in about 256 tokens
MIN_CONVERSATIONS = 200
SEED = 0


def stdlib_path(stdlib=None) -> Path:
    return Path(stdlib or sysconfig.get_paths()["stdlib"])


def package_files(stdlib: Path, packages) -> list:
    """The .py files of the packages (or modules) that exist under `stdlib`, sorted."""
    files = []
    for package in packages:
        path = stdlib / package
        files += [path.with_suffix(".py")] if path.with_suffix(".py").is_file() else \
            sorted(p for p in path.rglob("*.py") if "__pycache__" not in p.parts)
    return sorted(files)


def _definitions(node):
    """Every function definition below `node` (methods and nested ones too). A definition is a statement, so only
    statements are descended into: half the time of ast.walk, which visits every expression."""
    for child in ast.iter_child_nodes(node):
        if isinstance(child, (ast.stmt, ast.excepthandler, ast.match_case)):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
                yield child
            yield from _definitions(child)


def file_functions(path: Path) -> list:
    """[(docstring, code)] of a file's functions (methods and nested functions included), in source order."""
    try:
        source = path.read_text(encoding="utf-8")
        with warnings.catch_warnings():  # test files hold invalid escapes on purpose
            warnings.simplefilter("ignore", (SyntaxWarning, DeprecationWarning))
            tree = ast.parse(source)
    except (OSError, UnicodeDecodeError, SyntaxError, ValueError):
        return []
    lines, found = source.splitlines(), []
    for node in sorted(_definitions(tree), key=lambda n: n.lineno):
        docstring = ast.get_docstring(node)
        first = node.body[0]
        if not docstring or len(node.body) < 2 or first.lineno == node.lineno:
            continue  # no docstring, nothing but it, or one on the def line
        if len(docstring) > MAX_DOCSTRING:
            docstring = docstring.split("\n\n")[0]  # a long one's summary: its first paragraph
        kept = lines[node.lineno - 1:first.lineno - 1] + lines[first.end_lineno:node.end_lineno]
        code = textwrap.dedent("\n".join(kept)).strip("\n")
        if docstring.strip() and len(docstring) <= MAX_DOCSTRING and len(code) <= MAX_CODE:
            found.append((docstring, code))
    return found


def docstring_functions(stdlib, packages) -> list:
    """[(docstring, code, file index)] of every function of the packages, files in sorted order."""
    return [(docstring, code, index) for index, path in enumerate(package_files(stdlib_path(stdlib), packages))
            for docstring, code in file_functions(path)]


def conversation(docstring: str, code: str) -> dict:
    """One conversation in the OpenAI layout."""
    return {"messages": [{"role": "user", "content": docstring}, {"role": "assistant", "content": code}]}


def example_conversations(stdlib=None) -> list:
    """The example conversations, in a fixed shuffled order (the first ones, which prepare holds out for
    validation, come from every package)."""
    functions = docstring_functions(stdlib, TRAIN_PACKAGES)
    random.Random(SEED).shuffle(functions)
    return [conversation(docstring, code) for docstring, code, _ in functions]


def write_example_chat(path) -> int:
    """Write the example conversations to `path` (JSONL, one conversation per line); returns how many."""
    conversations = example_conversations()
    if len(conversations) < MIN_CONVERSATIONS:
        raise DataError(f"the standard library at {stdlib_path()} has only {len(conversations)} documented functions "
                        f"in {', '.join(TRAIN_PACKAGES)} (the example conversations come from packages the demo "
                        f"does not train on). Install this Python's IDLE and test suite (on Debian and Ubuntu: "
                        f"idle-python3.X and libpython3.X-testsuite), or fine-tune on conversations of your own.")
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(Path(path), "".join(json.dumps(c, ensure_ascii=False) + "\n" for c in conversations))
    return len(conversations)
