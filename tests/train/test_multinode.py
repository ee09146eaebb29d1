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
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

pytestmark = [pytest.mark.slow, pytest.mark.skipif(not sys.platform.startswith("linux"),
                                                    reason="finds torchrun's workers through /proc (Linux)")]
FINAL_STEP = 12
TORCHRUN = [sys.executable, "-m", "torch.distributed.run"]
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

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def child_pids(pid: int) -> list:
    """Processes whose parent is `pid` (torchrun starts each worker in a session of its own)."""
    children = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:   # field 4, after "pid (comm) state"
                children.append(int(entry.name))
    return children


def worker_ranks(agent_pid: int) -> dict:
    """{RANK: pid} of the training processes a torchrun agent started."""
    ranks = {}
    for pid in child_pids(agent_pid):
        try:
            variables = (Path("/proc") / str(pid) / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        env = dict(v.split(b"=", 1) for v in variables if b"=" in v)
        if b"RANK" in env and b"TORCHELASTIC_RUN_ID" in env:
            ranks[int(env[b"RANK"])] = pid
    return ranks


class Launches:
    """torchrun processes with output in files; `close()` kills whatever is left (agents and their workers)."""

    def __init__(self, directory: Path, helpers):
        self.directory, self.helpers, self.processes = directory, helpers, []

    def start(self, name: str, args: list, **env):
        stdout, stderr = self.directory / f"{name}.out", self.directory / f"{name}.err"
        with open(stdout, "w") as out, open(stderr, "w") as err:
            process = subprocess.Popen([*TORCHRUN, *args], cwd=self.helpers.REPO,
                                       env=self.helpers.subprocess_env(**env), stdout=out, stderr=err)
        process.name, process.stdout_path, process.stderr_path = name, stdout, stderr
        self.processes.append(process)
        return process

    @staticmethod
    def output(process) -> str:
        return process.stdout_path.read_text() + process.stderr_path.read_text()

    def wait_all(self, processes, timeout: float = 180.0) -> None:
        deadline = time.monotonic() + timeout
        for process in processes:
            try:
                process.wait(timeout=max(1.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                raise AssertionError(f"{process.name} still running after {timeout:.0f} s:\n"
                                     + "\n".join(self.output(p)[-3000:] for p in processes)) from None

    def wait_for(self, predicate, processes, what: str, timeout: float = 180.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if predicate():
                return
            for process in processes:
                if process.poll() is not None:
                    raise AssertionError(f"{process.name} exited ({process.returncode}) before {what}:\n"
                                         + self.output(process)[-4000:])
            time.sleep(0.05)
        raise AssertionError(f"timed out waiting for {what}")

    def close(self) -> None:
        for process in self.processes:
            if process.poll() is None:
                workers = child_pids(process.pid)
                process.kill()
                process.wait(timeout=30)
                for pid in workers:
                    try:
                        os.killpg(pid, signal.SIGKILL)   # each worker leads its own session
                    except (ProcessLookupError, PermissionError):
                        pass


def latest_step(out_dir: Path) -> int:
    return torch.load(out_dir / "latest_checkpoint.pt", map_location="cpu", weights_only=True)["step"]


def assert_same_as_reference(out_dir: Path, reference, helpers) -> None:
    reference_losses, reference_weights = reference
    losses = helpers.losses_by_step(out_dir)
    assert sorted(losses) == list(range(1, FINAL_STEP + 1))
    assert losses == reference_losses
    helpers.assert_weights_close(helpers.final_weights(out_dir), reference_weights)


# ---- tests ----------------------------------------------------------------------------------------

def multinode_c10d_args(port: int, config: Path) -> list:
    """One node's command line; the host running the rendezvous store would be node0's address."""
    return ["--nnodes=2", "--nproc_per_node=1", "--rdzv_id=lunaris-test", "--rdzv_backend=c10d",
            f"--rdzv_endpoint=127.0.0.1:{port}", "-m", "lunaris", "train", str(config)]


def multinode_static_args(port: int, node_rank: int, config: Path) -> list:
    return ["--nnodes=2", "--nproc_per_node=1", f"--node_rank={node_rank}", "--master_addr=127.0.0.1",
            f"--master_port={port}", "-m", "lunaris", "train", str(config)]


def test_two_nodes_sigterm_on_one_node_then_resume_on_both_exactly(tmp_path, token_data, helpers, reference):
    out = tmp_path / "shared" / "run"      # the filesystem both nodes see
    config = helpers.write_yaml(helpers.make_config(token_data, out, **run_keys()), tmp_path / "run.yaml")
    launches = Launches(tmp_path, helpers)
    try:
        # 1. two nodes, c10d rendezvous (ranks are given in the order the nodes join)
        port = free_port()
        nodes = [launches.start(f"node{i}", multinode_c10d_args(port, config), LUNARIS_TEST_PAUSE_IN_SAVE="4:3")
                 for i in range(2)]
        launches.wait_for(lambda: list(out.glob(".ckpt_4.pt.tmp-*")), nodes, "the step-4 save")
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
        nodes = [launches.start(f"resume{i}", multinode_static_args(port, i, config)) for i in range(2)]
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
        agent = launches.start("elastic", ["--standalone", "--nproc_per_node=2", "--max-restarts=1",
                                           "-m", "lunaris", "train", str(config)],
                               LUNARIS_TEST_PAUSE_IN_SAVE="6:3", **ELASTIC_ENV)
        # rank 0 writes ckpt_6 (held 3 s before its rename) while rank 1 waits at the save's barrier
        launches.wait_for(lambda: list(out.glob(".ckpt_6.pt.tmp-*")), [agent], "the step-6 save")
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
