"""Decode speed against the memory-bandwidth limit and against `transformers` generate on the same weights.

    python bench/bench_generate.py --threads 2                        # four sizes, 32 + 128 tokens, 3 rounds
    python bench/bench_generate.py --sizes small 124m --threads 2     # the sizes of the targets
    python bench/bench_generate.py --sizes micro --no-compile --no-hf-compile --rounds 1   # a quick look

A command line over lunaris.bench.generate (whose docstring says what is measured and how); `lunaris bench` runs
the same measurement. Prints markdown tables.
"""

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from lunaris.bench.generate import SIZES, GenerateBenchOptions, bench_generate  # noqa: E402
from lunaris.bench.report import generate_markdown  # noqa: E402


def parse_args(argv=None):
    d = GenerateBenchOptions()
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", nargs="+", default=d.sizes, choices=list(SIZES))
    p.add_argument("--prompt-tokens", type=int, default=d.prompt_tokens)
    p.add_argument("--new-tokens", type=int, default=d.new_tokens)
    p.add_argument("--rounds", type=int, default=d.rounds)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    p.add_argument("--clock", choices=("wall", "cpu"), default=d.clock,
                   help="wall-clock time, or this process's CPU time (steadier on a shared machine; "
                        "use with --threads 1)")
    p.add_argument("--probe-mb", type=int, default=d.probe_mb, help="MB of fp32 matrices the bandwidth probe reads")
    p.add_argument("--no-compile", dest="compile", action="store_false",
                   help="skip lunaris compiled (and the compiled probe)")
    p.add_argument("--no-hf-compile", dest="hf_compile", action="store_false",
                   help="skip transformers with static cache + compile")
    p.add_argument("--no-blas-variant", dest="blas_variant", action="store_false",
                   help="skip lunaris compiled with BLAS matrix-vector products (F.linear) instead of the streaming "
                        "multiply-and-sum, the comparison behind decode_linear's choice")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)  # before any compilation: inductor sizes its loops for it
    options = GenerateBenchOptions(**{k: v for k, v in vars(args).items() if k != "threads"})
    result = bench_generate(options, log=lambda message: print(message, file=sys.stderr, flush=True))
    print(generate_markdown(result))


if __name__ == "__main__":
    main()
