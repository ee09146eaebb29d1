"""`lunaris eval`: loss, perplexity and bits-per-byte of a checkpoint on held-out token shards.

The held-out stream is read in order (`sequential_batches`), as windows of the model's max_seq_len,
so two evaluations of the same data see the same tokens. The loss is the mean cross-entropy over every
evaluated target token (the padded end of the stream excluded), in nats. Bits-per-byte uses the
bytes-per-token ratio of the split from its manifest (`lunaris prepare` counts both), which makes models
with different tokenizers comparable; a flat directory of shards has no manifest, so no bits-per-byte.
MoC layers run dropless (eval mode), and the reported loss is the cross-entropy alone, without aux losses.

`lunaris eval --tasks` scores downstream tasks instead (lunaris.tasks): accuracy by log-likelihood, per task.
"""

import math
import time
from pathlib import Path

from lunaris.checkpoints import read_trainer_state, resolve_checkpoint_path
from lunaris.data import (
    ShardDataset,
    check_vocab,
    read_manifest,
    resolve_data_dirs,
    sequential_batches,
    split_info,
    tokenizer_path,
)
from lunaris.data.packing import check_windows
from lunaris.data.tokenizer import end_of_text_id, find_tokenizer, load_tokenizer
from lunaris.errors import DataError, LunarisError
from lunaris.fileio import atomic_write_json
from lunaris.generate import load_model
from lunaris.tasks import encode_task, evaluate_tasks, load_task, parse_specs
from lunaris.tasks.scoring import token_encoder
from lunaris.train.evaluation import held_out_sums, loss_and_perplexity
from lunaris.train.init_from import grown_model


def evaluate(model, dataset, batch_size: int, max_batches: int = None, bytes_per_token: float = None) -> dict:
    """Token-weighted mean loss over the first `max_batches` batches (all if None) of a ShardDataset."""
    device = model.wte.weight.device
    batches = sequential_batches(dataset, batch_size, max_batches=max_batches)
    nats, tokens, count = held_out_sums(model, batches, device).tolist()  # the model is already in its dtype
    if tokens == 0:
        raise DataError("the evaluation data has no target tokens; point --data at shards with at least 2 tokens.")
    loss, perplexity = loss_and_perplexity(nats, tokens)
    return {
        "loss": loss,
        "perplexity": perplexity,
        "bits_per_byte": loss / math.log(2) / bytes_per_token if bytes_per_token else None,
        "tokens": int(tokens),
        "batches": int(count),
    }


def held_out_dir(data, run_config: dict) -> Path:
    """The shard directory to evaluate: --data, else the run's held-out split.

    --data may be a prepared directory (its val/ split), one of its splits, or a flat directory of shards.
    """
    if data is not None:
        _, val_dir = resolve_data_dirs(data)
        if val_dir is None:
            path = Path(data)
            if (path / "train").is_dir() and (path / "manifest.json").is_file():
                raise LunarisError(f"{path} has no val/ split (it was prepared with --val-tokens 0); pass "
                                   f"--data {path / 'train'} to evaluate on training data instead.")
            return path  # a flat directory of shards, or a split directory: evaluate it as given
        return Path(val_dir)
    data_dir, val_data_dir = run_config.get("data_dir"), run_config.get("val_data_dir")
    try:
        _, val_dir = resolve_data_dirs(data_dir, val_data_dir)
    except DataError as exc:
        raise LunarisError(f"the run's data ({exc}) cannot be found from here; pass --data DIR, the held-out "
                           f"shards to evaluate on.") from None
    if val_dir is None:
        raise LunarisError(f"the run has no held-out data (data_dir {data_dir} has no val/ split and "
                           f"val_data_dir is not set); pass --data DIR, the held-out shards to evaluate on.")
    return Path(val_dir)


def bytes_per_token(data_dir) -> float:
    """Average UTF-8 bytes per token of a prepared split (None for a flat directory without manifest); for
    conversations, bytes of the assistant's text per trained token (what the masked loss is over)."""
    info = split_info(data_dir)
    tokens = info and ((info.get("loss_mask") or {}).get("trained_tokens") or info.get("tokens"))
    if not info or not info.get("bytes") or not tokens:
        return None
    return info["bytes"] / tokens


def checkpoint_metadata(path) -> dict:
    """The run config and step saved in a checkpoint, read without loading its tensors (memory-mapped)."""
    path = resolve_checkpoint_path(path)
    state = read_trainer_state(path)
    return {"path": str(path), "config": state.get("config", {}), "step": state.get("step")}


def load_held_out(checkpoint, data=None, batch_size: int = None, device: str = "auto", dtype: str = "auto",
                  threads: int = None) -> tuple:
    """(model, checkpoint metadata, data directory, ShardDataset, batch size): what `lunaris eval` (and
    `lunaris analyze`) evaluate; batch_size None means the run's."""
    if batch_size is not None and batch_size < 1:
        raise LunarisError(f"--batch-size must be a positive integer, got {batch_size}.")
    model = load_model(checkpoint, device, dtype, threads)
    meta = checkpoint_metadata(checkpoint)
    data_dir = held_out_dir(data, meta["config"])
    model = fit_to_conversations(model, checkpoint, data_dir)
    check_vocab(data_dir, model.config.vocab_size)  # ids the embedding cannot index: a clear error, not a crash
    dataset = ShardDataset(data_dir, model.config.max_seq_len, verify="full")
    batch_size = batch_size or int(meta["config"].get("batch_size") or 8)
    return model, meta, data_dir, dataset, batch_size


def fit_to_conversations(model, checkpoint, data_dir):
    """A model evaluated on prepared conversations (a manifest with a `chat` entry) reads each one alone
    (attention_mask: document, whatever it was trained with); a base model whose tokenizer lacks the chat tokens
    is evaluated as fine-tuning from it starts (init_from: the vocabulary grown, new rows = the mean embedding), so
    that its assistant-token loss is the fine-tuned model's baseline. Other data: the model unchanged."""
    manifest = read_manifest(data_dir)
    if not manifest or "chat" not in manifest:
        return model
    if model.config.vocab_size < manifest["vocab_size"]:
        model = grown_model(model, checkpoint, manifest["model_vocab_size"], tokenizer_path(data_dir))
    model.config.attention_mask, model.config.document_separator_id = "document", int(manifest["eot_id"])
    check_windows(data_dir, model.config)  # windows of a multiple of the prepared length: conversations whole
    return model


def run_eval(checkpoint, data=None, max_batches: int = None, batch_size: int = None, device: str = "auto",
             dtype: str = "auto", threads: int = None, json_path=None) -> dict:
    """Evaluate a checkpoint; returns (and optionally writes to `json_path`) one JSON-ready dict."""
    if max_batches is not None and max_batches < 1:
        raise LunarisError(f"--max-batches must be a positive integer, got {max_batches}.")
    model, meta, data_dir, dataset, batch_size = load_held_out(checkpoint, data, batch_size, device, dtype, threads)
    start = time.perf_counter()
    result = evaluate(model, dataset, batch_size, max_batches, bytes_per_token(data_dir))
    result.update({"checkpoint": meta["path"], "step": meta["step"], "data": str(data_dir),
                   "seq_len": model.config.max_seq_len, "batch_size": batch_size,
                   "seconds": round(time.perf_counter() - start, 3)})
    if json_path is not None:
        atomic_write_json(Path(json_path), result)
    return result


def run_task_eval(checkpoint, tasks, limit: int = None, batch_size: int = None, device: str = "auto",
                  dtype: str = "auto", threads: int = None, tokenizer=None, json_path=None) -> dict:
    """Score a checkpoint on downstream tasks (`--tasks` entries, see lunaris.tasks); returns (and optionally
    writes to `json_path`) {"checkpoint", "step", "tasks": {name: result}, "seconds", ...}."""
    if limit is not None and limit < 1:
        raise LunarisError(f"--limit must be a positive integer, got {limit}.")
    if batch_size is not None and batch_size < 1:
        raise LunarisError(f"--batch-size must be a positive integer, got {batch_size}.")
    specs = parse_specs(tasks, limit)
    loaded = [load_task(spec) for spec in specs]  # every task file read before the (slow) model load
    model = load_model(checkpoint, device, dtype, threads)
    meta = checkpoint_metadata(checkpoint)
    tok = load_tokenizer(find_tokenizer(checkpoint, tokenizer), model.config.vocab_size)
    encoded = [encode_task(task, token_encoder(tok), end_of_text_id(tok), model.config.max_seq_len)
               for task in loaded]
    batch_size = batch_size or int(meta["config"].get("batch_size") or 8)
    start = time.perf_counter()
    results = evaluate_tasks(model, loaded, encoded, batch_size)
    summary = {"checkpoint": meta["path"], "step": meta["step"], "tasks": results,
               "seq_len": model.config.max_seq_len, "batch_size": batch_size,
               "seconds": round(time.perf_counter() - start, 3)}
    if json_path is not None:
        atomic_write_json(Path(json_path), summary)
    return summary
