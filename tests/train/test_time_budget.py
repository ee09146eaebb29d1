"""max_train_seconds: a training-time budget, with the learning-rate schedule decaying on time, resumed exactly."""

import math

import pytest

from lunaris import TrainConfig
from lunaris.errors import ConfigError
from lunaris.train import Trainer, train
from lunaris.train.checkpoint import load_checkpoint_file
from lunaris.train.optim import lr_at

STEP_SECONDS = 1.0  # the clock of the loop tests: every step takes exactly this long


def schedule(kind: str, **keys) -> TrainConfig:
    return TrainConfig(learning_rate=1.0, min_lr=0.1, warmup_steps=10, max_steps=1000, lr_schedule=kind,
                       max_train_seconds=100.0, **keys)


def test_warmup_stays_in_steps_and_the_decay_follows_the_time_spent():
    cosine = schedule("cosine")
    assert lr_at(0, cosine, 0.0) == pytest.approx(1 / 11) and lr_at(9, cosine, 50.0) == pytest.approx(10 / 11)
    # after warmup the step no longer matters, the time does: half the budget is half way down the cosine
    assert lr_at(10, cosine, 50.0) == lr_at(500, cosine, 50.0) == pytest.approx(0.1 + 0.5 * 0.9)
    assert lr_at(10, cosine, 25.0) == pytest.approx(0.1 + 0.5 * (1 + math.cos(math.pi / 4)) * 0.9)
    assert lr_at(10, cosine, 100.0) == lr_at(10, cosine, 130.0) == pytest.approx(0.1)   # the floor, also past it
    assert lr_at(10, schedule("linear"), 25.0) == pytest.approx(1.0 - 0.25 * 0.9)
    wsd = schedule("wsd", decay_fraction=0.2)
    assert lr_at(10, wsd, 10.0) == lr_at(10, wsd, 80.0) == pytest.approx(1.0)   # the decay starts with 20 s left
    assert lr_at(10, wsd, 90.0) == pytest.approx(1.0 - 0.5 * 0.9)
    assert lr_at(999, wsd, 100.0) == pytest.approx(0.1)


def test_without_a_time_budget_the_schedule_follows_max_steps_whatever_the_time():
    steps = TrainConfig(learning_rate=1.0, min_lr=0.1, warmup_steps=10, max_steps=110, lr_schedule="wsd")
    assert [lr_at(step, steps, 1e6) for step in (60, 99, 110)] == [lr_at(step, steps) for step in (60, 99, 110)]
    assert lr_at(99, steps) == pytest.approx(1.0 - 11 / 22 * 0.9)


def test_the_budget_is_a_positive_number_of_seconds(tmp_path):
    with pytest.raises(ConfigError, match="max_train_seconds must be positive or null, got 0.0"):
        TrainConfig.from_dict({"max_train_seconds": 0})
    assert TrainConfig().max_train_seconds is None                           # off unless a config names it


@pytest.fixture
def fixed_clock(monkeypatch):
    """Every training step counts exactly STEP_SECONDS (the loop's measured time goes through _agreed_seconds)."""
    monkeypatch.setattr(Trainer, "_agreed_seconds", lambda self, elapsed: STEP_SECONDS)


def test_training_stops_after_the_step_that_reaches_the_budget_and_decays_on_time(tmp_path, train_config, helpers,
                                                                                  fixed_clock):
    config = train_config(tmp_path / "run", max_steps=1000, warmup_steps=2, lr_schedule="wsd", decay_fraction=0.5,
                          max_train_seconds=5.5, eval_interval=1000)
    result = train(config)
    assert (result.step, result.reason) == (6, "finished")                  # 5 s < 5.5 s: one more step, to 6 s
    rows = helpers.read_metrics(tmp_path / "run")
    assert [r["step"] for r in rows] == list(range(1, 7))
    assert [r["time/train_seconds"] for r in rows] == [float(s) for s in range(1, 7)]
    # each step's LR is the schedule at the training time before it (warmup: steps 0 and 1)
    assert [r["lr"] for r in rows] == pytest.approx([lr_at(s, config, s * STEP_SECONDS) for s in range(6)])
    peak, span = 3e-3, 3e-3 - 3e-4                                          # learning_rate and min_lr (1/10)
    assert [r["lr"] for r in rows][2:] == pytest.approx(          # wsd decays from 2.75 s on, half of 5.5 s
        [peak] + [peak - (t / 5.5 - 0.5) / 0.5 * span for t in (3, 4, 5)])
    assert "val/loss" in rows[-1]                                           # the final evaluation, at the end
    assert load_checkpoint_file(tmp_path / "run")["train_seconds"] == 6.0   # saved with the checkpoint


def test_a_resumed_run_continues_the_time_budget_exactly(tmp_path, train_config, helpers, fixed_clock):
    common = dict(warmup_steps=2, lr_schedule="cosine", max_train_seconds=7.5, model={"dropout": 0.1})
    straight = train(train_config(tmp_path / "straight", max_steps=1000, **common))
    assert straight.step == 8
    first = train(train_config(tmp_path / "resumed", max_steps=3, **common))   # cut short by max_steps
    assert (first.step, load_checkpoint_file(tmp_path / "resumed")["train_seconds"]) == (3, 3.0)
    resumed = train(train_config(tmp_path / "resumed", max_steps=1000, **common))
    assert resumed.step == 8                                                 # 3 s + 5 steps reach 7.5 s, as before
    a, b = helpers.read_metrics(tmp_path / "straight"), helpers.read_metrics(tmp_path / "resumed")
    assert [r["step"] for r in b] == list(range(1, 9))
    for key in ("lr", "loss/total", "time/train_seconds"):
        assert [r[key] for r in a] == [r[key] for r in b], key
    done = Trainer(train_config(tmp_path / "resumed", max_steps=1000, **common))
    try:
        assert done.run().reason == "already-finished"                       # the budget is spent
    finally:
        done.close()


def test_with_the_real_clock_the_run_trains_its_budget_plus_at_most_one_step(tmp_path, train_config, helpers):
    config = train_config(tmp_path / "run", max_steps=100000, max_train_seconds=1.0, eval_interval=1000)
    result = train(config)
    seconds = [r["time/train_seconds"] for r in helpers.read_metrics(tmp_path / "run")]
    assert result.reason == "finished" and 1 < result.step < 100000
    assert seconds[-1] >= 1.0 > seconds[-2]                                 # stopped by the first step past it
    assert seconds == sorted(seconds)
