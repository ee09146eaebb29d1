"""Atomic file writes: a temporary file beside the target, flushed to disk, then renamed over it.

A kill at any moment leaves either the old file or the new one, never a half-written one. Every write of
Lunaris that replaces a user's file (checkpoints, metrics, manifests, shards, plots, exports) goes through here.

Here too is the one judgement of whether a failed write means the disk cannot take the file (full, over quota,
read-only, no permission), and the message that says so (`disk_full_error`, `on_full_disk`): whatever the writing
library raised, the cause is found in the exception's chain.
"""

import errno
import json
import os
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Optional

from lunaris.errors import DiskError

EDQUOT = getattr(errno, "EDQUOT", 122)  # Linux's number where the platform's errno lacks it

# errno -> (what happened, what the user does about it)
DISK_PROBLEMS = {
    errno.ENOSPC: ("the disk is full", "Free disk space"),
    EDQUOT: ("the disk quota is used up", "Free space within the quota (or have it raised)"),
    errno.EROFS: ("the filesystem is read-only", "Make the filesystem writable again"),
    errno.EACCES: ("permission denied", "Make the directory writable (check its owner and permissions)"),
    errno.EPERM: ("permission denied", "Make the directory writable (check its owner and permissions)"),
}


def disk_problem(exc: BaseException) -> Optional[OSError]:
    """The OSError that says the disk cannot take more (ENOSPC, EDQUOT, EROFS, EACCES, EPERM) among `exc`, its
    causes and contexts, and the failures it carries; None when the failure is something else.

    Libraries rarely let the OSError through: torch.save's zip writer raises a RuntimeError ("unexpected pos")
    whose context is the OSError; torch.distributed.checkpoint raises a CheckpointException whose `failures`
    ({rank: (exception, traceback)}) hold each rank's.
    """
    todo, seen = [exc], set()
    while todo:
        current = todo.pop(0)
        if current is None or id(current) in seen:
            continue
        seen.add(id(current))
        if isinstance(current, OSError) and current.errno in DISK_PROBLEMS:
            return current
        todo += [current.__cause__, current.__context__, *getattr(current, "exceptions", ())]  # ExceptionGroup
        failures = getattr(current, "failures", None)
        if isinstance(failures, dict):
            todo += [f[0] if isinstance(f, tuple) else f for f in failures.values()]
    return None


def disk_full_error(exc: BaseException, path, kept: str = "", then: str = "run the same command again"
                    ) -> Optional[DiskError]:
    """The one message for a write of `path` that failed because the disk is full, over quota or read-only (None
    when `exc` is another failure): what happened, `kept` (what is safe on disk now), what to do, then `then`."""
    problem = disk_problem(exc)
    if problem is None:
        return None
    what, remedy = DISK_PROBLEMS[problem.errno]
    reason = problem.strerror or os.strerror(problem.errno)
    return DiskError(" ".join(part for part in (f"could not write {path}: {what} ({reason}).", kept,
                                                f"{remedy}, then {then}.") if part))


@contextmanager
def on_full_disk(path, note: Callable[[], tuple] = lambda: ("", "run the same command again")):
    """`with on_full_disk(path, note): write...`: a write that fails for lack of space (or of write access) raises
    the DiskError of `disk_full_error`, with `note()` = (kept, then), asked only then; any other failure passes
    through unchanged."""
    try:
        yield
    except Exception as exc:
        if disk_problem(exc) is None:
            raise
        raise disk_full_error(exc, path, *note()) from None


def temp_path(final) -> Path:
    """The hidden temporary name beside `final` that this process writes before renaming."""
    final = Path(final)
    return final.with_name(f".{final.name}.tmp-{os.getpid()}")


def fsync_dir(directory) -> None:
    """Make a rename in `directory` durable (a no-op where directories cannot be opened)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextmanager
def atomic_open(path, mode: str = "w", before_rename=None):
    """`with atomic_open(path, "wb") as f: ...` writes `path` atomically; on an error the target is untouched.

    `before_rename` is called after the data is on disk and before the rename (tests pause there to kill). A write
    that fails for lack of space or of write access raises the DiskError of `disk_full_error` (a writer that knows
    more, such as what a run resumes from, rebuilds it with `on_full_disk`); any other failure passes unchanged.
    """
    path = Path(path)
    temp = temp_path(path)
    encoding = None if "b" in mode else "utf-8"
    existed = path.exists()
    try:
        with open(temp, mode, encoding=encoding) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        if before_rename is not None:
            before_rename()
        os.replace(temp, path)
    except BaseException as exc:
        _remove(temp)
        error = disk_full_error(exc, path, f"The previous {path.name} is unchanged." if existed else "")
        if error is None:
            raise
        raise error from exc
    fsync_dir(path.parent)


def _remove(temp: Path) -> None:
    """Delete a half-written temporary file; where even that fails (a filesystem turned read-only), the next
    start of the run removes it."""
    try:
        temp.unlink(missing_ok=True)
    except OSError:
        pass


def atomic_write_text(path, text: str) -> None:
    with atomic_open(path, "w") as f:
        f.write(text)


def atomic_write_json(path, data) -> None:
    atomic_write_text(path, json.dumps(data, indent=2, default=str) + "\n")


def atomic_link(target, link) -> None:
    """Make `link` name the same file as `target`, atomically: a hard link, or a full copy where unsupported."""
    link = Path(link)
    temp = temp_path(link)
    temp.unlink(missing_ok=True)
    try:
        try:
            os.link(target, temp)
        except OSError as exc:  # filesystems without hard links (some network/FUSE mounts): copy instead
            if exc.errno in (errno.ENOSPC, EDQUOT, errno.EROFS):  # nor can a copy be written
                raise
            shutil.copyfile(target, temp)
            with open(temp, "rb+") as f:
                os.fsync(f.fileno())
        os.replace(temp, link)
    except BaseException:
        _remove(temp)
        raise
    fsync_dir(link.parent)


def atomic_symlink(target_name: str, link) -> None:
    link = Path(link)
    temp = temp_path(link)
    temp.unlink(missing_ok=True)
    os.symlink(target_name, temp)
    os.replace(temp, link)
    fsync_dir(link.parent)


def replace_dir(temp, final) -> None:
    """Rename the finished directory `temp` to `final`, replacing an existing `final` only once `temp` is whole.

    Between the two renames the old directory is kept under a hidden name, so a kill leaves one of them.
    """
    temp, final = Path(temp), Path(final)
    if final.exists():
        old = final.with_name(f".{final.name}.tmp-old-{os.getpid()}")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
        os.replace(temp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(temp, final)
    fsync_dir(final.parent)


def move_into(temp, final, owned=()) -> None:
    """Install the finished directory `temp` as `final`: one rename when `final` does not exist; else file by file
    (each rename atomic), after removing the files named in `owned` that the new contents lack. Other files of an
    existing `final` (a user's notes) stay."""
    temp, final = Path(temp), Path(final)
    if not final.exists():
        os.replace(temp, final)
        fsync_dir(final.parent)
        return
    for name in owned:
        if not (temp / name).exists():
            (final / name).unlink(missing_ok=True)
    for path in temp.iterdir():
        os.replace(path, final / path.name)
    fsync_dir(final)
