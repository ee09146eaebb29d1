"""Command-line parsing: options that take values, exit statuses, argument errors, help without torch."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from lunaris.cli import main

ROOT = Path(__file__).resolve().parent.parent


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


# ---- lunaris --help starts without torch ----------------------------------------------------------------------

def command_names() -> list:
    from lunaris.cli import build_parser
    (commands,) = [action for action in build_parser()._actions if action.dest == "command"]
    return sorted(commands.choices)


HELP_WITHOUT_TORCH = """
import sys, runpy
sys.argv = ["lunaris", *sys.argv[1:]]
try:
    runpy.run_module("lunaris", run_name="__main__")
except SystemExit as exit:
    assert exit.code in (0, None), exit.code
print("torch imported:", "torch" in sys.modules)
"""


@pytest.mark.parametrize("argv", [["--help"]] + [[name, "--help"] for name in command_names()],
                         ids=lambda argv: " ".join(argv))
def test_help_does_not_import_torch(argv):
    result = subprocess.run([sys.executable, "-c", HELP_WITHOUT_TORCH, *argv], capture_output=True, text=True,
                            timeout=120, env={**os.environ, "PYTHONPATH": os.pathsep.join(
                                [str(ROOT / "src"), os.environ.get("PYTHONPATH", "")])})
    assert result.returncode == 0, result.stderr
    assert "usage: lunaris" in result.stdout and "torch imported: False" in result.stdout, result.stdout


def test_every_command_is_in_the_help_test():
    assert {"analyze", "bench", "config", "demo", "eval", "export", "generate", "plan", "plot", "prepare", "selftest",
            "sweep", "train"} <= set(command_names())


# ---- argument errors: the command's own usage -----------------------------------------------------------------

@pytest.mark.parametrize("argv, command", [
    (["analyze", "--checkpoint", "RUN", "--bogus"], "analyze"),
    (["eval", "--checkpoint", "RUN", "--bogus"], "eval"),
    (["plot", "RUN", "--bogus", "1"], "plot"),
    (["generate"], "generate"),                                  # a required option missing
    (["analyze"], "analyze"),                                    # neither CKPT nor --checkpoint
    (["analyze", "a", "--checkpoint", "b"], "analyze"),          # two different paths
    (["export", "--checkpoint", "RUN", "--out", "o", "--dtype", "fp64"], "export"),
    (["plan", "demo-cpu", "--gpus", "0"], "plan"),
    (["plan", "demo-cpu", "--gpu", "h100", "--gpu-memory", "80"], "plan"),   # one or the other
])
def test_an_argument_error_prints_the_commands_usage(argv, command, capsys):
    with pytest.raises(SystemExit) as exit:
        main(argv)
    err = capsys.readouterr().err
    assert exit.value.code == 2
    assert err.startswith(f"usage: lunaris {command} [-h]") and f"lunaris {command}: error:" in err, err
    assert "COMMAND ..." not in err


def test_unknown_options_before_the_command_are_the_top_levels_error(capsys):
    with pytest.raises(SystemExit):
        main(["--bogus", "eval", "--checkpoint", "RUN"])
    err = capsys.readouterr().err
    assert err.startswith("usage: lunaris [-h] [--version] COMMAND") and "unrecognized arguments: --bogus" in err


def test_config_overrides_still_reach_the_commands_that_take_them(capsys):
    assert main(["config", str(ROOT / "configs/demo-cpu.yaml"), "--learning_rate=0.0123", "--model.n_layers=3"]) == 0
    out = capsys.readouterr().out
    assert "0.0123" in out and "n_layers: 3" in out
    assert main(["config", str(ROOT / "configs/demo-cpu.yaml"), "--learning_rat=1"]) == 2
    err = capsys.readouterr().err
    assert "learning_rat" in err and "usage:" not in err      # the config's error, not argparse's


# ---- --checkpoint for analyze and plot --------------------------------------------------------------------------

def test_analyze_and_plot_take_checkpoint_as_well_as_the_positional_path():
    from lunaris.cli import build_parser
    parse = build_parser().parse_args
    assert parse(["analyze", "--checkpoint", "runs/a"]).checkpoint == "runs/a"
    assert parse(["analyze", "runs/a"]).checkpoint == "runs/a"
    assert parse(["analyze", "runs/a", "--checkpoint", "runs/a"]).checkpoint == "runs/a"
    assert parse(["plot", "--checkpoint", "runs/a", "--out", "x.png"]).checkpoint == "runs/a"
    assert parse(["plot", "runs/a"]).checkpoint == "runs/a"


def test_plot_with_a_checkpoint_plots_its_run(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    from test_plot import write_metrics
    write_metrics(tmp_path, moc=False)
    (tmp_path / "ckpt_90.pt").write_bytes(b"")         # a checkpoint of the run: its directory is plotted
    for source in (["--checkpoint", str(tmp_path / "ckpt_90.pt")], ["--checkpoint", str(tmp_path)],
                   [str(tmp_path / "metrics.jsonl")]):
        out = tmp_path / "curves.png"
        out.unlink(missing_ok=True)
        assert main(["plot", *source, "--out", str(out)]) == 0
        assert out.stat().st_size > 1000 and f"wrote {out}" in capsys.readouterr().out


def test_output_piped_into_a_reader_that_stops_ends_quietly():
    """`lunaris config --reference | head -1`: the reader closes the pipe; no traceback, no 'Exception ignored'."""
    result = subprocess.run(["bash", "-c", f"'{sys.executable}' -m lunaris config --reference | head -1"],
                            capture_output=True, text=True, timeout=120,
                            env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1] / "src")})
    assert result.stdout.startswith("**Model") and result.stderr == "", result.stderr
