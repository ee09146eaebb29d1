"""MoC `load_balance: bias` in the trainer: the bias moves, is checkpointed, and a resumed run is exact."""

import torch

from lunaris.train import Trainer, train
from lunaris.train.checkpoint import load_checkpoint_file

BIAS = {"n_experts": 4, "top_k": 2, "load_balance": "bias", "balance_bias_rate": 0.01, "n_reasoning_steps": 2}


def biases(out_dir) -> dict:
    return {k: v for k, v in load_checkpoint_file(out_dir)["model"].items() if k.endswith("balance_bias")}


def test_bias_run_stopped_and_resumed_matches_the_uninterrupted_run(tmp_path, train_config, helpers):
    common = dict(model=BIAS, max_steps=8, warmup_steps=2, save_interval=4, gradient_accumulation_steps=2)
    train(train_config(tmp_path / "straight", **common))
    trainer = Trainer(train_config(tmp_path / "resumed", **common))
    original = trainer.train_step

    def step(index):
        if index + 1 == 3:                     # a stop requested during step 3, between save_intervals
            trainer.request_stop("test")
        return original(index)

    trainer.train_step = step
    try:
        assert trainer.run().step == 3
    finally:
        trainer.close()
    assert len(biases(tmp_path / "resumed")) == 2
    train(train_config(tmp_path / "resumed", **common))

    a, b = helpers.read_metrics(tmp_path / "straight"), helpers.read_metrics(tmp_path / "resumed")
    assert [r["loss/total"] for r in a] == [r["loss/total"] for r in b]
    assert [r["moc/bias_spread"] for r in a] == [r["moc/bias_spread"] for r in b]
    helpers.assert_weights_close(helpers.final_weights(tmp_path / "straight"),
                                 helpers.final_weights(tmp_path / "resumed"))   # the bias buffers included
    final = biases(tmp_path / "straight")
    assert final.keys() == {"blocks.0.ffn.balance_bias", "blocks.1.ffn.balance_bias"}
    for bias in final.values():
        assert bias.dtype == torch.float32 and bias.abs().max().item() > 0   # the updates happened
        steps_taken = (bias / 0.01).round()
        torch.testing.assert_close(bias, steps_taken * 0.01)    # each step moved each expert by -rate, 0 or +rate
        assert steps_taken.abs().max().item() <= 8
    # the load-balancing loss is off: loss/aux is the router z-loss alone (small)
    assert all(0 < r["loss/aux"] < 1e-2 for r in a)
