"""The documents of `lunaris prepare`: reading its SOURCE arguments and mixing them into one stream.

**Sources.** Each SOURCE is a plain text file (one document per file), a JSONL file (one document per
line, field `--text-field`), a Parquet file (column `--text-field`), a gzip/bz2/xz-compressed variant of
these (`.txt.gz`, `.jsonl.gz`, ...), a Hugging Face `datasets` directory written by `save_to_disk`, or a
directory searched recursively for such files (`--include`/`--exclude` globs; its files are visited in an
order shuffled by `--seed`, so sorted per-topic or per-date files still give a homogeneous stream).

**Mixing.** Sources are interleaved deterministically, always taking the next document from the source
furthest below its share of the bytes emitted so far. With `--weights`, each source's share of the output
text (in bytes) follows its weight and the mix stops when the first source runs out (the report says how
much of each was used). Without `--weights`, every document of every source is used exactly once,
interleaved in proportion to the sources' sizes on disk.

**Conversations.** A JSONL, JSON or Parquet file whose first record is a conversation is a chat file, read by
conversations.py (`Source.chat_layouts` holds each file's layout) and mixed by `interleave` as documents are.

Documents are streamed, never held all at once. Undecodable bytes (and lone surrogates from JSON escapes)
become U+FFFD; each replaced sequence is counted in the run's `MixStats`, so separate runs never share a
count. The byte size of a document is that of its UTF-8 encoding after these replacements.
"""

from __future__ import annotations

import bz2
import fnmatch
import gzip
import heapq
import io
import json
import lzma
import os
import random
import re
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from lunaris.errors import DataError

DEFAULT_INCLUDE = ("*.txt", "*.text", "*.md", "*.rst", "*.jsonl", "*.ndjson", "*.parquet",
                   "*.txt.gz", "*.md.gz", "*.jsonl.gz", "*.ndjson.gz", "*.json.gz",
                   "*.txt.bz2", "*.jsonl.bz2", "*.txt.xz", "*.jsonl.xz")
COMPRESSED = {".gz": gzip.open, ".bz2": bz2.open, ".xz": lzma.open}
JSONL_SUFFIXES = (".jsonl", ".ndjson", ".json")

_REPLACEMENT_UTF8 = "\ufffd".encode()
_SURROGATES = re.compile("[\ud800-\udfff]+")


# ---- per-run statistics and decoding: undecodable bytes replaced by U+FFFD and counted --------------

@dataclass
class MixStats:
    """What one pass over the mix skipped and repaired (each pass has its own, so counts never mix)."""

    empty_skipped: int = 0
    replaced: int = 0  # undecodable byte sequences and runs of lone surrogates replaced by U+FFFD

    def decode(self, raw: bytes) -> str:
        """`raw` as UTF-8; each undecodable sequence becomes one U+FFFD and is counted."""
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            text = raw.decode("utf-8", errors="replace")
            # U+FFFD characters that were already in the input (as valid UTF-8) are not replacements.
            self.replaced += text.count("\ufffd") - raw.count(_REPLACEMENT_UTF8)
            return text

    def utf8_size(self, text: str) -> tuple:
        """(text, its UTF-8 byte count); each run of lone surrogates (from JSON escapes) becomes one counted U+FFFD."""
        if text.isascii():
            return text, len(text)
        try:
            return text, len(text.encode("utf-8"))
        except UnicodeEncodeError:
            text, replaced = _SURROGATES.subn("\ufffd", text)
            self.replaced += replaced
            return text, len(text.encode("utf-8"))


# ---- reading one file ------------------------------------------------------------------------------

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


def _text_file_docs(path: Path, stats: MixStats) -> Iterator[str]:
    opener, _ = _split_compression(path)
    with opener(path, "rb") as f:
        yield stats.decode(f.read())


def _jsonl_docs(path: Path, text_field: str, stats: MixStats) -> Iterator[str | None]:
    opener, _ = _split_compression(path)
    with opener(path, "rb") as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(stats.decode(line))
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


def _column_texts(column, where: str, text_field: str, stats: MixStats) -> list:
    import pyarrow as pa
    if pa.types.is_binary(column.type) or pa.types.is_large_binary(column.type):
        return [None if v is None else stats.decode(v) for v in column.to_pylist()]
    if not (pa.types.is_string(column.type) or pa.types.is_large_string(column.type)):
        raise DataError(f"{where}: column '{text_field}' has type {column.type}, not text. Choose the column "
                        f"holding the document text with --text-field.")
    return column.to_pylist()


def _parquet_docs(path: Path, text_field: str, stats: MixStats) -> Iterator[str | None]:
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
            yield from _column_texts(batch.column(0), str(path), text_field, stats)


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


def _hf_docs(path: Path, split: str, text_field: str, stats: MixStats) -> Iterator[str | None]:
    ds = _load_hf_dataset(path, split, text_field).with_format("arrow")
    for batch in ds.iter(batch_size=1024):
        yield from _column_texts(batch.column(text_field), str(path), text_field, stats)


def read_guarded(path: Path, items: Iterator) -> Iterator:
    """`items` read from `path`, a damaged file reported as one clear DataError naming it."""
    try:
        yield from items
    except DataError:
        raise
    except (OSError, EOFError, ValueError, UnicodeError, lzma.LZMAError, zlib.error) as exc:
        raise _unreadable(path, exc) from None
    except Exception as exc:  # pyarrow's ArrowInvalid and friends
        if type(exc).__module__.startswith("pyarrow"):
            raise _unreadable(path, exc) from None
        raise


def _matches(relative: str, patterns) -> bool:
    """Globs without '/' match the file name, globs with '/' the path relative to the source directory."""
    name = relative.rsplit("/", 1)[-1]
    return any(fnmatch.fnmatch(relative if "/" in p else name, p) for p in patterns)


# ---- one SOURCE argument ---------------------------------------------------------------------------

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
    chat_layouts: dict = field(default_factory=dict)  # {file: chat layout or None}, once conversations.py looked

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

    def _file_docs(self, path: Path, stats: MixStats) -> Iterator[str | None]:
        kind = _file_kind(path)
        if kind == "jsonl":
            return _jsonl_docs(path, self.text_field, stats)
        if kind == "parquet":
            return _parquet_docs(path, self.text_field, stats)
        return _text_file_docs(path, stats)

    def documents_iter(self, stats: MixStats | None = None) -> Iterator[str | None]:
        """Raw documents (None or blank ones included; the mixer skips and counts them).

        Undecodable bytes are replaced and counted in `stats` (a fresh, discarded MixStats if None).
        """
        stats = MixStats() if stats is None else stats
        for path in self.files:
            if self.kind == "hf":
                yield from read_guarded(path, _hf_docs(path, self.hf_split, self.text_field, stats))
            else:
                yield from read_guarded(path, self._file_docs(path, stats))

    def describe(self) -> dict:
        return {"path": str(self.path), "kind": self.kind, "weight": self.weight, "files": len(self.files),
                "documents": self.documents, "bytes": self.bytes, "tokens": self.tokens,
                "exhausted": self.exhausted}


# ---- the mix ---------------------------------------------------------------------------------------

def interleave(streams: list, sources: list, honour_weights: bool) -> Iterator[tuple]:
    """(source index, item, size) from streams of (item, size or None), in a deterministic weighted interleaving.

    Always takes the next item from the source with the fewest bytes emitted per unit of weight (ties: first
    source); an item of size None (an empty document) is passed over. With `honour_weights` the mix ends when any
    source runs out, keeping the proportions; otherwise an exhausted source drops out and the others continue.
    """
    heap = [(0.0, i) for i in range(len(sources))]  # (bytes emitted / weight, source index)
    emitted = [0] * len(sources)
    while heap:
        _, i = heapq.heappop(heap)
        entry = next(streams[i], StopIteration)
        if entry is StopIteration:
            sources[i].exhausted = True
            if honour_weights:
                return
            continue
        item, size = entry
        emitted[i] += size or 0
        heapq.heappush(heap, (emitted[i] / sources[i].weight, i))
        if size is not None:
            yield i, item, size


def mix_documents(sources: list, honour_weights: bool, stats: MixStats) -> Iterator[tuple]:
    """(source index, text, UTF-8 bytes) of every source's documents, interleaved by weight (`interleave`).

    Empty documents and replaced sequences are counted in `stats`.
    """
    def sized(stream):
        for text in stream:
            if not text or text.isspace():
                stats.empty_skipped += 1
                yield None, None
            else:
                yield stats.utf8_size(text)

    yield from interleave([sized(s.documents_iter(stats)) for s in sources], sources, honour_weights)


def batched(docs: Iterator[tuple], max_docs: int, max_bytes: int) -> Iterator[list]:
    """Lists of (source index, text, bytes) of at most `max_docs` documents, cut once `max_bytes` is reached."""
    batch, size = [], 0
    for doc in docs:
        batch.append(doc)
        size += doc[2]
        if len(batch) >= max_docs or size >= max_bytes:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch
