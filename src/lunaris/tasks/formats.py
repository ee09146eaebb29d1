"""Downstream tasks from files and names: the task files Lunaris reads, the built-in task, and `--tasks` entries.

What a task is (examples, multiple choice or cloze) is types.py. Files are read from disk, never downloaded. The
layout of a JSONL file is recognized from the fields of its first row, by the entries of LAYOUTS in order:

| layout | fields | context + continuation (as lm-evaluation-harness builds them) |
| --- | --- | --- |
| simple | `context`, `choices`, `label` | `context` + `" " + choice` |
| HellaSwag | `ctx_a`, `ctx_b`, `activity_label`, `endings`, `label` | `"{activity}: {ctx_a} {Ctx_b}"` + `" " + end` |
| ARC | `question`, `choices`/`question.choices`, `answerKey` | `"Question: {q}\nAnswer:"` + `" " + text` |
| PIQA | `goal`, `sol1`, `sol2`, `label` (or `*-labels.lst`) | `"Question: {goal}\nAnswer:"` + `" " + sol` |
| LAMBADA | `text` | all words but the last + `" " + last word` (cloze) |

(HellaSwag's text cleaned as lm-eval cleans it; PIQA's original release keeps its labels in valid-labels.lst.)
A new layout is one more `Layout` entry in LAYOUTS. Anything else is described by a small YAML file that maps
fields (see `TaskFile`). A task built into Lunaris is named instead of a file (BUILTIN_TASKS: `python_next_line`,
whose older name `embedded` still works, and `python_docstring`).
"""

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import yaml

from lunaris.errors import LunarisError
from lunaris.tasks import docstring, embedded
from lunaris.tasks.types import CLOZE, MULTIPLE_CHOICE, Example, Task
from lunaris.taskspec import (  # the entry grammar lives below the config; its names stay importable here
    EMBEDDED,
    EMBEDDED_NAME,
    SPEC_HELP,
    TaskSpec,
    parse_spec,
    parse_specs,
    spec_problems,
)

# Example, Task, MULTIPLE_CHOICE and CLOZE live in types.py; they stay importable from here.
__all__ = ["BUILTIN_TASKS", "CLOZE", "EMBEDDED", "EMBEDDED_NAME", "LAYOUTS", "Example", "Layout", "MULTIPLE_CHOICE",
           "Task", "TaskFile", "TaskSpec", "detect_layout", "load_task", "parse_spec", "parse_specs", "read_layout",
           "spec_problems"]

assert EMBEDDED_NAME == embedded.NAME    # `embedded` is the older name of the built-in task, kept as an alias
# name -> the function that builds the task
BUILTIN_TASKS = {embedded.NAME: embedded.embedded_task, docstring.NAME: docstring.docstring_task}


# ---- reading a task ---------------------------------------------------------------------------------------

def load_task(spec: TaskSpec) -> Task:
    """The task a spec names, its examples cut to `spec.limit` (the first ones in file order)."""
    builtin = BUILTIN_TASKS.get(EMBEDDED_NAME if spec.path == EMBEDDED else spec.path)
    if builtin is not None:
        task = builtin()
        task.name = spec.name
    else:
        path = Path(spec.path)
        if not path.is_file():
            raise LunarisError(f"task {spec.name}: {path} does not exist; {SPEC_HELP}. Task files are read from "
                               f"disk (nothing is downloaded).")
        if path.suffix in (".yaml", ".yml"):
            task_file = TaskFile.read(path)
            task = task_file.load(spec.name if spec.named else task_file.name or spec.name)
        else:
            task = read_layout(path, spec.name)
    task.examples_total = len(task.examples)
    if spec.limit is not None:
        task.examples = task.examples[:spec.limit]
    if not task.examples:
        raise LunarisError(f"task {spec.name}: {task.source} holds no examples.")
    return task


def read_jsonl(path: Path) -> list:
    rows = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise LunarisError(f"{path}, line {number}, is not JSON ({exc.msg}); a task file holds one JSON "
                                   f"object per line.") from None
            if not isinstance(row, dict):
                raise LunarisError(f"{path}, line {number}, is not a JSON object.")
            rows.append(row)
    return rows


def detect_layout(row: dict) -> Optional[str]:
    """The name of the first layout in LAYOUTS whose fields the row has, or None."""
    keys = set(row)
    return next((name for name, layout in LAYOUTS.items() if layout.detect(keys)), None)


def read_layout(path: Path, name: str, layout: str = None) -> Task:
    """A task from a JSONL file in one of the published layouts (detected from its first row unless given)."""
    rows = read_jsonl(path)
    if not rows:
        raise LunarisError(f"task {name}: {path} holds no examples.")
    layout = layout or detect_layout(rows[0])
    if layout is None:
        known = ", ".join(f"{entry.title} ({entry.fields})" for entry in LAYOUTS.values())
        raise LunarisError(f"task {name}: the rows of {path} (fields {', '.join(sorted(rows[0]))}) match no known "
                           f"layout: {known}. Describe other fields with a task YAML (see the README, Evaluate).")
    entry = LAYOUTS[layout]
    if entry.prepare is not None:
        rows = entry.prepare(path, rows, name)
    examples = []
    for number, row in enumerate(rows, 1):
        try:
            examples.append(entry.convert(row))
        except (KeyError, IndexError, TypeError, ValueError, AttributeError) as exc:
            raise LunarisError(f"task {name}: row {number} of {path} is not a valid {layout} example "
                               f"({type(exc).__name__}: {exc}).") from None
    _check_examples(examples, entry.kind, name, path)
    return Task(name, entry.kind, examples, str(path))


def _simple(row) -> Example:
    return Example(str(row["context"]), tuple(str(c) for c in row["choices"]), _label(row["label"], row["choices"]))


def hellaswag_preprocess(text: str) -> str:
    """lm-evaluation-harness's cleaning of HellaSwag text (WikiHow's bracketed artifacts)."""
    text = text.strip().replace(" [title]", ". ")
    text = re.sub("\\[.*?\\]", "", text)
    return text.replace("  ", " ")


def _hellaswag(row) -> Example:
    ctx = row["ctx_a"] + " " + row["ctx_b"].capitalize() if "ctx_a" in row else row["ctx"]
    context = hellaswag_preprocess(row.get("activity_label", "") + ": " + ctx) if row.get("activity_label") \
        else hellaswag_preprocess(ctx)
    return Example(context, tuple(hellaswag_preprocess(e) for e in row["endings"]), int(row["label"]))


def _arc(row) -> Example:
    question, choices = row["question"], row.get("choices")
    if isinstance(question, dict):       # the original ARC JSONL: {"question": {"stem", "choices": [{text, label}]}}
        choices = question["choices"]
        question = question["stem"]
    if isinstance(choices, dict):        # the Hugging Face layout: {"text": [...], "label": [...]}
        texts, labels = list(choices["text"]), list(choices["label"])
    else:
        texts, labels = [c["text"] for c in choices], [c["label"] for c in choices]
    return Example(f"Question: {question}\nAnswer:", tuple(texts), labels.index(row["answerKey"]))


def _piqa(row) -> Example:
    return Example(f"Question: {row['goal']}\nAnswer:", (row["sol1"], row["sol2"]), int(row["label"]))


def _lambada(row) -> Example:
    words = row["text"].split(" ")
    if len(words) < 2:
        raise ValueError("the text has no word to predict after a context")
    return Example(" ".join(words[:-1]), (words[-1],), 0)


def _attach_piqa_labels(path: Path, rows: list, name: str) -> list:
    """PIQA's original release keeps labels in a file beside the examples: valid.jsonl + valid-labels.lst."""
    if "label" in rows[0]:
        return rows
    labels_path = path.with_name(path.stem + "-labels.lst")
    if not labels_path.is_file():
        raise LunarisError(f"task {name}: the PIQA rows of {path} have no label field and {labels_path} (the labels "
                           f"file of PIQA's original release) does not exist.")
    labels = [line.strip() for line in labels_path.read_text().splitlines() if line.strip()]
    if len(labels) != len(rows):
        raise LunarisError(f"task {name}: {labels_path} has {len(labels)} labels for {len(rows)} rows of {path}.")
    return [{**row, "label": int(label)} for row, label in zip(rows, labels)]


@dataclass(frozen=True)
class Layout:
    """A published task-file layout: how its rows are recognised, and how one row becomes an Example."""
    title: str                              # as error messages name it
    fields: str                             # the fields that identify it, for error messages
    detect: Callable[[set], bool]           # the keys of a row -> is it this layout?
    convert: Callable[[dict], Example]      # one row -> one example (KeyError, ValueError, ... for a bad row)
    kind: str = MULTIPLE_CHOICE
    prepare: Optional[Callable[[Path, list, str], list]] = None   # (path, rows, task name) -> rows, before convert


LAYOUTS = {  # detection tries them in this order
    "simple": Layout("simple", "context, choices, label", lambda keys: {"context", "choices", "label"} <= keys,
                     _simple),
    "hellaswag": Layout("HellaSwag", "ctx_a, ctx_b, endings, label",
                        lambda keys: "endings" in keys and ("ctx" in keys or "ctx_a" in keys), _hellaswag),
    "arc": Layout("ARC", "question, answerKey", lambda keys: {"question", "answerKey"} <= keys, _arc),
    "piqa": Layout("PIQA", "goal, sol1, sol2", lambda keys: {"goal", "sol1", "sol2"} <= keys, _piqa,
                   prepare=_attach_piqa_labels),
    "lambada": Layout("LAMBADA", "text", lambda keys: "text" in keys and not keys - {"text", "id", "domain"},
                      _lambada, kind=CLOZE),
}


def _label(value, choices, names=None) -> int:
    """The index of the right choice from an index, a digit string, a choice's name or a choice's text."""
    if isinstance(value, bool):
        raise ValueError(f"label {value!r} is not an index")
    if isinstance(value, int):
        index = value
    elif isinstance(value, str) and value.strip().lstrip("-").isdigit():
        index = int(value)
    elif names is not None and value in names:
        index = list(names).index(value)
    elif value in choices:
        index = list(choices).index(value)
    else:
        raise ValueError(f"label {value!r} is neither an index nor one of the choices")
    if not 0 <= index < len(choices):
        raise ValueError(f"label {index} is out of range for {len(choices)} choices")
    return index


def _check_examples(examples: list, kind: str, name: str, source) -> None:
    for number, example in enumerate(examples, 1):
        if kind == MULTIPLE_CHOICE and len(example.choices) < 2:
            raise LunarisError(f"task {name}: example {number} of {source} has {len(example.choices)} choice(s); a "
                               f"multiple-choice example needs at least 2.")
        if any(not choice for choice in example.choices):
            raise LunarisError(f"task {name}: example {number} of {source} has an empty choice.")


# ---- task YAML ----------------------------------------------------------------------------------------

@dataclass
class TaskFile:
    """A task YAML: which file, which layout or which fields.

        name: quiz                        # optional; default: the YAML file's name
        path: quiz.jsonl                  # relative to the YAML file
        layout: hellaswag                 # one of the layouts above; or describe the fields:
        kind: multiple_choice             # or cloze
        context: "Question: {question}\\nAnswer:"   # a field, or a template of {field}s
        choices: options                  # field holding the list of choices (multiple_choice)
        label: answer                     # index, digit string, a choice's text, or one of label_names
        label_names: letters              # optional field listing each choice's name (A, B, C, D)
        target: answer                    # cloze: field holding the text to predict
        target_delimiter: " "             # between the context and each choice (default " ")
    """
    path: Path
    source: Path
    name: Optional[str] = None
    layout: Optional[str] = None
    kind: str = MULTIPLE_CHOICE
    context: Optional[str] = None
    choices: Optional[str] = None
    label: Optional[str] = None
    label_names: Optional[str] = None
    target: Optional[str] = None
    target_delimiter: str = " "
    extra: dict = field(default_factory=dict)

    KEYS = ("name", "path", "layout", "kind", "context", "choices", "label", "label_names", "target",
            "target_delimiter")

    @classmethod
    def read(cls, yaml_path: Path) -> "TaskFile":
        try:
            data = yaml.safe_load(yaml_path.read_text(encoding="utf-8"))
        except yaml.YAMLError as exc:
            raise LunarisError(f"task file {yaml_path} is not valid YAML: {exc}") from None
        if not isinstance(data, dict):
            raise LunarisError(f"task file {yaml_path} must be a YAML mapping (path, layout or context/choices/label).")
        unknown = sorted(set(data) - set(cls.KEYS))
        if unknown:
            raise LunarisError(f"task file {yaml_path} has unknown key(s) {', '.join(unknown)}; the keys are "
                               f"{', '.join(cls.KEYS)}.")
        if not data.get("path"):
            raise LunarisError(f"task file {yaml_path} has no path: the JSONL file of examples (relative to the "
                               f"YAML file).")
        path = Path(data["path"])
        values = {k: v for k, v in data.items() if k != "path"}
        return cls(path=path if path.is_absolute() else yaml_path.parent / path, source=yaml_path, **values)

    def load(self, task_name: str) -> Task:
        if not self.path.is_file():
            raise LunarisError(f"task {task_name}: {self.path} (path in {self.source}) does not exist.")
        if self.layout is not None:
            if self.layout not in LAYOUTS:
                raise LunarisError(f"task file {self.source}: layout must be one of {', '.join(LAYOUTS)}, got "
                                   f"{self.layout!r}.")
            return read_layout(self.path, task_name, self.layout)
        if self.kind not in (MULTIPLE_CHOICE, CLOZE):
            raise LunarisError(f"task file {self.source}: kind must be {MULTIPLE_CHOICE} or {CLOZE}, got "
                               f"{self.kind!r}.")
        needed = ("context", "choices", "label") if self.kind == MULTIPLE_CHOICE else ("context", "target")
        missing = [key for key in needed if not getattr(self, key)]
        if missing:
            raise LunarisError(f"task file {self.source}: a {self.kind} task needs {', '.join(needed)} (missing: "
                               f"{', '.join(missing)}), or a layout.")
        examples = []
        for number, row in enumerate(read_jsonl(self.path), 1):
            try:
                context = _render(self.context, row)
                if self.kind == CLOZE:
                    examples.append(Example(context, (str(_field(row, self.target)),), 0))
                    continue
                choices = tuple(str(c) for c in _field(row, self.choices))
                names = _field(row, self.label_names) if self.label_names else None
                examples.append(Example(context, choices, _label(_field(row, self.label), choices, names)))
            except (KeyError, IndexError, TypeError, ValueError) as exc:
                raise LunarisError(f"task {task_name}: row {number} of {self.path} does not fit {self.source} "
                                   f"({type(exc).__name__}: {exc}).") from None
        _check_examples(examples, self.kind, task_name, self.path)
        return Task(task_name, self.kind, examples, str(self.path), self.target_delimiter)


def _field(row: dict, dotted: str):
    """row["a"]["b"] for "a.b"."""
    value = row
    for part in dotted.split("."):
        value = value[part]
    return value


def _render(template: str, row: dict) -> str:
    """A field's value, or a template with {field} (dotted fields allowed) filled from the row."""
    if "{" not in template:
        return str(_field(row, template))
    return re.sub(r"\{([\w.]+)\}", lambda m: str(_field(row, m.group(1))), template)
