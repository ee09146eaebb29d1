"""`eval_tasks`: downstream task accuracy in the training loop, logged and plotted, and changing nothing else."""

import json

import pytest
from conftest import byte_level_tokenizer

from lunaris.errors import LunarisError
from lunaris.train import Trainer, train
from lunaris.train.logging import format_console_line

MODEL = {"vocab_size": 320, "max_seq_len": 128, "dropout": 0.1}  # the test tokenizer has 300 ids


def quiz_file(path):
    rows = [{"context": f"hello world {i}", "choices": ["the quick fox", "lazy dog", "brown"], "label": i % 3}
            for i in range(5)]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def with_tokenizer(out_dir):
    """A flat shard directory has no tokenizer: the run reads out_dir/tokenizer.json instead."""
    out_dir.mkdir(parents=True, exist_ok=True)
    byte_level_tokenizer().save(str(out_dir / "tokenizer.json"))
    return out_dir


def test_eval_tasks_are_logged_and_training_and_resume_stay_exact(tmp_path, train_config, helpers, capsys):
    tasks = [{"path": "embedded", "limit": 6}, f"quiz={quiz_file(tmp_path / 'quiz.jsonl')}"]
    common = dict(model=MODEL, max_steps=8, warmup_steps=2, save_interval=4, eval_interval=4)
    train(train_config(tmp_path / "plain", **common))
    train(train_config(with_tokenizer(tmp_path / "tasks"), eval_tasks=tasks, **common))
    trainer = Trainer(train_config(with_tokenizer(tmp_path / "resumed"), eval_tasks=tasks, **common))
    original = trainer.train_step
    trainer.train_step = lambda i: (trainer.request_stop("test") if i == 4 else None) or original(i)
    try:
        assert trainer.run().step == 5
    finally:
        trainer.close()
    train(train_config(tmp_path / "resumed", eval_tasks=tasks, **common))

    plain, tasked, resumed = (helpers.read_metrics(tmp_path / d) for d in ("plain", "tasks", "resumed"))
    # scoring tasks consumes no batch and no random number: every loss is the one of the run without them
    assert [r["loss/total"] for r in plain] == [r["loss/total"] for r in tasked] == [r["loss/total"] for r in resumed]
    assert [r.get("val/loss") for r in plain] == [r.get("val/loss") for r in tasked]
    keys = ["eval/python_next_line/acc", "eval/python_next_line/acc_norm", "eval/quiz/acc", "eval/quiz/acc_norm"]
    for runs in (tasked, resumed):
        logged = [r for r in runs if "eval/quiz/acc" in r]
        assert [r["step"] for r in logged] == [4, 8]
        assert all(set(keys) <= set(r) and r["eval/tasks_seconds"] > 0 for r in logged)
        assert all(r[k] in {n / 6 for n in range(7)} for r in logged for k in keys[:2])  # 6 examples each
    assert [[r[k] for k in keys] for r in tasked if "eval/quiz/acc" in r] == \
        [[r[k] for k in keys] for r in resumed if "eval/quiz/acc" in r]
    line = format_console_line(8, 8, tasked[-1])
    assert "acc python_next_line" in line and "quiz" in line and " s)" in line

    from lunaris.plot import panels_for, read_metrics
    panels = dict(panels_for(read_metrics(tmp_path / "tasks")))
    assert panels["task accuracy (eval_tasks)"] == ["eval/python_next_line/acc", "eval/quiz/acc"]


def test_eval_tasks_without_held_out_data_still_run(tmp_path, train_config, helpers):
    train(train_config(with_tokenizer(tmp_path / "run"), model=MODEL, val_data_dir=None, max_steps=2, warmup_steps=1,
                       eval_interval=2, eval_tasks=[str(quiz_file(tmp_path / "quiz.jsonl"))]))
    last = helpers.read_metrics(tmp_path / "run")[-1]
    assert "val/loss" not in last and "eval/quiz/acc" in last


def test_eval_tasks_problems_stop_the_run_before_training(tmp_path, train_config):
    with pytest.raises(LunarisError, match="eval_tasks needs the tokenizer"):
        Trainer(train_config(tmp_path / "a", model=MODEL, eval_tasks=["embedded"]))
    with pytest.raises(LunarisError, match="missing.jsonl does not exist"):
        Trainer(train_config(with_tokenizer(tmp_path / "b"), model=MODEL, eval_tasks=["x=missing.jsonl"]))
    with pytest.raises(LunarisError, match="more than the model's context"):  # a 32-token model, 80-character lines
        Trainer(train_config(with_tokenizer(tmp_path / "c"), model={"vocab_size": 320}, eval_tasks=["embedded"]))
