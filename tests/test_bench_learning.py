"""bench/bench_learning.py: recipes trained for a wall-clock budget, scored in bits per byte."""

import importlib.util
import json
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "bench" / "bench_learning.py"


def load_script():
    spec = importlib.util.spec_from_file_location("bench_learning", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_time_to_reach_interpolates_between_evaluations():
    bench = load_script()
    curve = [(10.0, 3.0), (20.0, 2.0), (30.0, 1.5)]
    assert bench.time_to_reach(curve, 2.5) == pytest.approx(15.0)
    assert bench.time_to_reach(curve, 3.5) == 10.0          # reached at the first evaluation
    assert bench.time_to_reach(curve, 1.0) is None          # never reached


def test_unknown_recipe_is_a_clear_error(capsys):
    bench = load_script()
    with pytest.raises(SystemExit):
        bench.parse_args(["--recipes", "baseline,adam9"])
    assert "unknown recipe(s) adam9" in capsys.readouterr().err


def test_recipe_seed_counts_and_every_option_loads(capsys):
    bench = load_script()
    args = bench.parse_args(["--seeds", "1", "--recipes", "baseline:2,muon,demo-cpu:3"])
    assert args.plan == [("baseline", 2), ("muon", 1), ("demo-cpu", 3)]
    with pytest.raises(SystemExit):
        bench.parse_args(["--recipes", "baseline:two"])
    assert "seed count" in capsys.readouterr().err
    from lunaris.config import load_config
    from lunaris.demo import PRESET
    for overrides in bench.RECIPES.values():  # every recipe is a valid config (load_config validates)
        load_config(bench.BASELINE if overrides is not None else PRESET, overrides or [])


def test_two_recipes_train_in_fresh_processes_and_are_scored(tmp_path, monkeypatch, capsys):
    bench = load_script()
    out = tmp_path / "study"
    monkeypatch.setattr(sys, "argv", ["bench_learning.py"])
    assert bench.main(["--budget", "2", "--seeds", "1", "--recipes", "baseline,muon", "--corpus-mb", "0.3",
                       "--out", str(out), "--json", str(tmp_path / "r.json"), "--threads", "1", "--max-steps", "6",
                       "--eval-batches", "1"]) == 0
    report = json.loads((tmp_path / "r.json").read_text())
    rows = {r["recipe"]: r for r in report["results"]}
    assert set(rows) == {"baseline", "muon"}
    for row in rows.values():
        assert row["steps"] == 6 and row["tokens"] == 6 * 16 * 256
        assert 0 < row["val_bpb"] < 10 and row["curve"] and row["params"] > 3e6
    assert report["baseline_bpb"] == rows["baseline"]["val_bpb"]
    assert "| muon | 0 |" in capsys.readouterr().out
