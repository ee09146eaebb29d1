"""Benchmark Muon's optimizer step on one process against its FSDP and DDP splits over several (gloo, fp32 CPU).

    python bench/bench_muon.py --quick                      # a smoke test: the tiny model, 2 steps
    python bench/bench_muon.py                              # 30m shapes, 1 and 2 processes, 1 thread each
    python bench/bench_muon.py --size 100m --processes 1 2 4 --steps 7 --json muon.json

A command line over lunaris.bench.muon (whose docstring says what is measured and how). Run it on an otherwise idle
machine with a core per process. Prints a markdown table: seconds per step and the ratio to one process.
"""

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from lunaris.bench.muon import MuonBenchOptions, bench_muon, muon_markdown  # noqa: E402
from lunaris.bench.settings import SIZES  # noqa: E402


def parse_args(argv=None):
    d = MuonBenchOptions()
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", choices=list(SIZES), default=d.size, help="the model whose matrices Muon updates")
    p.add_argument("--experts", dest="n_experts", type=int, default=d.n_experts,
                   help="stack the FFNs as this many experts (each expert matrix is orthogonalized on its own)")
    p.add_argument("--processes", type=int, nargs="+", default=d.processes)
    p.add_argument("--parallelism", nargs="+", choices=["fsdp", "ddp"], default=d.parallelism)
    p.add_argument("--steps", type=int, default=d.steps, help="timed steps per configuration (median reported)")
    p.add_argument("--warmup", type=int, default=d.warmup)
    p.add_argument("--threads", type=int, default=d.threads, help="torch threads per process")
    p.add_argument("--quick", action="store_true", help="the tiny model, 2 steps: a smoke test")
    p.add_argument("--json", metavar="FILE", help="also write the result to FILE")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    options = MuonBenchOptions(**{k: v for k, v in vars(args).items() if k != "json"})
    result = bench_muon(options)
    print(muon_markdown(result))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
