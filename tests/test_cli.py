"""Command-line parsing: options that take values, exit statuses."""

import json

from lunaris.cli import main


def test_include_takes_one_glob_so_the_source_after_it_is_not_swallowed(tmp_path, capsys):
    src = tmp_path / "src"
    src.mkdir()
    (src / "a.py").write_text("def f():\n    return 1\n" * 50)
    (src / "b.txt").write_text("plain text " * 100)
    (src / "c.md").write_text("# notes " * 100)
    out = tmp_path / "out"
    assert main(["prepare", "--include", "*.py", str(src), "--out", str(out), "--vocab-size", "300",
                 "--val-tokens", "0", "--no-progress"]) == 0
    assert json.loads((out / "manifest.json").read_text())["splits"]["train"]["tokens"] > 0
    # several globs: the flag repeated, or comma-separated
    assert main(["prepare", "--include", "*.py,*.txt", "--include", "*.md", str(src), "--out", str(tmp_path / "o2"),
                 "--vocab-size", "300", "--val-tokens", "0", "--no-progress"]) == 0
    # the old multi-value form is a clear error that says what to write instead
    assert main(["prepare", "--include", "*.py", "*.txt", str(src), "--out", str(tmp_path / "o3"),
                 "--vocab-size", "300"]) == 2
    assert "looks like a file glob" in capsys.readouterr().err


def test_bare_lunaris_prints_usage_and_exits_2(capsys):
    assert main([]) == 2
    assert "usage: lunaris" in capsys.readouterr().err


def test_small_models_generate_and_evaluate_on_one_thread_unless_told(tmp_path):
    import dataclasses

    import torch
    from conftest import tiny_model_config

    from lunaris import LunarisCodex, TrainConfig
    from lunaris.generate import load_model
    from lunaris.runtime import SMALL_MODEL_PARAMS, inference_threads
    model = LunarisCodex(tiny_model_config())
    torch.save({"model": model.state_dict(), "step": 1,
                "config": dataclasses.asdict(TrainConfig(model=model.config))}, tmp_path / "ckpt_1.pt")
    torch.set_num_threads(2)
    load_model(tmp_path / "ckpt_1.pt", device="cpu")
    assert torch.get_num_threads() == 1            # a tiny model: one thread
    load_model(tmp_path / "ckpt_1.pt", device="cpu", threads=2)
    assert torch.get_num_threads() == 2            # --threads wins
    cpu = torch.device("cpu")
    assert inference_threads(None, SMALL_MODEL_PARAMS, cpu) is None  # a large model: torch's choice
    assert inference_threads(None, 1000, torch.device("meta")) is None  # not a CPU
