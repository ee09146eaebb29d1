"""Real processes, real signals: SIGKILL mid-save, a double Ctrl-C, SIGTERM, and exact resumes after each.

One `lunaris train` run is interrupted three ways and finished by a fourth process; its per-step
losses must equal an uninterrupted run's exactly (dropout on, data loader worker processes on).
"""

import signal
import sys
import time

import pytest
import torch
from processes import Processes, kill_tree

from lunaris.train import train

pytestmark = pytest.mark.slow
FINAL_STEP = 16


def latest_step(out_dir) -> int:
    return torch.load(out_dir / "latest_checkpoint.pt", map_location="cpu", weights_only=True)["step"]


def test_kill_during_save_double_ctrl_c_and_sigterm_all_resume_exactly(tmp_path, train_config, helpers):
    out = tmp_path / "run"
    # constant LR: --max_steps at the end does not change the schedule of the steps before it
    keys = dict(model={"dropout": 0.1}, warmup_steps=0, learning_rate=3e-3, min_lr=3e-3, save_interval=2,
                keep_last=0, max_steps=400, num_workers=1, persistent_workers=True)
    config = helpers.write_yaml(train_config(out, **keys), tmp_path / "run.yaml")
    command = [sys.executable, "-m", "lunaris", "train", str(config)]
    runs = Processes(tmp_path)

    def start(name, pause=None, extra=()):
        env = helpers.subprocess_env(**({"LUNARIS_TEST_PAUSE_IN_SAVE": pause} if pause else {}))
        return runs.start(name, [*command, *extra], env=env)

    try:
        interrupt_three_ways(out, runs, start, helpers)
    finally:
        runs.close()

    # the interrupted run computed exactly what an uninterrupted one does
    reference = tmp_path / "reference"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # like the subprocesses (OMP_NUM_THREADS=1): same float summation order
    try:
        train(train_config(reference, **{**keys, "max_steps": FINAL_STEP, "num_workers": 0}))
    finally:
        torch.set_num_threads(threads)
    interrupted, uninterrupted = helpers.losses_by_step(out), helpers.losses_by_step(reference)
    assert sorted(interrupted) == list(range(1, FINAL_STEP + 1))
    assert interrupted == uninterrupted
    helpers.assert_weights_close(helpers.final_weights(out), helpers.final_weights(reference))


def interrupt_three_ways(out, runs, start, helpers) -> None:
    """SIGKILL mid-save, a double Ctrl-C, SIGTERM, then a plain restart to the end."""
    # 1. SIGKILL while the step-4 checkpoint is written (temporary file complete, not yet renamed)
    p = start("kill", pause="4:120")
    runs.wait_for(lambda: list(out.glob(".ckpt_4.pt.tmp-*")), "the step-4 temporary file", [p])
    kill_tree(p.pid)
    p.wait(timeout=30)
    assert not (out / "ckpt_4.pt").exists()
    assert latest_step(out) == 2                                      # still loadable, weights_only

    # 2. Ctrl-C during the step-6 save lets the save go on; a second Ctrl-C aborts
    p = start("ctrl-c", pause="6:120")
    runs.wait_for(lambda: list(out.glob(".ckpt_6.pt.tmp-*")), "the step-6 temporary file", [p])
    p.send_signal(signal.SIGINT)
    time.sleep(0.5)
    assert p.poll() is None                                           # the first Ctrl-C does not abort
    p.send_signal(signal.SIGINT)
    runs.wait_all([p], timeout=60)
    stdout, stderr = runs.stdout(p), runs.stderr(p)
    assert p.returncode == 130, stderr[-3000:]
    assert "resuming from" in stdout and "at step 2" in stdout        # step 1 resumed from the survivor
    assert not list(out.glob(".ckpt_6*")) and not (out / "ckpt_6.pt").exists()
    assert latest_step(out) == 4

    # 3. SIGTERM mid-run: finish the step, save, exit 0
    p = start("sigterm")
    runs.wait_for(lambda: max(helpers.losses_by_step(out), default=0) >= 7, "step 7", [p])
    p.send_signal(signal.SIGTERM)
    runs.wait_all([p], timeout=60)
    stdout, stderr = runs.stdout(p), runs.stderr(p)
    assert p.returncode == 0, stderr[-3000:]
    stopped = latest_step(out)
    assert 7 <= stopped < FINAL_STEP and f"stopped at step {stopped}" in stdout
    assert (out / f"ckpt_{stopped}.pt").exists()

    # 4. a plain restart finishes the run
    p = start("finish", extra=[f"--max_steps={FINAL_STEP}"])
    runs.wait_all([p], timeout=120)
    assert p.returncode == 0, runs.stderr(p)[-3000:]
    assert f"at step {stopped}" in runs.stdout(p)
