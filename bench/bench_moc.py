"""Benchmark one MoC layer against a dense SwiGLU with the same active parameters (forward + backward).

    python bench/bench_moc.py                       # D=512, H=1536, 8 experts top-2, 2048 tokens
    python bench/bench_moc.py --threads 1 --clock cpu --rounds 5   # steadier on a shared machine

Every variant is timed once per round, rounds interleaved so that load from other processes hits all
variants alike; the table shows the median time and the median of the per-round ratios to the dense
SwiGLU (hidden = top_k x expert hidden, so the same weights are active per token). "dispatch share" is
the time of the baseline layer with its experts replaced by the identity (router, top-k, sort,
gathers, weighted combine, aux losses and metrics, forward + backward) over the full layer's time.
Prints a markdown table.
"""

import argparse
import math
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from lunaris.config import LunarisCodexConfig  # noqa: E402
from lunaris.model.layers import SwiGLU  # noqa: E402
from lunaris.model.moc import MoCLayer  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--d-model", type=int, default=512)
    p.add_argument("--hidden", type=int, default=None,
                   help="expert hidden size H (default: the config's derived FFN size, 1536 for D=512)")
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--capacity-factor", type=float, default=1.25)
    p.add_argument("--tokens", type=int, default=2048, help="tokens per micro-batch N (batch 8 x T)")
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    p.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                   help="wall-clock time, or this process's CPU time (steadier on a shared machine; "
                        "use with --threads 1)")
    p.add_argument("--quick", action="store_true", help="only the baseline comparison (no collab / IRL rows)")
    return p.parse_args(argv)


def moc_config(args, **overrides) -> LunarisCodexConfig:
    base = dict(d_model=args.d_model, n_heads=8, n_layers=12, ffn_hidden_size=args.hidden, n_experts=args.experts,
                top_k=args.top_k, capacity_factor=args.capacity_factor, collab_mode="none", n_reasoning_steps=1,
                simple_collab_dropout=0.0)
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

    def forward(self, x_rows, plan, stats=None):
        return x_rows * 1.0


def dispatch_only(args, grouped: bool) -> MoCLayer:
    """The baseline layer with identity experts, dispatching in the same layout as the baseline."""
    layer = MoCLayer(moc_config(args), 0).train()
    layer.experts = IdentityExperts()
    layer.dispatch_backend = "grouped" if grouped else "padded"
    return layer


def main(argv=None):
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    if args.hidden is None:
        args.hidden = LunarisCodexConfig(d_model=args.d_model).ffn_hidden
    D, H, K, N = args.d_model, args.hidden, args.top_k, args.tokens
    x = torch.randn(8, N // 8, D, requires_grad=True)

    variants = {"dense SwiGLU (hidden = K·H)": SwiGLU(D, K * H)}
    baseline = "MoC none, S=1 (auto backend)"
    variants[baseline] = MoCLayer(moc_config(args), 0).train()
    padded = MoCLayer(moc_config(args), 0).train()
    padded.dispatch_backend = "padded"
    variants["MoC none, S=1, padded bmm [E, C, D]"] = padded
    grouped = variants[baseline].use_grouped(x)
    variants["  routing + dispatch + combine only (experts = identity)"] = dispatch_only(args, grouped)
    if not args.quick:
        for name, overrides in (("MoC simple, S=1", dict(collab_mode="simple")),
                                ("MoC mha, S=1", dict(collab_mode="mha")),
                                ("MoC none, S=2", dict(n_reasoning_steps=2)),
                                ("MoC none, S=3", dict(n_reasoning_steps=3))):
            variants[name] = MoCLayer(moc_config(args, **overrides), 0).train()

    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    times = {name: [] for name in variants}
    for module in variants.values():  # warm-up (allocator, grouped-matmul probe)
        fwd_bwd(module, x)
    for _ in range(args.rounds):
        for name, module in variants.items():
            start = clock()
            fwd_bwd(module, x)
            times[name].append(clock() - start)

    dense_times = times["dense SwiGLU (hidden = K·H)"]
    capacity = math.ceil(args.capacity_factor * N * K / args.experts)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; D={D}, H={H}, E={args.experts}, "
          f"top-{K}, capacity_factor={args.capacity_factor} (C={capacity}), N={N} tokens, fp32, "
          f"{args.rounds} rounds, {args.clock} clock; auto backend = {'grouped matmul' if grouped else 'padded bmm'}\n")
    print("| variant (forward + backward) | median ms | x dense | x MoC none S=1 |")
    print("|---|---:|---:|---:|")
    for name, ts in times.items():
        vs_dense = statistics.median(t / d for t, d in zip(ts, dense_times))
        vs_base = statistics.median(t / b for t, b in zip(ts, times[baseline]))
        print(f"| {name} | {statistics.median(ts) * 1e3:.1f} | {vs_dense:.2f} | {vs_base:.2f} |")
    share = statistics.median(d / b for d, b in zip(times["  routing + dispatch + combine only (experts = identity)"],
                                                     times[baseline]))
    print(f"\ndispatch share of the baseline MoC layer (experts = identity / full layer): {share:.0%}")


if __name__ == "__main__":
    main()
