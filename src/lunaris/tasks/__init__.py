"""Downstream tasks: multiple-choice and cloze accuracy by log-likelihood, as lm-evaluation-harness defines it.

types.py says what a task is (examples, multiple choice or cloze); formats.py reads task files (a simple JSONL
schema, the published HellaSwag, ARC, PIQA and LAMBADA layouts, a YAML that maps fields), the built-in tasks by
name and `--tasks` entries; embedded.py builds the task that needs no download (`python_next_line`, from the Python
standard library); scoring.py scores them in batches and computes the metrics. Used by `lunaris eval --tasks`, by
the trainer (`eval_tasks`, train/evaluation.py) and by the `lunaris` model of lm-evaluation-harness
(lm_eval_adapter.py). Nothing here imports the trainer or the model.
"""

from lunaris.tasks.formats import (
    BUILTIN_TASKS,
    EMBEDDED,
    EMBEDDED_NAME,
    LAYOUTS,
    Layout,
    TaskSpec,
    load_task,
    parse_spec,
    parse_specs,
)
from lunaris.tasks.scoring import encode_pair, encode_task, evaluate_tasks, format_table, score, task_result
from lunaris.tasks.types import CLOZE, MULTIPLE_CHOICE, Example, Task

__all__ = ["BUILTIN_TASKS", "CLOZE", "EMBEDDED", "EMBEDDED_NAME", "Example", "LAYOUTS", "Layout", "MULTIPLE_CHOICE",
           "Task", "TaskSpec", "encode_pair", "encode_task", "evaluate_tasks", "format_table", "load_task",
           "parse_spec", "parse_specs", "score", "task_result"]
