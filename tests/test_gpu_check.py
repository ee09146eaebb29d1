"""bench/gpu_check.sh, the parts a CPU machine can check: arguments, --dry-run, and stopping early without a GPU
(or without torch) before anything is installed, torch above all."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import processes
import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "bench" / "gpu_check.sh"

pytestmark = pytest.mark.skipif(shutil.which("bash") is None or shutil.which("timeout") is None,
                                reason="needs bash and coreutils' timeout")


@pytest.fixture
def fake_bin(tmp_path):
    """A PATH directory whose `pip`, `pip3` and `python -m pip` only record their arguments (one line per call);
    every other `python` call goes to this interpreter."""
    bin_dir, record = tmp_path / "bin", tmp_path / "pip-calls.txt"
    bin_dir.mkdir()
    for name in ("pip", "pip3"):
        (bin_dir / name).write_text(f'#!/bin/sh\necho "{name} $*" >> "{record}"\nexit 0\n')
    (bin_dir / "python").write_text(
        '#!/bin/sh\n'
        f'if [ "$1" = "-m" ] && [ "$2" = "pip" ]; then echo "python $*" >> "{record}"; exit 0; fi\n'
        f'exec "{sys.executable}" "$@"\n')
    for path in bin_dir.iterdir():
        path.chmod(0o755)
    return bin_dir, record


def run(*args, env=None, cwd=None, timeout=180) -> subprocess.CompletedProcess:
    return processes.run(["bash", str(SCRIPT), *args], timeout, cwd=cwd or ROOT, env=env or dict(os.environ))


def pip_calls(record: Path) -> list:
    return record.read_text().splitlines() if record.exists() else []


def test_help_lists_every_option():
    done = run("--help")
    assert done.returncode == 0, done.stderr
    for option in ("--out DIR", "--skip-tests", "--skip-bench", "--dry-run", "-h, --help", "gpu-check/"):
        assert option in done.stdout, option
    assert run("-h").stdout == done.stdout


@pytest.mark.parametrize("args, message", [(["--bogus"], "unknown option '--bogus'"),
                                           (["--skip-tests", "extra"], "unknown option 'extra'"),
                                           (["--out"], "--out needs a directory")])
def test_bad_arguments_exit_2_with_a_clear_message(args, message):
    done = run(*args)
    assert done.returncode == 2
    assert message in done.stderr and "usage: bench/gpu_check.sh" in done.stderr
    assert done.stdout == ""


def test_dry_run_prints_the_plan_and_runs_nothing(tmp_path, fake_bin):
    bin_dir, record = fake_bin
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    for name in ("torch-2.5.1-cp311-cp311-linux_x86_64.whl", "pytest-8.3.0-py3-none-any.whl"):
        (wheels / name).write_bytes(b"")
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "GPU_CHECK_WHEELS": str(wheels)}
    done = run("--dry-run", "--out", "check-out", "--skip-bench", env=env, cwd=tmp_path, timeout=30)
    assert done.returncode == 0, done.stderr
    plan = done.stdout
    assert "nothing is run" in plan
    for stage in ("1. preflight", "2. install", "3. tests", "4. bench", "5. report"):
        assert stage in plan, stage
    assert f"pip install --no-index --no-deps {wheels / 'pytest-8.3.0-py3-none-any.whl'}" in plan
    assert f"skip {wheels / 'torch-2.5.1-cp311-cp311-linux_x86_64.whl'}: never replaces torch" in plan
    assert f"pip install --no-index --no-deps --no-build-isolation -e {ROOT}" in plan
    assert "pytest tests/cuda" in plan and "4. bench: skipped (--skip-bench)" in plan
    assert str(tmp_path / "check-out" / "report.json") in plan     # --out is relative to the caller
    assert not (tmp_path / "check-out").exists() and pip_calls(record) == []

    full = run("--dry-run", "--skip-tests", env=env, cwd=ROOT, timeout=30).stdout
    assert "3. tests: skipped (--skip-tests)" in full
    assert "lunaris bench --device cuda --sizes 100m" in full and "--sizes 350m" in full
    assert str(ROOT / "gpu-check" / "report.md") in full


def test_without_cuda_it_stops_before_installing_anything(tmp_path, fake_bin):
    import torch
    if torch.cuda.is_available():
        pytest.skip("this machine has a CUDA GPU")
    bin_dir, record = fake_bin
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    (wheels / "torch-2.5.1-cp311-cp311-linux_x86_64.whl").write_bytes(b"")
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "GPU_CHECK_WHEELS": str(wheels)}
    env.pop("PYTHON", None)
    out = tmp_path / "out"
    done = run("--out", str(out), env=env)
    assert done.returncode == 4, done.stdout + done.stderr
    assert "no CUDA GPU" in done.stderr and "Nothing was installed" in done.stderr
    assert pip_calls(record) == []                                 # no pip at all, so never torch
    report = json.loads((out / "report.json").read_text())
    assert [(s["stage"], s["status"]) for s in report["stages"]] == [("preflight", "failed")]
    assert report["machine"]["cuda_available"] is False
    assert "no CUDA GPU" in (out / "report.md").read_text()


def test_without_torch_it_stops_and_never_installs_torch(tmp_path, fake_bin):
    bin_dir, record = fake_bin
    no_torch = tmp_path / "no_torch" / "torch"
    no_torch.mkdir(parents=True)
    (no_torch / "__init__.py").write_text("raise ImportError('No module named torch (test)')\n")
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
           "PYTHONPATH": str(no_torch.parent), "GPU_CHECK_WHEELS": str(tmp_path / "none")}
    env.pop("PYTHON", None)
    done = run("--out", str(tmp_path / "out"), env=env, timeout=60)
    assert done.returncode == 3, done.stdout + done.stderr
    assert "never installs torch" in done.stderr and "Nothing was installed" in done.stderr
    assert not any("torch" in call for call in pip_calls(record)) and pip_calls(record) == []
