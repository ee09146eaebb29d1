"""Token shards on disk, read back as one stream of fixed-length training windows.

Layouts accepted everywhere a data directory is expected:

* a directory made by `lunaris prepare`::

      DIR/manifest.json  DIR/tokenizer.json  DIR/train/shard_00000.npy ...  DIR/val/shard_00000.npy ...

  `DIR` itself means its `train/` split; `DIR/train` or `DIR/val` can also be given directly (the
  manifest one level up is still used to check them);
* a flat directory of `.npy` shards and no manifest (bring your own shards).

Each shard is a 1-D `.npy` array of token ids, uint16 (vocabularies up to 65,536 ids) or uint32.
All shards of a directory, in sorted file-name order, form one token stream of N tokens. With
sequence length L, sample i is the tokens `[i*L, i*L + L + 1)`: `x` the first L, `y` the last L
(neighbouring windows share one token), stitched across shard boundaries. There are
`ceil((N - 1) / L)` samples; only the final one can be incomplete: its missing `x` positions hold
id 0 and its missing targets -1 (ignored by the loss). Padding is applied after the conversion
to int64, so no padding value is ever written into a uint16 array (where -1 would become 65535).

**Loss masks** (fine-tuning data, `lunaris prepare` of conversations): a split directory may hold a
`loss_mask/` subdirectory with one uint8 shard per token shard, of the same name and length: 1 where the
token is trained as a target (the assistant's), 0 where it is not. Windows are cut from it exactly as from the
tokens, and `get_batch` then returns `(x, y, mask)`, mask (B, L) bool for the targets y (padding: False).
A flat directory of shards can carry one the same way.

Manifest layout (`format_version` 1), the fields other commands rely on::

    {"format_version": 1, "vocab_size": V, "model_vocab_size": V rounded up to 64,
     "eot_token": "<|endoftext|>", "eot_id": 0, "dtype": "uint16",
     "tokenizer": "tokenizer.json", "tokenizer_sha256": "...",
     "splits": {"train": {"documents": n, "tokens": n, "bytes": n, "max_token_id": n,
                          "shards": [{"file": "shard_00000.npy", "tokens": n, "sha256": "..."}, ...],
                          "loss_mask": {"dir": "loss_mask", "trained_tokens": n, "shards": [...]}},  # chat only
                "val": {...}},
     "chat": {"seq_len": L, "layout": "packed", "special_tokens": {...}, "bad_rows": {...}, ...},  # chat only
     "sources": [...], "args": {...}, "report": {...}}

Verification levels (`verify=`): `"size"` (default, cheap: the set of shard files and every
shard's token count must match the manifest), `"full"` (also the sha256 of every shard, reading
every byte once: `lunaris prepare` does this implicitly by construction, `lunaris eval` and
`ShardDataset(..., verify="full")` do it explicitly), `"none"` (ignore the manifest's shard list).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from lunaris.errors import DataError
from lunaris.runtime import file_sha256

MANIFEST_NAME = "manifest.json"
MASK_DIR = "loss_mask"
TOKENIZER_NAME = "tokenizer.json"
FORMAT_VERSION = 1
TOKEN_DTYPES = (np.dtype(np.uint8), np.dtype(np.uint16), np.dtype(np.uint32))
VERIFY_LEVELS = ("none", "size", "full")


# ---- locating a data directory's manifest and splits ----------------------------------------------

def _is_prepared_root(path: Path) -> bool:
    return (path / MANIFEST_NAME).is_file() and (path / "train").is_dir()


def _manifest_location(data_dir: Path):
    """(root, split name) of the manifest that describes `data_dir`, or (None, None).

    `data_dir` is either a prepared root (its split is `train`) or a split directory whose parent
    holds the manifest.
    """
    if _is_prepared_root(data_dir):
        return data_dir, "train"
    parent = data_dir.parent
    if (parent / MANIFEST_NAME).is_file() and data_dir.name in ("train", "val"):
        return parent, data_dir.name
    return None, None


def _load_manifest_file(path: Path) -> dict:
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DataError(f"The manifest {path} cannot be read ({exc}). It is written last by `lunaris prepare`; "
                        f"re-run prepare to rebuild the directory, or delete the manifest to use the shards "
                        f"unchecked as a flat directory.") from None
    if not isinstance(manifest, dict) or not isinstance(manifest.get("splits"), dict):
        raise DataError(f"The manifest {path} has no 'splits' mapping, so it was not written by `lunaris prepare` "
                        f"(format_version {FORMAT_VERSION}). Re-run prepare, or delete the manifest to use the "
                        f"shards unchecked as a flat directory.")
    version = manifest.get("format_version")
    if version != FORMAT_VERSION:
        raise DataError(f"The manifest {path} has format_version {version!r}; this version of Lunaris reads "
                        f"format_version {FORMAT_VERSION}. Re-run `lunaris prepare` to rebuild the directory.")
    return manifest


def read_manifest(data_dir) -> dict | None:
    """The manifest describing `data_dir` (a prepared root or one of its splits), or None for a flat directory."""
    root, _ = _manifest_location(Path(data_dir))
    return _load_manifest_file(root / MANIFEST_NAME) if root is not None else None


def split_info(data_dir) -> dict | None:
    """The manifest's entry for the split `data_dir` points at (documents, tokens, bytes, shards), or None."""
    root, split = _manifest_location(Path(data_dir))
    if root is None:
        return None
    return _load_manifest_file(root / MANIFEST_NAME)["splits"].get(split)


def tokenizer_path(data_dir) -> Path | None:
    """The `tokenizer.json` belonging to `data_dir` (prepared root, split, or flat directory), or None."""
    path = Path(data_dir)
    root, _ = _manifest_location(path)
    candidate = (root if root is not None else path) / TOKENIZER_NAME
    return candidate if candidate.is_file() else None


def _require_dir(path: Path, what: str) -> None:
    if not path.exists():
        raise DataError(f"The {what} {path} does not exist. Point it at a directory made by `lunaris prepare` "
                        f"or at a directory of .npy token shards.")
    if not path.is_dir():
        raise DataError(f"The {what} {path} is a file, not a directory. Point it at a directory made by "
                        f"`lunaris prepare` or at a directory of .npy token shards.")


def resolve_data_dirs(data_dir, val_data_dir=None):
    """(train_dir, val_dir or None) for a training run.

    A prepared directory gives `(DIR/train, DIR/val)` (val None if the split is absent); a flat directory
    of shards gives `(DIR, val_data_dir)`. An explicit `val_data_dir` always wins; if it is itself a
    prepared directory its `val/` split is used.
    """
    data_dir = Path(data_dir)
    _require_dir(data_dir, "data_dir")
    if _is_prepared_root(data_dir):
        train_dir, default_val = data_dir / "train", data_dir / "val"
        default_val = default_val if default_val.is_dir() else None
    else:
        train_dir, default_val = data_dir, None
    if val_data_dir is None:
        return train_dir, default_val
    val_dir = Path(val_data_dir)
    _require_dir(val_dir, "val_data_dir")
    if _is_prepared_root(val_dir):
        if not (val_dir / "val").is_dir():
            raise DataError(f"val_data_dir {val_dir} is a prepared directory without a val/ split (it was "
                            f"prepared with --val-tokens 0). Point val_data_dir at a directory of shards instead.")
        val_dir = val_dir / "val"
    return train_dir, val_dir


# ---- opening and checking shards ------------------------------------------------------------------

def list_shards(data_dir: Path) -> list:
    """The sorted `.npy` files of a shard directory; a clear error if there are none."""
    _require_dir(data_dir, "data directory")
    files = sorted(p for p in data_dir.glob("*.npy") if p.is_file())
    if not files:
        others = sorted(p.name for p in data_dir.iterdir())[:5]
        hint = f" It contains: {', '.join(others)}." if others else " It is empty."
        raise DataError(f"The data directory {data_dir} has no .npy token shards.{hint} Create shards with "
                        f"`lunaris prepare SOURCE... --out DIR`, or point data_dir at the directory that holds them.")
    return files


def open_masks(data_dir: Path, files: list, lengths) -> list:
    """Memory-map the loss-mask shards of a split (`loss_mask/`): one per token shard, same name and length."""
    mask_dir = data_dir / MASK_DIR
    masks = []
    for path, length in zip(files, lengths):
        mask_path = mask_dir / path.name
        if not mask_path.is_file():
            raise DataError(f"{mask_dir} has no {path.name}: a split's loss mask needs one shard per token shard, "
                            f"of the same name and length. Re-run `lunaris prepare`, or remove {mask_dir} to train "
                            f"on every token.")
        mask = open_shard(mask_path)
        if mask.dtype != np.uint8 or len(mask) != length:
            raise DataError(f"the loss-mask shard {mask_path} holds {len(mask):,} {mask.dtype} values for the "
                            f"{length:,} tokens of {path.name}; a loss mask is uint8 (0 or 1), one per token. "
                            f"Re-run `lunaris prepare`.")
        masks.append(mask)
    return masks


def open_shard(path: Path) -> np.ndarray:
    """Memory-map one shard and check that it is a 1-D array of unsigned token ids."""
    try:
        array = np.load(path, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError, EOFError) as exc:
        raise DataError(f"The shard {path} is not a valid .npy file or is truncated ({exc}). It may come from an "
                        f"interrupted write: delete it and re-create the shards (e.g. re-run "
                        f"`lunaris prepare`).") from None
    if array.dtype not in TOKEN_DTYPES:
        raise DataError(f"The shard {path} holds {array.dtype} values; token shards must be unsigned integers "
                        f"(uint16 for vocabularies up to 65,536 ids, uint32 above). Float or signed arrays are "
                        f"rejected because they can hide bad ids (-1 padding, NaN): convert the ids with "
                        f"np.save(path, ids.astype(np.uint16)) after checking 0 <= ids < vocab size, or re-run "
                        f"`lunaris prepare`.")
    if array.ndim != 1:
        raise DataError(f"The shard {path} has shape {array.shape}; token shards must be 1-D streams of ids. "
                        f"Flatten it with np.save(path, ids.reshape(-1)) if the rows are consecutive text.")
    return array


def _manifest_mismatch(data_dir: Path, detail: str) -> DataError:
    return DataError(f"The shards in {data_dir} no longer match the manifest {data_dir.parent / MANIFEST_NAME}: "
                     f"{detail}. The files were changed after `lunaris prepare` wrote them; re-run prepare to "
                     f"rebuild the directory (or restore the original files).")


def verify_against_manifest(data_dir: Path, files: Sequence[Path], lengths: Sequence[int], entry: dict,
                            level: str = "size") -> None:
    """Check shard names and token counts (level "size") and also sha256 hashes (level "full")."""
    if level == "none":
        return
    listed = {s["file"]: s for s in entry.get("shards", [])}
    present = {p.name for p in files}
    if missing := sorted(set(listed) - present):
        raise _manifest_mismatch(data_dir, f"listed shard(s) {', '.join(missing)} are missing")
    if extra := sorted(present - set(listed)):
        raise _manifest_mismatch(data_dir, f"shard(s) {', '.join(extra)} are not in the manifest")
    for path, length in zip(files, lengths):
        expected = listed[path.name]
        if int(expected["tokens"]) != int(length):
            raise _manifest_mismatch(data_dir, f"{path.name} has {length} tokens, "
                                               f"the manifest says {expected['tokens']}")
        if level == "full" and file_sha256(path) != expected["sha256"]:
            raise _manifest_mismatch(data_dir, f"the sha256 of {path.name} differs from the manifest's")


class ShardDataset(torch.utils.data.Dataset):
    """Fixed-length windows over all `.npy` shards of a directory, read as one memory-mapped stream.

    `len(ds)` = `ceil((N - 1) / seq_len)` for N tokens; `ds[i]` -> `(x, y)`, int64 tensors of shape
    (seq_len,), where `y` is `x` shifted by one token (see the module docstring for padding).
    `get_batch(indices)` -> `(x, y)` of shape (len(indices), seq_len) is the fast path the loader uses; a split with
    a loss mask (`loss_mask/`, see the module docstring) gives `(x, y, mask)` instead (`has_loss_mask`).

    `data_dir` may be a directory made by `lunaris prepare` (its `train/` split is read and checked
    against the manifest), one of its split directories, or a flat directory of `.npy` shards.
    `verify` is "size" (default: shard names and token counts against the manifest, free), "full"
    (also sha256 of every shard, reads all data once) or "none".

    Shards are opened lazily and re-opened in each DataLoader worker: pickling the dataset never
    copies token data.
    """

    def __init__(self, data_dir, seq_len: int, verify: str = "size"):
        if not isinstance(seq_len, int) or seq_len <= 0:
            raise DataError(f"seq_len must be a positive integer, got {seq_len!r}.")
        if verify not in VERIFY_LEVELS:
            raise DataError(f"verify must be one of {', '.join(VERIFY_LEVELS)}, got {verify!r}.")
        path = Path(data_dir)
        _require_dir(path, "data directory")
        root, split = _manifest_location(path)
        self.data_dir = root / split if root is not None and path == root else path
        self.seq_len = seq_len
        self.manifest = _load_manifest_file(root / MANIFEST_NAME) if root is not None else None
        self.files = list_shards(self.data_dir)
        arrays = [open_shard(p) for p in self.files]
        self.lengths = np.array([len(a) for a in arrays], dtype=np.int64)
        self.has_loss_mask = (self.data_dir / MASK_DIR).is_dir()
        masks = open_masks(self.data_dir, self.files, self.lengths) if self.has_loss_mask else None
        if self.manifest is not None:
            entry = self.manifest["splits"].get(split)
            if entry is None:
                raise _manifest_mismatch(self.data_dir, f"the manifest has no '{split}' split")
            verify_against_manifest(self.data_dir, self.files, self.lengths, entry, verify)
            if self.has_loss_mask != ("loss_mask" in entry):
                raise _manifest_mismatch(self.data_dir, "the loss mask is " + ("not in the manifest" if
                                         self.has_loss_mask else f"missing ({self.data_dir / MASK_DIR})"))
            if masks is not None:  # (a mismatch names the split directory, whose manifest lists the masks too)
                verify_against_manifest(self.data_dir, [self.data_dir / MASK_DIR / p.name for p in self.files],
                                        self.lengths, entry["loss_mask"], verify)
        self.dtypes = sorted({a.dtype.name for a in arrays})
        # offsets[k] = index in the stream of shard k's first token; offsets[-1] = N.  Shape (S+1,)
        self.offsets = np.concatenate([[0], np.cumsum(self.lengths)]).astype(np.int64)
        self.num_tokens = int(self.offsets[-1])
        if self.num_tokens < 2:
            raise DataError(f"The shards in {self.data_dir} hold {self.num_tokens} token(s) in total; at least 2 "
                            f"are needed for one (input, target) pair. Prepare more data.")
        self._arrays, self._masks = arrays, masks

    # Workers get the file list, not the memory maps (pickling a memmap would copy its data).
    def __getstate__(self):
        state = self.__dict__.copy()
        state["_arrays"] = state["_masks"] = None
        return state

    def _shards(self) -> list:
        if self._arrays is None:
            self._arrays = [np.load(p, mmap_mode="r", allow_pickle=False) for p in self.files]
        return self._arrays

    def _mask_shards(self) -> list:
        if self._masks is None:
            self._masks = [np.load(self.data_dir / MASK_DIR / p.name, mmap_mode="r", allow_pickle=False)
                           for p in self.files]
        return self._masks

    def __len__(self) -> int:
        return (self.num_tokens - 1 + self.seq_len - 1) // self.seq_len

    def _read_into(self, start: int, row: np.ndarray, shards: list = None) -> int:
        """Copy stream tokens (or the loss mask, from `shards`) [start, start + len(row)) into `row`, across shards;
        returns the count."""
        shards, offsets = shards if shards is not None else self._shards(), self.offsets
        end = min(start + len(row), self.num_tokens)
        k = int(np.searchsorted(offsets, start, side="right")) - 1
        filled, pos = 0, start
        while pos < end:
            take = min(end, int(offsets[k + 1])) - pos
            local = pos - int(offsets[k])
            row[filled:filled + take] = shards[k][local:local + take]
            filled, pos, k = filled + take, pos + take, k + 1
        return filled

    def get_batch(self, indices) -> tuple:
        """(x, y) int64 tensors of shape (B, seq_len) for sample indices of length B; with a loss mask,
        (x, y, mask), mask (B, seq_len) bool: whether each target of y is trained."""
        L = self.seq_len
        n_samples = len(self)
        window = np.empty((len(indices), L + 1), dtype=np.int64)  # (B, L+1): x = [:, :L], y = [:, 1:]
        masks = np.zeros((len(indices), L + 1), dtype=np.bool_) if self.has_loss_mask else None
        short_rows = []
        for r, i in enumerate(indices):
            i = int(i)
            if not 0 <= i < n_samples:
                raise IndexError(f"sample index {i} out of range for {n_samples} samples")
            filled = self._read_into(i * L, window[r])
            if masks is not None:
                self._read_into(i * L, masks[r], self._mask_shards())
            if filled < L + 1:
                short_rows.append((r, filled))
        x = torch.from_numpy(window[:, :L].copy())
        y = torch.from_numpy(window[:, 1:].copy())
        for r, filled in short_rows:  # only the stream's last window: pad in int64, never in the shard dtype
            x[r, filled:] = 0
            y[r, filled - 1:] = -1
            if masks is not None:
                masks[r, filled:] = False
        return (x, y) if masks is None else (x, y, torch.from_numpy(masks[:, 1:].copy()))

    def __getitem__(self, index: int) -> tuple:
        if index < 0:
            index += len(self)
        return tuple(t[0] for t in self.get_batch([index]))

    def max_token_id(self) -> int:
        """The largest id in the shards (reads every token once; memory maps keep this fast)."""
        return max(int(a.max()) for a in self._shards() if len(a))

    def __repr__(self) -> str:
        mask = ", with a loss mask" if self.has_loss_mask else ""
        return (f"ShardDataset({str(self.data_dir)!r}, seq_len={self.seq_len}: {len(self.files)} shard(s), "
                f"{self.num_tokens:,} tokens, {len(self):,} samples{mask})")


def check_vocab(data_dir, vocab_size: int) -> None:
    """Raise DataError if token ids of `data_dir` can reach or exceed the model's `vocab_size`.

    A prepared directory is checked from its manifest (the tokenizer's vocabulary size, so any text
    the tokenizer encodes fits; no shard is read). A flat directory is scanned shard by shard and the
    offending file is named. Call it before training so a bad id never becomes a device-side assert.
    """
    path = Path(data_dir)
    root, _ = _manifest_location(path)
    if root is not None:
        manifest = _load_manifest_file(root / MANIFEST_NAME)
        data_vocab = int(manifest["vocab_size"])
        if data_vocab > vocab_size:
            raise DataError(f"The data in {root} was tokenized with a {data_vocab:,}-id vocabulary "
                            f"({root / MANIFEST_NAME}), but model.vocab_size is {vocab_size:,}: ids up to "
                            f"{data_vocab - 1:,} would index past the embedding table. Set model.vocab_size to at "
                            f"least {manifest.get('model_vocab_size', data_vocab):,} (the value `lunaris prepare` "
                            f"printed).")
        return
    for shard in list_shards(path):
        array = open_shard(shard)
        if len(array) and (top := int(array.max())) >= vocab_size:
            raise DataError(f"The shard {shard} contains token id {top:,}, but model.vocab_size is {vocab_size:,} "
                            f"(ids must be below it). Set model.vocab_size to at least {top + 1:,} (rounded up to a "
                            f"multiple of 64 for speed), or re-tokenize the data with a smaller vocabulary.")
