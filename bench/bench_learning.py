"""Learning efficiency: how good a model each training recipe gets for the same wall-clock budget on this machine.

    python bench/bench_learning.py                                # every recipe, 200 s each, 2 seeds
    python bench/bench_learning.py --budget 60 --seeds 1 --recipes baseline,muon

The corpus is the demo's (Python standard-library source, 4,096-token tokenizer, prepared once under --out). The
baseline is bench/configs/baseline-demo-cpu.yaml, the `demo-cpu` preset as it was before the recipe study (AdamW,
cosine); each option is that baseline plus a few config overrides, and `demo-cpu` is today's preset as it ships.
`--recipes muon,baseline:2` runs 2 seeds of baseline whatever --seeds says. Each run trains in a fresh process: a few
timed steps pick the step count that fills --budget seconds, so every schedule decays fully, then the run trains and
scores the whole held-out split. The metric is validation bits per byte, which does not depend on the tokenizer.
Recipes run one after another, never concurrently. "time to baseline" is the training time at which a recipe's
held-out curve first reaches the baseline's final bits per byte (mean over seeds), linearly interpolated between
evaluations.
Prints a markdown table and writes JSON (--json). Each finished run leaves RUN_DIR/result.json; a rerun with the same
recipe, seed and settings keeps it instead of training again, so an interrupted study continues where it stopped.
"""

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
from lunaris.fileio import atomic_write_json  # noqa: E402

BASELINE = Path(__file__).resolve().parent / "configs" / "baseline-demo-cpu.yaml"
SMALLER = {  # model sizes for the demo's budget: (d_model, heads, kv heads, FFN hidden) at 4 layers
    "d192": (192, 6, 2, 512),
    "d128": (128, 4, 2, 384),
}
RECIPES = {  # name -> overrides of the baseline config (None: today's demo-cpu preset as it ships)
    "baseline": [],
    "demo-cpu": None,
    "wsd": ["--lr_schedule=wsd"],
    "muon": ["--optimizer=muon"],
    "muon+wsd": ["--optimizer=muon", "--lr_schedule=wsd"],
    "qk_norm": ["--model.qk_norm=true"],
    "zero_init_out": ["--model.zero_init_out=true"],
    "logit_softcap": ["--model.logit_softcap=15"],
    "document": ["--model.attention_mask=document"],
    **{name: [f"--model.d_model={d}", f"--model.n_heads={h}", f"--model.n_kv_heads={kv}",
              f"--model.ffn_hidden_size={f}"] for name, (d, h, kv, f) in SMALLER.items()},
    **{f"muon+{name}": ["--optimizer=muon", f"--model.d_model={d}", f"--model.n_heads={h}",
                        f"--model.n_kv_heads={kv}", f"--model.ffn_hidden_size={f}"]
       for name, (d, h, kv, f) in SMALLER.items()},
}
VOCAB = 4096
EVALS = 8  # held-out evaluations per run, for the time-to-target curve
EVAL_BATCH = 16  # sequences per batch of the final score (the same held-out tokens for every recipe)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--budget", type=float, default=200.0, help="training seconds per run (default 200)")
    p.add_argument("--seeds", type=int, default=2, help="runs per recipe, seeds 0..N-1 (default 2)")
    p.add_argument("--recipes", default=",".join(RECIPES), help=f"comma-separated, of: {', '.join(RECIPES)}")
    p.add_argument("--corpus-mb", type=float, default=6.0, help="MB of standard-library source (default 6)")
    p.add_argument("--out", type=Path, default=Path("runs/bench-learning"), help="data and runs go here")
    p.add_argument("--json", type=Path, help="also write the results here")
    p.add_argument("--threads", type=int, help="torch threads of each run (default: torch's choice)")
    p.add_argument("--max-steps", type=int, help="cap every run at this many steps (a quick smoke test)")
    p.add_argument("--eval-batches", type=int, default=8, help="held-out batches per evaluation of the curve")
    p.add_argument("--worker", nargs=3, metavar=("RECIPE", "SEED", "RUN_DIR"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.plan = []  # (recipe, seeds)
    for item in args.recipes.split(","):
        name, _, seeds = item.partition(":")
        args.plan.append((name, int(seeds) if seeds.isdigit() and int(seeds) > 0 else args.seeds))
        if seeds and not (seeds.isdigit() and int(seeds) > 0):
            p.error(f"--recipes {item}: the number after ':' is the recipe's seed count, a positive integer")
    unknown = [name for name, _ in args.plan if name not in RECIPES]
    if unknown:
        p.error(f"unknown recipe(s) {', '.join(unknown)}; choose from {', '.join(RECIPES)}")
    if args.budget <= 0 or args.seeds < 1 or args.corpus_mb <= 0:
        p.error("--budget, --seeds and --corpus-mb must be positive")
    return args


# ---- one run, in its own process ---------------------------------------------------------------------

def run_key(recipe: str, seed: int, args) -> dict:
    """What a run's result depends on: a finished run with the same key is kept, not trained again."""
    return {"overrides": RECIPES[recipe], "seed": seed, "budget": args.budget, "corpus_mb": args.corpus_mb,
            "max_steps": args.max_steps, "eval_batches": args.eval_batches}


def worker(recipe: str, seed: int, run_dir: Path, args) -> dict:
    """Calibrate, train for the budget, score the whole held-out split; returns the run's numbers."""
    import torch

    from lunaris.config import load_config
    from lunaris.demo import PRESET, calibrate_steps
    from lunaris.train.trainer import train
    if args.threads:
        torch.set_num_threads(args.threads)
    overrides = RECIPES[recipe]
    config = load_config(PRESET if overrides is None else BASELINE,
                         [f"--data_dir={args.out / 'data'}", f"--out_dir={run_dir}", f"--model.vocab_size={VOCAB}",
                          f"--seed={seed}", "--device=cpu", "--num_workers=0", *(overrides or [])])
    config.max_steps = calibrate_steps(config, args.budget / 60, share=1.0)
    if args.max_steps:
        config.max_steps = min(config.max_steps, args.max_steps)
    config.eval_batches = args.eval_batches
    config.warmup_steps = max(1, config.max_steps // 20)
    config.eval_interval = config.log_interval = max(1, config.max_steps // EVALS)
    config.save_interval = config.max_steps
    config.validate()
    train(config, resume=False)
    result = score(recipe, seed, run_dir, args.out / "data")
    atomic_write_json(run_dir / "result.json", {"key": run_key(recipe, seed, args), "result": result})
    return result


def score(recipe: str, seed: int, run_dir: Path, data_dir: Path) -> dict:
    """A trained run's numbers: steps, tokens, time, its held-out curve and the whole held-out split's bpb."""
    from lunaris.data import ShardDataset
    from lunaris.evaluate import bytes_per_token, evaluate
    from lunaris.train.checkpoint import model_from_checkpoint
    per_byte = bytes_per_token(data_dir / "val")
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    curve = [(r["time/train_seconds"], r["val/loss"] / math.log(2) / per_byte) for r in rows if "val/loss" in r]
    model = model_from_checkpoint(run_dir)
    config = model.config
    steps, tokens = rows[-1]["step"], rows[-1]["tokens_seen"]
    held_out = evaluate(model, ShardDataset(data_dir / "val", config.max_seq_len), EVAL_BATCH,
                        bytes_per_token=per_byte)
    return {"recipe": recipe, "seed": seed, "steps": steps, "tokens": tokens, "params": model.num_params(),
            "train_seconds": curve[-1][0], "step_ms": 1000 * curve[-1][0] / max(steps, 1),
            "val_bpb": held_out["bits_per_byte"], "curve": curve}


def time_to_reach(curve: list, target: float):
    """Training seconds at which the curve [(seconds, bpb)] first reaches `target` (interpolated), else None."""
    previous = (0.0, math.inf)
    for seconds, bpb in curve:
        if bpb <= target:
            if math.isinf(previous[1]):
                return seconds
            fraction = (previous[1] - target) / (previous[1] - bpb)
            return previous[0] + fraction * (seconds - previous[0])
        previous = (seconds, bpb)
    return None


# ---- the study ---------------------------------------------------------------------------------------------

def main(argv=None) -> int:
    args = parse_args(argv)
    if args.worker:
        recipe, seed, run_dir = args.worker
        print("RESULT " + json.dumps(worker(recipe, int(seed), Path(run_dir), args)))
        return 0
    from lunaris.demo import prepare_corpus
    args.out.mkdir(parents=True, exist_ok=True)
    prepare_corpus(args.out / "data", args.corpus_mb, VOCAB, 0, echo=lambda line: print(line, file=sys.stderr))
    rows = []
    for recipe, seeds in args.plan:
        for seed in range(seeds):
            run_dir = args.out / "runs" / f"{recipe}-seed{seed}"
            kept = json.loads((run_dir / "result.json").read_text()) if (run_dir / "result.json").is_file() else {}
            if kept.get("key") == run_key(recipe, seed, args):
                print(f"{recipe}, seed {seed}: kept from an earlier run ({run_dir / 'result.json'})", file=sys.stderr)
                rows.append(kept["result"])
                continue
            command = [sys.executable, __file__, "--worker", recipe, str(seed), str(run_dir), "--budget",
                       str(args.budget), "--corpus-mb", str(args.corpus_mb), "--out", str(args.out)]
            for option in ("threads", "max_steps"):
                if getattr(args, option):
                    command += [f"--{option.replace('_', '-')}", str(getattr(args, option))]
            command += ["--eval-batches", str(args.eval_batches)]
            print(f"[{time.strftime('%H:%M:%S')}] {recipe}, seed {seed}", file=sys.stderr, flush=True)
            done = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": ""})
            lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
            if done.returncode != 0 or not lines:
                raise SystemExit(f"{recipe} seed {seed} failed:\n{done.stderr[-3000:]}")
            rows.append(json.loads(lines[-1][len("RESULT "):]))
    report = summarize(rows, args)
    print(report["table"])
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    return 0


def summarize(rows: list, args) -> dict:
    baseline = [r for r in rows if r["recipe"] == "baseline"]
    target = statistics.mean(r["val_bpb"] for r in baseline) if baseline else None
    lines = [f"Budget {args.budget:g} s per run; validation bits per byte on the whole "
             f"held-out split" + (f"; baseline's final bpb {target:.4f}" if target else ""), "",
             "| recipe | seed | steps | tokens seen | params | step ms | train s | val bpb | vs baseline "
             "| time to baseline bpb |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        reach = time_to_reach(r["curve"], target) if target else None
        r["seconds_to_baseline"] = reach
        versus = f"{100 * (r['val_bpb'] / target - 1):+.1f}%" if target else "-"
        lines.append(f"| {r['recipe']} | {r['seed']} | {r['steps']} | {r['tokens']:,} | {r['params'] / 1e6:.2f}M | "
                     f"{r['step_ms']:.0f} | {r['train_seconds']:.0f} | {r['val_bpb']:.4f} | {versus} | "
                     f"{'not reached' if reach is None else f'{reach:.0f} s'} |")
    return {"budget_seconds": args.budget, "seeds": args.seeds, "baseline_bpb": target, "results": rows,
            "table": "\n".join(lines)}


if __name__ == "__main__":
    sys.exit(main())
