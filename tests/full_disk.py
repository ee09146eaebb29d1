"""Disks that fill: a real small filesystem (tmpfs) made full at a chosen moment, and files that fail the way a full
disk makes them fail (in this process, or in child processes through `sitecustomize`).

`small_disk(directory)` mounts a tmpfs of a few MB (root only; None where mounting is not allowed), `fill(disk, leave)`
takes all its space but `leave` bytes. `failing_writes(fragment, room, at)` makes every file opened under a path that
contains `fragment` take `room` bytes and then raise OSError(ENOSPC): in `write` (torch.save's zip writer turns that
into a RuntimeError with the OSError as its context) or in `flush` (a plain OSError, as a buffered write's flush).
`child_env(env, tmp, ...)` does the same in child processes (torchrun workers) through a `sitecustomize` module.
"""

import builtins
import errno
import io
import os
import subprocess
from contextlib import contextmanager
from pathlib import Path

ENV = "LUNARIS_TEST_FULL_DISK"   # "FRAGMENT|ROOM|AT|RANK;..." (RANK: the only rank that fails, or *)
TESTS = Path(__file__).resolve().parent


class FullDiskFile:
    """`file` on a disk that holds only `room` more bytes (at="write"), or whose buffered data never reaches the
    disk (at="flush")."""

    def __init__(self, file, room: int, at: str, code: int = errno.ENOSPC):
        self.file, self.room, self.at, self.code = file, room, at, code

    def _full(self) -> OSError:
        return OSError(self.code, os.strerror(self.code))

    def write(self, data):
        size = len(data) if isinstance(data, str) else memoryview(data).nbytes
        if self.at == "write" and size > self.room:
            fits = data[:self.room] if isinstance(data, str) else memoryview(data).cast("B")[:self.room]
            self.file.write(fits)  # what fits is written, as by the kernel
            self.room = 0
            raise self._full()
        self.room -= size
        return self.file.write(data)

    def flush(self):
        if self.at == "flush":
            raise self._full()
        return self.file.flush()

    def close(self):
        self.file.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __getattr__(self, name):  # fileno, tell, seek, name, mode, ...
        return getattr(self.file, name)


def _patched_open(real_open, fragment: str, room: int, at: str, code: int = errno.ENOSPC):
    def open_(file, mode="r", *args, **kwargs):
        opened = real_open(file, mode, *args, **kwargs)
        writing = any(flag in mode for flag in "wax+")
        if writing and isinstance(file, (str, os.PathLike)) and fragment in os.fspath(file):
            return FullDiskFile(opened, room, at, code)
        return opened
    return open_


@contextmanager
def failing_writes(monkeypatch, fragment: str, room: int = 0, at: str = "write", code: int = errno.ENOSPC):
    """Files opened for writing under a path containing `fragment` run out of space (or fail with `code`)."""
    real = builtins.open
    patched = _patched_open(real, fragment, room, at, code)
    with monkeypatch.context() as patch:
        patch.setattr(builtins, "open", patched)
        patch.setattr(io, "open", patched)
        yield


def install_from_env() -> None:
    """What the child processes' sitecustomize runs: the specs of `child_env` meant for this process's rank."""
    for spec in filter(None, os.environ.get(ENV, "").split(";")):
        fragment, room, at, rank = spec.split("|")
        if rank in ("*", os.environ.get("RANK", "0")):
            builtins.open = io.open = _patched_open(builtins.open, fragment, int(room), at)


def child_env(env: dict, directory: Path, *specs) -> dict:
    """`env` for child processes whose writes run out of space: each spec is (fragment, room, at, rank), rank an int
    (that rank's process only) or "*" (every process)."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "sitecustomize.py").write_text(
        f"import sys\nsys.path.insert(0, {str(TESTS)!r})\nimport full_disk\nfull_disk.install_from_env()\n")
    return {**env, "PYTHONPATH": os.pathsep.join([str(directory), env.get("PYTHONPATH", "")]),
            ENV: ";".join("|".join(str(part) for part in spec) for spec in specs)}


# ---- a real small disk ------------------------------------------------------------------------------

def small_disk(directory: Path, size: str = "8m"):
    """Mount a tmpfs of `size` at `directory`; None when this process may not (not root, no permission)."""
    if not hasattr(os, "geteuid") or os.geteuid() != 0:
        return None
    directory.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(directory)],
                          capture_output=True, text=True)
    return directory if done.returncode == 0 else None


def unmount(directory: Path) -> None:
    subprocess.run(["umount", "-l", str(directory)], capture_output=True)


def free_bytes(directory: Path) -> int:
    stat = os.statvfs(directory)
    return stat.f_bavail * stat.f_frsize


def fill(directory: Path, leave: int = 0) -> Path:
    """Take all free space of the filesystem of `directory` but `leave` bytes (rounded down to its blocks), in a
    file `ballast` (deleting it gives the space back)."""
    ballast = directory / "ballast"
    size = free_bytes(directory) - leave
    if ballast.exists():
        size += ballast.stat().st_size
        ballast.unlink()
    with open(ballast, "wb") as f:
        os.posix_fallocate(f.fileno(), 0, max(size, 1))
    return ballast
