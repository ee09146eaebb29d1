"""Generation: prefill, then a static-shape decode step (compiled on request), for a batch of prompts.

`LunarisCodex.generate` and `generate_stream` call `generate_tokens` and `stream_tokens`; the per-token
arithmetic is the model's own `decode_step`. Prompts of different lengths are left-padded into one batch in
which each row sees exactly the positions and keys it would see alone. Sampling stays on the device; the only
per-step host read is whether every row has finished.
"""

import time
import warnings
from contextlib import contextmanager

import torch

from lunaris.errors import ConfigError, LunarisError
from lunaris.model.sampling import check_prompt_length, check_sampling_args, sample_next_token

# Auto compilation (CUDA only) starts once a model has decoded this many steps in the process: an estimate of
# compilation time (tens of seconds cold, a few with inductor's cache warm) over the time CUDA graphs save per
# step (a few milliseconds for a small model, whose eager step is bound by kernel launches).
AUTO_COMPILE_STEPS = 2048

_COMPILED_DECODE_STEPS: dict = {}


def _decode_step_entry(model, token, slot, caches, pad, key_ok):
    """What torch.compile captures: the model's static-shape decode step (over the whole cache)."""
    return model.decode_step(token, slot, caches, pad, key_ok)


def compiled_decode_step(options: dict):
    """torch.compile(`_decode_step_entry`, dynamic=False, **options), made once per set of options.

    Shapes are static (a recompilation per batch size and cache length, never per step); the model is an
    argument, so models of one configuration share the compiled code.
    """
    key = tuple(sorted((name, repr(value)) for name, value in options.items()))
    if key not in _COMPILED_DECODE_STEPS:
        _COMPILED_DECODE_STEPS[key] = torch.compile(_decode_step_entry, **{"dynamic": False, **options})
    return _COMPILED_DECODE_STEPS[key]


def static_cache_length(needed: int, limit: int) -> int:
    """The cache length of a compiled generation: `needed` rounded up to a power of two (at least 64), at most
    max_seq_len, so that a few compiled graphs serve every generation length."""
    return max(needed, min(max(64, 1 << (needed - 1).bit_length()), limit))


def left_pad(prompts, device, max_seq_len: int) -> tuple:
    """Prompts as one batch: (idx (B, T), pad (B,) long or None), each prompt's length checked.

    A (B, T) tensor is used as it is (pad None). A list of prompts (sequences of ids or 1-D tensors) is
    right-aligned in a (B, T) tensor on `device`, row b after pad[b] padding positions (token 0, masked);
    pad is None when all prompts have the same length.
    """
    if isinstance(prompts, torch.Tensor):
        if prompts.dim() != 2:
            raise LunarisError(f"prompts must be a (batch, length) tensor of token ids or a list of prompts, got a "
                               f"tensor of shape {tuple(prompts.shape)}.")
        check_prompt_length(prompts.shape[1], max_seq_len)
        return prompts, None
    rows = [torch.as_tensor(prompt, dtype=torch.long).reshape(-1).cpu() for prompt in prompts]
    if not rows:
        raise LunarisError("generate got an empty list of prompts; pass at least one.")
    for row in rows:
        check_prompt_length(row.numel(), max_seq_len)
    T = max(row.numel() for row in rows)
    idx = torch.zeros(len(rows), T, dtype=torch.long)
    for b, row in enumerate(rows):
        idx[b, T - row.numel():] = row
    pad = torch.tensor([T - row.numel() for row in rows])
    return idx.to(device), (pad.to(device) if bool(pad.any()) else None)


@torch.no_grad()
def generate_tokens(model, idx, max_new_tokens: int, temperature: float = 1.0, top_k: int = None, top_p: float = None,
             eos_token_id: int = None, generator: torch.Generator = None, *, compile=None, stats: dict = None):
    """Continue prompts: idx (B, T) tensor -> (B, T + n) tensor with n <= max_new_tokens; or a list of prompts
    (each a sequence of token ids, lengths may differ) -> a list of 1-D tensors, each its prompt and its
    continuation (ending with `eos_token_id` where a row produced it).

    temperature 0 is greedy; top_k / top_p restrict sampling to the most likely tokens. Stops when every
    row has produced `eos_token_id` (in a tensor result finished rows are padded with it), or, with a
    warning, at max_seq_len. A list is decoded as one left-padded batch in which each row sees the positions
    and keys it would see alone (so greedy decoding gives each the tokens it gets alone, up to the last bits
    of batched matrix products). `compile` and `stats`: see `stream_tokens`.
    """
    new_tokens = list(stream_tokens(model, idx, max_new_tokens, temperature, top_k, top_p, eos_token_id,
                                           generator, compile=compile, stats=stats))
    if isinstance(idx, torch.Tensor):
        return torch.cat([idx, *new_tokens], dim=1)
    device = model.wte.weight.device
    new = torch.cat(new_tokens, dim=1) if new_tokens else torch.zeros(len(idx), 0, dtype=torch.long,
                                                                       device=device)
    rows = []
    for prompt, row in zip(idx, new):
        if eos_token_id is not None:
            ends = (row == eos_token_id).nonzero()
            row = row[:int(ends[0]) + 1] if len(ends) else row
        rows.append(torch.cat([torch.as_tensor(prompt, dtype=torch.long, device=device).reshape(-1), row]))
    return rows


@torch.no_grad()
def stream_tokens(model, idx, max_new_tokens: int, temperature: float = 1.0, top_k: int = None,
                    top_p: float = None, eos_token_id: int = None, generator: torch.Generator = None, *,
                    compile=None, stats: dict = None):
    """Yield the next token of every row, (B, 1), one step at a time (arguments as in `generate`).

    One forward pass over the prompts fills the KV caches (prefill), then each step feeds only the newest
    tokens (`decode_step`). Runs in eval mode (dropout off, MoC dropless) and restores the previous mode.
    Sampling stays on the device; the only per-step host read is whether every row has finished (with
    `eos_token_id`).

    `compile`: False decodes eagerly (the reference); True compiles the decode step with torch.compile
    (inductor; on CUDA with CUDA graphs, mode="reduce-overhead"), once per batch size and cache length
    (lengths are rounded up to a power of two so that a few graphs serve every generation); a dict passes
    torch.compile options instead (e.g. {"backend": "aot_eager"}); None (the default) compiles on CUDA once
    this model has decoded enough steps in this process for compilation to pay off (AUTO_COMPILE_STEPS),
    and never elsewhere. If compilation fails, decoding continues eagerly with a warning. `stats`, a dict,
    receives "compiled" (bool) and "compile_s", the seconds of the first compiled step (compilation
    included).
    """
    check_sampling_args(max_new_tokens, temperature, top_k, top_p)
    device = model.wte.weight.device
    limit = model.config.max_seq_len
    idx, pad = left_pad(idx, device, limit)                # (B, T), (B,) or None
    B, T = idx.shape
    steps = min(max_new_tokens, limit - T)  # the whole sequence stays within max_seq_len
    options = decode_compile_options(model, compile, steps)
    stats = {} if stats is None else stats
    stats.update(compiled=options is not None, compile_s=0.0)
    with eval_mode(model):
        length = T + steps if options is None else static_cache_length(T + steps, limit)
        caches = generation_caches(model, B, length, options)
        prompt_mask, positions, key_ok = padding_masks(pad, T, length, device)
        pad_column = None if pad is None else pad[:, None]                        # (B, 1)
        logits = model(idx, caches=caches, last_logits_only=True, attn_mask=prompt_mask,
                       positions=positions).logits[:, -1]                          # (B, vocab)
        step_fn = compiled_decode_step(options) if options is not None else None
        cudagraphs = options is not None and options.get("mode") in ("reduce-overhead", "max-autotune")
        slot = torch.full((1,), T, dtype=torch.long, device=device)
        finished = torch.zeros(B, dtype=torch.bool, device=device)
        for step in range(steps):
            token = sample_next_token(logits, temperature, top_k, top_p, generator)  # (B, 1)
            if eos_token_id is not None:
                token = token.masked_fill(finished[:, None], eos_token_id)  # finished rows repeat eos
                finished |= token[:, 0] == eos_token_id
            yield token
            if eos_token_id is not None and bool(finished.all()):
                return
            if step + 1 == steps:
                break
            if step_fn is None:
                logits = model.decode_step(token, slot, caches, pad_column, key_ok, length=T + step + 1)
            else:
                logits, step_fn = compiled_step(model, step_fn, step == 0, cudagraphs, stats, token, slot, caches,
                                                pad_column, key_ok)
            slot += 1
        if steps < max_new_tokens:
            warnings.warn(f"generation stopped after {steps} of {max_new_tokens} new tokens: the sequence reached "
                          f"the model's context limit, max_seq_len={limit}.", stacklevel=2)


@contextmanager
def eval_mode(model):
    """The model in eval mode (dropout off, MoC dropless) while the block runs; its previous mode restored after
    (also when a generator using it is closed early)."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


def padding_masks(pad, T: int, length: int, device) -> tuple:
    """For left-padded prompts (pad (B,) long; None: nothing padded, all three None): the prompt pass's attention
    mask (B, 1, T, T) bool and rotary positions (B, T), and the cache positions that are not padding (B, length).

    Row b's tokens sit at positions 0.. after its pad[b] padding slots, exactly where they would be alone; a
    padding query sees itself, so no attention row is empty.
    """
    if pad is None:
        return None, None, None
    key_ok = torch.arange(length, device=device) >= pad[:, None]             # (B, S) not padding
    causal = torch.ones(T, T, dtype=torch.bool, device=device).tril()
    own = torch.eye(T, dtype=torch.bool, device=device)
    prompt_mask = (causal & (key_ok[:, None, :T] | own))[:, None]           # (B, 1, T, T)
    positions = (torch.arange(T, device=device) - pad[:, None]).clamp(min=0)  # (B, T)
    return prompt_mask, positions, key_ok


def decode_compile_options(model, compile, steps: int):
    """torch.compile options for the decode step of a generation of `steps` steps, or None to decode eagerly.

    Auto (None): only on CUDA, where CUDA graphs remove the launch overhead that dominates small-batch
    decoding, and only once the generations of this model in this process (this one included) have asked
    for AUTO_COMPILE_STEPS steps: decoding stays eager until the steps it ran would have paid for a
    compilation. With AUTO_COMPILE_STEPS at the break-even point, that rule (the ski-rental rule) never
    costs more than twice the better choice made in hindsight.
    """
    device_type = model._decode_device_type()
    if compile is None or compile == "auto":
        history = model.__dict__.setdefault("_decode_history", {"eager_steps": 0, "compiled": False})
        if device_type != "cuda":
            return None
        if not history["compiled"] and history["eager_steps"] + steps < AUTO_COMPILE_STEPS:
            history["eager_steps"] += steps
            return None
        history["compiled"] = True
        compile = True
    if compile is False:
        return None
    if compile is True:
        return {"mode": "reduce-overhead"} if device_type == "cuda" else {}
    if isinstance(compile, dict):
        return dict(compile)
    raise ConfigError(f"compile must be True, False, None (auto) or a dict of torch.compile options, "
                      f"got {compile!r}.")


def generation_caches(model, batch: int, length: int, options) -> list:
    """KV caches for one generation. With CUDA graphs the compiled step writes into buffers whose addresses
    the graph keeps: one set per model is kept and reused, its addresses marked static."""
    if options is None or options.get("mode") not in ("reduce-overhead", "max-autotune") \
            or model.wte.weight.device.type != "cuda":
        return model.new_kv_caches(batch, length)
    key = (batch, length, model.wte.weight.dtype, model.wte.weight.device)
    pool = model.__dict__.setdefault("_static_kv_caches", {})
    if key not in pool:
        pool.clear()
        pool[key] = model.new_kv_caches(batch, length)
        for cache in pool[key]:
            torch._dynamo.mark_static_address(cache.k, guard=False)
            torch._dynamo.mark_static_address(cache.v, guard=False)
    return pool[key]


def compiled_step(model, step_fn, first: bool, cudagraphs: bool, stats: dict, *args):
    """One compiled decode step: (logits (B, vocab), the step function for the next step). With CUDA graphs each
    call starts a new graph step; the first call compiles (first_compiled_step: None next if that failed)."""
    if cudagraphs:
        torch.compiler.cudagraph_mark_step_begin()
    if first:
        return first_compiled_step(model, step_fn, stats, *args)
    return step_fn(model, *args), step_fn


def first_compiled_step(model, step_fn, stats: dict, *args):
    """The first compiled step (compilation happens here, timed into stats); eager if compilation fails."""
    start = time.perf_counter()
    try:
        logits = step_fn(model, *args)
    except Exception as exc:  # a backend that cannot compile this model: decode eagerly, say so
        reason = " ".join(str(exc).split("\n\n")[0].split())  # its first paragraph, on one line
        warnings.warn(f"torch.compile of the decode step failed ({type(exc).__name__}: {reason}); decoding "
                      f"eagerly instead.", stacklevel=4)
        stats["compiled"] = False
        token, slot, caches, pad, key_ok = args
        return model.decode_step(token, slot, caches, pad, key_ok, length=int(slot) + 1), None
    if logits.device.type == "cuda":
        torch.cuda.synchronize(logits.device)
    stats["compile_s"] = time.perf_counter() - start
    return logits, step_fn
