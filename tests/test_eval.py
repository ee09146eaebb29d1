"""`lunaris eval`: the loss the model gives on the held-out batches, perplexity, bits-per-byte, clear errors."""

import dataclasses
import json
import math

import numpy as np
import pytest
import torch
from conftest import prepared_words, tiny_model_config

from lunaris import LunarisCodex, TrainConfig
from lunaris.cli import main
from lunaris.data import ShardDataset, read_manifest


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    """A `lunaris prepare` directory (train/ and val/ splits, manifest with byte counts)."""
    return prepared_words(tmp_path_factory.mktemp("eval"),
                          "the quick brown fox jumps over the lazy dog while héllo wörld ☃ sings",
                          n_docs=40, doc_words=60, val_tokens=900, shard_tokens=500)


def save_run(run_dir, model, data_dir):
    run_dir.mkdir(parents=True)
    config = dataclasses.asdict(TrainConfig(model=model.config, data_dir=str(data_dir), batch_size=3))
    torch.save({"model": model.state_dict(), "config": config, "step": 11}, run_dir / "latest_checkpoint.pt")
    return run_dir


def expected_loss(model, data_dir, batch_size, n_batches):
    """Token-weighted mean of the model's own loss over the first batches of the stream, in order."""
    dataset = ShardDataset(data_dir, model.config.max_seq_len)
    total, tokens = 0.0, 0
    for b in range(n_batches):
        x, y = dataset.get_batch(range(b * batch_size, min((b + 1) * batch_size, len(dataset))))
        count = int((y != -1).sum())
        total += model(x, targets=y).main_loss.item() * count
        tokens += count
    return total / tokens, tokens


@pytest.mark.parametrize("overrides", [dict(), dict(n_experts=4, top_k=2, capacity_factor=0.5)], ids=["dense", "moc"])
def test_eval_reports_the_loss_the_model_gives_on_the_held_out_batches(prepared, tmp_path, capsys, overrides):
    model = LunarisCodex(tiny_model_config(vocab_size=320, **overrides)).eval()
    run = save_run(tmp_path / "run", model, prepared)
    assert main(["eval", "--checkpoint", str(run), "--max-batches", "2", "--batch-size", "2",
                 "--json", str(tmp_path / "eval.json")]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result == json.loads((tmp_path / "eval.json").read_text())

    loss, tokens = expected_loss(model, prepared / "val", batch_size=2, n_batches=2)
    assert result["tokens"] == tokens == 2 * 2 * 64 and result["batches"] == 2
    assert result["loss"] == pytest.approx(loss, rel=1e-5)
    assert result["perplexity"] == pytest.approx(math.exp(loss), rel=1e-5)
    split = read_manifest(prepared)["splits"]["val"]
    assert result["bits_per_byte"] == pytest.approx(loss / math.log(2) * split["tokens"] / split["bytes"], rel=1e-5)
    assert result["step"] == 11 and result["data"] == str(prepared / "val")


def test_eval_of_the_whole_split_counts_every_target_once(prepared, tmp_path, capsys):
    model = LunarisCodex(tiny_model_config(vocab_size=320)).eval()
    run = save_run(tmp_path / "run", model, prepared)
    assert main(["eval", "--checkpoint", str(run), "--data", str(prepared)]) == 0  # default batch: the run's 3
    result = json.loads(capsys.readouterr().out)
    dataset = ShardDataset(prepared / "val", 64)
    n_batches = math.ceil(len(dataset) / 3)
    loss, tokens = expected_loss(model, prepared / "val", 3, n_batches)
    assert tokens == dataset.num_tokens - 1  # every token but the first is a target exactly once
    assert result["tokens"] == tokens and result["batches"] == n_batches and result["batch_size"] == 3
    assert result["loss"] == pytest.approx(loss, rel=1e-5)


def test_eval_on_a_flat_directory_of_shards_has_no_bits_per_byte(prepared, tmp_path, capsys):
    flat = tmp_path / "flat"
    flat.mkdir()
    tokens = np.concatenate([np.load(p) for p in sorted((prepared / "val").glob("*.npy"))])
    np.save(flat / "shard_0.npy", tokens)
    run = save_run(tmp_path / "run", LunarisCodex(tiny_model_config(vocab_size=320)), prepared)
    assert main(["eval", "--checkpoint", str(run), "--data", str(flat), "--max-batches", "1"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["bits_per_byte"] is None and result["tokens"] == 3 * 64


def test_eval_errors_are_clear(prepared, tmp_path, capsys):
    model = LunarisCodex(tiny_model_config(vocab_size=320))
    run = save_run(tmp_path / "run", model, tmp_path / "gone")
    assert main(["eval", "--checkpoint", str(run)]) == 2
    err = capsys.readouterr().err
    assert "pass --data DIR" in err and "Traceback" not in err

    assert main(["eval", "--checkpoint", str(tmp_path / "nothing")]) == 2
    assert "does not exist" in capsys.readouterr().err

    small_vocab = save_run(tmp_path / "run_small", LunarisCodex(tiny_model_config(vocab_size=128)), prepared)
    assert main(["eval", "--checkpoint", str(small_vocab)]) == 2
    assert "model.vocab_size" in capsys.readouterr().err

    assert main(["eval", "--checkpoint", str(run), "--data", str(prepared), "--max-batches", "0"]) == 2
    assert "--max-batches must be a positive integer" in capsys.readouterr().err
