"""Causal grouped-query attention with a fused QKV projection, rotary embeddings, a KV cache and an optional sliding
window (a query sees the last `window` positions, its own included).

Two ways through a layer: `forward` (training, evaluation, the prompt pass of generation: T tokens, keys so far
from `cache.update`; without a cache, documents and windows as the model's AttentionPlan computes them, masking.py)
and `decode` (one new token per row with static shapes: the key/value is written at a position given as a tensor
and attention runs over the whole preallocated cache under a mask, so that torch.compile captures one graph for
every step of a generation). A window in the cache is a mask: the cache keeps every position.
"""

import torch
import torch.nn as nn
import torch.nn.functional as F

from lunaris.model.layers import RMSNorm, apply_rotary
from lunaris.model.masking import AttentionPlan, sdpa, window_band

# Up to this many rows (batch size of a decode step), `decode_linear` computes a compiled CPU product as a
# multiply-and-sum that reads each weight once; above it, a matrix product (F.linear) is the better kernel.
MATVEC_MAX_ROWS = 8


def decode_linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x (..., D_in) @ weight.T (weight (D_out, D_in), no bias) for the few rows of a decode step.

    Eager: F.linear, exactly what nn.Linear computes. Under torch.compile on CPU, for at most MATVEC_MAX_ROWS
    rows: the product written as a broadcast multiply and a sum over D_in, which inductor turns into one fused,
    vectorized loop that streams each weight row once (rows innermost, so a small batch still reads every weight
    once). A batch-1 decode step is bound by reading the weights, and that loop reads them faster than the BLAS
    matrix-vector call F.linear makes on CPUs like the one BENCHMARKS.md reports on. The sum runs in another
    order than the BLAS kernel's, so logits differ from eager in the last bits (tests allow 1e-4).
    """
    if not (torch.compiler.is_compiling() and x.device.type == "cpu"):
        return F.linear(x, weight)
    rows = x.reshape(-1, x.shape[-1])                                    # (R, D_in)
    if rows.shape[0] > MATVEC_MAX_ROWS:
        return F.linear(x, weight)
    out = (weight.unsqueeze(1) * rows.unsqueeze(0)).sum(dim=-1)         # (D_out, R)
    return out.t().reshape(*x.shape[:-1], weight.shape[0])


class KVCache:
    """Preallocated keys and values of one layer at n_kv_heads: (B, Hkv, T_max, hd) each.

    `update(k, v, start)` writes at the integer position `start` and returns the keys/values so far (the prompt
    pass; Hugging Face cache adapters offer the same interface). `write(k, v, slot)` writes at a position held in
    a tensor and returns the whole buffers, the static shapes of a compiled decode step.
    """

    def __init__(self, batch: int, n_kv_heads: int, max_len: int, head_dim: int, device, dtype):
        shape = (batch, n_kv_heads, max_len, head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)

    def update(self, k: torch.Tensor, v: torch.Tensor, start: int):
        """Write k, v (B, Hkv, T, hd) at positions [start, start+T); return all keys/values so far."""
        end = start + k.shape[2]
        self.k[:, :, start:end] = k
        self.v[:, :, start:end] = v
        return self.k[:, :, :end], self.v[:, :, :end]

    def write(self, k: torch.Tensor, v: torch.Tensor, slot: torch.Tensor, length: int = None):
        """Write k, v (B, Hkv, T, hd) at positions `slot` ((T,) long tensor) in place; return the buffers.

        `length` returns only the first `length` positions (views; eager decoding, which knows the position on
        the host and so attends over the filled part only); None returns the whole buffers (static shapes).
        """
        self.k.index_copy_(2, slot, k)
        self.v.index_copy_(2, slot, v)
        if length is None:
            return self.k, self.v
        return self.k[:, :, :length], self.v[:, :, :length]


class CausalSelfAttention(nn.Module):
    def __init__(self, config, window: int = None):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = config.n_heads, config.kv_heads, config.head_dim
        self.qkv = nn.Linear(config.d_model, (self.n_heads + 2 * self.n_kv_heads) * self.head_dim, bias=False)
        self.proj = nn.Linear(self.n_heads * self.head_dim, config.d_model, bias=False)
        self.proj.residual_out = ("weight",)  # a residual output projection: depth-scaled init
        self.dropout = config.dropout
        self.window = window  # sliding window: a query sees the last `window` positions, its own included; None: all
        # qk_norm: RMSNorm per head over head_dim on queries and keys, before rotary (the Qwen3 layout)
        self.q_norm = RMSNorm(self.head_dim, config.norm_eps) if config.qk_norm else None
        self.k_norm = RMSNorm(self.head_dim, config.norm_eps) if config.qk_norm else None

    def forward(self, x, cos, sin, cache: KVCache = None, start: int = 0, mask=None, ve: torch.Tensor = None):
        """x (B, T, D); cos/sin (T, hd), or (B, 1, T, hd) for per-row positions (left-padded prompts).

        `mask`: an AttentionPlan (no cache: documents and windows, masking.py), or (B, 1, T, S) bool, True where a
        query may see a key, replacing the causal mask (padded prompts; the window still applies).
        `ve` (B, T, Hkv·hd): a gated value embedding added to the values (model.value_embeddings), or None.
        """
        B, T, _ = x.shape
        q, k, v = self._project(x, cos, sin, ve=ve)
        dropout = self.dropout if self.training else 0.0
        if isinstance(mask, AttentionPlan):
            y = mask.attend(q, k, v, self.window, dropout)                  # (B, Hq, T, hd)
        else:
            if cache is not None:
                k, v = cache.update(k, v, start)                            # (B, Hkv, start+T, hd)
            band = window_band(T, k.shape[2], self.window, x.device)       # (T, S) or None
            causal = mask is None and band is None and T > 1
            if mask is None:
                mask = band
            elif band is not None:
                mask = mask & band
            y = sdpa(q, k, v, mask, causal, dropout)
        return self.proj(y.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim))

    def decode(self, x, cos, sin, cache: KVCache, slot: torch.Tensor, mask: torch.Tensor = None,
               length: int = None, ve: torch.Tensor = None):
        """One new token per row, with static shapes: x (B, 1, D) -> (B, 1, D).

        Its key/value goes to cache position `slot` ((1,) long tensor, one position for the whole batch: prompts
        are left-padded). Attention runs over the first `length` cache positions (eager, which knows the
        position on the host), or over the whole cache (length None, static shapes), `mask` ((B or 1, 1, 1, S)
        bool) hiding the positions not to see: left padding, and with length None the unwritten ones; a window
        hides the positions `window` or more before `slot` as well.
        """
        B = x.shape[0]
        q, k, v = self._project(x, cos, sin, decode_linear, ve)
        k, v = cache.write(k, v, slot, length)                             # (B, Hkv, S, hd)
        if self.window is not None:
            recent = (torch.arange(k.shape[2], device=x.device) > slot - self.window).view(1, 1, 1, -1)  # (1,1,1,S)
            mask = recent if mask is None else mask & recent
        y = sdpa(q, k, v, mask)                                            # (B, Hq, 1, hd)
        return decode_linear(y.transpose(1, 2).reshape(B, 1, self.n_heads * self.head_dim), self.proj.weight)

    def _project(self, x, cos, sin, linear=None, ve=None):
        """q (B, Hq, T, hd), k and v (B, Hkv, T, hd), q and k normalized (qk_norm) and rotated, `ve` added to v;
        `linear(x, weight)` replaces self.qkv."""
        B, T, _ = x.shape
        qkv = self.qkv(x) if linear is None else linear(x, self.qkv.weight)
        q, k, v = qkv.split(
            [self.n_heads * self.head_dim, self.n_kv_heads * self.head_dim, self.n_kv_heads * self.head_dim], dim=-1)
        if ve is not None:
            v = v + ve                                                     # (B, T, Hkv * hd)
        q = q.view(B, T, self.n_heads, self.head_dim)                      # (B, T, Hq, hd)
        k = k.view(B, T, self.n_kv_heads, self.head_dim)                   # (B, T, Hkv, hd)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = q.transpose(1, 2), k.transpose(1, 2)                        # (B, Hq, T, hd), (B, Hkv, T, hd)
        v = v.view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)   # (B, Hkv, T, hd)
        return apply_rotary(q, cos, sin), apply_rotary(k, cos, sin), v
