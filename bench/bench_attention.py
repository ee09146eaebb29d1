"""Benchmark document masking (and sliding windows): causal attention against each backend that masks documents.

    python bench/bench_attention.py                         # T = 1024 2048 4096, CPU, step time and peak memory
    python bench/bench_attention.py --quick                 # a smoke test in seconds (options still apply)
    python bench/bench_attention.py --inference             # the forward pass alone (FlexAttention runs on CPU)
    python bench/bench_attention.py --window 256 --device cuda --json attention.json

A command line over lunaris.bench.attention (whose docstring says what is measured and how). Prints a markdown
table; run it on an otherwise idle machine for numbers to keep.
"""

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from lunaris.bench.attention import QUICK, AttentionBenchOptions, attention_markdown, bench_attention  # noqa: E402


def parse_args(argv=None):
    d = AttentionBenchOptions()  # the defaults
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seq-lens", type=int, nargs="+", default=d.seq_lens, help="sequence lengths T")
    p.add_argument("--batch", type=int, default=d.batch)
    p.add_argument("--d-model", type=int, default=d.d_model)
    p.add_argument("--n-layers", type=int, default=d.n_layers)
    p.add_argument("--n-heads", type=int, default=d.n_heads)
    p.add_argument("--vocab-size", type=int, default=d.vocab_size)
    p.add_argument("--doc-len", type=int, default=d.doc_len, help="mean document length in tokens (exponential)")
    p.add_argument("--backends", nargs="+", default=d.backends, choices=("mask", "flex", "varlen"))
    p.add_argument("--window", type=int, default=d.window,
                   help="also time causal attention under a sliding window of this many tokens, per backend")
    p.add_argument("--inference", action="store_true", help="time the forward pass alone, without gradients")
    p.add_argument("--rounds", type=int, default=d.rounds)
    p.add_argument("--warmup", type=int, default=d.warmup)
    p.add_argument("--threads", type=int, default=d.threads, help="torch threads (default: torch's choice)")
    p.add_argument("--device", choices=("cpu", "cuda"), default=d.device)
    p.add_argument("--no-memory", dest="memory", action="store_false", help="skip the peak-memory processes")
    p.add_argument("--quick", action="store_true", help="small shapes, two rounds, no memory: a smoke test")
    p.add_argument("--json", metavar="FILE", help="also write every figure to FILE")
    if "--quick" in (sys.argv[1:] if argv is None else argv):
        p.set_defaults(**QUICK)  # the quick settings, under any option given explicitly
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    values = {k: v for k, v in vars(args).items() if k not in ("quick", "json")}
    result = bench_attention(AttentionBenchOptions(**values), log=lambda line: print(line, file=sys.stderr))
    print(attention_markdown(result))
    if args.json:
        Path(args.json).write_text(json.dumps({**result, "command": " ".join(sys.argv)}, indent=2))


if __name__ == "__main__":
    main()
