"""One MoC layer against a dense SwiGLU with the same active parameters (forward + backward), and its dispatch.

Every variant is timed once per round, rounds interleaved so that load from other processes hits all variants
alike; reported are the median time and the median of the per-round ratios to the dense SwiGLU (hidden = top_k x
expert hidden, so the same weights are active per token). The dispatch share is the time of the baseline layer
with its experts replaced by the identity (router, top-k, sort, gathers, weighted combine, aux losses and metrics,
forward + backward) over the full layer's time.

Optional rows: fine-grained experts at equal active and total parameters (`expert_counts`: E experts, top-(K·E/E0),
hidden H·E0/E, so the dense comparison is the same SwiGLU), the dense SwiGLU and the baseline compiled (`compile`),
and the baseline's forward + backward split into its parts (`profile`: router, plan, gathers, experts, combine, aux
loss, metrics, each one of the layer's own forward steps timed alone with autograd on; then the whole backward, and
the experts' backward measured alone).
"""

import math
import statistics
import time
from dataclasses import asdict, dataclass
from typing import Optional

import torch

from lunaris.config import LunarisCodexConfig
from lunaris.model.layers import SwiGLU
from lunaris.model.moc import MoCLayer, compute_dtype, gather_rows, plan_dispatch

DENSE = "dense SwiGLU (hidden = K·H)"
BASELINE = "MoC none, S=1 (auto backend)"
DISPATCH = "  routing + dispatch + combine only (experts = identity)"  # indented: a part of the baseline
MORE_VARIANTS = {"MoC simple, S=1": dict(collab_mode="simple"), "MoC mha, S=1": dict(collab_mode="mha"),
                 "MoC none, S=2": dict(n_reasoning_steps=2), "MoC none, S=3": dict(n_reasoning_steps=3)}


@dataclass
class MocLayerBenchOptions:
    """What `bench_moc_layer` measures, with bench/bench_moc.py's defaults."""
    d_model: int = 512
    hidden: Optional[int] = None     # expert hidden size H; None: the config's derived FFN size (1536 for D=512)
    experts: int = 8
    top_k: int = 2
    capacity_factor: float = 1.25
    tokens: int = 2048               # tokens per micro-batch N (batch 8 x T)
    rounds: int = 7
    clock: str = "wall"              # or "cpu": this process's CPU time (steadier on a shared machine, 1 thread)
    quick: bool = False              # only the baseline comparison (no collaboration / IRL rows)
    expert_counts: tuple = ()        # fine-grained rows: E experts each, top_k and H scaled (e.g. (16, 32, 64))
    compile: bool = False            # also the dense SwiGLU and the baseline under torch.compile
    profile: bool = False            # the baseline's forward, part by part


QUICK = dict(quick=True, rounds=3)  # `lunaris bench --quick`


def moc_config(options: MocLayerBenchOptions, hidden: int, **overrides) -> LunarisCodexConfig:
    base = dict(d_model=options.d_model, n_heads=8, n_layers=12, ffn_hidden_size=hidden, n_experts=options.experts,
                top_k=options.top_k, capacity_factor=options.capacity_factor, collab_mode="none",
                n_reasoning_steps=1, simple_collab_dropout=0.0)
    base.update(overrides)
    return LunarisCodexConfig(**base)


def fwd_bwd(module, x):
    """One forward + backward; returns nothing. MoC layers return (y, aux, stats)."""
    out = module(x)
    if isinstance(out, tuple):
        y, aux, _ = out
        loss = y.float().square().mean() + aux
    else:
        loss = out.float().square().mean()
    loss.backward()
    module.zero_grad(set_to_none=True)
    x.grad = None


class IdentityExperts(torch.nn.Module):
    """Stands in for the experts (y = x): the layer then costs only routing, dispatch, combine, losses."""

    def forward(self, x_rows, plan, stats=None, halting=None):
        return x_rows * 1.0


def fine_grained(options: MocLayerBenchOptions, hidden: int, experts: int) -> tuple:
    """(name, config) of the baseline with `experts` experts at the same active and total parameters."""
    if (options.top_k * experts) % options.experts or (hidden * options.experts) % experts:
        raise ValueError(f"{experts} experts do not split top-{options.top_k} of {options.experts} experts of hidden "
                         f"{hidden} evenly; choose a multiple of {options.experts} that divides the hidden size.")
    top_k, narrow = options.top_k * experts // options.experts, hidden * options.experts // experts
    return (f"MoC none, S=1, E={experts} top-{top_k} H={narrow}",
            moc_config(options, hidden, n_experts=experts, top_k=top_k, expert_hidden_size=narrow))


def variants(options: MocLayerBenchOptions, hidden: int, x) -> tuple:
    """({name: module}, whether the auto backend chose the grouped matmul for `x`)."""
    layers = {DENSE: SwiGLU(options.d_model, options.top_k * hidden),
              BASELINE: MoCLayer(moc_config(options, hidden), 0).train()}
    padded = MoCLayer(moc_config(options, hidden), 0).train()
    padded.dispatch_backend = "padded"
    layers["MoC none, S=1, padded bmm [E, C, D]"] = padded
    grouped = layers[BASELINE].use_grouped(x)
    dispatch = MoCLayer(moc_config(options, hidden), 0).train()  # the baseline, dispatching in its layout
    dispatch.experts = IdentityExperts()
    dispatch.dispatch_backend = "grouped" if grouped else "padded"
    layers[DISPATCH] = dispatch
    if not options.quick:
        for name, overrides in MORE_VARIANTS.items():
            layers[name] = MoCLayer(moc_config(options, hidden, **overrides), 0).train()
    for experts in options.expert_counts:
        name, config = fine_grained(options, hidden, experts)
        layers[name] = MoCLayer(config, 0).train()
    if options.compile:
        for name in (DENSE, BASELINE):
            layers[f"{name}, compiled"] = torch.compile(layers[name])
    return layers, grouped


def parts_of_a_step(layer: MoCLayer, x: torch.Tensor, clock) -> dict:
    """{part: seconds} of one training forward + backward of `layer` (collab_mode none, no shared experts): its
    forward steps called one at a time as MoCLayer.forward calls them, then the backward of the same loss as
    fwd_bwd's."""
    times = {}

    def timed(part, fn):
        start = clock()
        out = fn()
        times[part] = clock() - start
        return out

    B, T, D = x.shape
    N = B * T
    x_flat = x.reshape(N, D)
    logits = timed("router: logits (fp32)", lambda: layer.router_logits(x_flat))              # (N, E)
    top_experts, weights = timed("router: top-k, gates", lambda: layer.route(logits))          # (N, K) each
    plan = timed("plan: sort, ranks, rows", lambda: plan_dispatch(top_experts, layer.n_experts, layer.capacity(N),
                                                                  layer.use_grouped(x)))
    rows = timed("gather: token rows (index_select)", lambda: gather_rows(x_flat, plan, compute_dtype(x)))
    stats = {}
    y_rows = timed("experts (grouped mm / bmm)", lambda: layer.experts(rows, plan, stats, layer.halting))

    def combine():  # (N, 1, D)
        slots = y_rows.index_select(0, plan.row_of_slot.reshape(-1)).view(N, layer.top_k, D)
        kept = weights * plan.keep
        total = kept.sum(dim=-1, keepdim=True)
        kept = kept / torch.where(total > 0, total, torch.ones_like(total))
        return torch.bmm(kept.to(slots.dtype).unsqueeze(1), slots)
    y = timed("combine: slot gather, renormalize, fuse", combine)
    aux, entropy = timed("aux loss: balance, z-loss, entropy", lambda: layer.aux_loss(logits, plan.counts, N))
    timed("metrics (detached)", lambda: layer.record_stats(stats, entropy, plan, N))
    timed("backward (every part)", lambda: (y.float().square().mean() + aux).backward())
    alone = rows.detach().requires_grad_(True)   # the experts' share of the backward, measured on their own
    out = layer.experts(alone, plan, None, layer.halting)
    timed("  of which experts backward (alone)", lambda: out.backward(torch.ones_like(out)))
    layer.zero_grad(set_to_none=True)
    x.grad = None
    return times


def profile_parts(layer: MoCLayer, x: torch.Tensor, rounds: int, clock) -> list:
    """[{part, median_ms}] of the baseline's forward + backward, part by part, over `rounds` (after a warm-up)."""
    parts_of_a_step(layer, x, clock)
    rounds_of = [parts_of_a_step(layer, x, clock) for _ in range(rounds)]
    return [{"part": part, "median_ms": statistics.median(r[part] for r in rounds_of) * 1e3} for part in rounds_of[0]]


def bench_moc_layer(options: MocLayerBenchOptions, log=None) -> dict:
    """{"options", "threads", "hidden", "capacity", "backend", "variants": [{name, times_s, median_ms, tokens_per_s,
    vs_dense, vs_baseline}], "dispatch_share"} and, with `profile`, "parts": [{part, median_ms}]."""
    log = log or (lambda message: None)
    torch.manual_seed(0)
    hidden = options.hidden or LunarisCodexConfig(d_model=options.d_model).ffn_hidden
    x = torch.randn(8, options.tokens // 8, options.d_model, requires_grad=True)
    layers, grouped = variants(options, hidden, x)
    log(f"MoC layer: {len(layers)} variants x {options.rounds} rounds ...")
    clock = time.process_time if options.clock == "cpu" else time.perf_counter
    times = {name: [] for name in layers}
    for module in layers.values():  # warm-up (allocator, grouped-matmul probe)
        fwd_bwd(module, x)
    for _ in range(options.rounds):
        for name, module in layers.items():
            start = clock()
            fwd_bwd(module, x)
            times[name].append(clock() - start)
    rows = [{"name": name, "times_s": ts, "median_ms": statistics.median(ts) * 1e3,
             "tokens_per_s": options.tokens / statistics.median(ts),
             "vs_dense": statistics.median(t / d for t, d in zip(ts, times[DENSE])),
             "vs_baseline": statistics.median(t / b for t, b in zip(ts, times[BASELINE]))}
            for name, ts in times.items()]
    result = {"options": asdict(options), "threads": torch.get_num_threads(), "torch": torch.__version__,
              "hidden": hidden, "capacity": math.ceil(options.capacity_factor * options.tokens * options.top_k /
                                                      options.experts),
              "backend": "grouped matmul" if grouped else "padded bmm", "variants": rows,
              "dispatch_share": statistics.median(d / b for d, b in zip(times[DISPATCH], times[BASELINE]))}
    if options.profile:
        result["parts"] = profile_parts(layers[BASELINE], x, options.rounds, clock)
    return result
