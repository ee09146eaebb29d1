"""Atomic file writes: a temporary file beside the target, flushed to disk, then renamed over it.

A kill at any moment leaves either the old file or the new one, never a half-written one. Every write of
Lunaris that replaces a user's file (checkpoints, metrics, manifests, shards, plots, exports) goes through here.
"""

import json
import os
import shutil
from contextlib import contextmanager
from pathlib import Path


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

    `before_rename` is called after the data is on disk and before the rename (tests pause there to kill).
    """
    path = Path(path)
    temp = temp_path(path)
    encoding = None if "b" in mode else "utf-8"
    try:
        with open(temp, mode, encoding=encoding) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        if before_rename is not None:
            before_rename()
        os.replace(temp, path)
    except BaseException:
        temp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


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
        os.link(target, temp)
    except OSError:  # filesystems without hard links (some network/FUSE mounts): copy instead
        shutil.copyfile(target, temp)
        with open(temp, "rb+") as f:
            os.fsync(f.fileno())
    os.replace(temp, link)
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
