"""`lunaris generate`: stream a model's continuation to the terminal, or continue a file of prompts in batches.

The decoding loop itself (KV-cache prefill, then one-token steps, compiled on request) is
`LunarisCodex.generate_stream`, and what it samples with is `lunaris.model.sampling`; the tokenizer and the
streaming decoder are `lunaris.data.tokenizer`. This module holds what the command adds around them: the model on
its device and precision (`load_model`, also used by `lunaris eval` and the lm-eval model), text that appears as
it is produced, and for --prompt-file one JSON line per prompt.
"""

import json
import sys
import time
import warnings
from pathlib import Path

import torch

from lunaris.data.tokenizer import StreamingDecoder, end_of_text_id, find_tokenizer, load_tokenizer
from lunaris.errors import LunarisError
from lunaris.model import model_from_checkpoint
from lunaris.model.sampling import check_prompt_length, check_sampling_args
from lunaris.runtime import END_OF_TEXT, inference_threads, resolve_device, resolve_dtype, set_threads

# The tokenizer functions live in lunaris.data.tokenizer; these names stay importable from here.
__all__ = ["StreamingDecoder", "compile_note", "encode_prompt", "end_of_text_id", "find_tokenizer", "load_model",
           "load_tokenizer", "read_prompts", "run_generate", "run_generate_batch"]


# ---- the model ----------------------------------------------------------------------------------

def load_model(checkpoint, device: str = "auto", dtype: str = "auto", threads: int = None):
    """LunarisCodex from a checkpoint or run directory, in eval mode, on the resolved device and precision."""
    set_threads(threads)  # checked before the (slow) load; the default depends on the model's size
    torch_device = resolve_device(device)
    model = model_from_checkpoint(checkpoint, device=torch_device)
    set_threads(inference_threads(threads, model.num_params(), torch_device))
    return model.to(resolve_dtype(dtype, torch_device))


# ---- lunaris generate --------------------------------------------------------------------------------

def encode_prompt(tokenizer, prompt: str, eos) -> list:
    """Token ids of a prompt, as `lunaris prepare` encodes documents; an empty prompt is [<|endoftext|>]."""
    prompt_ids = tokenizer.encode(prompt, add_special_tokens=False).ids
    if not prompt_ids:
        if eos is None:
            raise LunarisError(f"the prompt is empty and the tokenizer has no {END_OF_TEXT} token to start a document "
                               f"with; pass --prompt TEXT.")
        prompt_ids = [eos]
    return prompt_ids


def compile_note(stats: dict) -> str:
    """The stderr line about compilation ('' when the decode step ran eagerly)."""
    if not stats.get("compiled"):
        return ""
    return f"[compiled the decode step in {stats['compile_s']:.1f} s, included in the time below]\n"


def run_generate(checkpoint, prompt: str, max_new_tokens: int = 200, temperature: float = 0.8, top_k: int = None,
                 top_p: float = None, seed: int = None, tokenizer_path=None, device: str = "auto",
                 dtype: str = "auto", threads: int = None, out=None, err=None, compile=None) -> str:
    """Print the prompt, then the continuation as it is produced; return the continuation.

    An empty prompt starts a new document (the model sees <|endoftext|>). Stops at <|endoftext|>, after
    max_new_tokens, or at the model's context limit (with a note on `err`). `compile`: True/False, or None
    for the model's default (see LunarisCodex.generate_stream).
    """
    out, err = out or sys.stdout, err or sys.stderr
    check_sampling_args(max_new_tokens, temperature, top_k, top_p)
    model = load_model(checkpoint, device, dtype, threads)
    tokenizer = load_tokenizer(find_tokenizer(checkpoint, tokenizer_path), model.config.vocab_size)
    eos = end_of_text_id(tokenizer)
    prompt_ids = encode_prompt(tokenizer, prompt, eos)
    check_prompt_length(len(prompt_ids), model.config.max_seq_len)
    device_ = model.wte.weight.device
    generator = torch.Generator(device=device_).manual_seed(seed) if seed is not None else None
    idx = torch.tensor([prompt_ids], dtype=torch.long, device=device_)

    decoder = StreamingDecoder(tokenizer, prompt_ids)
    out.write(prompt)
    out.flush()
    pieces, n_new, start, stats = [], 0, time.perf_counter(), {}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for token in model.generate_stream(idx, max_new_tokens, temperature, top_k, top_p, eos, generator,
                                           compile=compile, stats=stats):
            n_new += 1
            if eos is not None and token.item() == eos:
                break
            piece = decoder.push(token.item())
            if piece:
                pieces.append(piece)
                out.write(piece)
                out.flush()
    pieces.append(decoder.flush())
    out.write(pieces[-1] + "\n")
    out.flush()
    elapsed = time.perf_counter() - start
    for warning in caught:
        err.write(f"note: {warning.message}\n")
    err.write(compile_note(stats))
    err.write(f"[{n_new} tokens in {elapsed:.2f} s, {n_new / max(elapsed, 1e-9):.1f} tokens/s on {device_}]\n")
    return "".join(pieces)


# ---- lunaris generate --prompt-file ------------------------------------------------------------------

def read_prompts(path) -> list:
    """Prompts from a file: one per line, or, in a .jsonl file, one JSON string (or object with "prompt") per line
    (the way to write prompts that span lines). Blank lines are skipped."""
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise LunarisError(f"cannot read the prompt file {path} ({exc}); pass a UTF-8 text file with one prompt "
                           f"per line.") from None
    prompts = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        if path.suffix != ".jsonl":
            prompts.append(line)
            continue
        try:
            item = json.loads(line)
        except json.JSONDecodeError as exc:
            raise LunarisError(f"{path} line {number} is not JSON ({exc}); a .jsonl prompt file holds one JSON "
                               f"string or {{\"prompt\": ...}} object per line.") from None
        prompt = item.get("prompt") if isinstance(item, dict) else item
        if not isinstance(prompt, str):
            raise LunarisError(f"{path} line {number} holds no prompt; write a JSON string or an object with a "
                               f"\"prompt\" string.")
        prompts.append(prompt)
    if not prompts:
        raise LunarisError(f"the prompt file {path} holds no prompt.")
    return prompts


def run_generate_batch(checkpoint, prompts: list, max_new_tokens: int = 200, temperature: float = 0.8,
                       top_k: int = None, top_p: float = None, seed: int = None, tokenizer_path=None,
                       device: str = "auto", dtype: str = "auto", threads: int = None, batch_size: int = 8,
                       compile=None, out=None, err=None) -> list:
    """Continue every prompt, `batch_size` at a time; print one JSON line per prompt, in order; return the texts.

    Each line is {"prompt": ..., "completion": ...}. Prompts of different lengths share a batch (left-padded:
    greedy decoding gives each exactly what it would get alone); they are grouped by length to pad little.
    """
    out, err = out or sys.stdout, err or sys.stderr
    check_sampling_args(max_new_tokens, temperature, top_k, top_p)
    if not isinstance(batch_size, int) or batch_size < 1:
        raise LunarisError(f"--batch-size must be a positive integer, got {batch_size!r}.")
    model = load_model(checkpoint, device, dtype, threads)
    tokenizer = load_tokenizer(find_tokenizer(checkpoint, tokenizer_path), model.config.vocab_size)
    eos = end_of_text_id(tokenizer)
    encoded = [encode_prompt(tokenizer, prompt, eos) for prompt in prompts]
    for ids in encoded:
        check_prompt_length(len(ids), model.config.max_seq_len)
    device_ = model.wte.weight.device
    generator = torch.Generator(device=device_).manual_seed(seed) if seed is not None else None
    order = sorted(range(len(prompts)), key=lambda i: len(encoded[i]))
    completions, n_new, start, stats, compile_s = [None] * len(prompts), 0, time.perf_counter(), {}, 0.0
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for first in range(0, len(order), batch_size):
            rows = order[first:first + batch_size]
            outputs = model.generate([encoded[i] for i in rows], max_new_tokens, temperature, top_k, top_p, eos,
                                     generator, compile=compile, stats=stats)
            compile_s += stats["compile_s"]
            for i, output in zip(rows, outputs):
                new = output[len(encoded[i]):].tolist()
                n_new += len(new)
                completions[i] = tokenizer.decode([t for t in new if t != eos], skip_special_tokens=True)
    for prompt, completion in zip(prompts, completions):
        out.write(json.dumps({"prompt": prompt, "completion": completion}, ensure_ascii=False) + "\n")
    out.flush()
    elapsed = time.perf_counter() - start
    for warning in {str(w.message): w for w in caught}.values():  # one note per distinct warning
        err.write(f"note: {warning.message}\n")
    err.write(compile_note({"compiled": compile_s > 0, "compile_s": compile_s}))
    err.write(f"[{len(prompts)} prompts, {n_new} tokens in {elapsed:.2f} s, {n_new / max(elapsed, 1e-9):.1f} "
              f"tokens/s on {device_}, batches of up to {batch_size}]\n")
    return completions
