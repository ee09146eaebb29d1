"""The data pipeline: `lunaris prepare`'s overhead over pure tokenization, and the loader's tokens/s.

1. Preparation: a JSONL corpus (two sources, mixed) is tokenized twice with the same tokenizer.json:
   (a) the tokenizer library alone: `encode_batch` (the `_fast` variant where available, as prepare
   uses) on the same documents, already read and mixed in memory, in exactly prepare's batches;
   (b) the whole `prepare` pipeline (reading and parsing files, mixing, encoding, appending
   end-of-text, writing shards with hashes, manifest). Reported: the best MB/s of each, and the
   ratio (b)/(a) in wall time and in process CPU time (all threads), as the median over pairs of
   adjacent runs (each pair sees the same machine load); the target is at most 1.30. CPU time is
   the robust figure on a busy machine; wall time also credits prepare's overlap of reading and
   writing with encoding.
2. Loader: uint16 shards of `loader_tokens` tokens, read once so they are page-cached, then
   `TokenLoader` (one process, num_workers=0) yields shuffled (x, y) int64 batches; the target is at
   least 20 million tokens/s.

Text: `text_dir` (files read as documents), or by default the Python standard library's source files
(real, varied text available on every machine), repeated until `corpus_mb` is reached.
"""

import json
import os
import statistics
import sys
import sysconfig
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

import numpy as np
from tokenizers import Tokenizer

from lunaris.data import ShardDataset, TokenLoader
from lunaris.data.prepare import PrepareOptions, _encode, batched, prepare
from lunaris.data.sources import MixStats, Source, mix_documents
from lunaris.data.tokenizer import train_tokenizer
from lunaris.errors import LunarisError

TARGET_PREPARE_RATIO = 1.30          # prepare / tokenizer alone, at most
TARGET_LOADER_TOKENS_PER_S = 20e6    # at least


@dataclass
class DataBenchOptions:
    """What `bench_data` measures, with bench/bench_data.py's defaults."""
    corpus_mb: float = 40            # text to prepare, in MB
    text_dir: Optional[str] = None   # files to use instead of the Python standard library's sources
    vocab_size: int = 32_000
    repeats: int = 3
    loader_tokens: int = 100_000_000
    seq_len: int = 1024
    batch_size: int = 32
    loader_seconds: float = 2.0      # approximate loader measuring time
    prepare: bool = True
    loader: bool = True


QUICK = dict(corpus_mb=2, loader_tokens=4_000_000, repeats=1)  # `lunaris bench --quick`


def corpus_texts(text_dir: Optional[str], target_bytes: int) -> list:
    """Documents of `text_dir` (or the standard library's *.py files), repeated up to `target_bytes`."""
    root = Path(text_dir) if text_dir else Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in root.rglob("*" if text_dir else "*.py") if p.is_file())
    texts, size = [], 0
    while size < target_bytes:  # the files in order, again and again
        before = len(texts)
        for path in files:
            text = path.read_text(encoding="utf-8", errors="replace")
            if text.strip():
                texts.append(text)
                size += len(text.encode())
            if size >= target_bytes:
                break
        if len(texts) == before:
            raise LunarisError(f"the data benchmark found no non-empty text files under {root}; give a "
                               f"directory of text files (--text-dir).")
    return texts


def mixed_documents(sources: list) -> list:
    """The documents in the order and form prepare tokenizes them (same mix, same batches), held in memory."""
    built = [Source(Path(p)) for p in sources]
    for source in built:
        source.weight = float(source.disk_bytes())
    return list(mix_documents(built, honour_weights=False, stats=MixStats()))


def timed(fn) -> tuple:
    """(wall seconds, CPU seconds of this process, all threads included) of fn()."""
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - wall, time.process_time() - cpu


def pure_encoding(tokenizer_file: Path, docs: list, batch_docs: int, batch_bytes: int) -> None:
    tokenizer = Tokenizer.from_file(str(tokenizer_file))  # fresh, like prepare's (the BPE cache starts cold)
    tokenizer.encode_special_tokens = True  # as prepare encodes
    for batch in batched(iter(docs), batch_docs, batch_bytes):
        _encode(tokenizer, [t for _, t, _ in batch])


def prepare_run(sources: list, tokenizer_file: Path, out: Path) -> None:
    prepare(PrepareOptions(sources=[str(s) for s in sources], out=out, tokenizer=tokenizer_file, val_tokens=100_000,
                           shard_tokens=10_000_000, overwrite=True, progress=False))


def write_corpus(texts: list, work: Path, vocab_size: int) -> tuple:
    """Two JSONL sources (the halves of `texts`) and a tokenizer trained on a tenth: (sources, tokenizer file)."""
    half = len(texts) // 2
    sources = [work / "a.jsonl", work / "b.jsonl"]
    for path, part in zip(sources, (texts[:half], texts[half:])):
        with open(path, "w", encoding="utf-8") as f:
            f.writelines(json.dumps({"text": t}) + "\n" for t in part)
    tokenizer_file = work / "tokenizer.json"
    train_tokenizer(iter(texts[:max(1, len(texts) // 10)]), vocab_size).save(str(tokenizer_file))
    return sources, tokenizer_file


def bench_prepare(options: DataBenchOptions, work: Path) -> dict:
    """Pure encoding and the prepare pipeline, in adjacent pairs, `repeats` times."""
    texts = corpus_texts(options.text_dir, int(options.corpus_mb * 1e6))
    nbytes = sum(len(t.encode()) for t in texts)
    sources, tokenizer_file = write_corpus(texts, work, options.vocab_size)
    docs = mixed_documents(sources)
    pure, pipeline = [], []
    for _ in range(options.repeats):
        pure.append(timed(lambda: pure_encoding(tokenizer_file, docs, 1024, 8_000_000)))
        pipeline.append(timed(lambda: prepare_run(sources, tokenizer_file, work / "out")))
    mb = nbytes / 1e6
    pure_wall, pure_cpu = min(w for w, _ in pure), min(c for _, c in pure)
    pipe_wall, pipe_cpu = min(w for w, _ in pipeline), min(c for _, c in pipeline)
    return {"corpus_bytes": nbytes, "documents": len(texts), "vocab_size": options.vocab_size,
            "pure_wall_s": [w for w, _ in pure], "pure_cpu_s": [c for _, c in pure],
            "pipeline_wall_s": [w for w, _ in pipeline], "pipeline_cpu_s": [c for _, c in pipeline],
            "pure_mb_per_s": mb / pure_wall, "pure_mb_per_cpu_s": mb / pure_cpu,
            "pipeline_mb_per_s": mb / pipe_wall, "pipeline_mb_per_cpu_s": mb / pipe_cpu,
            # ratios of adjacent runs (same machine load), median over repeats: robust on a shared machine
            "ratio_wall": statistics.median(p[0] / q[0] for p, q in zip(pipeline, pure)),
            "ratio_cpu": statistics.median(p[1] / q[1] for p, q in zip(pipeline, pure)),
            "target_ratio_at_most": TARGET_PREPARE_RATIO}


def bench_loader(options: DataBenchOptions, work: Path) -> dict:
    """TokenLoader batches per second over page-cached uint16 shards."""
    shard_dir = work / "shards"
    shard_dir.mkdir()
    rng = np.random.default_rng(0)
    for k in range(4):
        np.save(shard_dir / f"shard_{k:05d}.npy", rng.integers(0, 50_000, options.loader_tokens // 4, dtype=np.uint16))
    for path in shard_dir.glob("*.npy"):  # page-cache the shards
        path.read_bytes()
    loader = TokenLoader(ShardDataset(shard_dir, options.seq_len), options.batch_size, seed=0, num_workers=0)
    iterator = iter(loader)
    for _ in range(10):  # warm-up
        next(iterator)
    n_batches = min(loader.batches_per_epoch, max(50, int(options.loader_seconds * 1000)))
    start = time.perf_counter()
    for _ in range(n_batches):
        next(iterator)
    elapsed = time.perf_counter() - start
    tokens = n_batches * options.batch_size * options.seq_len
    return {"shard_tokens": options.loader_tokens, "shards": 4, "batch_size": options.batch_size,
            "seq_len": options.seq_len, "num_workers": 0, "batches": n_batches, "seconds": elapsed,
            "tokens_per_s": tokens / elapsed, "target_tokens_per_s_at_least": TARGET_LOADER_TOKENS_PER_S}


def bench_data(options: DataBenchOptions, log=None) -> dict:
    """Both measurements in a temporary directory; {"options", "cpu_count", "python", "prepare", "loader"}."""
    log = log or (lambda message: None)
    result = {"options": asdict(options), "cpu_count": os.cpu_count(), "python": sys.version.split()[0]}
    with tempfile.TemporaryDirectory(prefix="lunaris-bench-data-") as tmp:
        if options.prepare:
            log(f"data: prepare vs the tokenizer alone, {options.corpus_mb:g} MB x {options.repeats} ...")
            result["prepare"] = bench_prepare(options, Path(tmp))
        if options.loader:
            log(f"data: loader over {options.loader_tokens / 1e6:.0f}M tokens ...")
            result["loader"] = bench_loader(options, Path(tmp))
    return result
