"""The task built into Lunaris, `python_next_line` (also called `embedded`): a real multiple-choice task that needs
no download.

Built from the Python standard library present on every machine, deterministically (sorted files, a fixed seed):
for each function of the held-out packages (HELD_OUT_PACKAGES), the context is its first lines, from the `def`
line to a line drawn among its first body lines; the choices are the true next line and three lines of functions
of *other* files (as they are, indentation included), the closest in length among twelve drawn, so that a line's
length does not give it away. Telling them apart takes knowing Python: which indentation and which statement can
follow, which names the function has in scope. Chance is 1/4.

Held out: `lunaris demo` excludes the held-out packages from its corpus (demo.EXCLUDE holds HELD_OUT_GLOBS), so
the demo model never trains on these functions. A corpus of your own that contains the standard library should
exclude them too (`lunaris prepare ... --exclude 'email/*,http/*,json/*,wsgiref/*,xmlrpc/*'`) for the accuracy to
measure generalization rather than memorization. The examples depend on the Python version's standard library:
compare accuracies measured with the same Python minor version.
"""

import functools
import random
import re
import sysconfig
from pathlib import Path

from lunaris.errors import LunarisError
from lunaris.tasks.types import MULTIPLE_CHOICE, Example, Task

NAME = "python_next_line"
HELD_OUT_PACKAGES = ("email", "http", "json", "wsgiref", "xmlrpc")
HELD_OUT_GLOBS = tuple(f"{package}/*" for package in HELD_OUT_PACKAGES)
SEED = 0
N_CHOICES = 4
MAX_CONTEXT_LINES = 16      # the next line is drawn among the first lines of a function
MIN_LINE, MAX_LINE = 4, 80  # characters of a candidate line (stripped)
DRAWS = 12                  # lines drawn per example, of which the three closest in length are the wrong choices


def _good_line(text: str) -> bool:
    stripped = text.strip()
    return MIN_LINE <= len(stripped) <= MAX_LINE and not stripped.startswith(("#", '"', "'", "@"))


DEF = re.compile(r"^(\s*)(?:async\s+)?def\s+\w+")
QUOTES = ('"""', "'''")


def _indent(line: str) -> int:
    return len(line) - len(line.lstrip())


def _string_lines(lines: list) -> list:
    """For each line, whether it is (partly) inside a triple-quoted string: docstrings are not code to predict."""
    marks, open_quote = [], None
    for line in lines:
        inside = open_quote is not None
        at = 0
        while True:
            hits = [(line.find(q, at), q) for q in QUOTES if (open_quote in (None, q)) and line.find(q, at) >= 0]
            if not hits:
                break
            position, quote = min(hits)
            inside, open_quote, at = True, None if open_quote else quote, position + 3
        marks.append(inside)
    return marks


def _functions(path: Path) -> list:
    """[(lines of the file, def line index, [candidate next-line indices])] for each function of a file.

    Read line by line (no parsing: fast, and the same on every Python version that has the same file): a function
    is a `def` line, its signature up to the line ending with ':', and the lines indented deeper that follow.
    A docstring right after the signature stays in the context, never a target.
    """
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError):
        return []
    in_string = _string_lines(lines)
    found = []
    for start, line in enumerate(lines):
        match = DEF.match(line)
        if not match:
            continue
        indent, body = len(match.group(1)), start
        while body < len(lines) and not lines[body].split("#")[0].rstrip().endswith(":"):
            body += 1
        body += 1                                              # the first line after the signature
        if body < len(lines) and lines[body].strip().startswith(QUOTES):  # skip the docstring
            quote = lines[body].strip()[:3]
            closed = lines[body].strip()[3:].find(quote) >= 0
            while not closed and body + 1 < len(lines):
                body += 1
                closed = quote in lines[body]
            body += 1
        candidates = []
        for i in range(body, min(len(lines), start + MAX_CONTEXT_LINES)):
            if lines[i].strip() and _indent(lines[i]) <= indent:
                break                                          # the function ended
            if _good_line(lines[i]) and not in_string[i]:
                candidates.append(i)
        if candidates:
            found.append((lines, start, candidates))
    return found


def held_out_files(stdlib: Path) -> list:
    return sorted(p for package in HELD_OUT_PACKAGES for p in (stdlib / package).rglob("*.py")
                  if "__pycache__" not in p.parts and not any(part in ("test", "tests") for part in p.parts))


@functools.lru_cache(maxsize=4)
def build_examples(stdlib: str) -> tuple:
    """Every example of the task for the standard library at `stdlib`, in a fixed shuffled order."""
    rng = random.Random(SEED)
    functions = []  # (file index, lines, def index, candidates)
    for index, path in enumerate(held_out_files(Path(stdlib))):
        functions.extend((index, *function) for function in _functions(path))
    pool = [(index, lines[i]) for index, lines, _, candidates in functions for i in candidates]
    examples = []
    for index, lines, start, candidates in functions:
        target = rng.choice(candidates)
        true_line = lines[target].rstrip()
        drawn, seen = [], {true_line.strip()}
        for _ in range(DRAWS):  # distinct lines of other files
            other_file, other = pool[rng.randrange(len(pool))]
            if other_file != index and other.strip() not in seen:
                seen.add(other.strip())
                drawn.append(other.rstrip())
        if len(drawn) < N_CHOICES - 1:
            continue
        # the drawn lines closest in length to the true one: length alone (fewer tokens, higher likelihood) does
        # not tell them apart
        drawn.sort(key=lambda line: abs(len(line.strip()) - len(true_line.strip())))
        choices = [true_line] + drawn[:N_CHOICES - 1]
        rng.shuffle(choices)
        context = "\n".join(line.rstrip() for line in lines[start:target]) + "\n"
        examples.append(Example(context, tuple(choices), choices.index(true_line)))
    rng.shuffle(examples)  # a limit takes examples from every package, not the first file's
    return tuple(examples)


def stdlib_task(name: str, build, stdlib=None) -> Task:
    """A built-in task whose examples `build(stdlib path)` makes from the held-out packages of the standard library
    at `stdlib` (default: this interpreter's); a clear error when they are not there."""
    root = Path(stdlib or sysconfig.get_paths()["stdlib"])
    examples = build(str(root))
    if not examples:
        raise LunarisError(f"the built-in task {name} is built from the standard library's "
                           f"{', '.join(HELD_OUT_PACKAGES)} packages, but none were found under {root}; use a regular "
                           f"CPython installation or task files of your own.")
    # every built-in context ends where its choice begins (a newline, or the chat template's <|assistant|>)
    return Task(name, MULTIPLE_CHOICE, list(examples), name, target_delimiter="")


def embedded_task(stdlib=None) -> Task:
    """The task (all its examples); `stdlib` defaults to this interpreter's standard library."""
    return stdlib_task(NAME, build_examples, stdlib)
