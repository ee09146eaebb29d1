"""Shared fixtures: tiny configs that build and run in milliseconds on CPU."""

import pytest
import torch

from lunaris import LunarisCodexConfig


def tiny_model_config(**overrides) -> LunarisCodexConfig:
    base = dict(vocab_size=128, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=64,
                multiple_of=16)
    base.update(overrides)
    return LunarisCodexConfig(**base)


@pytest.fixture
def tiny_config():
    return tiny_model_config()


@pytest.fixture(autouse=True)
def _seed_and_threads():
    torch.manual_seed(0)
    yield
