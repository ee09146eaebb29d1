"""bench/bench_learning.py: recipes trained for a wall-clock budget, scored in bits per byte."""

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import yaml

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
    for name in bench.RECIPES:  # every recipe is a valid config (load_config validates)
        bench.recipe_config(name)


def test_the_nanochat_rows_change_only_their_ingredient_of_demo_cpu_and_the_recipe_combines_them():
    bench = load_script()
    from lunaris.demo import PRESET
    from lunaris.model import build_on_meta
    demo = bench.recipe_config("demo-cpu")
    assert demo.to_dict() == load_config_dict(PRESET)
    changed = {}
    for name in bench.NANOCHAT:
        config = bench.recipe_config(name).to_dict()
        changed[name] = {key for key in flat(config) if flat(config)[key] != flat(demo.to_dict())[key]}
    assert changed["demo+relu2"] == {"model.mlp", "model.ffn_hidden_size"}
    assert changed["demo+untied_lr"] == {"model.tie_embeddings", "embedding_lr", "lm_head_lr"}
    assert changed["demo+value_embeddings"] == {"model.value_embeddings"}
    assert changed["demo+polar_express"] == {"muon_ns_coefficients"}
    # relu2's row has demo-cpu's matmul weights, so the same compute per token
    relu2 = build_on_meta(bench.recipe_config("demo+relu2").model)
    assert relu2.flops_per_token() == build_on_meta(demo.model).flops_per_token()
    recipe = flat(bench.recipe_config("recipe").to_dict())
    for name in bench.RECIPE:
        assert all(recipe[key] == flat(bench.recipe_config(name).to_dict())[key] for key in changed[name]), name
    nanochat = flat(bench.recipe_config("nanochat").to_dict())
    assert nanochat["model.logit_softcap"] == 15 and nanochat["muon_lr_scaling"] == "shape"


def flat(config: dict) -> dict:
    return {**{f"model.{k}": v for k, v in config["model"].items()}, **{k: v for k, v in config.items()
                                                                          if k != "model"}}


def load_config_dict(path) -> dict:
    from lunaris.config import load_config
    return load_config(path).to_dict()


def test_two_recipes_train_in_fresh_processes_and_are_scored(tmp_path, monkeypatch, capsys):
    bench = load_script()
    out = tmp_path / "study"
    monkeypatch.setattr(sys, "argv", ["bench_learning.py"])
    assert bench.main(["--budget", "600", "--seeds", "1", "--recipes", "baseline,muon", "--corpus-mb", "0.3",
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
    config = yaml.safe_load((out / "runs" / "muon-seed0" / "config.yaml").read_text())
    assert config["max_train_seconds"] == 600.0 and config["optimizer"] == "muon"   # trained on a time budget


def test_a_run_trains_its_time_budget_and_is_kept_for_a_rerun(tmp_path, monkeypatch, capsys):
    bench = load_script()
    out = tmp_path / "study"
    monkeypatch.setattr(sys, "argv", ["bench_learning.py"])
    argv = ["--budget", "2", "--seeds", "1", "--recipes", "demo+relu2", "--corpus-mb", "0.3", "--out", str(out),
            "--json", str(tmp_path / "r.json"), "--threads", "1", "--eval-batches", "1", "--eval-every", "1"]
    assert bench.main(argv) == 0
    row = json.loads((tmp_path / "r.json").read_text())["results"][0]
    metrics = [json.loads(line) for line in (out / "runs" / "demo+relu2-seed0" / "metrics.jsonl").read_text()
               .splitlines()]
    seconds = [r["time/train_seconds"] for r in metrics]
    assert seconds[-1] >= 2 and row["train_seconds"] == seconds[-1]       # trained until the budget was spent
    assert all(s < 2 for s in seconds[:-1])                                 # and not a step longer
    assert row["steps"] == metrics[-1]["step"] and row["params"] < 2e6
    assert [p[0] for p in row["curve"]] == [r["time/train_seconds"] for r in metrics if "val/loss" in r]
    capsys.readouterr()
    assert bench.main(argv) == 0                                            # the finished run is kept
    assert "kept from an earlier run" in capsys.readouterr().err
