"""The grammar of a task entry: a `--tasks` word of `lunaris eval` or an `eval_tasks` item of a config.

`embedded` (the built-in task), `NAME=PATH`, a `PATH` alone, or a mapping {name, path, limit}. Pure parsing, no file
is read here (lunaris.tasks reads them): the config's validation checks its `eval_tasks` with `spec_problems`
without importing the tasks package above it.
"""

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from lunaris.errors import LunarisError

EMBEDDED = "embedded"                     # the path of the built-in task (tasks/embedded.py)
EMBEDDED_NAME = "python_next_line"        # its name


@dataclass(frozen=True)
class TaskSpec:
    """One `--tasks` entry or one `eval_tasks` item: a name, a path (or "embedded"), an example limit."""
    name: str
    path: str
    limit: Optional[int] = None
    named: bool = True        # False: the name was derived from the file (a task YAML's own `name` wins)


# ---- `--tasks` entries and `eval_tasks` items ------------------------------------------------------------

SPEC_HELP = ("a task is `python_next_line` (the built-in task; `embedded` is its older name), NAME=PATH (a JSONL "
             "file in one of the layouts simple, HellaSwag, ARC, PIQA, LAMBADA, or a task YAML), or a PATH alone "
             "(named after the file)")
SPEC_KEYS = ("name", "path", "limit")


def parse_spec(entry, limit: Optional[int] = None) -> TaskSpec:
    """A TaskSpec from a string (`embedded`, `NAME=PATH`, `PATH`) or a mapping {name, path, limit}."""
    if isinstance(entry, dict):
        unknown = sorted(set(entry) - set(SPEC_KEYS))
        if unknown:
            raise LunarisError(f"task {entry} has unknown key(s) {', '.join(unknown)}; the keys are name, path "
                               f"and limit.")
        path = entry.get("path")
        name = entry.get("name")
        if path is None and name in (EMBEDDED, EMBEDDED_NAME):
            path = EMBEDDED
        if not isinstance(path, str) or not path:
            raise LunarisError(f"task {entry} has no path; give path: FILE (or path: embedded).")
        if name is not None and (not isinstance(name, str) or not name):
            raise LunarisError(f"task {entry}: name must be a non-empty string.")
        spec = parse_spec(path if name is None else f"{name}={path}", limit)
        item_limit = entry.get("limit", limit)
        if item_limit is not None and (isinstance(item_limit, bool) or not isinstance(item_limit, int)
                                       or item_limit < 1):
            raise LunarisError(f"task {entry}: limit must be a positive integer or null, got {item_limit!r}.")
        return TaskSpec(spec.name, spec.path, item_limit, spec.named)
    if not isinstance(entry, str) or not entry.strip():
        raise LunarisError(f"task {entry!r} is not a task: {SPEC_HELP}.")
    entry = entry.strip()
    if entry in (EMBEDDED, EMBEDDED_NAME):
        return TaskSpec(EMBEDDED_NAME, EMBEDDED, limit)
    name, sep, path = entry.partition("=")
    if not sep:
        name, path = None, entry
    name, path = (name or "").strip(), path.strip()
    if not path:
        raise LunarisError(f"task {entry!r} has no path: {SPEC_HELP}.")
    named = bool(name)
    name = name or (EMBEDDED_NAME if path == EMBEDDED else Path(path).stem)
    if not re.fullmatch(r"[\w.\-]+", name):
        raise LunarisError(f"task name {name!r} may only hold letters, digits, '_', '-' and '.' (it becomes part "
                           f"of the metric name eval/<task>/acc).")
    return TaskSpec(name, path, limit, named)


def parse_specs(entries, limit: Optional[int] = None) -> list:
    """TaskSpecs of a list of entries (a string holding several, comma-separated, counts as several)."""
    if not isinstance(entries, (list, tuple)):
        entries = [entries]
    specs = []
    for entry in entries:
        if isinstance(entry, str) and "," in entry:
            specs.extend(parse_spec(part, limit) for part in entry.split(",") if part.strip())
        else:
            specs.append(parse_spec(entry, limit))
    names = [spec.name for spec in specs]
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise LunarisError(f"task name(s) {', '.join(repeated)} appear more than once; give each task its own name "
                           f"(NAME=PATH).")
    return specs


def spec_problems(entries) -> list:
    """One sentence per invalid entry of `eval_tasks` (and one for repeated names): config validation."""
    if not isinstance(entries, list):
        return [f"must be a list of tasks, got {entries!r}."]
    problems, specs = [], []
    for entry in entries:
        try:
            specs.extend(parse_specs(entry))
        except LunarisError as exc:
            problems.append(str(exc))
    if not problems:
        try:
            parse_specs(specs and [{"name": s.name, "path": s.path, "limit": s.limit} for s in specs])
        except LunarisError as exc:
            problems.append(str(exc))
    return problems

