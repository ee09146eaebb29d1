"""Choosing the next token from logits: greedy, temperature, top-k and top-p (nucleus) sampling.

Used by `LunarisCodex.generate_stream` (the decoding loop) and everything built on it.
"""

import torch

from lunaris.errors import ConfigError, LunarisError


def check_sampling_args(max_new_tokens: int, temperature: float, top_k, top_p) -> None:
    problems = []
    if not isinstance(max_new_tokens, int) or max_new_tokens < 0:
        problems.append(f"max_new_tokens must be a non-negative integer, got {max_new_tokens!r}")
    if temperature < 0:
        problems.append(f"temperature must be >= 0 (0 is greedy), got {temperature!r}")
    if top_k is not None and (not isinstance(top_k, int) or top_k < 1):
        problems.append(f"top_k must be a positive integer or None, got {top_k!r}")
    if top_p is not None and not 0.0 < top_p <= 1.0:
        problems.append(f"top_p must be in (0, 1] or None, got {top_p!r}")
    if problems:
        raise ConfigError("invalid generation settings: " + "; ".join(problems) + ".")


def check_prompt_length(prompt_tokens: int, max_seq_len: int) -> None:
    """A prompt must leave room for at least one new token within the model's context."""
    if not 0 < prompt_tokens < max_seq_len:
        raise LunarisError(
            f"the prompt has {prompt_tokens} tokens, but generation needs between 1 and {max_seq_len - 1} (the "
            f"model's context, max_seq_len={max_seq_len}, must leave room for new tokens); shorten the prompt.")


def filter_logits(logits: torch.Tensor, top_k: int = None, top_p: float = None) -> torch.Tensor:
    """Set the logits of excluded tokens to -inf. logits (B, V).

    top_k keeps the k largest logits (ties with the k-th are kept too); top_p then keeps the smallest set of
    most likely tokens whose probability reaches top_p (nucleus sampling). The most likely token always stays.
    """
    if top_k is not None and top_k < logits.size(-1):
        kth_largest = torch.topk(logits, top_k, dim=-1).values[:, -1:]             # (B, 1)
        logits = logits.masked_fill(logits < kth_largest, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)               # (B, V) each
        probs = sorted_logits.softmax(dim=-1)
        mass_before = probs.cumsum(dim=-1) - probs  # probability of the more likely tokens
        remove_sorted = mass_before >= top_p
        remove = remove_sorted.scatter(-1, order, remove_sorted)                   # back to vocabulary order
        logits = logits.masked_fill(remove, float("-inf"))
    return logits


def sample_next_token(logits: torch.Tensor, temperature: float = 1.0, top_k: int = None, top_p: float = None,
                      generator: torch.Generator = None) -> torch.Tensor:
    """Next token ids (B, 1) from logits (B, V): argmax when temperature is 0, else a filtered sample."""
    if temperature == 0:
        return logits.argmax(dim=-1, keepdim=True)
    logits = filter_logits(logits.float() / temperature, top_k, top_p)
    return torch.multinomial(logits.softmax(dim=-1), num_samples=1, generator=generator)
