"""Child processes that cannot hang the test suite.

Every process a test starts runs in a session of its own with its output in a file; every wait has a timeout that
kills the whole tree (torchrun agents start each worker in yet another session, so the tree is found through /proc,
not the process group) and reports the output of every process the test started, not only the one that timed out.
`leftover_processes()` lists descendants of the test process that are still running: the suite reports them
(tests/conftest.py) instead of letting them load the machine or hold ports for the next test.
"""

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

TAIL = 3000  # characters of each process's output in a report


def children_by_parent() -> dict:
    """{parent pid: [child pids]} of every process (Linux /proc; empty elsewhere)."""
    tree: dict = {}
    proc = Path("/proc")
    if not proc.is_dir():
        return tree
    for entry in proc.iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            parent = int(stat.rsplit(")", 1)[1].split()[1])   # field 4, after "pid (comm) state"
            tree.setdefault(parent, []).append(int(entry.name))
    return tree


def descendants(pid: int) -> list:
    """Every process below `pid`, children first."""
    tree, found, todo = children_by_parent(), [], [pid]
    while todo:
        for child in tree.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def command_line(pid: int) -> str:
    try:
        return (Path("/proc") / str(pid) / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return "?"


def kill_tree(pid: int) -> None:
    """SIGKILL `pid` and everything below it (found before the kill: orphans are re-parented)."""
    for target in [pid, *descendants(pid)]:
        try:
            os.kill(target, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass


def python_stacks(pids: list) -> list:
    """`py-spy dump` of each pid (every thread's Python stack), or nothing when py-spy is not installed."""
    spy = shutil.which("py-spy")
    if spy is None:
        return []
    dumps = []
    for pid in pids:
        try:
            dump = subprocess.run([spy, "dump", "--pid", str(pid)], capture_output=True, text=True, timeout=30)
            dumps.append(f"--- stacks of {pid} ({command_line(pid)[:120]}):\n{dump.stdout or dump.stderr}")
        except (OSError, subprocess.TimeoutExpired) as error:
            dumps.append(f"--- stacks of {pid}: py-spy failed: {error}")
    return dumps


# Helpers that live as long as the test process, on purpose: inductor's compile-worker pool, and multiprocessing's
# resource tracker and fork server (started by the first torch.multiprocessing spawn).
EXPECTED = ("compile_worker", "multiprocessing.resource_tracker", "multiprocessing.forkserver")


def leftover_processes() -> list:
    """(pid, command line) of this process's descendants that are still running (zombies and torch's own
    long-lived compile workers excluded)."""
    left = []
    for pid in descendants(os.getpid()):
        try:
            state = (Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        line = command_line(pid)
        if state != "Z" and not any(name in line for name in EXPECTED):
            left.append((pid, line))
    return left


class Processes:
    """Processes started by one test, each with its output in NAME.out; `close()` kills whatever is left."""

    def __init__(self, directory: Path, env: dict = None, cwd=None):
        self.directory, self.env, self.cwd, self.started = Path(directory), env, cwd, []

    def start(self, name: str, command: list, env: dict = None) -> subprocess.Popen:
        """Start `command`: stdout in NAME.out, stderr in NAME.err."""
        out_path, err_path = self.directory / f"{name}.out", self.directory / f"{name}.err"
        with open(out_path, "w") as out, open(err_path, "w") as err:
            process = subprocess.Popen(command, cwd=self.cwd, env=env or self.env, stdout=out, stderr=err,
                                       start_new_session=True)
        process.name, process.out_path, process.err_path = name, out_path, err_path
        self.started.append(process)
        return process

    @staticmethod
    def stdout(process) -> str:
        return process.out_path.read_text(errors="replace")

    @staticmethod
    def stderr(process) -> str:
        return process.err_path.read_text(errors="replace")

    @classmethod
    def output(cls, process) -> str:
        return cls.stdout(process) + cls.stderr(process)

    @staticmethod
    def last_output_time(process) -> float:
        """When the process last wrote anything (wall-clock seconds, as time.time())."""
        return max(process.out_path.stat().st_mtime, process.err_path.stat().st_mtime)

    def report(self, headline: str) -> str:
        """The headline and the tail of every started process's output; for a process still running, the Python
        stacks of it and its descendants (when py-spy is installed) so that a hang says where it hangs."""
        parts = [headline]
        for process in self.started:
            status = "running" if process.poll() is None else f"exit {process.returncode}"
            parts.append(f"----- {process.name} ({status}):\n{self.output(process)[-TAIL:]}")
            if process.poll() is None:
                parts.extend(python_stacks([process.pid, *descendants(process.pid)]))
        return "\n".join(parts)

    def fail(self, headline: str):
        """Kill every process still running, then raise AssertionError with everyone's output."""
        text = self.report(headline)
        self.close()
        raise AssertionError(text)

    def wait_all(self, processes=None, timeout: float = 180.0) -> None:
        deadline = time.monotonic() + timeout
        for process in processes or self.started:
            try:
                process.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                self.fail(f"{process.name} still running after {timeout:.0f} s (every process killed):")

    def wait_for(self, predicate, what: str, processes=None, timeout: float = 180.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if predicate():
                return
            for process in processes or self.started:
                if process.poll() is not None:
                    self.fail(f"{process.name} exited ({process.returncode}) before {what}:")
            time.sleep(0.05)
        self.fail(f"timed out after {timeout:.0f} s waiting for {what}:")

    def close(self) -> None:
        for process in self.started:
            if process.poll() is None:
                kill_tree(process.pid)
                process.wait(timeout=30)
            for pid in descendants(process.pid):   # workers of an agent that exited on its own
                kill_tree(pid)


def run(command: list, timeout: float, cwd=None, env=None, directory: Path = None) -> subprocess.CompletedProcess:
    """subprocess.run with output captured; on timeout the whole tree is killed and the output is in the error."""
    with tempfile.TemporaryDirectory(dir=directory) as scratch:
        processes = Processes(Path(scratch), env=env, cwd=cwd)
        process = processes.start("command", command)
        processes.wait_all([process], timeout)
        stdout, stderr = processes.stdout(process), processes.stderr(process)
        processes.close()
    return subprocess.CompletedProcess(command, process.returncode, stdout=stdout, stderr=stderr)


# ---- torchrun on one machine: "nodes" on 127.0.0.1 ----------------------------------------------------

TORCHRUN = [sys.executable, "-m", "torch.distributed.run"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def multinode_c10d_args(port: int, config: Path) -> list:
    """One node's command line; the host running the rendezvous store would be node0's address."""
    return ["--nnodes=2", "--nproc_per_node=1", "--rdzv_id=lunaris-test", "--rdzv_backend=c10d",
            f"--rdzv_endpoint=127.0.0.1:{port}", "-m", "lunaris", "train", str(config)]


def multinode_static_args(port: int, node_rank: int, config: Path) -> list:
    return ["--nnodes=2", "--nproc_per_node=1", f"--node_rank={node_rank}", "--master_addr=127.0.0.1",
            f"--master_port={port}", "-m", "lunaris", "train", str(config)]


def worker_ranks(agent_pid: int) -> dict:
    """{RANK: pid} of the training processes a torchrun agent started."""
    ranks = {}
    for pid in children_by_parent().get(agent_pid, []):
        try:
            variables = (Path("/proc") / str(pid) / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        env = dict(v.split(b"=", 1) for v in variables if b"=" in v)
        if b"RANK" in env and b"TORCHELASTIC_RUN_ID" in env:
            ranks[int(env[b"RANK"])] = pid
    return ranks
