"""One MoC layer against a dense SwiGLU with the same active parameters (forward + backward), and its dispatch.

Every variant is timed once per round, rounds interleaved so that load from other processes hits all variants
alike; reported are the median time and the median of the per-round ratios to the dense SwiGLU (hidden = top_k x
expert hidden, so the same weights are active per token). The dispatch share is the time of the baseline layer
with its experts replaced by the identity (router, top-k, sort, gathers, weighted combine, aux losses and metrics,
forward + backward) over the full layer's time.
"""

import math
import statistics
import time
from dataclasses import asdict, dataclass
from typing import Optional

import torch

from lunaris.config import LunarisCodexConfig
from lunaris.model.layers import SwiGLU
from lunaris.model.moc import MoCLayer

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
    return layers, grouped


def bench_moc_layer(options: MocLayerBenchOptions, log=None) -> dict:
    """{"options", "threads", "hidden", "capacity", "backend", "variants": [{name, times_s, median_ms, vs_dense,
    vs_baseline}], "dispatch_share"}."""
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
             "vs_dense": statistics.median(t / d for t, d in zip(ts, times[DENSE])),
             "vs_baseline": statistics.median(t / b for t, b in zip(ts, times[BASELINE]))}
            for name, ts in times.items()]
    return {"options": asdict(options), "threads": torch.get_num_threads(), "torch": torch.__version__,
            "hidden": hidden, "capacity": math.ceil(options.capacity_factor * options.tokens * options.top_k /
                                                    options.experts),
            "backend": "grouped matmul" if grouped else "padded bmm", "variants": rows,
            "dispatch_share": statistics.median(d / b for d, b in zip(times[DISPATCH], times[BASELINE]))}
