"""`lunaris demo` learns: a shortened run ends clearly below the unigram baseline, and a rerun resumes."""

import json

import torch

from lunaris.demo import run_demo


def test_short_demo_beats_the_unigram_baseline_and_resumes(tmp_path):
    torch.set_num_threads(2)  # a real (if small) model: both cores help here, unlike the tiny ones elsewhere
    lines = []
    summary = run_demo(tmp_path, max_steps=90, corpus_mb=2.0, echo=lines.append)
    assert summary["steps"] == 90
    assert summary["val_loss"] < summary["unigram_baseline"] - 0.5, summary
    assert summary["sample"] and summary["plot"].endswith("training.png")
    assert any("lunaris generate --checkpoint" in line for line in lines)
    # running it again reuses the data and continues the same run instead of starting over
    lines.clear()
    again = run_demo(tmp_path, max_steps=92, corpus_mb=2.0, echo=lines.append)
    assert any("reusing" in line for line in lines)
    assert again["steps"] == 92
    first_steps = [json.loads(line)["step"] for line in (tmp_path / "dense/metrics.jsonl").read_text().splitlines()]
    assert first_steps == sorted(first_steps) and first_steps[0] > 0 and first_steps[-1] == 92
