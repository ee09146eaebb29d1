"""`lunaris prepare`: raw text sources -> byte-level BPE tokenizer -> uint16/uint32 token shards + manifest.

The pipeline (memory stays bounded whatever the corpus size: documents are streamed in batches):

1. **Sources and mixing** (`lunaris.data.sources`): the SOURCE arguments are read and interleaved
   deterministically, by `--weights` or in proportion to their sizes on disk.
2. **Tokenizer** (`lunaris.data.tokenizer`): `--tokenizer FILE` is loaded, or `--vocab-size N` trains a
   byte-level BPE with `<|endoftext|>` as id 0 on the start of the mix.
3. **Tokens** (here): documents are encoded in batches with the library's multi-threaded `encode_batch`
   (in a background thread, overlapping reading and writing), each followed by the end-of-text id.
4. **Output** (`lunaris.data.writer`): the first documents, up to `--val-tokens` (default: 5% of the
   corpus, at most 1,000,000 tokens), form the validation split, the rest the training split; shards and
   the tokenizer are written into a hidden staging directory, the manifest last, and the directory is
   moved to `--out` only when complete.

Sources that hold conversations (chat files: prepare_chat.py) take the same path with a chat template: the
tokenizer gains the template's special tokens, each conversation is rendered with a loss mask (1 on the
assistant's tokens) and packed whole into windows of `--seq-len`, and every split gets loss-mask shards beside its
token shards. `--example-chat FILE` writes the example conversations Lunaris builds from the standard library to
FILE (chat_example.py) and prepares them.

Byte counts (`bytes` per split and source) are UTF-8 bytes of the documents as tokenized (after
replacing undecodable bytes), without the end-of-text token, so bits-per-byte = nats / ln 2 / bytes.
"""

from __future__ import annotations

import array
import math
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from lunaris.data import prepare_chat
from lunaris.data.chat_template import ChatTemplate, add_chat_tokens, write_template
from lunaris.data.shards import FORMAT_VERSION, MANIFEST_NAME, TOKENIZER_NAME
from lunaris.data.sources import DEFAULT_INCLUDE, MixStats, Source, batched, mix_documents
from lunaris.data.tokenizer import load_tokenizer, round_vocab, tokenizer_sample, train_tokenizer, vocab_size_of
from lunaris.data.writer import (
    AdaptiveSplitter,
    MaskedShardWriter,
    ShardWriter,
    TrainValSplitter,
    install,
    staging_dir,
)
from lunaris.errors import DataError
from lunaris.fileio import atomic_write_json
from lunaris.runtime import END_OF_TEXT, file_sha256

__all__ = [
    "DEFAULT_INCLUDE",
    "MixStats",
    "PrepareOptions",
    "ShardWriter",
    "Source",
    "batched",
    "format_report",
    "load_tokenizer",
    "mix_documents",
    "prepare",
    "round_vocab",
    "train_tokenizer",
    "vocab_size_of",
]


# ---- the command -----------------------------------------------------------------------------------

# The validation split when --val-tokens is not given: this fraction of the corpus, at most VAL_TOKENS_CAP tokens
# (so a corpus over 20M tokens gets exactly 1,000,000, and a small one still keeps 95% for training).
VAL_FRACTION = 0.05
VAL_TOKENS_CAP = 1_000_000

@dataclass
class PrepareOptions:
    sources: list
    out: Path
    vocab_size: int | None = None
    tokenizer: Path | None = None
    weights: list | None = None
    shard_tokens: int = 100_000_000
    val_tokens: int | None = None  # None: VAL_FRACTION of the corpus, at most VAL_TOKENS_CAP
    max_tokens: int | None = None
    seed: int = 0
    text_field: str = "text"
    include: tuple = DEFAULT_INCLUDE
    exclude: tuple = ()
    hf_split: str = "train"
    eot_token: str = END_OF_TEXT
    tokenizer_sample_bytes: int = 500_000_000
    batch_docs: int = 1024
    batch_bytes: int = 8_000_000
    overwrite: bool = False
    progress: bool = True
    seq_len: int | None = None          # conversations: the window they are packed into (model.max_seq_len)
    chat_layout: str = "packed"         # conversations: packed (several per window) or padded (one per window)
    example_chat: Path | None = None    # write the example conversations here and prepare them too

    def check(self) -> None:
        problems = prepare_chat.check_options(self)
        if not self.sources and self.example_chat is None:
            problems.append("give at least one SOURCE (or --example-chat FILE)")
        if (self.vocab_size is None) == (self.tokenizer is None):
            problems.append("give exactly one of --vocab-size N (train a tokenizer) or --tokenizer FILE (use one)")
        if self.vocab_size is not None and not 258 <= self.vocab_size < 2**32:
            problems.append(f"--vocab-size must be at least 258 (256 bytes, end-of-text, one merge), "
                            f"got {self.vocab_size}")
        if self.weights is not None:
            if len(self.weights) != len(self.sources):
                problems.append(f"--weights has {len(self.weights)} value(s) for {len(self.sources)} source(s); "
                                f"give one weight per source, in the same order")
            elif not all(w > 0 and math.isfinite(w) for w in self.weights):
                problems.append(f"--weights must all be positive, got {self.weights}")
        for name in ("shard_tokens", "batch_docs", "batch_bytes", "tokenizer_sample_bytes"):
            if getattr(self, name) <= 0:
                problems.append(f"--{name.replace('_', '-')} must be positive, got {getattr(self, name)}")
        if self.val_tokens is not None and self.val_tokens < 0:
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


def _splitter(options, val: ShardWriter, train: ShardWriter) -> TrainValSplitter:
    if options.val_tokens is None:
        return AdaptiveSplitter(val, train, VAL_FRACTION, VAL_TOKENS_CAP, options.max_tokens)
    return TrainValSplitter(val, train, options.val_tokens, options.max_tokens)


def _encode_all(options, sources, tokenizer, eot_id, dtype, stage: Path, stats: MixStats) -> tuple:
    """Tokenize the mix into staged shards; returns the per-split manifest entries and the validation budget."""
    val = ShardWriter(stage / "val", dtype, options.shard_tokens)
    train = ShardWriter(stage / "train", dtype, options.shard_tokens)
    splitter = _splitter(options, val, train)
    progress = _Progress(options.progress, "tokenizing")
    honour = options.weights is not None
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
    splitter.finish()
    return {"train": train.close(), **({"val": val.close()} if val.tokens else {})}, splitter.val_tokens


def _encode_chat(options, sources, tokenizer, eot_id, dtype, stage: Path) -> tuple:
    """Conversations into staged token and loss-mask shards (prepare_chat.py); returns the per-split manifest
    entries, the validation budget and the manifest's `chat` entry."""
    val = MaskedShardWriter(stage / "val", dtype, options.shard_tokens)
    train = MaskedShardWriter(stage / "train", dtype, options.shard_tokens)
    splitter = _splitter(options, val, train)
    progress = _Progress(options.progress, "rendering")
    record = prepare_chat.encode_conversations(options, sources, ChatTemplate(tokenizer), eot_id, splitter, progress)
    progress.close()
    splitter.finish()
    return {"train": train.close(), **({"val": val.close()} if val.tokens else {})}, splitter.val_tokens, record


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


def _sources(options: PrepareOptions) -> list:
    """The SOURCE arguments (and the example conversations, written first), each with its weight."""
    paths = list(options.sources)
    if options.example_chat is not None:
        from lunaris.data.chat_example import write_example_chat
        write_example_chat(options.example_chat)
        paths.append(options.example_chat)
    weights = options.weights or [None] * len(paths)
    sources = [Source(Path(p), options.text_field, tuple(options.include), tuple(options.exclude),
                      options.hf_split, options.seed) for p in paths]
    for source, weight in zip(sources, weights):
        source.weight = float(weight) if weight is not None else float(max(source.disk_bytes(), 1))
    return sources


def _tokenizer(options: PrepareOptions, sources: list, chat: bool) -> tuple:
    """(tokenizer, end-of-text id, chat tokens added to it): loaded or trained on the start of the mix."""
    if options.tokenizer is not None:
        tokenizer = load_tokenizer(options.tokenizer, eot_token=options.eot_token)
        eot_id = tokenizer.token_to_id(options.eot_token)
    else:
        honour = options.weights is not None
        sample = (prepare_chat.chat_sample(sources, honour, options.tokenizer_sample_bytes) if chat else
                  tokenizer_sample(sources, honour, options.tokenizer_sample_bytes))
        tokenizer, eot_id = train_tokenizer((t for batch in sample for t in batch), options.vocab_size), 0
        for s in sources:
            s.exhausted = False
    return tokenizer, eot_id, add_chat_tokens(tokenizer) if chat else []


def prepare(options: PrepareOptions, args_for_manifest: dict | None = None) -> dict:
    """Run the whole pipeline; returns the manifest (also written to `out/manifest.json`)."""
    options.check()
    started = time.time()
    sources = _sources(options)
    chat = prepare_chat.chat_sources(sources)
    if chat:
        prepare_chat.require_seq_len(options)
    out = options.out.resolve()
    with staging_dir(out) as stage:
        tokenizer, eot_id, added = _tokenizer(options, sources, chat)
        base_vocab_size = vocab_size_of(tokenizer) - len(added)
        tokenizer.save(str(stage / TOKENIZER_NAME))
        if chat:
            write_template(stage)  # the template belongs to the tokenizer: tokenizer_config.json beside it
        elif hasattr(tokenizer, "encode_special_tokens"):
            tokenizer.encode_special_tokens = True  # a literal "<|endoftext|>" in a document stays text
        vocab_size = vocab_size_of(tokenizer)
        dtype = np.uint16 if vocab_size <= 2**16 else np.uint32
        stats = MixStats()  # this run's counts (the tokenizer sample read the same documents with its own)
        if chat:
            splits, val_budget, chat_record = _encode_chat(options, sources, tokenizer, eot_id, dtype, stage)
            prepare_chat.check_conversations(splits, chat_record)
        else:
            splits, val_budget = _encode_all(options, sources, tokenizer, eot_id, dtype, stage, stats)
        _check_splits(splits, options, sources, stats)
        manifest = {
            "format_version": FORMAT_VERSION,
            "tokenizer": TOKENIZER_NAME, "tokenizer_sha256": file_sha256(stage / TOKENIZER_NAME),
            "vocab_size": vocab_size, "model_vocab_size": round_vocab(vocab_size),
            "eot_token": tokenizer.id_to_token(eot_id), "eot_id": eot_id, "dtype": np.dtype(dtype).name,
            "splits": splits,
            "sources": [s.describe() for s in sources],
            "mixing": "weights (stops when a source runs out)" if options.weights else "all documents once",
            "report": {"requested_vocab_size": options.vocab_size, "val_tokens": val_budget,
                       "val_tokens_automatic": options.val_tokens is None,
                       "empty_documents_skipped": stats.empty_skipped,
                       "undecodable_sequences_replaced": stats.replaced, "seconds": round(time.time() - started, 1)},
            "args": args_for_manifest or {},
        }
        if chat:
            manifest.update(chat=chat_record, tokenizer_added_tokens=added, base_vocab_size=base_vocab_size)
        atomic_write_json(stage / MANIFEST_NAME, manifest)  # last: a directory with a manifest is complete
        install(stage, out)
    return manifest


def _check_splits(splits: dict, options, sources, stats) -> None:
    if splits["train"]["tokens"] == 0:
        total = sum(s.get("tokens", 0) for s in splits.values())
        if total == 0:
            raise DataError(f"The sources {', '.join(str(s.path) for s in sources)} contain no non-empty documents "
                            f"({stats.empty_skipped} empty ones skipped). Check --text-field and the --include globs.")
        raise DataError(f"The sources hold only {total:,} tokens and all of them went to the validation split "
                        f"(--val-tokens {options.val_tokens:,}). Lower --val-tokens, e.g. to {total // 10:,}.")


def _validation_line(manifest: dict) -> str:
    """How the default validation split came out, e.g. 'validation: 5,012 tokens (5.0% of the corpus; ...)'."""
    splits = manifest["splits"]
    val = splits.get("val", {}).get("tokens", 0)
    share = 100 * val / max(1, val + splits["train"]["tokens"])
    why = "the corpus is a single document, kept for training" if val == 0 else \
        f"whole documents: the default is {100 * VAL_FRACTION:.0f}% up to {VAL_TOKENS_CAP:,}"
    return f"  validation: {val:,} tokens ({share:.1f}% of the corpus; {why}; --val-tokens N to choose)"


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
    if "chat" in manifest:
        lines += prepare_chat.report_lines(manifest)
    report = manifest["report"]
    if report.get("val_tokens_automatic"):
        lines.append(_validation_line(manifest))
    lines.append(f"  skipped {report['empty_documents_skipped']:,} empty document(s); replaced "
                 f"{report['undecodable_sequences_replaced']:,} undecodable byte sequence(s); "
                 f"{report['seconds']:.1f} s")
    requested = report.get("requested_vocab_size")
    if requested and requested > manifest["vocab_size"]:
        lines.append(f"  note: the sample had too little text for {requested:,} ids; the tokenizer stopped at "
                     f"{manifest['vocab_size']:,} (raise --tokenizer-sample-bytes or use more data for more)")
    line = f"set model.vocab_size: {manifest['model_vocab_size']}  (the tokenizer's {manifest['vocab_size']:,} " \
           f"ids rounded up to a multiple of 64) and data_dir: {out}"
    if "chat" in manifest:
        line += f", model.max_seq_len: {manifest['chat']['seq_len']} (or a multiple)"
        if manifest["chat"]["layout"] == "packed":
            line += ", model.attention_mask: document (conversations share windows)"
        line += "; start from a model with init_from: CHECKPOINT"
    lines.append(line)
    return "\n".join(lines)
