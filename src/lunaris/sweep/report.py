"""The report: OUT/results.md (a table), OUT/results.json (every number, per run and averaged over seeds) and
OUT/sweep.png (held-out loss against training FLOPs and against training seconds)."""

import json
import statistics
from collections import defaultdict
from pathlib import Path

from lunaris import metrics as names
from lunaris.sweep.plan import count

# per-layer MoC metrics, averaged over layers into one number each in the report
LAYER_AVERAGES = {names.DROP_RATE: "moc/drop_rate", names.ROUTER_ENTROPY: "moc/router_entropy",
                  names.MAX_LOAD_RATIO: "moc/max_load_ratio"}
SHORT = {"moc/drop_rate": "drop", "moc/router_entropy": "entropy", "moc/max_load_ratio": "max load"}


def _metric_rows(run_dir: Path) -> list:
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            rows.append(json.loads(line))
        except ValueError:
            continue  # a truncated last line of a killed run
    return rows


def model_metrics(row: dict) -> dict:
    """A few scalars of the MoC and IRL layers from one metrics row: moc/* and irl/* as logged, and the
    per-layer expert drop rate, router entropy and max load ratio averaged over layers (moc/<name>)."""
    metrics, layers = {}, defaultdict(list)
    for key, value in row.items():
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            continue
        if key.startswith(("moc/", "irl/")):
            metrics[key] = value
        template = names.template_of(key, names.MOC_LAYER_METRICS)
        if template is not None:
            layers[LAYER_AVERAGES[template]].append(value)
    metrics.update({name: statistics.fmean(values) for name, values in sorted(layers.items())})
    return metrics


def read_run_metrics(run_dir: Path) -> dict:
    """train_seconds, the held-out curve [(step, train seconds or None, val loss)] and the last model metrics."""
    rows = _metric_rows(run_dir)
    timed = [r for r in rows if isinstance(r.get(names.TRAIN_SECONDS), (int, float))]
    logged = [r for r in rows if names.LOSS_TOTAL in r]
    curve = [[r["step"], r.get(names.TRAIN_SECONDS), r[names.VAL_LOSS]] for r in rows
             if isinstance(r.get(names.VAL_LOSS), (int, float))]
    return {"train_seconds": timed[-1][names.TRAIN_SECONDS] if timed else None, "curve": curve,
            "metrics": model_metrics(logged[-1]) if logged else {}}


def _mean_spread(values: list):
    values = [v for v in values if v is not None]
    if not values:
        return None, None
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else None)


def _finished(runs: list, state: dict) -> dict:
    """{variant: [(run, result)]} of the finished runs."""
    by_variant = defaultdict(list)
    for run in runs:
        record = state["runs"].get(run.name)
        if record and record.get("status") == "finished":
            by_variant[run.variant].append((run, record["result"]))
    return by_variant


def summarize(sweep, runs: list, state: dict) -> list:
    """One row per variant with at least one finished run: costs, and results averaged over its seeds."""
    by_variant = _finished(runs, state)
    rows = []
    for variant in sweep.variants:
        done = by_variant.get(variant)
        if not done:
            continue
        cost = sweep.costs[variant]
        counts = [r["steps"] for _, r in done]
        steps = counts[0] if len(set(counts)) == 1 else statistics.fmean(counts)  # seeds of a variant: equal steps
        loss, loss_spread = _mean_spread([r["val_loss"] for _, r in done])
        bpb, bpb_spread = _mean_spread([r.get("val_bpb") for _, r in done])
        seconds, _ = _mean_spread([r.get("train_seconds") for _, r in done])
        keys = dict.fromkeys(k for _, r in done for k in r.get("metrics", {}))
        metrics = {k: statistics.fmean(r["metrics"][k] for _, r in done if k in r.get("metrics", {})) for k in keys}
        rows.append({
            "variant": variant, "overrides": sweep.variants[variant], "seeds": [run.seed for run, _ in done],
            "params": cost.params, "active_params": cost.active_params, "flops_per_token": cost.flops_per_token,
            "tokens_per_step": cost.tokens_per_step, "steps": steps, "tokens": steps * cost.tokens_per_step,
            "flops": steps * cost.tokens_per_step * cost.flops_per_token, "train_seconds": seconds,
            "val_loss": loss, "val_loss_std": loss_spread, "val_bpb": bpb, "val_bpb_std": bpb_spread,
            "eval_tokens": done[0][1].get("eval_tokens"), "metrics": metrics,
            "runs": [{"seed": run.seed, "run_dir": str(run.dir), **result} for run, result in done],
        })
    return rows


def _with_spread(mean, spread, digits: int = 4) -> str:
    if mean is None:
        return "-"
    return f"{mean:.{digits}f}" + (f" ± {spread:.{digits}f}" if spread is not None else "")


def _metrics_text(metrics: dict) -> str:
    parts = []
    for key, value in metrics.items():
        step = names.match(names.IRL_UPDATE_NORM, key)
        label = SHORT.get(key) or (f"irl step {step['step']}" if step else None)
        if label:
            parts.append(f"{label} {value:.3g}")
    return ", ".join(parts) or "-"


def format_table(sweep, rows: list) -> str:
    seeds = max(len(r["seeds"]) for r in rows)
    eval_what = f"the first {sweep.eval_batches} held-out batches" if sweep.eval_batches else "the whole held-out split"
    lines = [f"Budget {sweep.budget_text()} per run; every variant scored on {eval_what} "
             f"({rows[0]['eval_tokens']:,} tokens, batch size {sweep.eval_batch_size})"
             + ("; mean ± standard deviation over seeds" if seeds > 1 else ""), "",
             "| variant | seeds | params | active params | steps | tokens | training FLOPs | train s | val loss "
             "| val bpb | MoC / IRL at the end |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        seconds = f"{r['train_seconds']:.3g}" if r["train_seconds"] is not None else "-"
        lines.append(f"| {r['variant']} | {len(r['seeds'])} | {count(r['params'])} | {count(r['active_params'])} | "
                     f"{r['steps']:g} | {count(r['tokens'])} | {r['flops']:.3g} | {seconds} | "
                     f"{_with_spread(r['val_loss'], r['val_loss_std'])} | "
                     f"{_with_spread(r['val_bpb'], r['val_bpb_std'])} | {_metrics_text(r['metrics'])} |")
    return "\n".join(lines)


def write_report(sweep, runs: list, state: dict, out: Path, echo) -> dict:
    """OUT/results.md, OUT/results.json and OUT/sweep.png from every finished run; returns the report."""
    from lunaris.fileio import atomic_write_json, atomic_write_text
    rows = summarize(sweep, runs, state)
    report = {"sweep": str(sweep.path), "budget": {sweep.budget_kind: sweep.budget}, "seeds": sweep.seeds,
              "eval": {"batches": sweep.eval_batches or "all", "batch_size": sweep.eval_batch_size},
              "world_size": sweep.world_size, "variants": rows, "table": format_table(sweep, rows) if rows else ""}
    if not rows:
        return report
    missing = [r.name for r in runs if state["runs"].get(r.name, {}).get("status") != "finished"]
    note = f"\n\nNot finished yet: {', '.join(missing)}.\n" if missing else "\n"
    atomic_write_text(out / "results.md", report["table"] + note)
    atomic_write_json(out / "results.json", report)
    try:
        plot = plot_sweep(rows, out / "sweep.png")
        echo(f"wrote {out / 'results.md'}, {out / 'results.json'} and {plot}")
    except ImportError:
        echo(f"wrote {out / 'results.md'} and {out / 'results.json'} (no plot: pip install matplotlib)")
    return report


def _mean_curve(row: dict) -> list:
    """[(flops, seconds or None, val loss)] averaged over the seeds at the steps they all evaluated."""
    per_step = defaultdict(list)
    for run in row["runs"]:
        for step, seconds, loss in run.get("curve", []):
            per_step[step].append((seconds, loss))
    points = []
    per_token = row["tokens_per_step"] * row["flops_per_token"]
    for step in sorted(per_step):
        values = per_step[step]
        if len(values) == len(row["runs"]):
            seconds = [s for s, _ in values if s is not None]
            points.append((step * per_token, statistics.fmean(seconds) if len(seconds) == len(values) else None,
                           statistics.fmean(loss for _, loss in values)))
    return points


def plot_sweep(rows: list, path: Path) -> Path:
    """Held-out loss of every variant against training FLOPs (left) and training seconds (right)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from lunaris.fileio import atomic_open
    fig, (by_flops, by_time) = plt.subplots(1, 2, figsize=(12, 4.5))
    for i, row in enumerate(rows):
        # 10 colours, then the same colours dashed, dotted, ...: every variant keeps its own line
        style = dict(color=f"C{i % 10}", linestyle=("-", "--", ":", "-.")[i // 10 % 4], marker="o", markersize=3,
                     label=row["variant"])
        curve = _mean_curve(row)
        by_flops.plot([c[0] for c in curve], [c[2] for c in curve], **style)
        timed = [c for c in curve if c[1] is not None]
        by_time.plot([c[1] for c in timed], [c[2] for c in timed], **style)
    for ax, label in ((by_flops, "training FLOPs"), (by_time, "training seconds")):
        ax.set_xlabel(label)
        ax.set_ylabel("held-out loss (nats/token)")
        ax.grid(alpha=0.3)
    by_flops.set_title("held-out loss vs training FLOPs")
    by_time.set_title("held-out loss vs training time")
    by_time.legend(fontsize=8)
    fig.tight_layout()
    with atomic_open(path, "wb") as f:
        fig.savefig(f, dpi=110, format="png")
    plt.close(fig)
    return path
