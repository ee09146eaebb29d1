"""A finished distributed run exits: two-node launches, repeated while another process keeps a core busy.

A run that trained, saved and printed "finished" but never exits is the worst failure on a cluster: the job looks
done, holds its GPUs until the scheduler's time limit, and nothing after it in the job script starts. Each launch
below must exit within EXIT_SECONDS of its last output line. The hang this guards against (a DDP reducer freed after
the process group, whose gloo destructor then waited with the GIL held for a worker thread that needed the GIL;
see distributed.release_ddp) struck about one launch in ten under load, at random, and only at exit.
"""

import os
import signal
import sys
import time

import processes
import pytest
from processes import TORCHRUN, Processes, free_port, multinode_c10d_args, multinode_static_args, worker_ranks

pytestmark = [pytest.mark.slow, pytest.mark.skipif(not sys.platform.startswith("linux"),
                                                    reason="finds torchrun's workers through /proc (Linux)")]
CYCLE_SCRIPT = """
import faulthandler, gc, sys, torch, torch.distributed as dist
from lunaris.train.distributed import DistInfo, teardown_distributed, wrap_ddp
faulthandler.dump_traceback_later(90, exit=True)    # a deadlock: print where, exit 1
dist.init_process_group("gloo")
info = DistInfo(dist.get_rank(), 0, 2, torch.device("cpu"))
for cycle in range(int(sys.argv[1])):
    group = dist.new_group(backend="gloo")
    ddp = torch.nn.parallel.DistributedDataParallel(torch.nn.Linear(8, 8), process_group=group)
    for _ in range(3):
        ddp(torch.randn(4, 8)).sum().backward()
        dist.all_reduce(torch.ones(3), group=group)
    teardown_distributed(True, info.rank, ddp=ddp, group=group)
    del ddp, group
    if cycle % 20 == 0:
        gc.collect()
print("cycles done", flush=True)
"""
PAIRS = 5            # each: a c10d launch from scratch, then a static-rendezvous launch that resumes it
EXIT_SECONDS = 30.0  # from a launch's last output line, once it printed "finished", to the exit of all its nodes
RUN_SECONDS = 300.0  # to reach "finished": start-up alone (imports, rendezvous) takes tens of seconds under load


def wait_for_exit(launches: Processes, nodes: list, what: str) -> float:
    """Wait until every node of a launch exits; fail (killing all) when one runs EXIT_SECONDS past its last line
    after the run printed "finished" (or RUN_SECONDS in all). Returns the longest time from the launch's last
    output to its exit."""
    started = time.time()
    while any(node.poll() is None for node in nodes):
        finished = any("finished" in launches.output(node) for node in nodes)
        quiet = time.time() - max(launches.last_output_time(node) for node in nodes)
        if finished and quiet > EXIT_SECONDS:
            launches.fail(f"{what}: still running {quiet:.0f} s after its last output line:")
        if time.time() - started > RUN_SECONDS:
            launches.fail(f"{what}: not finished after {RUN_SECONDS:.0f} s:")
        time.sleep(0.2)
    waited = time.time() - max(launches.last_output_time(node) for node in nodes)
    codes = [node.returncode for node in nodes]
    if codes != [0] * len(nodes):
        launches.fail(f"{what}: exit codes {codes}:")
    return waited


def test_two_node_launches_exit_promptly_under_load(tmp_path, token_data, helpers):
    config = helpers.write_yaml(helpers.make_config(token_data, tmp_path / "run", max_steps=2, save_interval=2,
                                                    keep_last=1), tmp_path / "run.yaml")
    launches = Processes(tmp_path, cwd=helpers.REPO, env=helpers.subprocess_env())
    launches.start("cpu-hog", [sys.executable, "-c", "while True: pass"])
    slowest = 0.0
    try:
        for pair in range(PAIRS):
            out = tmp_path / f"run{pair}"
            port = free_port()
            nodes = [launches.start(f"c10d{pair}-node{i}", [*TORCHRUN, *multinode_c10d_args(port, config),
                                                             f"--out_dir={out}"]) for i in range(2)]
            slowest = max(slowest, wait_for_exit(launches, nodes, f"c10d launch {pair}"))
            port = free_port()
            nodes = [launches.start(f"static{pair}-node{i}", [*TORCHRUN, *multinode_static_args(port, i, config),
                                                               f"--out_dir={out}", "--max_steps=4"])
                     for i in range(2)]
            slowest = max(slowest, wait_for_exit(launches, nodes, f"static resume {pair}"))
            assert "resuming from" in "".join(launches.output(node) for node in nodes)
    finally:
        launches.close()
    print(f"{2 * PAIRS} launches; the slowest exited {slowest:.1f} s after its last output line")


def test_a_killed_process_ends_the_other_node_in_one_line(tmp_path, token_data, helpers):
    """SIGKILL to rank 1 while rank 0 saves: rank 0 learns at its next collective, says so in one line, exits 1."""
    config = helpers.write_yaml(helpers.make_config(token_data, tmp_path / "run", max_steps=40, save_interval=2,
                                                    keep_last=1), tmp_path / "run.yaml")
    launches = Processes(tmp_path, cwd=helpers.REPO, env=helpers.subprocess_env(LUNARIS_TEST_PAUSE_IN_SAVE="4:3"))
    try:
        port = free_port()
        nodes = [launches.start(f"node{i}", [*TORCHRUN, *multinode_c10d_args(port, config)]) for i in range(2)]
        launches.wait_for(lambda: list((tmp_path / "run").glob(".ckpt_4.pt.tmp-*")), "the step-4 save", nodes)
        ranks = {rank: pid for node in nodes for rank, pid in worker_ranks(node.pid).items()}
        os.kill(ranks[1], signal.SIGKILL)
        for node in nodes:
            launches.wait_all([node], timeout=EXIT_SECONDS + 30)
        output = "".join(launches.output(node) for node in nodes)
        assert [node.returncode != 0 for node in nodes] == [True, True], output[-6000:]
        assert "error: rank 0: lost contact with another process of the run" in output, output[-6000:]
        assert "finished" not in output
    finally:
        launches.close()


def test_leaving_a_process_group_never_deadlocks(tmp_path, helpers):
    """The root cause, reproduced fast: 150 times, two processes make a gloo group, train a DDP step on it and
    leave it as the trainer does. Freeing the DDP reducer after the group (the old order) deadlocked within 150
    cycles in each of two tries; teardown_distributed frees it first."""
    script = tmp_path / "cycles.py"
    script.write_text(CYCLE_SCRIPT)
    done = processes.run([*TORCHRUN, "--standalone", "--nproc_per_node=2", str(script), "150"], 240,
                         cwd=tmp_path, env=helpers.subprocess_env())
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert done.stdout.count("cycles done") == 2
