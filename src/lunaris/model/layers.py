"""Building blocks: RMSNorm, rotary embeddings, SwiGLU and the iterative reasoning FFN (IRL).

Shapes: B batch, T sequence, D d_model, H hidden size of the FFN, hd head_dim.
"""

import torch
import torch.nn as nn
import torch.nn.functional as F


class RMSNorm(nn.Module):
    """RMSNorm computed in fp32 and cast back, with a learnable weight and (optionally) bias."""

    def __init__(self, dim: int, eps: float = 1e-5, bias: bool = False):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))
        self.bias = nn.Parameter(torch.zeros(dim)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight.float()
        if self.bias is not None:
            y = y + self.bias.float()
        return y.to(x.dtype)


class RotaryEmbedding(nn.Module):
    """cos/sin tables (T_max, hd) for rotate-half rotary embeddings (the Llama/Hugging Face layout).

    The tables are fp32, non-persistent buffers. `_apply` rebuilds them after every `.to()`, `.cuda()`
    or `.to_empty()`, so `model.to(torch.bfloat16)` cannot round them and meta-device construction
    followed by `to_empty` cannot leave them uninitialized.
    """

    def __init__(self, head_dim: int, max_seq_len: int, theta: float):
        super().__init__()
        self.head_dim, self.max_seq_len, self.theta = head_dim, max_seq_len, theta
        cos, sin = self._tables(torch.device("cpu"))
        self.register_buffer("cos", cos, persistent=False)
        self.register_buffer("sin", sin, persistent=False)

    def _tables(self, device):
        exponents = torch.arange(0, self.head_dim, 2, device=device, dtype=torch.float32) / self.head_dim
        inv_freq = 1.0 / (self.theta ** exponents)           # (hd/2,)
        positions = torch.arange(self.max_seq_len, device=device, dtype=torch.float32)
        freqs = torch.outer(positions, inv_freq)           # (T_max, hd/2)
        emb = torch.cat((freqs, freqs), dim=-1)            # (T_max, hd)
        return emb.cos(), emb.sin()

    def _apply(self, fn, *args, **kwargs):
        super()._apply(fn, *args, **kwargs)
        cos, sin = self._tables(self.cos.device)
        self.cos, self.sin = cos, sin
        return self

    def forward(self, start: int, length: int):
        """Tables for positions [start, start + length): two (length, hd) fp32 tensors."""
        return self.cos[start:start + length], self.sin[start:start + length]


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x (B, heads, T, hd) by position; computed in fp32, returned in x's dtype."""
    xf = x.float()
    x1, x2 = xf.chunk(2, dim=-1)
    rotated = torch.cat((-x2, x1), dim=-1)
    return (xf * cos + rotated * sin).to(x.dtype)


class SwiGLU(nn.Module):
    """down(silu(gate(x)) * up(x)), with gate and up fused into one projection (D -> 2H)."""

    def __init__(self, d_model: int, hidden: int):
        super().__init__()
        self.gate_up = nn.Linear(d_model, 2 * hidden, bias=False)
        self.down = nn.Linear(hidden, d_model, bias=False)
        self.down.residual_out = True  # depth-scaled init

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Two products with views of the fused weight rather than one (B, T, 2H) output split in two:
        # gate and up come out contiguous (elementwise ops on the strided halves ran ~2x slower on CPU)
        # and the backward concatenates the (2H, D) weight gradient, not a (B, T, 2H) activation gradient.
        w_gate, w_up = self.gate_up.weight.chunk(2, dim=0)           # (H, D) each
        return self.down(F.silu(F.linear(x, w_gate)) * F.linear(x, w_up))  # (B, T, H) -> (B, T, D)


def irl_iterate(ffn, x: torch.Tensor, steps: int, alpha: float, stats: dict = None) -> torch.Tensor:
    """Iterative reasoning: h_0 = 0; h_t = h_{t-1} + alpha * ffn(h_{t-1} + x); returns h_S.

    With steps = 1 and alpha = 1 this is exactly ffn(x). When `stats` is given and steps > 1, records
    the relative update norm |h_t - h_{t-1}| / |x| of each step (detached) under `irl/update_norm_step{t}`.
    """
    h = ffn(x) if alpha == 1.0 else alpha * ffn(x)
    if stats is not None and steps > 1:
        x_norm = x.detach().float().norm().clamp_min(1e-12)
        stats["irl/update_norm_step1"] = h.detach().float().norm() / x_norm
    for t in range(2, steps + 1):
        update = alpha * ffn(h + x)
        h = h + update
        if stats is not None:
            stats[f"irl/update_norm_step{t}"] = update.detach().float().norm() / x_norm
    return h


class ReasoningFeedForward(nn.Module):
    """Dense FFN layer: SwiGLU iterated `n_reasoning_steps` times (IRL). Returns (y, aux=None, stats)."""

    def __init__(self, config):
        super().__init__()
        self.ffn = SwiGLU(config.d_model, config.ffn_hidden)
        self.steps = config.n_reasoning_steps
        self.alpha = config.irl_step_scale

    def forward(self, x: torch.Tensor):
        stats: dict = {}
        return irl_iterate(self.ffn, x, self.steps, self.alpha, stats), None, stats

    def matmul_params_per_token(self) -> int:
        """Weights each token multiplies through (for FLOP counting): 3·D·H per IRL step."""
        return self.steps * (self.ffn.gate_up.weight.numel() + self.ffn.down.weight.numel())
