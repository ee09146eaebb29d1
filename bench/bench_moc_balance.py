"""How fast `load_balance: bias` balances a MoC model on real text: the drop rate over a short run, per bias rule.

    lunaris demo --max-steps 1 --out runs/demo          # once: the demo corpus and tokenizer in runs/demo/data
    python bench/bench_moc_balance.py                   # sign 1e-3 (the default) against proportional 0.05
    python bench/bench_moc_balance.py --rules sign:0.01 proportional:0.02 --steps 200 --seed 1

Trains a small MoC model (d_model 64, 2 layers, 8 experts, top-2, capacity factor 1.25, no load-balancing loss)
for --steps steps at learning rate 2e-3 (warmup 4) on the demo data, once per rule, and prints the mean fraction of
dropped slots (over both MoC layers) in each quarter of the run. Not a timing: the numbers do not depend on the
machine's speed.
"""

import argparse
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from lunaris.config import TrainConfig  # noqa: E402
from lunaris.metrics import DROP_RATE  # noqa: E402
from lunaris.train import train  # noqa: E402


def drop_rates(rule: str, rate: float, args, out_dir: Path) -> list:
    """The mean drop rate over the MoC layers at every step of one run."""
    model = dict(vocab_size=args.vocab_size, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=64,
                 multiple_of=16, n_experts=8, top_k=2, collab_mode="none", capacity_factor=1.25,
                 load_balance="bias", balance_bias_update=rule, balance_bias_rate=rate)
    train(TrainConfig.from_dict(dict(
        model=model, data_dir=args.data, learning_rate=2e-3, warmup_steps=4, max_steps=args.steps, batch_size=8,
        save_interval=10 ** 9, log_interval=1, eval_interval=0, num_workers=0, out_dir=str(out_dir), device="cpu",
        dtype="fp32", seed=args.seed)))
    rows = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]
    layers = [DROP_RATE.format(layer=i) for i in range(2)]
    return [sum(r[k] for k in layers) / len(layers) for r in rows if "loss/total" in r]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default="runs/demo/data", help="token shards (made by `lunaris demo`)")
    p.add_argument("--vocab-size", type=int, default=4096, help="the data's vocabulary size")
    p.add_argument("--rules", nargs="+", default=["sign:0.001", "proportional:0.05"],
                   help="balance_bias_update:balance_bias_rate pairs")
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    quarter = max(args.steps // 4, 1)
    print("| rule | rate | " + " | ".join(f"steps {i + 1}-{min(i + quarter, args.steps)}"
                                           for i in range(0, args.steps, quarter)) + " |")
    print("|---|---:|" + "---:|" * len(range(0, args.steps, quarter)))
    with tempfile.TemporaryDirectory() as tmp:
        for spec in args.rules:
            rule, rate = spec.split(":")
            drops = drop_rates(rule, float(rate), args, Path(tmp) / spec.replace(":", "-"))
            means = [sum(drops[i:i + quarter]) / len(drops[i:i + quarter]) for i in range(0, len(drops), quarter)]
            print(f"| {rule} | {rate} | " + " | ".join(f"{m:.1%}" for m in means) + " |")


if __name__ == "__main__":
    main()
