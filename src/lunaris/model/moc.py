"""MoC: a mixture of collaborating experts, with iterative reasoning (IRL) inside every expert.

One MoC layer replaces the FFN of a block (model.make_ffn). Read top to bottom:

1. Router: bias-free gate in fp32 with autocast off; top-k on the logits; softmax over the K selected, at the
   router temperature (constant, or annealed over the run by the `RouterSchedule` training hook).
2. Capacity: C = ceil(capacity_factor·N·K/E) slots per expert, first choices before second choices in
   token order; `None` is dropless. Evaluation is dropless unless eval_capacity_factor is set.
3. Dispatch: a stable sort of the N·K (token, choice) slots by expert gives contiguous per-expert
   segments (`plan_dispatch`); the experts are stacked weights [E, D, 2H] and [E, H, D] (H = expert_hidden_size,
   fine-grained experts are many narrow ones) run as one grouped matmul (`torch._grouped_mm`) or one batched
   matmul over a padded [E, C, D] buffer. Rows are gathered with index_select (its backward is an index_add).
   Every shape is static and nothing reads a tensor value on the host, so the layer compiles.
4. IRL inside every expert (layers.irl_iterate): S = 1 is exactly a SwiGLU; with irl_halting the steps halt per
   token (layers.Halting, one halting unit for the layer's routed experts).
5. Collaboration among a token's K expert outputs: `mha`, `simple` or `none` (plain weighted sum); with
   `collab_gate` its change of each output is scaled by a learned per-channel gate that starts at 0.
   With `n_shared_experts` > 0 every token also goes through an always-on shared FFN (DeepSeekMoE), added
   to the fused routed output; it takes no part in routing or collaboration, and a token whose slots were
   all dropped still gets it.
6. Auxiliary losses (fp32): load balance E·Σ f_i·P_i (f_i per micro-batch, or over the optimizer step's
   micro-batches and every process with balance_scope: global_batch, via the `GlobalBalance` hook), router
   z-loss mean(logsumexp(logits)²) and, when weighted, the router entropy.
   With `load_balance: bias` (auxiliary-loss-free, DeepSeek-V3) there is no load-balance loss: a per-expert
   bias is added to the logits to select the top-k (the gates stay the unbiased softmax), training forwards
   count each expert's slots, and after every optimizer step the model's training hook (`ExpertBalance`, which
   `LunarisCodex.training_hooks()` hands to the training loop) calls `apply_balance`.

Shapes: B batch, T time, N = B·T tokens, D d_model, H expert hidden size, E experts, K top_k,
C capacity (slots per expert), R rows of the expert input buffer, S = N·K slots.
"""

import math
from typing import NamedTuple, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from lunaris.metrics import (
    BIAS_SPREAD,
    COLLAB_GATE,
    DROP_RATE,
    EXPERT_UTIL,
    IRL_PONDER,
    IRL_STEPS_TAKEN,
    MAX_LOAD_RATIO,
    ROUTER_ENTROPY,
    ROUTER_TEMPERATURE,
)
from lunaris.model.initialization import initialize
from lunaris.model.layers import Halting, ReasoningFeedForward, RMSNorm, SwiGLU, irl_iterate

# ---------------------------------------------------------------------------------------------
# Grouped matmul availability
# ---------------------------------------------------------------------------------------------

_GROUPED_MM_SUPPORT: dict = {}


def _probe_grouped_mm(device: str, dtype: torch.dtype) -> bool:
    """Run torch._grouped_mm forward and backward once on `device` and compare with plain matmuls.

    Some builds have the op but not for every device/dtype (older CUDA builds: bf16 on sm90 only),
    so availability is tested, not assumed.
    """
    if not hasattr(torch, "_grouped_mm"):
        return False
    # The first call can happen inside a checkpointed forward: the identity saved-tensor hooks keep
    # the probe's tensors out of the checkpoint's bookkeeping (else its recomputation count differs).
    no_checkpoint = torch.autograd.graph.saved_tensors_hooks(lambda t: t, lambda t: t)
    try:
        with torch.enable_grad(), no_checkpoint, torch.autocast(device_type=torch.device(device).type, enabled=False):
            gen = torch.Generator().manual_seed(0)
            a = torch.randn(24, 16, generator=gen).to(device=device, dtype=dtype).requires_grad_()
            b = torch.randn(3, 16, 8, generator=gen).to(device=device, dtype=dtype).requires_grad_()
            ends = torch.tensor([5, 5, 24], dtype=torch.int32, device=device)
            out = torch._grouped_mm(a, b, offs=ends)
            ref = torch.cat([a[:5] @ b[0], a[5:] @ b[2]])
            grad_a, grad_b = torch.autograd.grad(out.float().square().sum(), (a, b))
            ref_a, ref_b = torch.autograd.grad(ref.float().square().sum(), (a, b))
        tol = 1e-1 if dtype in (torch.bfloat16, torch.float16) else 1e-4
        return all(torch.allclose(x.float(), y.float(), rtol=tol, atol=tol)
                   for x, y in ((out, ref), (grad_a, ref_a), (grad_b, ref_b)))
    except (RuntimeError, NotImplementedError, TypeError):
        return False


@torch.compiler.assume_constant_result
def grouped_mm_supported(device: str, dtype: torch.dtype) -> bool:
    """Whether torch._grouped_mm works (forward and backward) for `dtype` on `device`; probed once.

    `assume_constant_result` makes torch.compile run the probe at trace time and keep the answer
    as a constant, so the choice costs nothing in the compiled graph.
    """
    key = (device, dtype)
    if key not in _GROUPED_MM_SUPPORT:
        _GROUPED_MM_SUPPORT[key] = _probe_grouped_mm(device, dtype)
    return _GROUPED_MM_SUPPORT[key]


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype matmuls run in: the autocast dtype when autocast is on for x's device, else x's."""
    device_type = x.device.type
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return x.dtype


# ---------------------------------------------------------------------------------------------
# Dispatch plan: which token fills which row of the expert input buffer
# ---------------------------------------------------------------------------------------------

class DispatchPlan(NamedTuple):
    token_of_row: torch.Tensor   # (R,) token feeding each buffer row; N (a zero row) for empty rows
    row_of_slot: torch.Tensor    # (N, K) buffer row holding each (token, choice) slot's output
    keep: torch.Tensor           # (N, K) bool: the slot was processed (not dropped by capacity)
    counts: torch.Tensor         # (E,) slots routed to each expert, before capacity
    group_ends: Optional[torch.Tensor]  # (E,) int32 end row of each expert (grouped layout only)
    capacity: int                # C: rows per expert in the padded layout, the slot limit in both
    full: bool = False           # every row is a token (no empty or dropped row): no zero row is needed


def plan_dispatch(top_experts: torch.Tensor, n_experts: int, capacity: Optional[int], grouped: bool) -> DispatchPlan:
    """Sort-based dispatch of the S = N·K slots (static shapes, no host sync).

    Slots are ordered choice-major (every token's first choice, then every second choice, in token
    order); a stable sort by expert keeps that order inside each expert's segment, so a slot's rank
    in its segment is its priority and `rank < capacity` decides whether it is kept.

    Padded layout (grouped=False): R = E·C rows, expert e owns rows [e·C, e·C + C); empty rows read
    the zero row. Grouped layout: R = S rows, the kept slots packed expert by expert, then the
    dropped slots, which read the zero row and are run by the last expert (a SwiGLU maps 0 to exactly
    0, so they cost a few wasted FLOPs but never change a result or a gradient). A capacity of N or more
    (dropless: an expert never gets more than N slots) drops nothing: the grouped rows are then the sorted
    slots themselves, planned in a few operations.
    """
    N, K = top_experts.shape
    E, S = n_experts, N * K
    device = top_experts.device
    cap = min(capacity, N) if capacity is not None else N   # an expert never gets more than N slots
    expert_of_slot = top_experts.t().reshape(S)                               # (S,) choice-major
    sorted_expert, order = torch.sort(expert_of_slot, stable=True)           # (S,) each
    counts = torch.zeros(E, dtype=torch.long, device=device).scatter_add_(
        0, expert_of_slot, torch.ones_like(expert_of_slot))                  # (E,)
    token_sorted = order % N                                                   # (S,) slot s is token s mod N
    if grouped and cap == N:  # dropless: row r holds the r-th sorted slot
        row_of_slot = torch.empty_like(order).scatter_(0, order, torch.arange(S, device=device))   # (S,)
        return DispatchPlan(token_sorted, row_of_slot.view(K, N).t(), torch.ones(N, K, dtype=torch.bool,
                            device=device), counts, counts.cumsum(0).to(torch.int32), cap, full=True)
    segment_start = counts.cumsum(0) - counts                                  # (E,)
    rank = torch.arange(S, device=device) - segment_start[sorted_expert]      # (S,) priority within expert
    kept_sorted = rank < cap                                                   # (S,)
    if grouped:
        kept_counts = counts.clamp(max=cap)                                    # (E,)
        kept_ends = kept_counts.cumsum(0)                                      # (E,)
        dropped_rank = (~kept_sorted).long().cumsum(0) - 1                     # (S,)
        row_sorted = torch.where(kept_sorted, kept_ends[sorted_expert] - kept_counts[sorted_expert] + rank,
                                 kept_ends[-1] + dropped_rank)                 # (S,) a permutation of [0, S)
        token_of_row = torch.empty_like(row_sorted).scatter_(
            0, row_sorted, torch.where(kept_sorted, token_sorted, N))          # (R = S,)
        # The last group ends at S so that the dropped rows at the end are computed (as zeros).
        group_ends = torch.cat([kept_ends[:-1], kept_ends.new_full((1,), S)]).to(torch.int32)
    else:
        dump = E * cap                                                         # dropped slots land here
        row_sorted = torch.where(kept_sorted, sorted_expert * cap + rank, dump)
        token_of_row = torch.full((dump + 1,), N, dtype=torch.long, device=device).scatter_(
            0, row_sorted, token_sorted)[:dump]                                # (R = E·C,)
        row_sorted = row_sorted.clamp(max=dump - 1)   # a dropped slot reads any row; its weight is 0
        group_ends = None
    row_of_slot = torch.empty_like(row_sorted).scatter_(0, order, row_sorted)  # (S,) choice-major
    keep = torch.empty_like(kept_sorted).scatter_(0, order, kept_sorted)       # (S,)
    return DispatchPlan(token_of_row, row_of_slot.view(K, N).t(), keep.view(K, N).t(), counts,
                        group_ends, cap)


def gather_rows(x_flat: torch.Tensor, plan: DispatchPlan, dtype: torch.dtype) -> torch.Tensor:
    """The expert input buffer (R, D): each row's token of x_flat (N, D), in `dtype`; empty and dropped rows 0."""
    x_flat = x_flat.to(dtype)
    if not plan.full:  # row N of x_pad is the zero row
        x_flat = torch.cat([x_flat, x_flat.new_zeros(1, x_flat.shape[1])])   # (N+1, D)
    return x_flat.index_select(0, plan.token_of_row)


def recomputing() -> bool:
    """Whether this forward is activation checkpointing's recomputation inside the backward pass (eager): state
    that a forward updates (load counts) must not be updated twice. Compiled graphs recompute no Python."""
    return not torch.compiler.is_compiling() and torch._C._current_graph_task_id() != -1


# ---------------------------------------------------------------------------------------------
# Experts: stacked SwiGLU weights, run with IRL
# ---------------------------------------------------------------------------------------------

class StackedExperts(nn.Module):
    """E SwiGLU experts as two stacked weights; each expert runs IRL over its own rows.

    An expert that receives no tokens still takes part in the matmul, so its weights get a (zero)
    gradient: DDP with find_unused_parameters=False never waits for it.
    """

    residual_out = ("down",)   # the residual output projection: depth-scaled init (initialization.py)

    def __init__(self, n_experts: int, d_model: int, hidden: int, steps: int, alpha: float):
        super().__init__()
        self.n_experts, self.d_model, self.hidden = n_experts, d_model, hidden
        self.steps, self.alpha = steps, alpha
        self.gate_up = nn.Parameter(torch.empty(n_experts, d_model, 2 * hidden))  # [E, D, 2H]: gate | up
        self.down = nn.Parameter(torch.empty(n_experts, hidden, d_model))         # [E, H, D]
        self.irl_probe = None   # an open IRLProbe (log steps of training; analysis), else None

    def batched_swiglu(self, x: torch.Tensor) -> torch.Tensor:
        """x (E, C, D) -> (E, C, D): one batched matmul per projection."""
        gate, up = torch.bmm(x, self.gate_up.to(x.dtype)).chunk(2, dim=-1)     # 2 x (E, C, H)
        return torch.bmm(F.silu(gate) * up, self.down.to(x.dtype))

    def grouped_swiglu(self, x: torch.Tensor, group_ends: torch.Tensor) -> torch.Tensor:
        """x (R, D) sorted by expert, expert e owning rows [group_ends[e-1], group_ends[e]) -> (R, D)."""
        gate, up = torch._grouped_mm(x, self.gate_up.to(x.dtype), offs=group_ends).chunk(2, dim=-1)  # (R, H) x 2
        return torch._grouped_mm(F.silu(gate) * up, self.down.to(x.dtype), offs=group_ends)

    def forward(self, x_rows: torch.Tensor, plan: DispatchPlan, stats: dict = None,
                halting: Halting = None) -> torch.Tensor:
        """x_rows (R, D) in the plan's layout -> expert outputs (R, D) after S IRL steps (halting per row with
        `halting`; its statistics count the rows that hold a token)."""
        valid = plan.token_of_row < plan.row_of_slot.shape[0] if halting is not None else None   # (R,)
        if plan.group_ends is not None:
            ends = plan.group_ends

            def running_rows(z, rows):  # evaluation with halting: the still-running rows, in their expert groups
                return self.grouped_swiglu(z, torch.searchsorted(rows, ends.to(rows.dtype)).to(torch.int32))
            return irl_iterate(lambda z: self.grouped_swiglu(z, ends), x_rows, self.steps, self.alpha, stats,
                               site=self, probe=self.irl_probe, halting=halting, valid=valid, ffn_rows=running_rows)
        buffer = x_rows.view(self.n_experts, plan.capacity, self.d_model)      # (E, C, D)
        return irl_iterate(self.batched_swiglu, buffer, self.steps, self.alpha, stats, site=self,
                           probe=self.irl_probe, halting=halting, valid=valid).view_as(x_rows)


# ---------------------------------------------------------------------------------------------
# Collaboration among a token's K expert outputs
# ---------------------------------------------------------------------------------------------

def attendable_slots(keep: torch.Tensor) -> torch.Tensor:
    """(N, K) bool keys each slot may attend to: the kept slots.

    A token with no kept slot may attend all of its (zero) slots instead: a fully masked softmax
    row would be NaN, and that token's output is multiplied by zero weights anyway.
    """
    return keep | ~keep.any(dim=-1, keepdim=True)


class MHACollaboration(nn.Module):
    """Multi-head attention over the K outputs (key-padding mask), residual, RMSNorm, FFN with residual."""

    def __init__(self, config):
        super().__init__()
        D = config.d_model
        self.n_heads = config.collab_heads or config.n_heads
        self.qkv = nn.Linear(D, 3 * D, bias=False)
        self.out = nn.Linear(D, D, bias=False)
        self.out.residual_out = ("weight",)
        self.norm = RMSNorm(D, config.norm_eps)
        self.ffn = SwiGLU(D, D)   # its `down` is marked residual_out
        self.dropout = config.dropout

    def forward(self, e: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        """e (N, K, D) expert outputs, keep (N, K) -> refined (N, K, D)."""
        N, K, D = e.shape
        q, k, v = self.qkv(e).view(N, K, 3, self.n_heads, D // self.n_heads).permute(2, 0, 3, 1, 4)  # (N, h, K, hd) x 3
        mask = attendable_slots(keep)[:, None, None, :]                        # (N, 1, 1, K) keys
        a = F.scaled_dot_product_attention(q, k, v, attn_mask=mask,
                                           dropout_p=self.dropout if self.training else 0.0)  # (N, h, K, hd)
        e = e + self.out(a.transpose(1, 2).reshape(N, K, D))
        return e + self.ffn(self.norm(e))


class SimpleCollaboration(nn.Module):
    """M = W_m E, Q = W_q E, Kk = W_k E; A = masked softmax(Q Kkᵀ/√D); C = A M; E' = E + MLP([E, C])."""

    def __init__(self, config):
        super().__init__()
        D = config.d_model
        self.qkm = nn.Linear(D, 3 * D, bias=False)          # W_q | W_k | W_m fused
        self.mlp_in = nn.Linear(2 * D, D, bias=False)
        self.mlp_out = nn.Linear(D, D, bias=False)
        self.mlp_out.residual_out = ("weight",)
        self.dropout = nn.Dropout(config.simple_collab_dropout)

    def forward(self, e: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        """e (N, K, D) expert outputs, keep (N, K) -> refined (N, K, D)."""
        q, k, m = self.qkm(e).unsqueeze(1).chunk(3, dim=-1)                    # (N, 1, K, D) x 3
        mask = attendable_slots(keep)[:, None, None, :]                        # (N, 1, 1, K) keys
        c = F.scaled_dot_product_attention(q, k, m, attn_mask=mask).squeeze(1)  # (N, K, D), scale 1/sqrt(D)
        return e + self.mlp_out(self.dropout(F.gelu(self.mlp_in(torch.cat([e, c], dim=-1)))))


COLLABORATIONS = {"mha": MHACollaboration, "simple": SimpleCollaboration}


# ---------------------------------------------------------------------------------------------
# The MoC layer
# ---------------------------------------------------------------------------------------------

class MoCLayer(nn.Module):
    """Router -> capacity -> dispatch -> IRL experts -> collaboration -> weighted fuse.

    forward(x (B, T, D)) -> (y (B, T, D), aux_loss (fp32 scalar), stats of detached tensors; with irl_halting
    also `irl/ponder_cost`, which carries its gradient: the model adds it to the auxiliary loss).
    """

    def __init__(self, config, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.n_experts, self.top_k, self.d_model = config.n_experts, config.top_k, config.d_model
        self.capacity_factor = config.capacity_factor
        self.eval_capacity_factor = config.eval_capacity_factor
        self.aux_loss_weight, self.z_loss_weight = config.aux_loss_weight, config.router_z_loss_weight
        self.entropy_weight = config.router_entropy_weight
        self.router_jitter = config.router_jitter
        self.load_balance, self.balance_bias_rate = config.load_balance, config.balance_bias_rate
        self.balance_bias_update = config.balance_bias_update
        if self.load_balance == "bias":
            # Auxiliary-loss-free balancing (DeepSeek-V3): the bias shifts which experts are selected, never
            # the gate weights. It is state (checkpointed); the counts are the current step's scratch.
            self.register_buffer("balance_bias", torch.zeros(config.n_experts, dtype=torch.float32))
            self.register_buffer("balance_counts", torch.zeros(config.n_experts, dtype=torch.long), persistent=False)
        self.balance_scope = config.balance_scope
        if self.balance_scope == "global_batch":
            # The step's slots per expert so far, summed over processes (GlobalBalance resets it before each step),
            # and the f_i the last forward used (activation checkpointing's recomputation reuses it).
            self.register_buffer("step_load", torch.zeros(config.n_experts, dtype=torch.float32), persistent=False)
            self.register_buffer("step_fraction", torch.zeros(config.n_experts, dtype=torch.float32),
                                 persistent=False)
            self.count_reducer = None   # sums a tensor over processes during a training step (GlobalBalance)
        self.router_temperature, self.router_temperature_end = config.router_temperature, config.router_temperature_end
        if self.router_temperature_end is not None:
            # The annealed temperature: state, so a checkpoint routes as it was trained (RouterSchedule sets it
            # before every training step); a model built from a config routes at the end temperature.
            self.register_buffer("router_temp", torch.full((), float(self.router_temperature_end)))
            self.init_constants = {"router_temp": float(self.router_temperature_end)}
        self.router = nn.Linear(config.d_model, config.n_experts, bias=False)
        self.experts = StackedExperts(config.n_experts, config.d_model, config.expert_hidden,
                                      config.n_reasoning_steps, config.irl_step_scale)
        self.halting = Halting(config.d_model, config.irl_halting_epsilon) if config.irl_halting == "act" else None
        self.collab_mode = config.resolved_collab_mode
        self.collab = COLLABORATIONS[self.collab_mode](config) if self.collab_mode != "none" else None
        # Per channel, 0 at the start: the layer starts as top-k MoE (collab_gate).
        self.collab_gate = (nn.Parameter(torch.zeros(config.d_model)) if config.collab_gate and self.collab is not None
                            else None)
        # n_shared_experts always-on experts (each as wide as a routed expert, as in DeepSeekMoE) are one SwiGLU
        # n_shared_experts times as wide, with the same IRL steps.
        self.shared = (ReasoningFeedForward(config, hidden=config.n_shared_experts * config.expert_hidden)
                       if config.n_shared_experts else None)
        # "auto": grouped matmul where it works, else the padded batched matmul. Tests and the
        # benchmark set "grouped" or "padded" to compare the two.
        self.dispatch_backend = "auto"
        # A layer built alone (tests, benchmarks) gets the model's initialization here. Inside LunarisCodex it is
        # built on the meta device, where this draws nothing: the model then draws each weight once, itself.
        initialize(self, config)

    # ---- routing ----
    def router_logits(self, x: torch.Tensor) -> torch.Tensor:
        """x (N, D) -> logits (N, E) in fp32, autocast off (a bf16 router flips top-k choices)."""
        with torch.autocast(device_type=x.device.type, enabled=False):
            x = x.float()
            if self.training and self.router_jitter > 0:  # multiplicative jitter, training only
                x = x * torch.empty_like(x).uniform_(1.0 - self.router_jitter, 1.0 + self.router_jitter)
            return F.linear(x, self.router.weight.float())

    def tempered(self, logits: torch.Tensor) -> torch.Tensor:
        """logits / router temperature (the annealed buffer, or the constant; temperature 1 returns `logits`)."""
        if self.router_temperature_end is not None:
            return logits / self.router_temp
        return logits if self.router_temperature == 1.0 else logits / self.router_temperature

    def annealed_temperature(self, progress: float) -> float:
        """The router temperature at `progress` (0 to 1) through the run: linear from start to end."""
        progress = min(max(progress, 0.0), 1.0)
        return self.router_temperature + (self.router_temperature_end - self.router_temperature) * progress

    def route(self, logits: torch.Tensor) -> tuple:
        """logits (N, E) -> (top_experts (N, K), gate weights (N, K) fp32, softmax at the router temperature)."""
        if self.load_balance == "bias":  # the bias picks the experts; the gates use the unbiased logits
            top_experts = (logits + self.balance_bias.float()).topk(self.top_k, dim=-1).indices   # (N, K)
            top_logits = logits.gather(1, top_experts)                         # (N, K)
        else:
            top_logits, top_experts = logits.topk(self.top_k, dim=-1)          # (N, K) each
        return top_experts, self.tempered(top_logits).softmax(dim=-1)

    def capacity(self, n_tokens: int) -> Optional[int]:
        """C = ceil(cf·N·K/E) with the training or evaluation capacity factor; None is dropless."""
        factor = self.capacity_factor if self.training else self.eval_capacity_factor
        if factor is None:
            return None
        return math.ceil(factor * n_tokens * self.top_k / self.n_experts)

    def use_grouped(self, x: torch.Tensor) -> bool:
        if self.dispatch_backend != "auto":
            return self.dispatch_backend == "grouped"
        dtype = compute_dtype(x)
        aligned = (self.d_model * dtype.itemsize) % 16 == 0 and (self.experts.hidden * dtype.itemsize) % 16 == 0
        # Under torch.compile the op's fake-tensor kernel accepts bf16 only.
        return (aligned and grouped_mm_supported(str(x.device), dtype)
                and (dtype == torch.bfloat16 or not torch.compiler.is_compiling()))

    # ---- forward ----
    def forward(self, x: torch.Tensor):
        B, T, D = x.shape
        N, K = B * T, self.top_k
        x_flat = x.reshape(N, D)
        logits = self.router_logits(x_flat)                                    # (N, E) fp32
        top_experts, weights = self.route(logits)                              # (N, K) each
        capacity = self.capacity(N)
        plan = plan_dispatch(top_experts, self.n_experts, capacity, self.use_grouped(x))
        if self.load_balance == "bias" and self.training and not recomputing():
            self.balance_counts.add_(plan.counts)   # this step's load, read after the update (apply_balance)
        stats: dict = {}

        # Dispatch: gather each buffer row's token, run the experts, gather each slot's output row.
        y_rows = self.experts(gather_rows(x_flat, plan, compute_dtype(x)), plan, stats, self.halting)   # (R, D)
        slots = y_rows.index_select(0, plan.row_of_slot.reshape(-1)).view(N, K, D)   # (N, K, D) token-major

        if capacity is not None:  # renormalize over kept slots; a token with none kept gets weight 0
            weights = weights * plan.keep
            total = weights.sum(dim=-1, keepdim=True)                          # (N, 1); 0 if all dropped
            weights = weights / torch.where(total > 0, total, torch.ones_like(total))  # no 0/0, no huge grads
        if self.collab is not None:
            slots = self.collaborate(slots * plan.keep.unsqueeze(-1).to(slots.dtype), plan.keep)
        y = torch.bmm(weights.to(slots.dtype).unsqueeze(1), slots).view(B, T, D)   # weighted fuse
        if self.shared is not None:  # the layer's `irl/` update statistics describe the routed experts
            y = y + self.shared_output(x, stats)                               # (B, T, D)

        aux, entropy = self.aux_loss(logits, plan.counts, N)
        self.record_stats(stats, entropy, plan, N)
        return y, aux, stats

    def collaborate(self, slots: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        """slots (N, K, D), dropped ones zero -> refined (N, K, D); with collab_gate only the gated change."""
        refined = self.collab(slots, keep)
        if self.collab_gate is None:
            return refined
        return slots + self.collab_gate.to(slots.dtype) * (refined - slots)

    def shared_output(self, x: torch.Tensor, stats: dict) -> torch.Tensor:
        """The shared experts' output (B, T, D); with irl_halting their halting statistics join the routed experts'
        in `stats` (the mean of the two)."""
        shared = self.shared
        shared_stats = {} if shared.halting is not None else None
        out = irl_iterate(shared.ffn, x, shared.steps, shared.alpha, shared_stats, halting=shared.halting,
                          ffn_rows=lambda z, rows: shared.ffn(z))
        for key in (IRL_PONDER, IRL_STEPS_TAKEN):
            if shared_stats and key in shared_stats:
                stats[key] = (stats[key] + shared_stats[key]) / 2 if key in stats else shared_stats[key]
        return out

    # ---- auxiliary losses and metrics ----
    def balance_fraction(self, counts: torch.Tensor, n_slots: int) -> torch.Tensor:
        """f_i (E,): each expert's share of the routed slots, before capacity. balance_scope: micro_batch (and any
        forward outside a training step): of this micro-batch. global_batch: of the optimizer step's micro-batches
        so far (this one included), summed over processes by the `count_reducer` GlobalBalance sets, so the last
        micro-batch of a step counts the whole step."""
        if self.balance_scope != "global_batch" or not (self.training and torch.is_grad_enabled()):
            return counts.float() / n_slots
        if recomputing():
            return self.step_fraction.clone()                                  # what this micro-batch's forward used
        load = counts.float()                                                   # (E,)
        if self.count_reducer is not None:
            load = self.count_reducer(load)                                    # summed over processes, in place
        self.step_load.add_(load)
        self.step_fraction.copy_(self.step_load / self.step_load.sum())
        return self.step_fraction.clone()

    def aux_loss(self, logits: torch.Tensor, counts: torch.Tensor, n_tokens: int) -> tuple:
        """(aux, entropy): aux = aux_loss_weight·E·Σ f_i·P_i + router_z_loss_weight·mean(logsumexp(logits)²)
        [+ router_entropy_weight·mean entropy], in fp32; entropy (N,) of each token's router softmax.

        P_i is the mean probability of the full softmax at the router temperature; the z-loss reads the raw
        logits. With load_balance: bias the routing bias balances the load instead: no load-balance term.
        """
        log_normalizer = torch.logsumexp(logits, dim=-1)                       # (N,)
        scaled = self.tempered(logits)                                         # (N, E)
        probs = scaled.softmax(dim=-1)                                         # (N, E)
        scaled_normalizer = log_normalizer if scaled is logits else torch.logsumexp(scaled, dim=-1)
        # entropy -Σ p·log p = logsumexp(scaled) - Σ p·scaled
        entropy = scaled_normalizer - (probs * scaled).sum(-1)                 # (N,)
        z_loss = log_normalizer.square().mean()
        if self.load_balance == "bias":
            aux = self.z_loss_weight * z_loss
        else:
            fraction = self.balance_fraction(counts, n_tokens * self.top_k)   # f_i
            load_balance = self.n_experts * (fraction * probs.mean(dim=0)).sum()  # P_i = mean probability
            aux = self.aux_loss_weight * load_balance + self.z_loss_weight * z_loss
        if self.entropy_weight != 0.0:
            aux = aux + self.entropy_weight * entropy.mean()
        return aux, entropy

    @torch.no_grad()
    def record_stats(self, stats: dict, entropy: torch.Tensor, plan: DispatchPlan, n_tokens: int):
        """Detached metrics (tensors; nothing is read on the host here)."""
        layer = self.layer_idx
        fraction = plan.counts.float() / (n_tokens * self.top_k)               # (E,)
        for i, share in enumerate(fraction.unbind(0)):                         # E views, one operation
            stats[EXPERT_UTIL.format(layer=layer, expert=i)] = share
        stats[DROP_RATE.format(layer=layer)] = 1.0 - plan.keep.float().mean()
        stats[ROUTER_ENTROPY.format(layer=layer)] = entropy.mean()
        stats[MAX_LOAD_RATIO.format(layer=layer)] = fraction.max() * self.n_experts
        if self.load_balance == "bias":  # averaged over layers by merge_stats
            stats[BIAS_SPREAD] = self.balance_bias.max() - self.balance_bias.min()
        if self.router_temperature_end is not None:
            stats[ROUTER_TEMPERATURE] = self.router_temp.clone()
        if self.collab_gate is not None:
            stats[COLLAB_GATE] = self.collab_gate.abs().mean()

    # ---- auxiliary-loss-free balancing (load_balance: bias) ----
    @torch.no_grad()
    def apply_balance(self, counts: torch.Tensor, rate: float = None) -> None:
        """Move the routing bias toward balance: bias_e += rate·sign(mean load - load_e) (balance_bias_update:
        sign), or rate·(mean load - load_e)/mean load (proportional).

        counts (E,) are the slots routed to each expert over a whole optimizer step (every micro-batch, and
        every process: the caller sums them). An underloaded expert's bias rises, an overloaded one's falls;
        either rule reads the imbalance relative to the mean, so the update is the same whatever the batch size.
        Called after the optimizer update by the model's training hook (ExpertBalance.after_update), never in
        forward.
        """
        load = counts.to(device=self.balance_bias.device, dtype=torch.float32)
        step = self.balance_bias_rate if rate is None else rate
        if self.balance_bias_update == "proportional":
            mean = load.mean()
            self.balance_bias.add_((mean - load) / mean.clamp_min(1e-12), alpha=step)
        else:
            self.balance_bias.add_(torch.sign(load.mean() - load), alpha=step)

    @torch.no_grad()
    def reset_balance_counts(self) -> None:
        """Forget the counted load (ExpertBalance: before a step's first micro-batch and after the update)."""
        self.balance_counts.zero_()

    # ---- accounting ----
    def matmul_params_per_token(self) -> int:
        """Weights each token multiplies through: router + top_k experts x IRL steps (+ halting decisions) +
        collaboration per slot, + the shared experts x IRL steps."""
        expert = 3 * self.d_model * self.experts.hidden                        # gate, up, down
        halting = (self.experts.steps - 1) * self.d_model if self.halting is not None else 0
        collab = sum(p.numel() for p in self.collab.parameters() if p.dim() >= 2) if self.collab is not None else 0
        shared = self.shared.matmul_params_per_token() if self.shared is not None else 0
        return self.d_model * self.n_experts + self.top_k * (self.experts.steps * expert + halting + collab) + shared


# ---------------------------------------------------------------------------------------------
# Training hooks: what the training loop runs around each optimizer step for these MoC layers
# ---------------------------------------------------------------------------------------------
#
# The loop calls `before_step(progress, all_reduce_sum)` of every hook the model hands it right before a step's
# first micro-batch (progress: the step's index over max_steps, None when unknown) and `after_update(applied,
# all_reduce_sum)` right after the optimizer update; it names no layer type. `all_reduce_sum` sums a tensor over
# the run's processes in place (the identity in one process): parallelism stays out of the model.

def moc_training_hooks(model: nn.Module) -> list:
    """The training hooks the MoC layers of `model` need: [] for a model that needs none."""
    return ExpertBalance.hooks_of(model) + GlobalBalance.hooks_of(model) + RouterSchedule.hooks_of(model)


class ExpertBalance:
    """The training hook of `load_balance: bias`.

    A step counts its own micro-batches only: `before_step` forgets loads counted by a probe forward or a failed
    compiled attempt. `after_update` sums every layer's loads over processes in ONE all-reduce, so every rank
    applies the same update and the biases stay identical; then it forgets them. A skipped update (non-finite
    loss) only forgets them.
    """

    def __init__(self, layers: list):
        self.layers = layers      # the MoCLayers with load_balance: bias

    @classmethod
    def hooks_of(cls, model: nn.Module) -> list:
        """[ExpertBalance over the bias-balanced MoC layers of `model`], or [] when it has none."""
        layers = [m for m in model.modules() if isinstance(m, MoCLayer) and m.load_balance == "bias"]
        return [cls(layers)] if layers else []

    def before_step(self, progress: float = None, all_reduce_sum=None) -> None:
        for layer in self.layers:
            layer.reset_balance_counts()

    def after_update(self, applied: bool, all_reduce_sum) -> None:
        counts = all_reduce_sum(torch.stack([layer.balance_counts for layer in self.layers]))   # (layers, E)
        for layer, layer_counts in zip(self.layers, counts):
            if applied:
                layer.apply_balance(layer_counts)
            layer.reset_balance_counts()


class GlobalBalance:
    """The training hook of `balance_scope: global_batch`: a step's load counts start at zero, and during the step
    each training forward sums its slots per expert over processes with the loop's `all_reduce_sum` (one E-sized
    all-reduce per MoC layer and micro-batch; every process runs the same forwards, so the collectives match).
    Outside a step (evaluation, a probe forward) the layers count their micro-batch alone."""

    def __init__(self, layers: list):
        self.layers = layers      # the MoCLayers with balance_scope: global_batch

    @classmethod
    def hooks_of(cls, model: nn.Module) -> list:
        layers = [m for m in model.modules() if isinstance(m, MoCLayer) and m.balance_scope == "global_batch"]
        return [cls(layers)] if layers else []

    def before_step(self, progress: float = None, all_reduce_sum=None) -> None:
        for layer in self.layers:
            layer.step_load.zero_()
            layer.count_reducer = all_reduce_sum

    def after_update(self, applied: bool, all_reduce_sum) -> None:
        for layer in self.layers:
            layer.count_reducer = None


class RouterSchedule:
    """The training hook of `router_temperature_end`: before each step the router temperature of every such MoC
    layer moves linearly from router_temperature (progress 0) to router_temperature_end (progress 1)."""

    def __init__(self, layers: list):
        self.layers = layers      # the MoCLayers with an annealed router temperature

    @classmethod
    def hooks_of(cls, model: nn.Module) -> list:
        layers = [m for m in model.modules() if isinstance(m, MoCLayer) and m.router_temperature_end is not None]
        return [cls(layers)] if layers else []

    def before_step(self, progress: float = None, all_reduce_sum=None) -> None:
        if progress is not None:
            for layer in self.layers:
                layer.router_temp.fill_(layer.annealed_temperature(progress))

    def after_update(self, applied: bool, all_reduce_sum) -> None:
        pass
