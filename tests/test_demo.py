"""`lunaris demo` learns: a shortened run ends clearly below the unigram baseline, and a rerun resumes."""

import json

import torch

from lunaris.demo import run_demo


def test_short_demo_beats_the_unigram_baseline_and_resumes(tmp_path):
    torch.set_num_threads(2)  # a real (if small) model: both cores help here, unlike the tiny ones elsewhere
    lines = []
    summary = run_demo(tmp_path, max_steps=90, corpus_mb=2.0, echo=lines.append, task_examples=100)
    assert summary["steps"] == 90
    assert summary["val_loss"] < summary["unigram_baseline"] - 0.5, summary
    assert summary["sample"] and summary["plot"].endswith("training.png")
    # task accuracy next to the loss (the embedded task, whose functions the demo corpus leaves out)
    assert summary["task_chance"] == 0.25 and 0 <= summary["task_accuracy"] <= 1 and summary["task_accuracy_stderr"]
    assert any("python_next_line" in line and "chance 0.25" in line for line in lines)
    assert any("lunaris generate --checkpoint" in line for line in lines)
    # running it again reuses the data and continues the same run instead of starting over
    lines.clear()
    again = run_demo(tmp_path, max_steps=92, corpus_mb=2.0, echo=lines.append, task_examples=20)
    assert any("reusing" in line for line in lines)
    assert again["steps"] == 92
    first_steps = [json.loads(line)["step"] for line in (tmp_path / "dense/metrics.jsonl").read_text().splitlines()]
    assert first_steps == sorted(first_steps) and first_steps[0] > 0 and first_steps[-1] == 92
