"""`lunaris prepare`: raw text sources -> byte-level BPE tokenizer -> uint16/uint32 token shards + manifest.

Pipeline (memory stays bounded whatever the corpus size: documents are streamed in batches):

1. **Sources.** Each SOURCE is a plain text file (one document per file), a JSONL file (one document
   per line, field `--text-field`), a Parquet file (column `--text-field`), a gzip/bz2/xz-compressed
   variant of these (`.txt.gz`, `.jsonl.gz`, ...), a Hugging Face `datasets` directory written by
   `save_to_disk`, or a directory searched recursively for such files (`--include`/`--exclude` globs;
   its files are visited in an order shuffled by `--seed`, so sorted per-topic or per-date files still
   give a homogeneous stream).
2. **Mixing.** Sources are interleaved deterministically, always taking the next document from the
   source furthest below its share of the bytes emitted so far. With `--weights`, each source's share of
   the output text (in bytes) follows its weight and the mix stops when the first source runs out (the
   report says how much of each was used). Without `--weights`, every document of every source is used
   exactly once, interleaved in proportion to the sources' sizes on disk.
3. **Tokenizer.** `--tokenizer FILE` uses an existing `tokenizer.json`; `--vocab-size N` trains a
   byte-level BPE (GPT-2 pre-tokenization, `<|endoftext|>` special token with id 0) on the first
   `--tokenizer-sample-bytes` of the mix.
4. **Tokens.** Documents are encoded in batches with the library's multi-threaded `encode_batch` (in a
   background thread, overlapping reading and writing), each followed by the end-of-text id. The first
   documents, up to `--val-tokens`, form the validation split; the rest the training split.
5. **Output.** Everything is built in a hidden staging directory next to `--out` and moved into place
   only when complete; each shard is written under a temporary name and renamed, and the manifest is
   written last. An interrupted run therefore never leaves a directory or shard that looks valid.

Byte counts (`bytes` per split and source) are UTF-8 bytes of the documents as tokenized (after
replacing undecodable bytes), without the end-of-text token, so bits-per-byte = nats / ln 2 / bytes.
"""

from __future__ import annotations

import array
import bz2
import codecs
import fnmatch
import gzip
import hashlib
import heapq
import io
import json
import lzma
import math
import os
import random
import shutil
import sys
import tempfile
import time
import zlib
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from lunaris.data.shards import FORMAT_VERSION, MANIFEST_NAME, TOKENIZER_NAME
from lunaris.errors import DataError

EOT_TOKEN = "<|endoftext|>"
DEFAULT_INCLUDE = ("*.txt", "*.text", "*.md", "*.rst", "*.jsonl", "*.ndjson", "*.parquet",
                   "*.txt.gz", "*.md.gz", "*.jsonl.gz", "*.ndjson.gz", "*.json.gz",
                   "*.txt.bz2", "*.jsonl.bz2", "*.txt.xz", "*.jsonl.xz")
COMPRESSED = {".gz": gzip.open, ".bz2": bz2.open, ".xz": lzma.open}
JSONL_SUFFIXES = (".jsonl", ".ndjson", ".json")


# ---- undecodable bytes: replaced by U+FFFD and counted ---------------------------------------------

_replaced = [0]  # sequences replaced since the last reset (reading happens in one thread)


def _count_and_replace(exc: UnicodeError):
    _replaced[0] += 1
    return "\ufffd", exc.end


codecs.register_error("lunaris_replace", _count_and_replace)


def _decode(raw: bytes) -> str:
    return raw.decode("utf-8", errors="lunaris_replace")


def _utf8_size(text: str) -> tuple:
    """(text, its UTF-8 byte count); lone surrogates (possible from JSON escapes) are replaced and counted."""
    if text.isascii():
        return text, len(text)
    try:
        return text, len(text.encode("utf-8"))
    except UnicodeEncodeError:
        text = text.encode("utf-8", errors="lunaris_replace").decode("utf-8")
        return text, len(text.encode("utf-8"))


# ---- sources ---------------------------------------------------------------------------------------

def _unreadable(path, exc) -> DataError:
    return DataError(f"The source file {path} cannot be read ({type(exc).__name__}: {exc}). Check that it is "
                     f"complete and of the type its name says (text, JSONL, Parquet, gzip/bz2/xz-compressed), "
                     f"or leave it out with --exclude.")


def _split_compression(path: Path):
    """(opener, name without the compression suffix)."""
    opener = COMPRESSED.get(path.suffix.lower())
    return (opener, path.name[:-len(path.suffix)]) if opener else (open, path.name)


def _file_kind(path: Path) -> str:
    _, name = _split_compression(path)
    lower = name.lower()
    if lower.endswith(JSONL_SUFFIXES):
        return "jsonl"
    if lower.endswith(".parquet"):
        return "parquet"
    return "text"


def _is_hf_dataset(path: Path) -> bool:
    return path.is_dir() and ((path / "dataset_dict.json").is_file() or
                              ((path / "state.json").is_file() and (path / "dataset_info.json").is_file()))


def _text_file_docs(path: Path) -> Iterator[str]:
    opener, _ = _split_compression(path)
    with opener(path, "rb") as f:
        yield _decode(f.read())


def _jsonl_docs(path: Path, text_field: str) -> Iterator[str | None]:
    opener, _ = _split_compression(path)
    with opener(path, "rb") as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(_decode(line))
            except json.JSONDecodeError as exc:
                raise DataError(f"{path}, line {line_no}, is not valid JSON ({exc}). A JSONL source needs one JSON "
                                f"object per line; fix or remove the line.") from None
            if not isinstance(record, dict) or text_field not in record:
                keys = ", ".join(list(record)[:10]) if isinstance(record, dict) else type(record).__name__
                raise DataError(f"{path}, line {line_no}, has no field '{text_field}' (it has: {keys}). Choose the "
                                f"field holding the document text with --text-field.")
            text = record[text_field]
            if text is not None and not isinstance(text, str):
                raise DataError(f"{path}, line {line_no}: field '{text_field}' holds {type(text).__name__}, not "
                                f"text. Choose the field holding the document text with --text-field.")
            yield text


def _column_texts(column, where: str, text_field: str) -> list:
    import pyarrow as pa
    if pa.types.is_binary(column.type) or pa.types.is_large_binary(column.type):
        return [None if v is None else _decode(v) for v in column.to_pylist()]
    if not (pa.types.is_string(column.type) or pa.types.is_large_string(column.type)):
        raise DataError(f"{where}: column '{text_field}' has type {column.type}, not text. Choose the column "
                        f"holding the document text with --text-field.")
    return column.to_pylist()


def _parquet_docs(path: Path, text_field: str) -> Iterator[str | None]:
    import pyarrow.parquet as pq
    opener, _ = _split_compression(path)
    with opener(path, "rb") as raw:
        source = raw if opener is open else io.BytesIO(raw.read())
        parquet = pq.ParquetFile(source)
        names = parquet.schema_arrow.names
        if text_field not in names:
            raise DataError(f"The Parquet source {path} has no column '{text_field}' (it has: "
                            f"{', '.join(names[:10])}). Choose the text column with --text-field.")
        for batch in parquet.iter_batches(batch_size=1024, columns=[text_field]):
            yield from _column_texts(batch.column(0), str(path), text_field)


def _load_hf_dataset(path: Path, split: str, text_field: str):
    try:
        import datasets
    except ImportError:
        raise DataError(f"{path} is a Hugging Face `datasets` directory, but the `datasets` package is not "
                        f"installed. Install it with: pip install 'lunaris[data]'.") from None
    try:
        ds = datasets.load_from_disk(str(path))
    except Exception as exc:  # the library raises many types for a damaged directory
        raise _unreadable(path, exc) from None
    if isinstance(ds, datasets.DatasetDict):
        if split not in ds:
            raise DataError(f"The Hugging Face dataset {path} has splits {', '.join(ds)}, not '{split}'. Choose "
                            f"one with --hf-split.")
        ds = ds[split]
    if text_field not in ds.column_names:
        raise DataError(f"The Hugging Face dataset {path} has no column '{text_field}' (it has: "
                        f"{', '.join(ds.column_names[:10])}). Choose the text column with --text-field.")
    return ds


def _hf_docs(path: Path, split: str, text_field: str) -> Iterator[str | None]:
    ds = _load_hf_dataset(path, split, text_field).with_format("arrow")
    for batch in ds.iter(batch_size=1024):
        yield from _column_texts(batch.column(text_field), str(path), text_field)


def _matches(relative: str, patterns) -> bool:
    """Globs without '/' match the file name, globs with '/' the path relative to the source directory."""
    name = relative.rsplit("/", 1)[-1]
    return any(fnmatch.fnmatch(relative if "/" in p else name, p) for p in patterns)


@dataclass
class Source:
    """One SOURCE argument: its files, how to read them, and what was taken from it."""

    path: Path
    text_field: str = "text"
    include: tuple = DEFAULT_INCLUDE
    exclude: tuple = ()
    hf_split: str = "train"
    seed: int = 0
    weight: float = 1.0
    documents: int = 0
    bytes: int = 0
    tokens: int = 0
    exhausted: bool = False
    files: list = field(default_factory=list)

    def __post_init__(self):
        if not self.path.exists():
            raise DataError(f"The source {self.path} does not exist. Give text, JSONL or Parquet files (optionally "
                            f"gzip-compressed), directories of them, or a Hugging Face dataset saved with "
                            f"save_to_disk.")
        if _is_hf_dataset(self.path):
            self.kind = "hf"
            _load_hf_dataset(self.path, self.hf_split, self.text_field)  # check split and column now
            self.files = [self.path]
        elif self.path.is_dir():
            self.kind = "dir"
            self.files = self._list_directory()
        else:
            self.kind = _file_kind(self.path)
            self.files = [self.path]

    def _list_directory(self) -> list:
        found = []
        for root, dirs, files in os.walk(self.path):
            dirs[:] = sorted(d for d in dirs if not d.startswith("."))
            for name in sorted(files):
                relative = Path(root, name).relative_to(self.path).as_posix()
                if not name.startswith(".") and _matches(relative, self.include) and \
                        not _matches(relative, self.exclude):
                    found.append(Path(root, name))
        if not found:
            raise DataError(f"The source directory {self.path} has no files matching --include "
                            f"{' '.join(self.include)} (minus --exclude {' '.join(self.exclude) or '-'}). Adjust the "
                            f"globs, e.g. --include '*' for text files without an extension.")
        random.Random(self.seed).shuffle(found)  # a homogeneous stream even from per-topic sorted files
        return found

    def disk_bytes(self) -> int:
        if self.kind == "hf":
            return sum(p.stat().st_size for p in self.path.rglob("*.arrow"))
        return sum(p.stat().st_size for p in self.files)

    def _file_docs(self, path: Path) -> Iterator[str | None]:
        kind = _file_kind(path)
        if kind == "jsonl":
            return _jsonl_docs(path, self.text_field)
        if kind == "parquet":
            return _parquet_docs(path, self.text_field)
        return _text_file_docs(path)

    def documents_iter(self) -> Iterator[str | None]:
        """Raw documents (None or blank ones included; the mixer skips and counts them)."""
        for path in self.files:
            docs = _hf_docs(path, self.hf_split, self.text_field) if self.kind == "hf" else self._file_docs(path)
            try:
                yield from docs
            except DataError:
                raise
            except (OSError, EOFError, ValueError, UnicodeError, lzma.LZMAError, zlib.error) as exc:
                raise _unreadable(path, exc) from None
            except Exception as exc:  # pyarrow's ArrowInvalid and friends
                if type(exc).__module__.startswith("pyarrow"):
                    raise _unreadable(path, exc) from None
                raise

    def describe(self) -> dict:
        return {"path": str(self.path), "kind": self.kind, "weight": self.weight, "files": len(self.files),
                "documents": self.documents, "bytes": self.bytes, "tokens": self.tokens,
                "exhausted": self.exhausted}


@dataclass
class MixStats:
    empty_skipped: int = 0
    replaced: int = 0


def mix_documents(sources: list, honour_weights: bool, stats: MixStats) -> Iterator[tuple]:
    """(source index, text, UTF-8 bytes) in a deterministic weighted interleaving.

    Always takes the next document from the source with the fewest bytes emitted per unit of weight
    (ties: first source). With `honour_weights` the mix ends when any source runs out, keeping the
    proportions; otherwise an exhausted source drops out and the others continue.
    """
    streams = [s.documents_iter() for s in sources]
    heap = [(0.0, i) for i in range(len(sources))]  # (bytes emitted / weight, source index)
    emitted = [0] * len(sources)
    while heap:
        _, i = heapq.heappop(heap)
        text = next(streams[i], StopIteration)
        if text is StopIteration:
            sources[i].exhausted = True
            if honour_weights:
                return
            continue
        if not text or text.isspace():
            stats.empty_skipped += 1
            heapq.heappush(heap, (emitted[i] / sources[i].weight, i))
            continue
        text, size = _utf8_size(text)
        emitted[i] += size
        heapq.heappush(heap, (emitted[i] / sources[i].weight, i))
        yield i, text, size


def batched(docs: Iterator[tuple], max_docs: int, max_bytes: int) -> Iterator[list]:
    batch, size = [], 0
    for doc in docs:
        batch.append(doc)
        size += doc[2]
        if len(batch) >= max_docs or size >= max_bytes:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch


# ---- tokenizer -------------------------------------------------------------------------------------

def train_tokenizer(texts: Iterator[str], vocab_size: int):
    """Byte-level BPE with GPT-2 pre-tokenization and `<|endoftext|>` as id 0."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOT_TOKEN], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(texts, trainer=trainer)
    return tokenizer


def load_tokenizer(path: Path, eot_token: str):
    """(tokenizer, eot id) from an existing tokenizer.json."""
    from tokenizers import Tokenizer
    if not path.is_file():
        raise DataError(f"The tokenizer file {path} does not exist. Pass a Hugging Face tokenizer.json with "
                        f"--tokenizer, or train one with --vocab-size N.")
    try:
        tokenizer = Tokenizer.from_file(str(path))
    except Exception as exc:  # the Rust library raises a generic Exception for bad files
        raise DataError(f"The tokenizer file {path} cannot be loaded ({exc}). It must be a Hugging Face "
                        f"`tokenizers` tokenizer.json (tokenizer.save(...) or the file in a model repository).") from None
    eot_id = tokenizer.token_to_id(eot_token)
    if eot_id is None:
        raise DataError(f"The tokenizer {path} has no token {eot_token!r} to end documents with. Name its "
                        f"end-of-text token with --eot-token (e.g. '</s>' or '<|end_of_text|>').")
    return tokenizer, eot_id


def vocab_size_of(tokenizer) -> int:
    """One more than the largest id the tokenizer can produce."""
    return max(tokenizer.get_vocab(with_added_tokens=True).values()) + 1


def round_vocab(vocab_size: int, multiple: int = 64) -> int:
    return -(-vocab_size // multiple) * multiple


# ---- shards ----------------------------------------------------------------------------------------

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
        self.tokens, self.documents, self.bytes = self.tokens + len(ids), self.documents + documents, self.bytes + nbytes
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
        final, temporary = self.directory / name, self.directory / (name + ".tmp")
        with open(temporary, "wb") as f:
            out = _HashingWriter(f)
            np.lib.format.write_array(out, self.buffer[:self.fill], allow_pickle=False)
            f.flush()
            os.fsync(f.fileno())
        os.replace(temporary, final)  # a shard appears under its real name only when complete
        self.shards.append({"file": name, "tokens": int(self.fill), "sha256": out.sha.hexdigest()})
        self.fill = 0

    def close(self) -> dict:
        if self.fill:
            self._write()
        self.buffer = None
        return {"documents": self.documents, "tokens": self.tokens, "bytes": self.bytes,
                "max_token_id": self.max_id, "shards": self.shards}


# ---- the command -----------------------------------------------------------------------------------

@dataclass
class PrepareOptions:
    sources: list
    out: Path
    vocab_size: int | None = None
    tokenizer: Path | None = None
    weights: list | None = None
    shard_tokens: int = 100_000_000
    val_tokens: int = 1_000_000
    max_tokens: int | None = None
    seed: int = 0
    text_field: str = "text"
    include: tuple = DEFAULT_INCLUDE
    exclude: tuple = ()
    hf_split: str = "train"
    eot_token: str = EOT_TOKEN
    tokenizer_sample_bytes: int = 500_000_000
    batch_docs: int = 1024
    batch_bytes: int = 8_000_000
    overwrite: bool = False
    progress: bool = True

    def check(self) -> None:
        problems = []
        if (self.vocab_size is None) == (self.tokenizer is None):
            problems.append("give exactly one of --vocab-size N (train a tokenizer) or --tokenizer FILE (use one)")
        if self.vocab_size is not None and not 258 <= self.vocab_size < 2**32:
            problems.append(f"--vocab-size must be at least 258 (256 bytes, end-of-text, one merge), got {self.vocab_size}")
        if self.weights is not None:
            if len(self.weights) != len(self.sources):
                problems.append(f"--weights has {len(self.weights)} value(s) for {len(self.sources)} source(s); "
                                f"give one weight per source, in the same order")
            elif not all(w > 0 and math.isfinite(w) for w in self.weights):
                problems.append(f"--weights must all be positive, got {self.weights}")
        for name in ("shard_tokens", "batch_docs", "batch_bytes", "tokenizer_sample_bytes"):
            if getattr(self, name) <= 0:
                problems.append(f"--{name.replace('_', '-')} must be positive, got {getattr(self, name)}")
        if self.val_tokens < 0:
            problems.append(f"--val-tokens must be >= 0, got {self.val_tokens}")
        if self.max_tokens is not None and self.max_tokens <= 0:
            problems.append(f"--max-tokens must be positive, got {self.max_tokens}")
        if self.out.exists() and not self.out.is_dir():
            problems.append(f"--out {self.out} is a file; give a directory")
        elif self.out.is_dir() and any(self.out.iterdir()) and not self.overwrite:
            problems.append(f"--out {self.out} already exists and is not empty; choose a new directory or pass "
                            f"--overwrite (the old contents are replaced only once the new ones are complete)")
        if problems:
            raise DataError("lunaris prepare: " + "; ".join(problems) + ".")


class _Progress:
    """tqdm bar in MB of text, with documents and tokens as postfix (MB/s is the bar's rate)."""

    def __init__(self, enabled: bool, desc: str):
        from tqdm import tqdm
        self.bar = tqdm(desc=desc, unit="B", unit_scale=True, unit_divisor=1000, disable=not enabled,
                        file=sys.stderr, dynamic_ncols=True)
        self.documents = self.tokens = 0

    def update(self, nbytes: int, documents: int, tokens: int) -> None:
        self.documents, self.tokens = self.documents + documents, self.tokens + tokens
        self.bar.set_postfix(docs=f"{self.documents:,}", tokens=f"{self.tokens:,}", refresh=False)
        self.bar.update(nbytes)

    def close(self) -> None:
        self.bar.close()


def _encode(tokenizer, texts: list) -> list:
    encode = getattr(tokenizer, "encode_batch_fast", tokenizer.encode_batch)  # _fast skips offsets (>= 0.21)
    return encode(texts, add_special_tokens=False)


def _to_ids(encodings: list, eot_id: int, dtype) -> tuple:
    """Flat ids of a batch with end-of-text after each document, and per-document token counts."""
    lengths = np.empty(len(encodings), dtype=np.int64)
    flat = array.array("I")  # C unsigned ints: extending from Python lists is about twice np.array's speed
    for k, e in enumerate(encodings):
        ids = e.ids  # each access converts the whole list from Rust: read it once
        lengths[k] = len(ids) + 1
        flat.extend(ids)
        flat.append(eot_id)
    return np.frombuffer(flat, dtype=np.uint32).astype(dtype), lengths


class _Splitter:
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
        n_val = 0
        if self.val.tokens < self.val_tokens:
            n_val = int(np.searchsorted(starts, self.val_tokens - self.val.tokens, side="left"))
        cut = int(starts[n_val]) if n_val < len(starts) else len(ids)
        self.val.add(ids[:cut], n_val, int(sizes[:n_val].sum()))
        n_keep = len(lengths)
        if self.max_tokens is not None:
            n_keep = int(np.searchsorted(starts, cut + self.max_tokens - self.train.tokens, side="left"))
            n_keep = max(n_keep, n_val)
        end = int(starts[n_keep]) if n_keep < len(starts) else len(ids)
        self.train.add(ids[cut:end], n_keep - n_val, int(sizes[n_val:n_keep].sum()))
        return n_keep


def _tokenizer_sample(sources, honour_weights, sample_bytes) -> Iterator[list]:
    """Batches of texts from the start of the mix, `sample_bytes` in total, for BPE training."""
    taken = 0
    for batch in batched(mix_documents(sources, honour_weights, MixStats()), 1024, 8_000_000):
        yield [text for _, text, _ in batch]
        taken += sum(size for _, _, size in batch)
        if taken >= sample_bytes:
            return


def _encode_all(options, sources, tokenizer, eot_id, dtype, stage: Path, stats: MixStats) -> dict:
    """Tokenize the mix into staged shards; returns the per-split manifest entries."""
    val = ShardWriter(stage / "val", dtype, options.shard_tokens)
    train = ShardWriter(stage / "train", dtype, options.shard_tokens)
    splitter = _Splitter(val, train, options.val_tokens, options.max_tokens)
    progress = _Progress(options.progress, "tokenizing")
    honour = options.weights is not None
    _replaced[0] = 0  # count only this pass (the tokenizer sample pass read the same documents)
    batches = batched(mix_documents(sources, honour, stats), options.batch_docs, options.batch_bytes)
    # One batch is encoded (multi-threaded, GIL released) while the next is read and the previous written.
    with ThreadPoolExecutor(max_workers=1) as pool:
        pending = None
        for batch in batches:
            future = pool.submit(_encode, tokenizer, [text for _, text, _ in batch])
            if pending is not None and _write_batch(*pending, splitter, sources, eot_id, dtype, progress):
                break
            pending = (batch, future)
        else:
            if pending is not None:
                _write_batch(*pending, splitter, sources, eot_id, dtype, progress)
    progress.close()
    return {"train": train.close(), **({"val": val.close()} if val.tokens else {})}


def _write_batch(batch, future, splitter, sources, eot_id, dtype, progress) -> bool:
    """Write one encoded batch; True once --max-tokens is reached."""
    ids, lengths = _to_ids(future.result(), eot_id, dtype)
    sizes = np.fromiter((size for _, _, size in batch), dtype=np.int64, count=len(batch))
    kept = splitter.add(ids, lengths, sizes)
    for (i, _, size), n in zip(batch[:kept], lengths[:kept]):
        sources[i].documents, sources[i].bytes, sources[i].tokens = \
            sources[i].documents + 1, sources[i].bytes + size, sources[i].tokens + int(n)
    progress.update(int(sizes[:kept].sum()), kept, int(lengths[:kept].sum()))
    return splitter.full


def _file_sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _install(stage: Path, out: Path) -> None:
    """Move the finished staging directory to `out`, replacing an old one only now."""
    if out.exists():
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        os.replace(out, old)
        os.replace(stage, out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(stage, out)


def prepare(options: PrepareOptions, args_for_manifest: dict | None = None) -> dict:
    """Run the whole pipeline; returns the manifest (also written to `out/manifest.json`)."""
    options.check()
    started = time.time()
    weights = options.weights or [None] * len(options.sources)
    sources = [Source(Path(p), options.text_field, tuple(options.include), tuple(options.exclude),
                      options.hf_split, options.seed) for p in options.sources]
    for source, weight in zip(sources, weights):
        source.weight = float(weight) if weight is not None else float(max(source.disk_bytes(), 1))
    out = options.out.resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".partial", dir=out.parent))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(stage, 0o777 & ~umask)  # mkdtemp's private 0700 would otherwise become the output's mode
    try:
        if options.tokenizer is not None:
            tokenizer, eot_id = load_tokenizer(Path(options.tokenizer), options.eot_token)
        else:
            sample = _tokenizer_sample(sources, options.weights is not None, options.tokenizer_sample_bytes)
            tokenizer, eot_id = train_tokenizer((t for batch in sample for t in batch), options.vocab_size), 0
            for s in sources:
                s.exhausted = False
        tokenizer.save(str(stage / TOKENIZER_NAME))
        if hasattr(tokenizer, "encode_special_tokens"):
            tokenizer.encode_special_tokens = True  # a literal "<|endoftext|>" in a document stays text
        vocab_size = vocab_size_of(tokenizer)
        dtype = np.uint16 if vocab_size <= 2**16 else np.uint32
        stats = MixStats()
        splits = _encode_all(options, sources, tokenizer, eot_id, dtype, stage, stats)
        stats.replaced = _replaced[0]
        _check_splits(splits, options, sources, stats)
        manifest = {
            "format_version": FORMAT_VERSION,
            "tokenizer": TOKENIZER_NAME, "tokenizer_sha256": _file_sha256(stage / TOKENIZER_NAME),
            "vocab_size": vocab_size, "model_vocab_size": round_vocab(vocab_size),
            "eot_token": tokenizer.id_to_token(eot_id), "eot_id": eot_id, "dtype": np.dtype(dtype).name,
            "splits": splits,
            "sources": [s.describe() for s in sources],
            "mixing": "weights (stops when a source runs out)" if options.weights else "all documents once",
            "report": {"requested_vocab_size": options.vocab_size, "empty_documents_skipped": stats.empty_skipped, "undecodable_sequences_replaced": stats.replaced,
                       "seconds": round(time.time() - started, 1)},
            "args": args_for_manifest or {},
        }
        temporary = stage / (MANIFEST_NAME + ".tmp")
        temporary.write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
        os.replace(temporary, stage / MANIFEST_NAME)
        _install(stage, out)
    finally:
        if stage.exists():
            shutil.rmtree(stage, ignore_errors=True)
    return manifest


def _check_splits(splits: dict, options, sources, stats) -> None:
    if splits["train"]["tokens"] == 0:
        total = sum(s.get("tokens", 0) for s in splits.values())
        if total == 0:
            raise DataError(f"The sources {', '.join(str(s.path) for s in sources)} contain no non-empty documents "
                            f"({stats.empty_skipped} empty ones skipped). Check --text-field and the --include globs.")
        raise DataError(f"The sources hold only {total:,} tokens and all of them went to the validation split "
                        f"(--val-tokens {options.val_tokens:,}). Lower --val-tokens, e.g. to {total // 10:,}.")


def format_report(manifest: dict, out: Path) -> str:
    """The human summary printed after `lunaris prepare`."""
    lines = [f"prepared {out}  (tokenizer vocab {manifest['vocab_size']:,}, {manifest['dtype']} shards, "
             f"end-of-text id {manifest['eot_id']})"]
    for name, split in manifest["splits"].items():
        lines.append(f"  {name:5s}: {split['tokens']:>14,} tokens  {split['documents']:>11,} documents  "
                     f"{split['bytes'] / 1e6:>10,.1f} MB  {len(split['shards'])} shard(s)")
    total_bytes = sum(s["bytes"] for s in manifest["sources"]) or 1
    for s in manifest["sources"]:
        used = "all" if s["exhausted"] else "part (mix ended)"
        lines.append(f"  source {s['path']}: {s['documents']:,} documents, {100 * s['bytes'] / total_bytes:.1f}% "
                     f"of bytes, {used}")
    report = manifest["report"]
    lines.append(f"  skipped {report['empty_documents_skipped']:,} empty document(s); replaced "
                 f"{report['undecodable_sequences_replaced']:,} undecodable byte sequence(s); "
                 f"{report['seconds']:.1f} s")
    requested = report.get("requested_vocab_size")
    if requested and requested > manifest["vocab_size"]:
        lines.append(f"  note: the sample had too little text for {requested:,} ids; the tokenizer stopped at "
                     f"{manifest['vocab_size']:,} (raise --tokenizer-sample-bytes or use more data for more)")
    lines.append(f"set model.vocab_size: {manifest['model_vocab_size']}  (the tokenizer's {manifest['vocab_size']:,} "
                 f"ids rounded up to a multiple of 64) and data_dir: {out}")
    return "\n".join(lines)
