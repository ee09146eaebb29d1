"""Atomic file writes: a temporary file beside the target, flushed, then renamed over it.

A kill at any moment leaves either the old file or the new one, never a half-written one.
"""

import json
import os
from pathlib import Path


def atomic_write_text(path, text: str) -> None:
    path = Path(path)
    temp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(temp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(temp, path)


def atomic_write_json(path, data) -> None:
    atomic_write_text(path, json.dumps(data, indent=2, default=str) + "\n")
