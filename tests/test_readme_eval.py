"""The README's Evaluate section runs: every block marked `eval-example`, against a tiny checkpoint at
runs/demo/dense and task files in every published layout, built here (the real files are downloads)."""

import json
import re
import shlex
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from conftest import byte_level_tokenizer, tiny_model_config
from test_tasks import HELLASWAG_ROWS, save_run, write_jsonl

from lunaris import LunarisCodex, TrainConfig
from lunaris.cli import main

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()
BLOCKS = [(lang, body) for lang, info, body in re.findall(r"```(\w+)([^\n]*)\n(.*?)```", README, re.S)
          if "eval-example" in info.split()]


def commands() -> list:
    """The command lines of the bash blocks, continuation lines joined."""
    lines = []
    for lang, body in BLOCKS:
        if lang == "bash":
            lines += [shlex.split(line, comments=True) for line in body.replace("\\\n", " ").splitlines()
                      if line.strip()]
    return lines


@pytest.fixture
def workspace(tmp_path, monkeypatch):
    """A directory holding what the README's commands name: the demo run, task files, the YAML blocks."""
    monkeypatch.chdir(tmp_path)
    model = LunarisCodex(tiny_model_config(vocab_size=320, max_seq_len=128)).eval()
    save_run(tmp_path / "runs/demo/dense", model)
    data = tmp_path / "data"
    (data / "piqa").mkdir(parents=True)
    write_jsonl(data / "hellaswag_val.jsonl", HELLASWAG_ROWS)
    write_jsonl(data / "ARC-Easy-Test.jsonl", [
        {"id": "1", "question": {"stem": "Which is a gas?", "choices": [{"text": "ice", "label": "A"},
                                 {"text": "steam", "label": "B"}]}, "answerKey": "B"}])
    write_jsonl(data / "piqa/valid.jsonl", [{"goal": "Open a jar", "sol1": "Twist the lid.", "sol2": "Eat it."}])
    (data / "piqa/valid-labels.lst").write_text("0\n")
    write_jsonl(data / "lambada_test.jsonl", [{"text": "the quick brown fox jumps over the lazy dog"}])
    write_jsonl(data / "quiz.jsonl", [{"question": f"What is {i} + 1?", "options": [str(i + 1), str(i + 2), "no"],
                                       "letters": ["A", "B", "C"], "answer": "A"} for i in range(6)])
    for lang, body in BLOCKS:  # the YAML blocks that name their file on their first line
        name = body.split()[1].rstrip(":")
        if lang == "yaml" and body.startswith("# ") and name.endswith(".yaml"):
            path = tmp_path / name
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(body)
    return tmp_path


def test_the_readme_eval_commands_and_config_run(workspace, capsys):
    lunaris_lines = [c for c in commands() if c[0] == "lunaris"]
    assert len(lunaris_lines) >= 3
    for line in lunaris_lines:
        assert main(line[1:]) == 0, line
    out = capsys.readouterr().out
    assert "| python_next_line | 400 |" in out
    tasks = json.loads((workspace / "tasks.json").read_text())["tasks"]
    assert set(tasks) == {"hellaswag", "arc_easy", "piqa", "lambada", "quiz"}
    assert tasks["lambada"]["kind"] == "cloze" and tasks["quiz"]["chance"] == pytest.approx(1 / 3)

    # the eval_tasks config: a short run that scores them
    (fragment,) = [yaml.safe_load(body) for lang, body in BLOCKS if lang == "yaml" and not body.startswith("# ")]
    shards = workspace / "shards"
    shards.mkdir()
    np.save(shards / "shard_0.npy", np.random.default_rng(0).integers(1, 300, 4000).astype(np.uint16))
    byte_level_tokenizer().save(str(shards / "tokenizer.json"))
    config = TrainConfig.from_dict({**fragment, "model": dict(tiny_model_config(vocab_size=320, max_seq_len=128)
                                                               .__dict__), "data_dir": str(shards),
                                    "out_dir": str(workspace / "run"), "max_steps": 2, "warmup_steps": 1,
                                    "batch_size": 2, "num_workers": 0, "device": "cpu"})
    from lunaris.train import train
    train(config)
    last = json.loads((workspace / "run/metrics.jsonl").read_text().splitlines()[-1])
    assert "eval/python_next_line/acc" in last and "eval/hellaswag/acc_norm" in last


def test_the_readme_lm_eval_commands_run(workspace, monkeypatch, capsys):
    pytest.importorskip("lm_eval", reason="lm-evaluation-harness is not installed: pip install 'lunaris[eval]'")
    pytest.importorskip("transformers", reason="the hf model needs transformers: pip install 'lunaris[hf]'")
    import datasets
    from lm_eval.tasks import TaskManager

    from lunaris.lm_eval_adapter import main as lm_eval_main
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", workspace / "datasets-cache")
    # lm_eval's command indexes its thousands of built-in task files first (~15 s); these commands use local tasks
    default_init = TaskManager.__init__
    monkeypatch.setattr(TaskManager, "__init__", lambda self, *a, **k: default_init(self, *a, **{
        **k, "include_defaults": False}))
    monkeypatch.setattr(sys, "argv", list(sys.argv))
    results = []
    for line in commands():
        if line[:2] == ["lunaris", "export"]:
            assert main(line[1:]) == 0, line
        elif line[:3] == ["python", "-m", "lunaris.lm_eval_adapter"] or line[0] == "lm_eval":
            args = line[3:] if line[0] == "python" else line[1:]
            if "--model" in args and args[args.index("--model") + 1] in ("lunaris", "hf"):
                lm_eval_main(args)
                table = capsys.readouterr().out
                results.append(re.findall(r"\|(acc(?:_norm)?)\s*\|[^|]*\|\s*([\d.]+)", table))
    assert len(results) == 2 and results[0] == results[1] and len(results[0]) == 2, results
