"""The output of `lunaris prepare`: token shards per split, built in a staging directory and installed whole.

**Splits.** Documents are routed whole: the first ones, up to `--val-tokens`, form the validation split,
the rest the training split (which stops at `--max-tokens`, also on a document boundary). Without
`--val-tokens` the budget adapts to the corpus (`AdaptiveSplitter`): 5% of it, at most 1,000,000 tokens.
Each split is a directory of `shard_00000.npy`, ... holding `--shard-tokens` tokens each (the last one
fewer), uint16 for vocabularies up to 65,536 ids, uint32 above; a shard's sha256 is computed while it is
written.

**Atomicity.** Everything is built in a hidden staging directory next to `--out` and moved into place
only when complete; each shard is written under a temporary name and renamed once it is on disk, and
the manifest is written last. An interrupted run therefore never leaves a directory or shard that looks
valid, and an existing `--out` is replaced only once the new one is complete.
"""

from __future__ import annotations

import hashlib
import math
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from lunaris.data.shards import MASK_DIR
from lunaris.fileio import atomic_open, replace_dir


class _HashingWriter:
    """File wrapper that hashes what is written, so a shard's sha256 costs no second read."""

    def __init__(self, f):
        self.f, self.sha = f, hashlib.sha256()

    def write(self, data):
        self.sha.update(data)
        return self.f.write(data)


class ShardWriter:
    """Buffers tokens of one split and writes `shard_00000.npy`, ... of `shard_tokens` tokens each."""

    def __init__(self, directory: Path, dtype, shard_tokens: int):
        self.directory, self.dtype, self.shard_tokens = directory, np.dtype(dtype), shard_tokens
        self.buffer = np.empty(shard_tokens, dtype=self.dtype)  # filled up to self.fill
        self.fill, self.shards, self.tokens, self.documents, self.bytes, self.max_id = 0, [], 0, 0, 0, -1

    def add(self, ids: np.ndarray, documents: int, nbytes: int) -> None:
        self.tokens, self.documents = self.tokens + len(ids), self.documents + documents
        self.bytes += nbytes
        if len(ids):
            self.max_id = max(self.max_id, int(ids.max()))
        while len(ids):
            take = min(len(ids), self.shard_tokens - self.fill)
            self.buffer[self.fill:self.fill + take] = ids[:take]
            self.fill, ids = self.fill + take, ids[take:]
            if self.fill == self.shard_tokens:
                self._write()

    def _write(self) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        name = f"shard_{len(self.shards):05d}.npy"
        with atomic_open(self.directory / name, "wb") as f:  # the shard appears under its name only when complete
            out = _HashingWriter(f)
            np.lib.format.write_array(out, self.buffer[:self.fill], allow_pickle=False)
        self.shards.append({"file": name, "tokens": int(self.fill), "sha256": out.sha.hexdigest()})
        self.fill = 0

    def close(self) -> dict:
        """Write the last, partial shard; returns the split's manifest entry."""
        if self.fill:
            self._write()
        self.buffer = None
        return {"documents": self.documents, "tokens": self.tokens, "bytes": self.bytes,
                "max_token_id": self.max_id, "shards": self.shards}


class MaskedShardWriter:
    """Token shards and their loss-mask shards (uint8, in `loss_mask/`) for one split of conversations.

    Takes the packer's rows (n, 3): token, loss mask, conversation start; the same interface as ShardWriter, so the
    splitters route whole windows of them. Both shard sets break at the same token counts.
    """

    def __init__(self, directory: Path, dtype, shard_tokens: int):
        self.ids = ShardWriter(directory, dtype, shard_tokens)
        self.mask = ShardWriter(directory / MASK_DIR, np.uint8, shard_tokens)
        self.conversations = self.trained = 0

    @property
    def tokens(self) -> int:
        return self.ids.tokens

    def add(self, rows: np.ndarray, documents: int, nbytes: int) -> None:
        self.ids.add(rows[:, 0].astype(self.ids.dtype), documents, nbytes)
        self.mask.add(rows[:, 1].astype(np.uint8), documents, 0)
        self.conversations += int(rows[:, 2].sum())
        self.trained += int(rows[:, 1].sum())

    def close(self) -> dict:
        """The split's manifest entry: ShardWriter's, `documents` counting conversations, plus `windows` and
        `loss_mask` (its shards and the number of trained tokens)."""
        entry, masks = self.ids.close(), self.mask.close()
        entry.update(documents=self.conversations, windows=masks["documents"],
                     loss_mask={"dir": MASK_DIR, "trained_tokens": self.trained, "shards": masks["shards"]})
        return entry


def _documents_within(starts: np.ndarray, budget: int) -> int:
    """How many documents start while fewer than `budget` tokens are taken (so the last one may cross it)."""
    return int(np.searchsorted(starts, budget, side="left")) if budget > 0 else 0


def _offset(starts: np.ndarray, n_docs: int, n_ids: int) -> int:
    """The token offset where document `n_docs` starts (the end of the batch when it has no more)."""
    return int(starts[n_docs]) if n_docs < len(starts) else n_ids


class TrainValSplitter:
    """Routes whole documents to the val writer until it holds `val_tokens`, then to train."""

    def __init__(self, val: ShardWriter, train: ShardWriter, val_tokens: int, max_tokens: int | None):
        self.val, self.train, self.val_tokens, self.max_tokens = val, train, val_tokens, max_tokens

    @property
    def full(self) -> bool:
        return self.max_tokens is not None and self.train.tokens >= self.max_tokens

    def add(self, ids: np.ndarray, lengths: np.ndarray, sizes: np.ndarray) -> int:
        """Write a batch; returns how many of its documents were kept (fewer once --max-tokens is reached).

        A document goes to val while val is below its budget when the document starts, so val ends
        on a whole document; the same rule ends train at --max-tokens.
        """
        starts = np.cumsum(lengths) - lengths  # (n_docs,) offset of each document in `ids`
        n_val = _documents_within(starts, self.val_tokens - self.val.tokens)
        cut = _offset(starts, n_val, len(ids))
        self.val.add(ids[:cut], n_val, int(sizes[:n_val].sum()))
        return n_val + self._add_train(ids[cut:], lengths[n_val:], sizes[n_val:])

    def _add_train(self, ids: np.ndarray, lengths: np.ndarray, sizes: np.ndarray) -> int:
        starts = np.cumsum(lengths) - lengths
        n_keep = len(lengths)
        if self.max_tokens is not None:
            n_keep = _documents_within(starts, self.max_tokens - self.train.tokens)
        self.train.add(ids[:_offset(starts, n_keep, len(ids))], n_keep, int(sizes[:n_keep].sum()))
        return n_keep

    def finish(self) -> None:
        """Called once after the last batch; the split is already written."""


class AdaptiveSplitter(TrainValSplitter):
    """The default split: `fraction` of the corpus for validation, at most `cap` tokens, whole documents.

    The corpus size is known only at the end, so the first documents, up to `cap` tokens, are held back in
    memory (at most a few MB) while the rest goes to train; `finish` then gives val the first of them up
    to the budget and appends the others to train. A corpus over cap / fraction tokens keeps exactly the
    split a fixed `--val-tokens cap` gives. Under --max-tokens M at most M·fraction/(1 - fraction) is held
    back, which is the whole budget of a corpus that reaches M: train still ends at M. Train never ends
    empty while there are two documents.
    """

    def __init__(self, val: ShardWriter, train: ShardWriter, fraction: float, cap: int, max_tokens: int | None):
        hold = cap if max_tokens is None else min(cap, math.ceil(max_tokens * fraction / (1 - fraction)))
        super().__init__(val, train, hold, max_tokens)
        self.fraction = fraction
        self.held, self.held_tokens = [], 0  # [(ids, lengths, sizes)] of the first documents, in order

    def add(self, ids: np.ndarray, lengths: np.ndarray, sizes: np.ndarray) -> int:
        starts = np.cumsum(lengths) - lengths
        n_held = _documents_within(starts, self.val_tokens - self.held_tokens)
        cut = _offset(starts, n_held, len(ids))
        if n_held:
            self.held.append((ids[:cut].copy(), lengths[:n_held].copy(), sizes[:n_held].copy()))
            self.held_tokens += cut
        return n_held + self._add_train(ids[cut:], lengths[n_held:], sizes[n_held:])

    def finish(self) -> None:
        """Decide the budget (`val_tokens` from now on; at most what was held back), write the held documents."""
        self.val_tokens = min(self.val_tokens, math.ceil(self.fraction * (self.held_tokens + self.train.tokens)))
        if not self.held:
            return
        ids, lengths, sizes = (np.concatenate(parts) for parts in zip(*self.held))
        self.held = []
        starts = np.cumsum(lengths) - lengths
        n_val = _documents_within(starts, self.val_tokens)
        if self.train.tokens == 0:
            n_val = min(n_val, len(lengths) - 1)  # a tiny corpus: at least one document trains
        cut = _offset(starts, n_val, len(ids))
        self.val.add(ids[:cut], n_val, int(sizes[:n_val].sum()))
        self.train.add(ids[cut:], len(lengths) - n_val, int(sizes[n_val:].sum()))


@contextmanager
def staging_dir(out: Path) -> Iterator[Path]:
    """A new hidden directory beside `out` to build the output in; removed on exit unless installed."""
    out.parent.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".partial", dir=out.parent))
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(stage, 0o777 & ~umask)  # mkdtemp's private 0700 would otherwise become the output's mode
        yield stage
    finally:
        if stage.exists():
            shutil.rmtree(stage, ignore_errors=True)


def install(stage: Path, out: Path) -> None:
    """Move the finished staging directory to `out`, replacing an old one only now."""
    replace_dir(stage, out)
