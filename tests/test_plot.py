"""`lunaris plot`: curves and expert-utilization heatmaps from metrics.jsonl."""

import json

import pytest

from lunaris.cli import main
from lunaris.errors import LunarisError
from lunaris.plot import panels_for, read_metrics, utilization_layers


def write_metrics(run_dir, moc=True):
    lines = []
    for step in range(0, 100, 10):
        record = {"step": step, "loss/total": 5 - step / 50, "loss/main": 4.9 - step / 50, "lr": 1e-3,
                  "grad_norm": 1.0, "throughput/tokens_per_sec": 1000.0}
        if moc:
            record["loss/aux"] = 0.1
            record.update({f"experts/util_layer{layer}/e{e}": 0.25 for layer in (1, 3) for e in range(4)})
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
