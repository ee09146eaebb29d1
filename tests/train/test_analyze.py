"""`lunaris analyze`: per-layer, per-step IRL numbers and the loss when every IRL FFN stops after s steps."""

import json

import pytest
import torch

from lunaris.analyze import irl_layers, reasoning_steps
from lunaris.cli import main
from lunaris.train import train
from lunaris.train.checkpoint import model_from_checkpoint

IRL = {"n_reasoning_steps": 3, "n_experts": 4, "top_k": 2, "moc_every": 2}   # layer 0 dense IRL, layer 1 MoC


@pytest.fixture(scope="module")
def irl_run(tmp_path_factory, token_data, helpers):
    out = tmp_path_factory.mktemp("irl_run")
    train(helpers.make_config(token_data, out, model=IRL, max_steps=3))
    return out


def test_analyze_prints_the_tables_and_its_full_depth_loss_is_evals(irl_run, token_data, tmp_path, capsys):
    batches = ["--batch-size", "2", "--data", str(token_data.val)]
    assert main(["analyze", "--checkpoint", str(irl_run), "--batches", "3", "--json", str(tmp_path / "a.json"),
                 *batches]) == 0
    out = capsys.readouterr().out
    result = json.loads((tmp_path / "a.json").read_text())
    assert main(["eval", "--checkpoint", str(irl_run), "--max-batches", "3", *batches]) == 0
    evaluated = json.loads(capsys.readouterr().out)

    assert result["reasoning_steps"] == 3 and result["batches"] == evaluated["batches"] == 3
    losses = {entry["steps"]: entry["loss"] for entry in result["loss_by_steps"]}
    assert sorted(losses) == [1, 2, 3]
    assert losses[3] == evaluated["loss"] and result["tokens"] == evaluated["tokens"]   # the same batches and sums
    assert losses[1] != losses[3]
    assert [(row["layer"], row["kind"]) for row in result["layers"]] == [(0, "dense"), (1, "moc")]
    for row in result["layers"]:
        assert len(row["update_norm"]) == 3 and all(v > 0 for v in row["update_norm"])
        assert row["update_cosine"][0] is None and all(-1 <= v <= 1 for v in row["update_cosine"][1:])
    assert "relative update norm" in out and "validation loss if every IRL FFN stops after s steps" in out
    assert "(as trained)" in out and f"{losses[1]:.4f}" in out


def test_the_steps_override_is_undone(irl_run):
    model = model_from_checkpoint(irl_run)
    layers = irl_layers(model)
    with reasoning_steps(layers, 1):
        assert [module.steps for _, _, _, module in layers] == [1, 1]
    assert [module.steps for _, _, _, module in layers] == [3, 3]
    with pytest.raises(RuntimeError), reasoning_steps(layers, 2):
        raise RuntimeError("an evaluation that fails")
    assert [module.steps for _, _, _, module in layers] == [3, 3]
    assert torch.is_grad_enabled()


def test_a_one_step_model_has_nothing_to_analyze_but_gets_its_loss(tmp_path, token_data, helpers, capsys):
    train(helpers.make_config(token_data, tmp_path / "run", max_steps=1))
    # the checkpoint as a positional argument: the older form
    assert main(["analyze", str(tmp_path / "run"), "--data", str(token_data.val), "--batches", "1"]) == 0
    out = capsys.readouterr().out
    assert "nothing to analyze" in out and "n_reasoning_steps 1" in out
    assert "validation loss" in out and "(as trained)" in out


def test_errors_are_one_clear_paragraph(irl_run, tmp_path, capsys):
    assert main(["analyze", str(tmp_path / "missing")]) == 2
    err = capsys.readouterr().err
    assert "does not exist" in err and "Traceback" not in err
    assert main(["analyze", str(irl_run), "--data", str(tmp_path / "no_data")]) == 2
    err = capsys.readouterr().err
    assert str(tmp_path / "no_data") in err and "Traceback" not in err
    (tmp_path / "empty").mkdir()
    assert main(["analyze", str(irl_run), "--data", str(tmp_path / "empty")]) == 2
    assert "no .npy token shards" in capsys.readouterr().err
    assert main(["analyze", str(irl_run), "--batches", "0"]) == 2
    assert "--batches must be a positive integer" in capsys.readouterr().err
