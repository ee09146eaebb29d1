"""Benchmark one MoC layer against a dense SwiGLU with the same active parameters (forward + backward).

    python bench/bench_moc.py                       # D=512, H=1536, 8 experts top-2, 2048 tokens
    python bench/bench_moc.py --threads 1 --clock cpu --rounds 5   # steadier on a shared machine
    python bench/bench_moc.py --expert-counts 16,32,64 --compile --profile   # fine-grained, compiled, per part

A command line over lunaris.bench.moc (whose docstring says what is measured and how); `lunaris bench` runs the
same measurement. Prints a markdown table.
"""

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from lunaris.bench.moc import MocLayerBenchOptions, bench_moc_layer  # noqa: E402
from lunaris.bench.report import moc_layer_markdown  # noqa: E402


def parse_args(argv=None):
    d = MocLayerBenchOptions  # the class attributes are the defaults
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--d-model", type=int, default=d.d_model)
    p.add_argument("--hidden", type=int, default=d.hidden,
                   help="expert hidden size H (default: the config's derived FFN size, 1536 for D=512)")
    p.add_argument("--experts", type=int, default=d.experts)
    p.add_argument("--top-k", type=int, default=d.top_k)
    p.add_argument("--capacity-factor", type=float, default=d.capacity_factor)
    p.add_argument("--tokens", type=int, default=d.tokens, help="tokens per micro-batch N (batch 8 x T)")
    p.add_argument("--rounds", type=int, default=d.rounds)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    p.add_argument("--clock", choices=("wall", "cpu"), default=d.clock,
                   help="wall-clock time, or this process's CPU time (steadier on a shared machine; "
                        "use with --threads 1)")
    p.add_argument("--quick", action="store_true", help="only the baseline comparison (no collab / IRL rows)")
    p.add_argument("--expert-counts", type=lambda v: tuple(int(e) for e in v.split(",")), default=d.expert_counts,
                   help="fine-grained rows at equal active and total parameters, e.g. 16,32,64: E experts, top-k "
                        "and hidden scaled by E/--experts")
    p.add_argument("--compile", action="store_true", help="also the dense SwiGLU and the baseline under torch.compile")
    p.add_argument("--profile", action="store_true", help="the baseline's forward part by part")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    options = MocLayerBenchOptions(**{k: v for k, v in vars(args).items() if k != "threads"})
    print(moc_layer_markdown(bench_moc_layer(options)))


if __name__ == "__main__":
    main()
