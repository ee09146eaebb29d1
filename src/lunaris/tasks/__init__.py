"""Downstream tasks: multiple-choice and cloze accuracy by log-likelihood, as lm-evaluation-harness defines it.

formats.py reads task files (a simple JSONL schema, the published HellaSwag, ARC, PIQA and LAMBADA layouts, a
YAML that maps fields) and `--tasks` entries; embedded.py builds the task that needs no download
(`python_next_line`, from the Python standard library); scoring.py scores them in batches and computes the
metrics. Used by `lunaris eval --tasks`, by the trainer (`eval_tasks`, train/evaluation.py) and by the `lunaris`
model of lm-evaluation-harness (lm_eval_adapter.py). Nothing here imports the trainer.
"""

from lunaris.tasks.formats import EMBEDDED, EMBEDDED_NAME, Example, Task, TaskSpec, load_task, parse_spec, parse_specs
from lunaris.tasks.scoring import encode_pair, encode_task, evaluate_tasks, format_table, score, task_result

__all__ = ["EMBEDDED", "EMBEDDED_NAME", "Example", "Task", "TaskSpec", "encode_pair", "encode_task", "evaluate_tasks",
           "format_table", "load_task", "parse_spec", "parse_specs", "score", "task_result"]
