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


def test_the_evaluation_line_says_what_was_read_and_a_rerun_names_the_demos_own_flag(tmp_path, capsys):
    """The README's scaled-down demo (`lunaris demo --max-steps 6 --corpus-mb 0.4`), then the same command again."""
    lines = []
    run_demo(tmp_path, max_steps=6, corpus_mb=0.4, echo=lines.append, task_examples=20)
    evaluation = next(line for line in lines if line.startswith("[3/5]"))
    split = int(evaluation.split(": ")[1].split(" tokens")[0].replace(",", ""))
    batches = 8 * 16 * 256                          # the preset's eval_batches of batch_size x max_seq_len
    if split <= batches:                            # the trainer read the whole split, once
        assert "(the trainer's val_loss above read the same tokens: the split is smaller than its 8 batches of " \
               "16 x 256)" in evaluation, evaluation
    else:
        assert f"(the trainer's val_loss above used its first 8 batches, {batches:,} tokens)" in evaluation
    assert "val_loss" in capsys.readouterr().out    # the trainer printed the val_loss the line refers to

    lines.clear()
    summary = run_demo(tmp_path, max_steps=6, corpus_mb=0.4, echo=lines.append, task_examples=20)
    printed = capsys.readouterr().out
    assert summary["steps"] == 6
    assert f"[2/5] train: {tmp_path / 'dense'} is already trained to step 6 (to continue it: lunaris demo --out " \
           f"{tmp_path} --max-steps 12)" in lines
    evaluation = next(line for line in lines if line.startswith("[3/5]"))
    assert evaluation == f"[3/5] evaluate on the whole validation split: {split:,} tokens"  # no val_loss "above"
    assert "val_loss" not in printed and "--max_steps" not in printed + "\n".join(lines)
