"""IRL analysis metrics in training: on log steps only, in metrics.jsonl, drawn by `lunaris plot`, and free of
any effect on the training itself."""

import math

from lunaris import LunarisCodex
from lunaris.cli import main as cli_main
from lunaris.model.layers import IRLProbe
from lunaris.plot import panels_for, read_metrics
from lunaris.train import Trainer, train

IRL = {"n_reasoning_steps": 3, "n_experts": 4, "top_k": 2, "moc_every": 2}   # layer 0 dense IRL, layer 1 MoC
NEW_KEYS = {"irl/step2_update_cosine", "irl/step3_update_cosine", "irl/step1_grad_norm", "irl/step2_grad_norm",
            "irl/step3_grad_norm"}


def test_analysis_metrics_are_logged_on_log_steps_only(tmp_path, train_config, helpers, monkeypatch):
    opened = []

    class CountingProbe(IRLProbe):
        def __enter__(self):
            opened.append(True)
            return super().__enter__()

    monkeypatch.setattr(LunarisCodex, "analysis", lambda model: CountingProbe(model))
    config = train_config(tmp_path, model=IRL, max_steps=5, log_interval=2, gradient_accumulation_steps=2)
    trainer = Trainer(config)
    analyzed, original = [], trainer.train_step

    def step(index):
        before = len(opened)
        result = original(index)
        analyzed.append(len(opened) > before)
        return result

    trainer.train_step = step
    try:
        trainer.run()
    finally:
        trainer.close()
    assert analyzed == [True, True, False, True, True]              # steps 1, 2, 4 (log_interval) and 5 (last)
    records = helpers.read_metrics(tmp_path)
    assert [r["step"] for r in records] == [1, 2, 4, 5]
    for record in records:
        assert NEW_KEYS <= record.keys() and "irl/step1_update_cosine" not in record
        assert all(math.isfinite(record[k]) for k in NEW_KEYS)
        assert all(-1.0 <= record[f"irl/step{t}_update_cosine"] <= 1.0 for t in (2, 3))
        assert all(record[f"irl/step{t}_grad_norm"] > 0 for t in (1, 2, 3))


def test_the_metrics_change_nothing_in_the_training(tmp_path, train_config, helpers):
    common = dict(model=IRL, max_steps=4, gradient_accumulation_steps=2)
    train(train_config(tmp_path / "every", log_interval=1, **common))      # analyzed at every step
    train(train_config(tmp_path / "rarely", log_interval=100, **common))   # at the first and last only
    helpers.assert_weights_close(helpers.final_weights(tmp_path / "every"), helpers.final_weights(tmp_path / "rarely"))
    every = helpers.losses_by_step(tmp_path / "every")
    assert all(every[s] == v for s, v in helpers.losses_by_step(tmp_path / "rarely").items())


def test_plot_draws_the_irl_panels(tmp_path, train_config):
    train(train_config(tmp_path, model=IRL, max_steps=2))
    titles = dict(panels_for(read_metrics(tmp_path)))
    assert titles["IRL cosine of successive updates"] == ["irl/step2_update_cosine", "irl/step3_update_cosine"]
    assert titles["IRL gradient norm of the state h_t"] == [f"irl/step{t}_grad_norm" for t in (1, 2, 3)]
    assert titles["IRL relative update norm |h_t - h_t-1| / |x|"] == [f"irl/update_norm_step{t}" for t in (1, 2, 3)]
    assert cli_main(["plot", str(tmp_path)]) == 0 and (tmp_path / "training.png").is_file()
