"""A golden loss curve: the first 30 losses of tiny deterministic CPU runs, stored and compared.

Any change to the numerics (initialization, model, optimizer, schedule, data order) moves these numbers and fails
here. When a change is intended, regenerate the file and commit it with the change:

    LUNARIS_UPDATE_GOLDEN=1 python -m pytest tests/train/test_golden_curve.py
"""

import json
import os
from pathlib import Path

import pytest

from lunaris.train.trainer import train

GOLDEN = Path(__file__).with_name("golden_loss_curve.json")
STEPS = 30
RUNS = {
    "dense": dict(model={}),
    "moc": dict(model=dict(n_experts=4, top_k=2, n_reasoning_steps=2)),
}


@pytest.mark.parametrize("name", sorted(RUNS))
def test_first_losses_match_the_golden_curve(tmp_path, token_data, helpers, name):
    config = helpers.make_config(token_data, tmp_path / name, max_steps=STEPS, warmup_steps=5, **RUNS[name])
    train(config)
    losses = [helpers.losses_by_step(tmp_path / name)[step] for step in range(1, STEPS + 1)]
    if os.environ.get("LUNARIS_UPDATE_GOLDEN"):
        golden = json.loads(GOLDEN.read_text()) if GOLDEN.exists() else {}
        golden[name] = losses
        GOLDEN.write_text(json.dumps(golden, indent=1) + "\n")
    golden = json.loads(GOLDEN.read_text())[name]
    assert len(golden) == STEPS
    for step, (got, expected) in enumerate(zip(losses, golden), start=1):
        assert abs(got - expected) <= 1e-5, (f"{name}: loss at step {step} is {got!r}, the golden curve has "
                                             f"{expected!r}; if the change is intended, regenerate the curve "
                                             f"(see this file's docstring)")
