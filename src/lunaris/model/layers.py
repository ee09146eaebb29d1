"""Building blocks: RMSNorm, rotary embeddings, the MLPs (SwiGLU, relu²), the iterative reasoning FFN (IRL), and
two recipe options' small modules: the value-embedding gate and the residual scalars.

Shapes: B batch, T sequence, D d_model, H hidden size of the FFN, hd head_dim.
"""

import torch
import torch.nn as nn
import torch.nn.functional as F

from lunaris.metrics import IRL_GRAD_NORM, IRL_PONDER, IRL_STEPS_TAKEN, IRL_UPDATE_COSINE, IRL_UPDATE_NORM


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
        self.down.residual_out = ("weight",)  # a residual output projection: depth-scaled init

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Two products with views of the fused weight rather than one (B, T, 2H) output split in two:
        # gate and up come out contiguous (elementwise ops on the strided halves ran ~2x slower on CPU)
        # and the backward concatenates the (2H, D) weight gradient, not a (B, T, 2H) activation gradient.
        w_gate, w_up = self.gate_up.weight.chunk(2, dim=0)           # (H, D) each
        return self.down(F.silu(F.linear(x, w_gate)) * F.linear(x, w_up))  # (B, T, H) -> (B, T, D)


class ReluSquared(nn.Module):
    """down(relu(up(x))²), two matrices D -> H -> D (model.mlp: relu2; nanochat's MLP, after Primer, So et al. 2021).

    Its hidden size when derived is ffn_mult·d_model, SwiGLU's is 2/3 of that: both have 2·ffn_mult·D² weights.
    """

    def __init__(self, d_model: int, hidden: int):
        super().__init__()
        self.up = nn.Linear(d_model, hidden, bias=False)
        self.down = nn.Linear(hidden, d_model, bias=False)
        self.down.residual_out = ("weight",)  # a residual output projection: depth-scaled init

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(F.relu(self.up(x)).square())                # (B, T, H) -> (B, T, D)


MLPS = {"swiglu": SwiGLU, "relu2": ReluSquared}  # model.mlp -> the dense FFN's class


class ValueGate(nn.Module):
    """How much of its value embedding each KV head of a layer takes (model.value_embeddings).

    The gate is 2·sigmoid of a linear map of the first `channels` channels of the attention input, one per token
    and KV head: in (0, 2), 1 for zero weights. Cheap (12 inputs, as nanochat), yet it lets a layer weigh the
    token's own embedding against the values it computes.
    """

    def __init__(self, d_model: int, n_kv_heads: int, channels: int = 12):
        super().__init__()
        self.channels = min(channels, d_model)
        self.proj = nn.Linear(self.channels, n_kv_heads, bias=False)

    def forward(self, x: torch.Tensor, ve: torch.Tensor) -> torch.Tensor:
        """x (B, T, D) the attention input, ve (B, T, Hkv·hd) the value embedding -> (B, T, Hkv·hd) gated."""
        gate = 2 * torch.sigmoid(self.proj(x[..., :self.channels]))          # (B, T, Hkv)
        B, T, _ = ve.shape
        return (ve.view(B, T, gate.shape[-1], -1) * gate.unsqueeze(-1).to(ve.dtype)).view(B, T, -1)


class ResidualScalars(nn.Module):
    """Two learnable scalars per layer on the residual stream (model.residual_scalars, as in modded-nanogpt and
    nanochat): before block i, x = residual[i]·x + x0[i]·x0, x0 the token embedding. The block then sees a mix of
    the stream and the raw embedding, and each layer sets how much of the stream carries on. They start at 1 and 0
    (`init_constants`: initialization.py), the model without them."""

    init_constants = {"residual": 1.0}

    def __init__(self, n_layers: int):
        super().__init__()
        self.residual = nn.Parameter(torch.ones(n_layers))
        self.x0 = nn.Parameter(torch.zeros(n_layers))

    def forward(self, layer: int, x: torch.Tensor, x0: torch.Tensor) -> torch.Tensor:
        return self.residual[layer] * x + self.x0[layer] * x0                  # (B, T, D)


class IRLProbe:
    """The IRL analysis metrics of one training step: opened on log steps only, so other steps pay nothing.

    `with IRLProbe(model) as probe:` (what `LunarisCodex.analysis()` returns) around a step's forward and backward
    passes attaches the probe to every IRL module of `model` (each module holding an `irl_probe` attribute: dense
    IRL FFNs, MoC experts) and detaches it on exit; nothing is global, so another model is never affected. While
    attached, every `irl_iterate` of those modules that records stats (steps > 1) also records
    `irl/step{t}_update_cosine` and, when autograd records the forward, hooks each state h_t: the backward pass
    leaves the squared norm of dLoss/dh_t in the probe, and `probe.metrics()` reads them afterwards. Hooks only
    read the gradient; nothing changes the computation or draws random numbers.
    """

    def __init__(self, *models: nn.Module):
        self.models = models
        self.sites: list = []    # the IRL modules the probe is attached to while open
        self.squares: dict = {}  # (id of the IRL module, t) -> () fp32 sum of squared gradient norms

    def __enter__(self) -> "IRLProbe":
        self.sites = [m for model in self.models for m in model.modules() if hasattr(m, "irl_probe")]
        for site in self.sites:
            site.irl_probe = self
        return self

    def __exit__(self, *exc) -> None:
        for site in self.sites:
            site.irl_probe = None
        self.sites = []

    def watch(self, state: torch.Tensor, site, t: int) -> None:
        """Record |dLoss/d state|² into the probe when the backward pass reaches `state` (h_t of module `site`)."""
        key = (id(site), t)

        def record(grad):
            square = grad.detach().float().square().sum()
            self.squares[key] = self.squares[key] + square if key in self.squares else square
        state.register_hook(record)

    def grad_norms(self, scale: float = 1.0) -> dict:
        """{`irl/step{t}_grad_norm`: |dLoss/dh_t|, over every micro-batch of the step, averaged over IRL layers}.

        `scale` divides out a loss scale (fp16's GradScaler). Empty before any backward pass.
        """
        by_step: dict = {}
        for (_, t), square in self.squares.items():
            by_step.setdefault(t, []).append(square.sqrt())
        return {IRL_GRAD_NORM.format(step=t): torch.stack(norms).mean() / scale for t, norms in sorted(by_step.items())}

    def metrics(self, loss_scale: float = 1.0) -> dict:
        """What the analysis adds to the step's metrics once its backward passes are done (the training step reads
        any model's analysis this way): the state gradient norms."""
        return self.grad_norms(loss_scale)


@torch.no_grad()
def update_cosine(previous: torch.Tensor, update: torch.Tensor) -> torch.Tensor:
    """Mean over rows (tokens) of cos(previous, update) along the last dimension, as a () fp32 tensor.

    Rows where either update is exactly zero (the empty rows of a MoC expert buffer) are left out.
    """
    a, b = previous.float().flatten(0, -2), update.float().flatten(0, -2)   # (rows, D)
    norms = a.norm(dim=-1) * b.norm(dim=-1)                                   # (rows,)
    valid = norms > 0
    cosine = (a * b).sum(dim=-1) / torch.where(valid, norms, torch.ones_like(norms))
    return (cosine * valid).sum() / valid.sum().clamp_min(1)


class IRLRecord:
    """What `irl_iterate` records about its steps: nothing when `stats` is None or there is one step.

    Into `stats`: the relative update norm |h_t - h_{t-1}| / |x| of each step (detached) under
    `irl/update_norm_step{t}`. With a `probe` (an open IRLProbe): the cosine between successive updates (t >= 2,
    mean over tokens) under `irl/step{t}_update_cosine`, and every state h_t hooked for the probe's gradient norms;
    `site` names the module these belong to.
    """

    def __init__(self, x: torch.Tensor, steps: int, stats: dict, probe, site):
        self.stats = stats if stats is not None and steps > 1 else None
        self.probe = probe if self.stats is not None else None
        self.site = site
        self.previous = None   # the previous step's update
        self.x_norm = x.detach().float().norm().clamp_min(1e-12) if self.stats is not None else None

    def step(self, t: int, h: torch.Tensor, update: torch.Tensor) -> None:
        """Step t made `update` (h_t - h_{t-1}), giving state h_t."""
        if self.stats is not None:
            self.stats[IRL_UPDATE_NORM.format(step=t)] = update.detach().float().norm() / self.x_norm
        if self.probe is not None:
            if self.previous is not None:
                self.stats[IRL_UPDATE_COSINE.format(step=t)] = update_cosine(self.previous, update)
            if h.requires_grad and torch.is_grad_enabled():
                self.probe.watch(h, self.site, t)
        self.previous = update


def irl_iterate(ffn, x: torch.Tensor, steps: int, alpha: float, stats: dict = None, site=None,
                probe: IRLProbe = None, halting=None, valid: torch.Tensor = None, ffn_rows=None) -> torch.Tensor:
    """Iterative reasoning: h_0 = 0; h_t = h_{t-1} + alpha * ffn(h_{t-1} + x); returns h_S.

    With steps = 1 and alpha = 1 this is exactly ffn(x). `stats`, `probe` and `site` (default `ffn`): what
    IRLRecord records. With `halting` (a Halting unit, irl_halting: act) and steps > 1, the steps halt per token
    (`Halting.iterate`, which reads `valid` and `ffn_rows`).
    """
    record = IRLRecord(x, steps, stats, probe, ffn if site is None else site)
    h = ffn(x) if alpha == 1.0 else alpha * ffn(x)
    record.step(1, h, h)   # the first update: h_1 - h_0 = h_1
    if halting is not None and steps > 1:
        return halting.iterate(ffn, x, h, steps, alpha, record, valid, ffn_rows)
    for t in range(2, steps + 1):
        update = alpha * ffn(h + x)
        h = h + update
        record.step(t, h, update)
    return h


HALTING_BIAS_INIT = -3.0   # sigmoid(-3) = 0.047: at the start every token takes every step


class Halting(nn.Module):
    """Adaptive computation time (ACT, Graves 2016) over the IRL steps of one IRL module, per token (row).

    After step t a token's halting probability is lambda_t = sigmoid(w.(h_t + x) + b) (fp32); with
    c_t = lambda_1 + ... + lambda_t, the token halts at the first N where c_N >= 1 - epsilon, at the latest at S.
    The output weights each update u_t = h_t - h_{t-1} by what is left of the halting budget before it:

        y = sum_{t <= N} (1 - c_{t-1}) u_t          (c_0 = 0; equal to ACT's sum_t p_t h_t)

    so the updates after N are masked (weight 0) and training keeps static shapes, every step computed. The ponder
    cost N + (1 - c_{N-1}) (ACT's, differentiable through the remainder) is averaged over the valid rows into
    stats `irl/ponder_cost`, with its gradient (the model adds irl_ponder_weight x its mean over IRL layers to the
    auxiliary loss), and N into `irl/steps_taken`. w starts at 0 and b at HALTING_BIAS_INIT, so every token first
    takes every step with update weights near 1.
    """

    init_constants = {"bias": HALTING_BIAS_INIT}   # initialization.py: drawn as this constant

    def __init__(self, d_model: int, epsilon: float):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(d_model))    # (D,)
        self.bias = nn.Parameter(torch.full((1,), HALTING_BIAS_INIT))
        self.epsilon = epsilon

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        """z (..., D) -> halting probabilities (...,) in fp32."""
        return torch.sigmoid(z.float() @ self.weight.float() + self.bias.float())

    def iterate(self, ffn, x: torch.Tensor, first: torch.Tensor, steps: int, alpha: float, record: IRLRecord,
                valid: torch.Tensor = None, ffn_rows=None) -> torch.Tensor:
        """Steps 2..S of irl_iterate with halting; `first` is h_1. x (..., D) -> y (..., D).

        `valid` (rows,) bool marks the rows that are tokens (a MoC expert buffer has empty rows), for the stats.
        Evaluation (no autograd, not compiling) skips the work of halted rows: `ffn_rows(z (M, D), rows (M,))`
        computes the FFN for the still-running rows only (their indices into the flattened rows); without it
        only a step no row needs is skipped. Each skip reads a tensor on the host once per step.
        """
        rows_shape = x.shape[:-1]
        eager_eval = not torch.is_grad_enabled() and not torch.compiler.is_compiling()
        h = y = first
        budget = torch.ones(rows_shape, dtype=torch.float32, device=x.device)   # 1 - c_t: weight of the next update
        running = torch.ones(rows_shape, dtype=torch.bool, device=x.device)
        ponder = torch.zeros(rows_shape, dtype=torch.float32, device=x.device)
        taken = torch.ones(rows_shape, dtype=torch.float32, device=x.device)    # steps each row has taken
        for t in range(1, steps):
            left = budget - self(h + x)                                          # 1 - c_t
            halt = running & (left <= self.epsilon)                              # N = t
            ponder = ponder + torch.where(halt, t + budget, 0.0)                 # N + (1 - c_{N-1})
            running = running & ~halt
            budget = torch.where(running, left, 0.0)
            if eager_eval and not running.any():                                 # every row has halted
                break
            update = self.running_update(ffn, ffn_rows, h + x, running, eager_eval) * alpha
            h = h + update
            weighted = budget.unsqueeze(-1).to(update.dtype) * update
            y = y + weighted
            taken = taken + running.float()
            record.step(t + 1, h, weighted)
        ponder = ponder + torch.where(running, steps + budget, 0.0)             # forced to halt at S
        if record.stats is not None:
            record.stats[IRL_STEPS_TAKEN] = masked_mean(taken, valid).detach()
            record.stats[IRL_PONDER] = masked_mean(ponder, valid)
        return y

    @staticmethod
    def running_update(ffn, ffn_rows, z: torch.Tensor, running: torch.Tensor, eager_eval: bool) -> torch.Tensor:
        """ffn(z) (..., D); in evaluation with `ffn_rows`, computed for the running rows only (zeros elsewhere)."""
        if not (eager_eval and ffn_rows is not None):
            return ffn(z)
        flat = z.reshape(-1, z.shape[-1])                                        # (rows, D)
        rows = running.reshape(-1).nonzero().squeeze(1)                          # (M,) a host sync
        out = torch.zeros_like(flat).index_copy_(0, rows, ffn_rows(flat.index_select(0, rows), rows))
        return out.view_as(z)


def masked_mean(values: torch.Tensor, valid: torch.Tensor = None) -> torch.Tensor:
    """Mean of `values` (rows...) over the rows where `valid` (the same number of elements, bool) holds; all rows
    when it is None."""
    if valid is None:
        return values.mean()
    weights = valid.reshape(values.shape).to(values.dtype)
    return (values * weights).sum() / weights.sum().clamp_min(1)


class ReasoningFeedForward(nn.Module):
    """Dense FFN layer: the MLP (SwiGLU, or relu² with model.mlp: relu2) iterated `n_reasoning_steps` times (IRL).
    Returns (y, aux=None, stats).

    `hidden` (default ffn_hidden) sets the MLP width; MoC's shared experts are one such FFN. With
    irl_halting: act the steps halt per token (`halting`, a Halting unit).
    """

    def __init__(self, config, hidden: int = None):
        super().__init__()
        self.ffn = MLPS[config.mlp](config.d_model, hidden or config.ffn_hidden)
        self.steps = config.n_reasoning_steps
        self.alpha = config.irl_step_scale
        self.halting = Halting(config.d_model, config.irl_halting_epsilon) if config.irl_halting == "act" else None
        self.irl_probe = None   # an open IRLProbe (log steps of training; analysis), else None

    def forward(self, x: torch.Tensor):
        stats: dict = {}
        return self.iterate(x, stats), None, stats

    def iterate(self, x: torch.Tensor, stats: dict = None, ffn=None) -> torch.Tensor:
        """The IRL steps over x (..., D), recorded into `stats`; `ffn` (default this SwiGLU) computes each step."""
        ffn = ffn or self.ffn
        return irl_iterate(ffn, x, self.steps, self.alpha, stats, site=self.ffn, probe=self.irl_probe,
                           halting=self.halting, ffn_rows=lambda z, rows: ffn(z))

    def matmul_params_per_token(self) -> int:
        """Weights each token multiplies through (for FLOP counting): the MLP's (SwiGLU 3·D·H) per IRL step (+ D
        per halting decision)."""
        halting = (self.steps - 1) * self.halting.weight.numel() if self.halting is not None else 0
        return self.steps * sum(weight.numel() for weight in self.ffn.parameters()) + halting
