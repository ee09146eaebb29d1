"""The MoC options in the trainer: the annealed router temperature follows the steps, halting IRL logs the steps it
took (and `lunaris analyze` reports them), global-batch balancing trains with accumulation, and each resumes exactly."""

import importlib.util
import json
from pathlib import Path

import pytest

from lunaris.cli import main
from lunaris.metrics import IRL_PONDER, IRL_STEPS_TAKEN, ROUTER_TEMPERATURE
from lunaris.train import Trainer, train

MOC = {"n_experts": 4, "top_k": 2, "collab_mode": "simple", "collab_gate": True}


def test_the_annealed_router_temperature_follows_the_step(tmp_path, train_config, helpers):
    model = dict(MOC, router_temperature=2.0, router_temperature_end=0.5)
    train(train_config(tmp_path / "run", model=model, max_steps=6))
    temperatures = [r[ROUTER_TEMPERATURE] for r in helpers.read_metrics(tmp_path / "run") if ROUTER_TEMPERATURE in r]
    # step s (1-based) ran at progress (s - 1) / max_steps
    assert temperatures == pytest.approx([2.0 - 1.5 * s / 6 for s in range(6)])


@pytest.mark.parametrize("model", [
    {"n_reasoning_steps": 3, "irl_halting": "act", "irl_ponder_weight": 0.1},
    {**MOC, "n_reasoning_steps": 2, "irl_halting": "act", "n_shared_experts": 1, "moc_every": 2,
     "expert_hidden_size": 16, "balance_scope": "global_batch"},
], ids=["dense-halting", "moc-halting-shared-interleaved-global"])
def test_options_train_log_and_resume_exactly(tmp_path, train_config, helpers, model):
    common = dict(model=model, max_steps=6, save_interval=3, gradient_accumulation_steps=2)
    train(train_config(tmp_path / "straight", **common))
    trainer = Trainer(train_config(tmp_path / "resumed", **common))
    original = trainer.train_step

    def step(index):
        if index + 1 == 3:
            trainer.request_stop("test")
        return original(index)

    trainer.train_step = step
    try:
        assert trainer.run().step == 3
    finally:
        trainer.close()
    train(train_config(tmp_path / "resumed", **common))
    a, b = helpers.read_metrics(tmp_path / "straight"), helpers.read_metrics(tmp_path / "resumed")
    assert [r["loss/total"] for r in a] == [r["loss/total"] for r in b]
    logged = [r for r in a if IRL_STEPS_TAKEN in r]
    assert len(logged) == 6 and all(1.0 <= r[IRL_STEPS_TAKEN] <= model["n_reasoning_steps"] for r in logged)
    assert all(r[IRL_PONDER] >= r[IRL_STEPS_TAKEN] for r in logged)
    assert a[-1]["loss/main"] < a[0]["loss/main"]


def test_analyze_reports_the_steps_a_halting_model_took(tmp_path, token_data, helpers, capsys):
    model = {**MOC, "n_reasoning_steps": 3, "irl_halting": "act", "moc_every": 2}
    train(helpers.make_config(token_data, tmp_path / "run", model=model, max_steps=2))
    assert main(["analyze", "--checkpoint", str(tmp_path / "run"), "--data", str(token_data.val), "--batches", "2",
                 "--batch-size", "2", "--json", str(tmp_path / "a.json")]) == 0
    out = capsys.readouterr().out
    result = json.loads((tmp_path / "a.json").read_text())
    assert [(row["layer"], row["kind"]) for row in result["layers"]] == [(0, "dense"), (1, "moc")]
    assert all(1.0 <= row["steps_taken"] <= 3.0 for row in result["layers"])
    assert "mean reasoning steps a token took" in out


def test_the_balance_benchmark_trains_each_rule_and_prints_its_drop_rates(token_data, capsys):   # vocabulary 128
    path = Path(__file__).resolve().parents[2] / "bench" / "bench_moc_balance.py"
    spec = importlib.util.spec_from_file_location("bench_moc_balance", path)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    script.main(["--data", str(token_data.train), "--vocab-size", "128", "--steps", "4",
                 "--rules", "sign:0.001", "proportional:0.05"])
    lines = capsys.readouterr().out.splitlines()
    table = [line for line in lines if line.startswith("| sign") or line.startswith("| proportional")]
    assert lines[0] == "| rule | rate | steps 1-1 | steps 2-2 | steps 3-3 | steps 4-4 |" and len(table) == 2
    assert all(len(line.split("|")) == 8 and line.rstrip().endswith("% |") for line in table)
