"""`lunaris plot RUN_DIR`: training curves (MoC expert utilization, IRL step metrics) from `RUN_DIR/metrics.jsonl`.

metrics.jsonl holds one JSON object per logged step: `step` plus the metric names of lunaris.metrics (`loss/total`,
`val/loss`, `eval/<task>/acc`, `lr`, `grad_norm`, `throughput/tokens_per_sec`, `experts/util_layer{l}/e{i}`, ...).
The panels are laid out in a grid that fits a screen (at most 4 columns, about 1600 x 1000 pixels with every panel of
a MoC run with IRL); a series equal to one already drawn in its panel is not drawn again (its name joins the first
one's legend entry: a dense run's `loss/main` is its `loss/total`), and the series of a panel differ in line style
and marker, so that two nearly equal ones (IRL steps often are) are both visible.
"""

import json
import math
from collections import defaultdict
from pathlib import Path

from lunaris import metrics as names
from lunaris.errors import LunarisError
from lunaris.fileio import atomic_open, on_full_disk

PANELS = [  # (title, metric names drawn in it)
    ("loss", [names.LOSS_TOTAL, names.LOSS_MAIN, names.VAL_LOSS]),
    ("learning rate", [names.LR]),
    ("grad norm (before clipping)", [names.GRAD_NORM]),
    ("throughput (tokens/s)", [names.TOKENS_PER_SEC]),
]
IRL_PANELS = [  # (title, template whose `step` is the reasoning step)
    ("IRL relative update norm |h_t - h_t-1| / |x|", names.IRL_UPDATE_NORM),
    ("IRL cosine of successive updates", names.IRL_UPDATE_COSINE),
    ("IRL gradient norm of the state h_t", names.IRL_GRAD_NORM),
]
STYLES = [("-", "o"), ("--", "s"), (":", "^"), ("-.", "D"), ((0, (5, 1, 1, 1)), "v"), ((0, (1, 2)), "P")]
MARKERS_PER_LINE = 12     # markers on a line of many points (every point when it has fewer)
DPI = 110
MAX_SIZE = (14.5, 9.0)    # inches: 1595 x 990 pixels at DPI
PANEL_SIZE = (5.0, 3.2)   # inches, when the grid is small enough


def read_metrics(run_dir) -> dict:
    """{metric name: ([steps], [values])} from RUN_DIR/metrics.jsonl (a file path is accepted too); values that are
    not finite numbers (a skipped step logs null) are left out."""
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
            if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool) \
                    and math.isfinite(value):
                series[key][0].append(step)
                series[key][1].append(value)
    if not series:
        raise LunarisError(f"{path} has no metrics yet; wait for the first log_interval steps of the run.")
    return dict(series)


def utilization_layers(series: dict) -> dict:
    """{layer: {expert: (steps, values)}} for MoC runs."""
    layers = defaultdict(dict)
    for key, data in series.items():
        found = names.match(names.EXPERT_UTIL, key)
        if found:
            layers[found["layer"]][found["expert"]] = data
    return dict(sorted(layers.items()))


def drawn(series: dict, keys: list) -> dict:
    """{key to draw: [the keys whose series equal it]}: a series equal to one already kept is not drawn again."""
    kept: dict = {}
    for key in keys:
        twin = next((k for k in kept if series[k] == series[key]), None)
        if twin is None:
            kept[key] = []
        else:
            kept[twin].append(key)
    return kept


def _panels(series: dict) -> list:
    """[(title, {metric drawn: [the metrics equal to it]})] of the line panels, with only the metrics the run
    logged."""
    panels = [(title, list(keys)) for title, keys in PANELS]
    tasks = sorted(k for k in series if k.startswith("eval/") and k.endswith("/acc"))  # eval/{task}/acc
    panels.insert(1, ("task accuracy (eval_tasks)", tasks))
    for title, template in IRL_PANELS:  # IRL runs (n_reasoning_steps > 1): one line per reasoning step
        steps = {k: names.match(template, k) for k in series}
        panels.append((title, sorted((k for k, found in steps.items() if found), key=lambda k: steps[k]["step"])))
    panels.append(("MoC routing bias spread (max - min, mean over layers)", [names.BIAS_SPREAD]))
    panels = [(title, drawn(series, [k for k in keys if k in series])) for title, keys in panels]
    return [(title, keys) for title, keys in panels if keys]


def panels_for(series: dict) -> list:
    """[(title, metric names)] of the line panels, with only the metrics the run logged, each series drawn once."""
    return [(title, list(keys)) for title, keys in _panels(series)]


def grid_shape(n_panels: int) -> tuple:
    """(rows, columns) for n panels: up to 2 columns for 4 panels, 3 for 9, then 4."""
    columns = min(n_panels, 2 if n_panels <= 4 else 3 if n_panels <= 9 else 4)
    return math.ceil(n_panels / columns), columns


def _draw_lines(ax, series: dict, twins: dict) -> None:
    """The panel's series ({key: the keys equal to it}), each in its own line style and marker; each line a little
    thinner, with smaller markers, than the one drawn before it, so that one nearly equal to an earlier line (IRL
    steps often are) leaves the earlier one showing around it."""
    keys = list(twins)
    for i, key in enumerate(keys):
        steps, values = series[key]
        linestyle, marker = STYLES[i % len(STYLES)]
        below = len(keys) - 1 - i  # lines drawn over this one
        every = max(1, len(steps) // MARKERS_PER_LINE)
        ax.plot(steps, values, label=" = ".join([key, *twins[key]]), linestyle=linestyle, marker=marker,
                markersize=3.5 + 2 * below, linewidth=1.2 + 1.2 * below, markevery=every, color=f"C{i % 10}")
    if len(keys) > 1 or twins[keys[0]]:
        ax.legend(fontsize=7)


def _draw_utilization(fig, ax, layers: dict) -> None:
    """One heatmap of every MoC layer's expert utilization: rows are (layer, expert), columns log steps."""
    import numpy as np
    first = layers[min(layers)]
    steps = first[min(first)][0]
    experts = len(first)
    rows = [experts_of[e][1] for experts_of in layers.values() for e in sorted(experts_of)
            if len(experts_of[e][1]) == len(steps)]
    image = ax.imshow(np.array(rows), aspect="auto", cmap="viridis", interpolation="nearest",
                      extent=(steps[0], steps[-1], len(rows) - 0.5, -0.5))
    for i in range(1, len(layers)):
        ax.axhline(i * experts - 0.5, color="white", linewidth=0.8)
    ax.set_yticks([i * experts + (experts - 1) / 2 for i in range(len(layers))],
                  [f"layer {layer}" for layer in layers], fontsize=7)
    ax.set_title(f"expert utilization, {experts} experts per layer (uniform = {1 / experts:.3f})", fontsize=9)
    fig.colorbar(image, ax=ax).ax.tick_params(labelsize=7)


def figure(series: dict):
    """The matplotlib figure of a run's metrics ({name: (steps, values)}, as read_metrics returns them)."""
    import matplotlib.pyplot as plt
    layers = utilization_layers(series)
    panels = _panels(series)
    rows, columns = grid_shape(len(panels) + bool(layers))
    size = (min(PANEL_SIZE[0] * columns, MAX_SIZE[0]), min(PANEL_SIZE[1] * rows, MAX_SIZE[1]))
    fig, axes = plt.subplots(rows, columns, figsize=size, squeeze=False)
    axes = list(axes.flat)
    for ax, (title, keys) in zip(axes, panels):
        _draw_lines(ax, series, keys)
        ax.set_title(title, fontsize=9)
        ax.ticklabel_format(axis="y", useOffset=False)  # 0.99998, not 1 + -2e-5
        ax.grid(alpha=0.3)
    if layers:
        _draw_utilization(fig, axes[len(panels)], layers)
    for ax in axes[:len(panels) + bool(layers)]:
        ax.set_xlabel("step", fontsize=8)
        ax.tick_params(labelsize=7)
    for ax in axes[len(panels) + bool(layers):]:
        ax.set_visible(False)
    fig.tight_layout()
    return fig


def plot_run(run_dir, out=None) -> Path:
    """Write the figure (PNG) and return its path: RUN_DIR/training.png unless `out` is given."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise LunarisError("lunaris plot needs matplotlib: pip install 'lunaris[plot]' "
                           "(or pip install matplotlib).") from None
    fig = figure(read_metrics(run_dir))
    out = Path(out) if out else (Path(run_dir) if Path(run_dir).is_dir() else Path(run_dir).parent) / "training.png"
    kept = f"The previous {out.name} is unchanged." if out.exists() else "No partial file was left."
    try:
        with on_full_disk(out, lambda: (kept, "run the same command again (or write the figure elsewhere with "
                                              "--out FILE)")):
            with atomic_open(out, "wb") as f:
                fig.savefig(f, dpi=DPI, format=out.suffix.lstrip(".") or "png")
    finally:
        plt.close(fig)
    return out
