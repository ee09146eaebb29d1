"""Learning efficiency: how good a model each training recipe gets for the same wall-clock budget on this machine.

    python bench/bench_learning.py                                # every recipe, 200 s each, 2 seeds
    python bench/bench_learning.py --budget 60 --seeds 1 --recipes baseline,muon

The corpus is the demo's (Python standard-library source, 4,096-token tokenizer, prepared once under --out). The
baseline is bench/configs/baseline-demo-cpu.yaml, the `demo-cpu` preset as it was before the recipe study (AdamW,
cosine); `demo-cpu` is today's preset as it ships. Each other recipe is one of the two plus a few config overrides:
the first round's options on the baseline, the ingredients of nanochat's recipe (`demo+...`) one at a time on
demo-cpu; `nanochat` is all of those at once, and `recipe` the combination RECIPE names (the ingredients a study
keeps). `--recipes muon,baseline:2` runs 2 seeds of baseline whatever --seeds says. Each run trains in a fresh
process for --budget seconds of training (the trainer's max_train_seconds: it stops after the step that reaches the
budget, and its schedule decays over that time), then scores the whole held-out split. The metric is validation
bits per byte, which does not depend on the tokenizer. Recipes run one after another, never concurrently. "time to
baseline" is the training time at which a recipe's held-out curve (an evaluation every --eval-every steps) first
reaches the baseline's final bits per byte (mean over seeds), linearly interpolated between evaluations.
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
from typing import NamedTuple

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
from lunaris.fileio import atomic_write_json  # noqa: E402

BASELINE = Path(__file__).resolve().parent / "configs" / "baseline-demo-cpu.yaml"
SMALLER = {  # model sizes for the demo's budget: (d_model, heads, kv heads, FFN hidden) at 4 layers
    "d192": (192, 6, 2, 512),
    "d128": (128, 4, 2, 384),
}


class Recipe(NamedTuple):
    base: str          # "baseline" (BASELINE) or "demo-cpu" (the preset as it ships)
    overrides: list    # config overrides on top of it


def on_baseline(*overrides) -> Recipe:
    return Recipe("baseline", list(overrides))


def on_demo(*overrides) -> Recipe:
    return Recipe("demo-cpu", list(overrides))


def sized(d, h, kv, f) -> list:
    return [f"--model.d_model={d}", f"--model.n_heads={h}", f"--model.n_kv_heads={kv}", f"--model.ffn_hidden_size={f}"]


# nanochat's recipe (mid-2026), one ingredient per row on top of demo-cpu (width 128, 4 layers, Muon, wsd). Sizes
# match demo-cpu's compute: relu2's hidden 576 gives its two matrices SwiGLU 384's three matrices' weights.
# The AdamW learning rates of their own are nanochat's steps relative to the initial scale, on Lunaris's
# Normal(0, 0.02) weights: nanochat's embedding takes lr 0.2·sqrt(768/d_model) ~ 0.5 on std 0.8, a relative
# step ~0.6, so 1e-2 here; its head learns slower than the embedding, and its x0 scalars fast (lr 0.5).
NANOCHAT = {
    "demo+relu2": on_demo("--model.mlp=relu2", "--model.ffn_hidden_size=576"),
    "demo+untied": on_demo("--model.tie_embeddings=false"),
    "demo+untied_lr": on_demo("--model.tie_embeddings=false", "--embedding_lr=1e-2", "--lm_head_lr=1e-3"),
    "demo+value_embeddings": on_demo("--model.value_embeddings=2"),           # layers 1 and 3, as nanochat's
    "demo+residual_scalars": on_demo("--model.residual_scalars=true", "--scalar_lr=1e-2"),
    "demo+polar_express": on_demo("--muon_ns_coefficients=polar_express"),
    "demo+muon_spectral": on_demo("--muon_lr_scaling=spectral"),
    "demo+muon_rms": on_demo("--muon_lr_scaling=rms", "--muon_lr=0.009"),   # 0.02 / (0.2 sqrt(128)): same 128x128 step
    "demo+qk_norm": on_demo("--model.qk_norm=true"),
    "demo+logit_softcap": on_demo("--model.logit_softcap=15"),
    "demo+long_decay": on_demo("--decay_fraction=0.65", "--min_lr=1e-4"),   # nanochat's warmdown: 65%, to 5%
    # nanochat's sliding windows (window_pattern "SSSL") become rows here once model.attention_window exists
}
# `nanochat`: every ingredient at once, as nanochat trains (its Muon scales its steps by shape, torch's way).
NANOCHAT_ALL = ("demo+relu2", "demo+untied_lr", "demo+value_embeddings", "demo+residual_scalars",
                "demo+polar_express", "demo+qk_norm", "demo+logit_softcap", "demo+long_decay")
# `recipe`: the ingredients a study keeps. Until the timed study has run, every ingredient expected to help
# (logit_softcap was 2.5% worse in the first round's rows).
RECIPE = ("demo+relu2", "demo+untied_lr", "demo+value_embeddings", "demo+residual_scalars", "demo+polar_express",
          "demo+qk_norm", "demo+long_decay")


def combined(names) -> Recipe:
    """demo-cpu plus the overrides of the NANOCHAT rows `names` (a later row wins a key that two set)."""
    return on_demo(*(override for name in names for override in NANOCHAT[name].overrides))


RECIPES = {  # name -> Recipe
    "baseline": on_baseline(),
    "demo-cpu": on_demo(),
    "wsd": on_baseline("--lr_schedule=wsd"),
    "muon": on_baseline("--optimizer=muon"),
    "muon+wsd": on_baseline("--optimizer=muon", "--lr_schedule=wsd"),
    "qk_norm": on_baseline("--model.qk_norm=true"),
    "zero_init_out": on_baseline("--model.zero_init_out=true"),
    "logit_softcap": on_baseline("--model.logit_softcap=15"),
    "document": on_baseline("--model.attention_mask=document"),
    **{name: on_baseline(*sized(*size)) for name, size in SMALLER.items()},
    **{f"muon+{name}": on_baseline("--optimizer=muon", *sized(*size)) for name, size in SMALLER.items()},
    **NANOCHAT,
    "nanochat": combined(NANOCHAT_ALL),
    "recipe": combined(RECIPE),
}
VOCAB = 4096
EVAL_EVERY = 25  # steps between held-out evaluations, for the time-to-target curve (--eval-every)
EVALS = 8  # held-out evaluations of a run capped by --max-steps
WARMUP_STEPS = 15  # learning-rate warmup of every run (about 5% of a 200 s demo-cpu run)
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
    p.add_argument("--eval-every", type=int, default=EVAL_EVERY,
                   help=f"training steps between evaluations of the curve (default {EVAL_EVERY})")
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
    if args.budget <= 0 or args.seeds < 1 or args.corpus_mb <= 0 or args.eval_every < 1:
        p.error("--budget, --seeds, --corpus-mb and --eval-every must be positive")
    return args


# ---- one run, in its own process ---------------------------------------------------------------------

def run_key(recipe: str, seed: int, args) -> dict:
    """What a run's result depends on: a finished run with the same key is kept, not trained again."""
    return {"base": RECIPES[recipe].base, "overrides": RECIPES[recipe].overrides, "seed": seed,
            "budget": args.budget, "budget_by": "max_train_seconds", "corpus_mb": args.corpus_mb,
            "max_steps": args.max_steps, "eval_batches": args.eval_batches, "eval_every": args.eval_every,
            "warmup_steps": WARMUP_STEPS}


def recipe_config(recipe: str, extra=()):
    """The TrainConfig of `recipe` (its base config and overrides, then `extra` overrides)."""
    from lunaris.config import load_config
    from lunaris.demo import PRESET
    base, overrides = RECIPES[recipe]
    return load_config(PRESET if base == "demo-cpu" else BASELINE, [*extra, *overrides])


def worker(recipe: str, seed: int, run_dir: Path, args) -> dict:
    """Train for the budget (training time), score the whole held-out split; returns the run's numbers."""
    import torch

    from lunaris.train.trainer import train
    if args.threads:
        torch.set_num_threads(args.threads)
    config = recipe_config(recipe, [f"--data_dir={args.out / 'data'}", f"--out_dir={run_dir}",
                                    f"--model.vocab_size={VOCAB}", f"--seed={seed}", "--device=cpu",
                                    "--num_workers=0"])
    config.max_train_seconds = args.budget
    config.max_steps = args.max_steps or 10**9   # the time budget ends the run
    config.eval_batches = args.eval_batches
    config.warmup_steps = min(WARMUP_STEPS, max(1, config.max_steps // 20))
    config.eval_interval = config.log_interval = (max(1, args.max_steps // EVALS) if args.max_steps
                                                  else args.eval_every)
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
            command += ["--eval-batches", str(args.eval_batches), "--eval-every", str(args.eval_every)]
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
