"""`lunaris selftest`: passes on a working install, fails (exit 1) when a model cannot learn."""

import torch

from lunaris import selftest
from lunaris.cli import main


def test_selftest_passes_and_reports_the_machine(capsys):
    status = main(["selftest", "--no-compile", "--steps", "20"])
    out = capsys.readouterr().out
    assert status == 0, out
    assert f"torch {torch.__version__}" in out and "device cpu" in out
    for name in ("dense", "moc-mha", "moc-simple"):
        line = next(line for line in out.splitlines() if f" {name} " in line)
        assert line.lstrip().startswith("ok") and "generated 8 tokens" in line, line
    assert "distributed  backends: gloo; gloo all-reduce ok" in out
    assert "selftest passed" in out


def test_selftest_fails_when_training_does_not_reduce_the_loss(capsys, monkeypatch):
    monkeypatch.setattr(torch.optim.AdamW, "step", lambda self, closure=None: None)  # a broken optimizer
    monkeypatch.setattr(selftest, "MODELS", {"dense": {}, "moc-simple": selftest.MODELS["moc-simple"]})
    assert main(["selftest", "--no-compile", "--steps", "6"]) == 1
    out = capsys.readouterr().out
    assert "FAIL dense" in out and "loss did not fall" in out and "selftest FAILED (dense, moc-simple)" in out


def test_compile_check_reports_a_missing_compiler_without_failing(monkeypatch):
    def broken_compile(fn, *args, **kwargs):
        raise RuntimeError("no C++ compiler found\nsecond line")
    monkeypatch.setattr(torch, "compile", broken_compile)
    report = selftest.check_compile(torch.device("cpu"))
    assert report.startswith("unavailable (RuntimeError: no C++ compiler found)") and "falls back to eager" in report


def test_selftest_rejects_too_few_steps(capsys):
    assert main(["selftest", "--steps", "2"]) == 2
    assert "--steps must be at least 4" in capsys.readouterr().err
