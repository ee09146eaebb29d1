"""Several nodes and elastic restarts, proven on one machine (CPU, gloo), against an uninterrupted 2-process run.

* Two torchrun "nodes" (`--nnodes=2 --nproc_per_node=1`) share one out_dir, as nodes share a filesystem. The
  run is stopped by SIGTERM to the training process of one node (every rank agrees to stop after the same
  step, rank 0 saves, every process exits 0), then relaunched on both nodes with static rendezvous: the
  ranks may land on other nodes than before, and the losses are still exactly those of the reference.
* `torchrun --max-restarts=1`: a worker killed with SIGKILL is restarted by torchrun together with its peer,
  and the run continues from the last checkpoint with exactly the reference's losses.

`LUNARIS_TEST_PAUSE_IN_SAVE=<step>:<seconds>` holds rank 0 inside that step's save (the other rank waits at
the save's barrier), so the signal lands at a known point instead of racing a fast run.
"""

import os
import re
import signal
import sys
from pathlib import Path

import pytest
import torch
from processes import TORCHRUN, Processes, free_port, multinode_c10d_args, multinode_static_args, worker_ranks

pytestmark = [pytest.mark.slow, pytest.mark.skipif(not sys.platform.startswith("linux"),
                                                    reason="finds torchrun's workers through /proc (Linux)")]
FINAL_STEP = 12
# torchrun's agents share their TCPStore with the workers (torch >= 2.5); after a restart the workers can read
# the previous attempt's gloo/NCCL addresses from it and fail to connect (pytorch/pytorch#135712). A store per
# attempt avoids that.
ELASTIC_ENV = {"TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"}


def run_keys(**overrides) -> dict:
    """Dropout on (every rank's generators must resume), constant LR (--max_steps never changes the schedule)."""
    keys = dict(model={"dropout": 0.1}, warmup_steps=0, learning_rate=3e-3, min_lr=3e-3, max_steps=FINAL_STEP,
                batch_size=4, save_interval=2, keep_last=0)
    keys.update(overrides)
    return keys


@pytest.fixture(scope="module")
def reference(tmp_path_factory, token_data, helpers):
    """The uninterrupted run: `torchrun --standalone --nproc_per_node=2`, FINAL_STEP steps."""
    root = tmp_path_factory.mktemp("reference")
    config = helpers.write_yaml(helpers.make_config(token_data, root / "run", **run_keys()), root / "run.yaml")
    done = helpers.torchrun(["-m", "lunaris", "train", str(config)], timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    losses = helpers.losses_by_step(root / "run")
    assert sorted(losses) == list(range(1, FINAL_STEP + 1))
    return losses, helpers.final_weights(root / "run")


# ---- processes ------------------------------------------------------------------------------------

class Launches(Processes):
    """torchrun launches from the repository root (see tests/processes.py: every wait kills and reports all)."""

    def __init__(self, directory: Path, helpers):
        super().__init__(directory, cwd=helpers.REPO)
        self.helpers = helpers

    def torchrun(self, name: str, args: list, **env):
        return self.start(name, [*TORCHRUN, *args], env=self.helpers.subprocess_env(**env))


def latest_step(out_dir: Path) -> int:
    return torch.load(out_dir / "latest_checkpoint.pt", map_location="cpu", weights_only=True)["step"]


def assert_same_as_reference(out_dir: Path, reference, helpers) -> None:
    reference_losses, reference_weights = reference
    losses = helpers.losses_by_step(out_dir)
    assert sorted(losses) == list(range(1, FINAL_STEP + 1))
    assert losses == reference_losses
    helpers.assert_weights_close(helpers.final_weights(out_dir), reference_weights)


# ---- tests ----------------------------------------------------------------------------------------

def test_two_nodes_sigterm_on_one_node_then_resume_on_both_exactly(tmp_path, token_data, helpers, reference):
    out = tmp_path / "shared" / "run"      # the filesystem both nodes see
    config = helpers.write_yaml(helpers.make_config(token_data, out, **run_keys()), tmp_path / "run.yaml")
    launches = Launches(tmp_path, helpers)
    try:
        # 1. two nodes, c10d rendezvous (ranks are given in the order the nodes join)
        port = free_port()
        nodes = [launches.torchrun(f"node{i}", multinode_c10d_args(port, config), LUNARIS_TEST_PAUSE_IN_SAVE="4:3")
                 for i in range(2)]
        launches.wait_for(lambda: list(out.glob(".ckpt_4.pt.tmp-*")), "the step-4 save", nodes)
        workers = worker_ranks(nodes[1].pid)
        assert len(workers) == 1, workers
        os.kill(next(iter(workers.values())), signal.SIGTERM)    # the training process of the second node
        launches.wait_all(nodes)
        output = "".join(launches.output(n) for n in nodes)
        assert [n.returncode for n in nodes] == [0, 0], output[-6000:]
        stopped = latest_step(out)
        assert 5 <= stopped < FINAL_STEP, output[-6000:]        # 5 unless the signal missed the 3 s pause
        assert f"stopped at step {stopped}" in output
        assert (out / f"ckpt_{stopped}.pt").exists()

        # 2. both nodes again, static rendezvous: node_rank 0 now holds rank 0
        port = free_port()
        nodes = [launches.torchrun(f"resume{i}", multinode_static_args(port, i, config)) for i in range(2)]
        launches.wait_all(nodes)
        output = "".join(launches.output(n) for n in nodes)
        assert [n.returncode for n in nodes] == [0, 0], output[-6000:]
        assert "resuming from" in output and f"at step {stopped}" in output
    finally:
        launches.close()
    assert_same_as_reference(out, reference, helpers)


def test_elastic_restart_after_sigkill_resumes_exactly(tmp_path, token_data, helpers, reference):
    out = tmp_path / "run"
    config = helpers.write_yaml(helpers.make_config(token_data, out, **run_keys()), tmp_path / "run.yaml")
    launches = Launches(tmp_path, helpers)
    try:
        agent = launches.torchrun("elastic", ["--standalone", "--nproc_per_node=2", "--max-restarts=1",
                                           "-m", "lunaris", "train", str(config)],
                               LUNARIS_TEST_PAUSE_IN_SAVE="6:3", **ELASTIC_ENV)
        # rank 0 writes ckpt_6 (held 3 s before its rename) while rank 1 waits at the save's barrier
        launches.wait_for(lambda: list(out.glob(".ckpt_6.pt.tmp-*")), "the step-6 save", [agent])
        assert (out / "ckpt_4.pt").exists()
        workers = worker_ranks(agent.pid)
        assert sorted(workers) == [0, 1], workers
        os.kill(workers[1], signal.SIGKILL)
        launches.wait_all([agent])
        output = launches.output(agent)
        assert agent.returncode == 0, output[-6000:]
        resumed = re.findall(r"resuming from .* at step (\d+)", output)
        assert len(resumed) == 1 and int(resumed[0]) in (4, 6), output[-6000:]   # one restart, from a checkpoint
    finally:
        launches.close()
    assert_same_as_reference(out, reference, helpers)
