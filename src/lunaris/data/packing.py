"""Conversations packed into windows of exactly `window` tokens, none of them cut by a window boundary.

Training reads a split as one stream in windows: sample i is tokens `[i·L, i·L + L + 1)` (DESIGN.md, "Token
stream"). A conversation that crossed a boundary would be trained in two pieces, the second without the question
it answers. So `lunaris prepare` fills windows of L = `--seq-len` tokens with whole conversations, each followed by
the end-of-text id, and fills what is left of a window with end-of-text ids (loss mask 0): then every window of a
run with `max_seq_len` L (or a multiple of it) starts with a conversation and holds only whole ones.

- `packed` (the default): several conversations share a window; the model must then see them as separate
  documents (`model.attention_mask: document`, which the end-of-text id drives), and little compute is spent on
  padding (first fit over a few open windows).
- `padded`: one conversation per window; plain causal attention never sees two, at the cost of the padding.

A window is emitted as `rows` of shape (L, 3), int64: token id, loss mask, and 1 where a conversation starts (so
the writer can count them), with the UTF-8 bytes of its trained text.
"""

from __future__ import annotations

import numpy as np

from lunaris.errors import ConfigError

LAYOUTS = ("packed", "padded")
OPEN_WINDOWS = 16  # windows kept open for first fit; the oldest is emitted when none has room


class WindowPacker:
    def __init__(self, window: int, eot_id: int, layout: str = "packed"):
        self.window, self.eot_id = window, eot_id
        self.limit = 1 if layout == "padded" else None      # conversations per window
        self.open: list = []                                  # [[parts, tokens used, bytes]]
        self.tokens = self.padding = self.windows = 0

    def add(self, ids: np.ndarray, mask: np.ndarray, nbytes: int) -> list:
        """Place one conversation (ids, mask without the end-of-text id; len(ids) < window); returns the windows
        this completed, as (rows, bytes)."""
        n = len(ids) + 1
        done = []
        target = next((w for w in self.open if w[1] + n <= self.window), None)
        if target is None:
            if len(self.open) >= OPEN_WINDOWS:
                done.append(self._emit(self.open.pop(0)))
            target = [[], 0, 0]
            self.open.append(target)
        target[0].append((ids, mask))
        target[1] += n
        target[2] += nbytes
        if self.limit is not None and len(target[0]) >= self.limit:
            self.open.remove(target)
            done.append(self._emit(target))
        return done

    def finish(self) -> list:
        """The windows still open, in the order they were opened."""
        done = [self._emit(w) for w in self.open]
        self.open = []
        return done

    def _emit(self, entry: list) -> tuple:
        parts, used, nbytes = entry
        rows = np.zeros((self.window, 3), dtype=np.int64)    # (L, 3): token, loss mask, conversation start
        rows[:, 0] = self.eot_id
        at = 0
        for ids, mask in parts:
            rows[at:at + len(ids), 0] = ids                   # its end-of-text id (mask 0) is already there
            rows[at:at + len(ids), 1] = mask
            rows[at, 2] = 1
            at += len(ids) + 1
        self.tokens += self.window
        self.padding += self.window - used
        self.windows += 1
        return rows, nbytes


def check_windows(train_dir, model) -> None:
    """Before training on conversations (a manifest with a `chat` entry): windows of model.max_seq_len must hold
    whole ones (a multiple of the prepared window), and several in a window must not see each other (document
    masking). Raises ConfigError saying what to set."""
    from lunaris.data.shards import read_manifest
    chat = (read_manifest(train_dir) or {}).get("chat")
    if not chat:
        return
    window, length = chat["seq_len"], model.max_seq_len
    if length % window:
        raise ConfigError(f"the conversations of {train_dir} were packed into windows of {window} tokens, and "
                          f"model.max_seq_len {length} would cut them at other places: set model.max_seq_len to "
                          f"{window} (or a multiple), or prepare the data again with --seq-len {length}.")
    shared = chat["layout"] == "packed" or length > window
    if shared and model.attention_mask != "document":
        why = "were packed several to a window" if chat["layout"] == "packed" else \
            f"come one per {window} tokens, several per window of {length}"
        raise ConfigError(f"the conversations of {train_dir} {why}, and with model.attention_mask: "
                          f"{model.attention_mask} each would attend to the ones before it: set "
                          f"model.attention_mask: document (each conversation alone, as at inference), or prepare "
                          f"the data with --chat-layout padded (one per window) and model.max_seq_len {window}.")
