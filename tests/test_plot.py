"""`lunaris plot`: curves and expert-utilization heatmaps from metrics.jsonl, in a grid that fits a screen, every
series drawn once and visible."""

import json
import math

import numpy as np
import pytest

from lunaris.cli import main
from lunaris.errors import LunarisError
from lunaris.plot import DPI, figure, panels_for, read_metrics, utilization_layers


def write_metrics(run_dir, moc=True, every_panel=False):
    """A run's metrics.jsonl: a dense run (loss/main is loss/total), or a MoC run (2 MoC layers, an auxiliary loss of
    0.002); with every_panel, also IRL metrics of 3 reasoning steps whose steps 1 and 2 differ by 0.3 to 1.5% (as a
    real run's do: less than a line's width), a task's accuracy and the routing-bias spread."""
    lines = []
    for step in range(0, 100, 10):
        main_loss = 4.9 - step / 50
        record = {"step": step, "loss/total": main_loss + (0.002 if moc else 0.0), "loss/main": main_loss, "lr": 1e-3,
                  "grad_norm": 1.0, "throughput/tokens_per_sec": 1000.0}
        if moc:
            record["loss/aux"] = 0.002
            record.update({f"experts/util_layer{layer}/e{e}": 0.25 for layer in (1, 3) for e in range(4)})
        if every_panel:
            norm = 0.35 / (1 + step / 20)
            record.update({"irl/step1_grad_norm": norm, "irl/step2_grad_norm": norm * 1.003,
                           "irl/step3_grad_norm": norm * 0.8, "irl/step2_update_cosine": 0.9999,
                           "irl/step3_update_cosine": 0.9998, "moc/bias_spread": step / 1000,
                           **{f"irl/update_norm_step{t}": 0.02 * (1 + 0.015 * t) for t in (1, 2, 3)}})
            if step % 30 == 0:
                record["eval/python_next_line/acc"] = 0.25 + step / 1000
        lines.append(json.dumps(record))
        if step % 50 == 0:
            lines.append(json.dumps({"step": step, "val/loss": 4.5 - step / 100, "val/perplexity": 90.0}))
    lines.append('{"step": 100, "loss/to')  # a run killed mid-write leaves a truncated line
    (run_dir / "metrics.jsonl").write_text("\n".join(lines))


def test_read_metrics_groups_series_and_skips_a_truncated_line(tmp_path):
    write_metrics(tmp_path)
    series = read_metrics(tmp_path)
    assert series["loss/total"][0] == list(range(0, 100, 10))
    assert series["val/loss"] == ([0, 50], [4.5, 4.0])
    layers = utilization_layers(series)
    assert sorted(layers) == [1, 3] and sorted(layers[1]) == [0, 1, 2, 3]


@pytest.mark.parametrize("moc", [True, False])
def test_plot_writes_a_png(tmp_path, capsys, moc):
    write_metrics(tmp_path, moc=moc)
    out = tmp_path / "curves.png"
    assert main(["plot", str(tmp_path), "--out", str(out)]) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert str(out) in capsys.readouterr().out


def test_plot_of_a_directory_without_metrics_is_a_clear_error(tmp_path, capsys):
    assert main(["plot", str(tmp_path)]) == 2
    assert "metrics.jsonl does not exist" in capsys.readouterr().err
    (tmp_path / "metrics.jsonl").write_text("")
    with pytest.raises(LunarisError, match="no metrics yet"):
        read_metrics(tmp_path)


def test_a_dense_run_draws_loss_total_once_and_a_moc_run_draws_main_and_total(tmp_path):
    for moc, expected in ((False, ["loss/total", "val/loss"]), (True, ["loss/total", "loss/main", "val/loss"])):
        write_metrics(tmp_path, moc=moc)
        assert dict(panels_for(read_metrics(tmp_path)))["loss"] == expected


def test_a_moc_run_with_every_panel_fits_a_screen_in_a_grid(tmp_path):
    write_metrics(tmp_path, moc=True, every_panel=True)
    fig = figure(read_metrics(tmp_path))
    width, height = fig.get_size_inches() * DPI
    panels = [ax for ax in fig.axes if ax.get_visible() and ax.get_title()]
    # loss, task accuracy, lr, grad norm, throughput, 3 IRL panels, bias spread, one utilization heatmap
    assert len(panels) == 10, [ax.get_title() for ax in panels]
    assert width <= 1600 and height <= 1000, (width, height)
    columns = {round(ax.get_position().x0, 2) for ax in panels}
    rows = {round(ax.get_position().y0, 2) for ax in panels}
    assert len(columns) >= 3 and len(rows) <= 4


def rendered(fig) -> np.ndarray:
    fig.canvas.draw()
    return np.asarray(fig.canvas.buffer_rgba()).copy()


def changed_pixels(fig, hide: list, before: np.ndarray) -> int:
    for line in hide:
        line.set_visible(False)
    after = rendered(fig)
    for line in hide:
        line.set_visible(True)
    return int((after != before).any(axis=-1).sum())


def test_every_legend_entry_has_visible_data(tmp_path):
    """Every line a legend lists has finite data, and at least a third of what it draws on its own still shows with
    the panel's other lines drawn: none hides under another (the loss/total and loss/main here, and IRL steps 1 to 3,
    differ by less than a line's width)."""
    write_metrics(tmp_path, moc=True, every_panel=True)
    fig = figure(read_metrics(tmp_path))
    for line in (line for ax in fig.axes for line in ax.get_lines()):
        line.set_antialiased(False)  # a hidden line's anti-aliased fringe would count as showing
    before = rendered(fig)
    checked = 0
    for ax in fig.axes:
        legend = ax.get_legend()
        if legend is None:
            continue
        labels = [text.get_text() for text in legend.get_texts()]
        lines = [line for line in ax.get_lines() if line.get_label() in labels]
        assert len(lines) == len(labels), labels
        for line in lines:
            assert any(math.isfinite(y) for y in line.get_ydata()), line.get_label()
            others = [other for other in lines if other is not line]
            for other in others:
                other.set_visible(False)
            alone = rendered(fig)
            own = changed_pixels(fig, [line], alone)             # what the line draws by itself
            for other in others:
                other.set_visible(True)
            shown = changed_pixels(fig, [line], before)          # what of it shows among the others
            assert shown >= own / 3, f"{ax.get_title()}: {line.get_label()} shows {shown} of its {own} pixels"
            checked += 1
    assert checked == 11  # loss (3), IRL update norms (3), IRL cosines (2), IRL gradient norms (3)


def test_a_series_equal_to_one_already_drawn_is_drawn_once_under_both_names(tmp_path):
    write_metrics(tmp_path, moc=False)
    series = read_metrics(tmp_path)
    assert series["loss/main"] == series["loss/total"]
    fig = figure(series)
    loss = next(ax for ax in fig.axes if ax.get_title() == "loss")
    assert [line.get_label() for line in loss.get_lines()] == ["loss/total = loss/main", "val/loss"]
    assert [text.get_text() for text in loss.get_legend().get_texts()] == ["loss/total = loss/main", "val/loss"]
