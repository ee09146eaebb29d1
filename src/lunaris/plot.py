"""`lunaris plot RUN_DIR`: training curves (MoC expert utilization, IRL step metrics) from `RUN_DIR/metrics.jsonl`.

metrics.jsonl holds one JSON object per logged step: `step` plus the metric names listed in the README
(`loss/total`, `val/loss`, `eval/<task>/acc`, `lr`, `grad_norm`, `throughput/tokens_per_sec`,
`experts/util_layer{l}/e{i}`, ...).
"""

import json
import re
from collections import defaultdict
from pathlib import Path

from lunaris.errors import LunarisError
from lunaris.fileio import atomic_open

PANELS = [  # (title, metric names drawn in it)
    ("loss", ["loss/total", "loss/main", "val/loss"]),
    ("learning rate", ["lr"]),
    ("grad norm (before clipping)", ["grad_norm"]),
    ("throughput (tokens/s)", ["throughput/tokens_per_sec"]),
]
UTIL = re.compile(r"^experts/util_layer(\d+)/e(\d+)$")
IRL_PANELS = [  # (title, pattern whose group 1 is the reasoning step)
    ("IRL relative update norm |h_t - h_t-1| / |x|", re.compile(r"^irl/update_norm_step(\d+)$")),
    ("IRL cosine of successive updates", re.compile(r"^irl/step(\d+)_update_cosine$")),
    ("IRL gradient norm of the state h_t", re.compile(r"^irl/step(\d+)_grad_norm$")),
]


def read_metrics(run_dir) -> dict:
    """{metric name: ([steps], [values])} from RUN_DIR/metrics.jsonl (a file path is accepted too)."""
    path = Path(run_dir)
    path = path / "metrics.jsonl" if path.is_dir() else path
    if not path.is_file():
        raise LunarisError(f"{path} does not exist; pass the out_dir of a `lunaris train` run "
                           f"(it writes metrics.jsonl every log_interval steps).")
    series = defaultdict(lambda: ([], []))
    for line in path.read_text().splitlines():
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            # a run killed mid-write can leave a truncated last line: skip it, the rest is valid
            continue
        step = record.get("step")
        if step is None:
            continue
        for key, value in record.items():
            if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool):
                series[key][0].append(step)
                series[key][1].append(value)
    if not series:
        raise LunarisError(f"{path} has no metrics yet; wait for the first log_interval steps of the run.")
    return dict(series)


def utilization_layers(series: dict) -> dict:
    """{layer: {expert: (steps, values)}} for MoC runs."""
    layers = defaultdict(dict)
    for key, data in series.items():
        match = UTIL.match(key)
        if match:
            layers[int(match.group(1))][int(match.group(2))] = data
    return dict(sorted(layers.items()))


def panels_for(series: dict) -> list:
    """[(title, metric names)] of the line panels, with only the metrics the run logged.

    A dense run's loss/main equals its loss/total (no auxiliary loss): drawn once, not one line hiding the other.
    """
    dense = not any(series.get("loss/aux", ([], []))[1])
    panels = [(title, [k for k in keys if k in series and not (dense and k == "loss/main")]) for title, keys in PANELS]
    tasks = sorted(k for k in series if k.startswith("eval/") and k.endswith("/acc"))  # eval_tasks
    panels.insert(1, ("task accuracy (eval_tasks)", tasks))
    for title, pattern in IRL_PANELS:  # IRL runs (n_reasoning_steps > 1): one line per reasoning step
        keys = [k for k in series if pattern.match(k)]
        panels.append((title, sorted(keys, key=lambda k: int(pattern.match(k).group(1)))))
    panels.append(("MoC routing bias spread (max - min, mean over layers)", ["moc/bias_spread"]))
    panels = [(title, [k for k in keys if k in series]) for title, keys in panels]
    return [(title, keys) for title, keys in panels if keys]


def plot_run(run_dir, out=None) -> Path:
    """Write the figure (PNG) and return its path: RUN_DIR/training.png unless `out` is given."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise LunarisError("lunaris plot needs matplotlib: pip install 'lunaris[plot]' "
                           "(or pip install matplotlib).") from None
    import numpy as np

    series = read_metrics(run_dir)
    layers = utilization_layers(series)
    panels = panels_for(series)
    n_rows = len(panels) + len(layers)
    fig, axes = plt.subplots(n_rows, 1, figsize=(9, 2.6 * n_rows), squeeze=False)
    axes = axes[:, 0]
    for ax, (title, keys) in zip(axes, panels):
        for key in keys:
            steps, values = series[key]
            ax.plot(steps, values, label=key, marker="o" if key.startswith(("val/", "eval/")) else None, markersize=3)
        ax.set_title(title)
        ax.set_xlabel("step")
        if len(keys) > 1:
            ax.legend()
        ax.grid(alpha=0.3)
    for ax, (layer, experts) in zip(axes[len(panels):], layers.items()):
        steps = experts[min(experts)][0]
        grid = np.array([experts[e][1] for e in sorted(experts)])  # (experts, log points)
        image = ax.imshow(grid, aspect="auto", cmap="viridis", interpolation="nearest",
                          extent=(steps[0], steps[-1], len(experts) - 0.5, -0.5))
        ax.set_title(f"expert utilization, layer {layer} (uniform = {1 / len(experts):.3f})")
        ax.set_xlabel("step")
        ax.set_ylabel("expert")
        fig.colorbar(image, ax=ax)
    fig.tight_layout()
    out = Path(out) if out else (Path(run_dir) if Path(run_dir).is_dir() else Path(run_dir).parent) / "training.png"
    with atomic_open(out, "wb") as f:
        fig.savefig(f, dpi=110, format=out.suffix.lstrip(".") or "png")
    plt.close(fig)
    return out
