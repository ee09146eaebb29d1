"""Causal grouped-query attention with a fused QKV projection, rotary embeddings and a KV cache."""

import torch
import torch.nn as nn
import torch.nn.functional as F

from lunaris.model.layers import apply_rotary

# torch >= 2.5: SDPA shares each KV head across its query group itself (enable_gqa), without
# materializing the repeated keys/values (a copy forward, a reduction backward).
SDPA_HAS_GQA = torch.__version__ >= (2, 5)


class KVCache:
    """Preallocated keys and values of one layer at n_kv_heads: (B, Hkv, T_max, hd) each."""

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


class CausalSelfAttention(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = config.n_heads, config.kv_heads, config.head_dim
        self.qkv = nn.Linear(config.d_model, (self.n_heads + 2 * self.n_kv_heads) * self.head_dim, bias=False)
        self.proj = nn.Linear(self.n_heads * self.head_dim, config.d_model, bias=False)
        self.proj.residual_out = True  # depth-scaled init
        self.dropout = config.dropout

    def forward(self, x, cos, sin, cache: KVCache = None, start: int = 0):
        B, T, _ = x.shape
        q, k, v = self.qkv(x).split(
            [self.n_heads * self.head_dim, self.n_kv_heads * self.head_dim, self.n_kv_heads * self.head_dim], dim=-1)
        q = q.view(B, T, self.n_heads, self.head_dim).transpose(1, 2)      # (B, Hq, T, hd)
        k = k.view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)   # (B, Hkv, T, hd)
        v = v.view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)   # (B, Hkv, T, hd)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        if cache is not None:
            k, v = cache.update(k, v, start)                                # (B, Hkv, start+T, hd)
        gqa = {}
        if self.n_kv_heads != self.n_heads:  # each KV head serves n_heads/n_kv_heads query heads
            if SDPA_HAS_GQA:
                gqa = {"enable_gqa": True}
            else:
                repeat = self.n_heads // self.n_kv_heads
                k, v = k.repeat_interleave(repeat, dim=1), v.repeat_interleave(repeat, dim=1)  # (B, Hq, S, hd)
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=self._decode_mask(T, k.shape[2], x.device),
            dropout_p=self.dropout if self.training else 0.0, is_causal=(k.shape[2] == T and T > 1), **gqa)
        y = y.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim)
        return self.proj(y)

    @staticmethod
    def _decode_mask(T: int, S: int, device):
        """Mask for T new queries after S - T cached keys.

        Without a cache (S == T) SDPA's `is_causal` is right. With a cache it is not: `is_causal` aligns
        the mask to the top-left, so a single decode query would see only key 0. One query sees every
        key (no mask); several queries see keys up to their own position.
        """
        if S == T or T == 1:
            return None
        offset = S - T
        return torch.ones(T, S, dtype=torch.bool, device=device).tril(diagonal=offset)  # (T, S)
