"""Initialization is one function (model/initialization.py): each weight drawn exactly once, in a stated order,
nothing drawn while the layers are built, the same rules for a layer built alone."""

import math
from collections import Counter

import pytest
import torch
from conftest import tiny_model_config

from lunaris import LunarisCodex
from lunaris.model.initialization import initialize
from lunaris.model.layers import RotaryEmbedding
from lunaris.model.moc import MoCLayer

CONFIGS = {"dense": {}, "moc-mha-shared-bias": dict(n_experts=4, top_k=2, collab_mode="mha", n_shared_experts=1,
                                                      load_balance="bias"),
           "moc-simple-untied": dict(n_experts=4, top_k=2, collab_mode="simple", tie_embeddings=False, moc_every=2)}


@pytest.mark.parametrize("overrides", CONFIGS.values(), ids=CONFIGS.keys())
def test_every_weight_is_drawn_exactly_once_and_building_draws_nothing(overrides, monkeypatch):
    draws, real = Counter(), torch.nn.init.normal_

    def counting(tensor, *args, **kwargs):
        if not tensor.is_meta:
            draws[tensor.data_ptr()] += 1
        return real(tensor, *args, **kwargs)

    def forbidden(*args, **kwargs):
        raise AssertionError("a default initialization ran on real storage")

    monkeypatch.setattr(torch.nn.init, "normal_", counting)
    for name in ("kaiming_uniform_", "uniform_"):
        real_default = getattr(torch.nn.init, name)
        monkeypatch.setattr(torch.nn.init, name, lambda tensor, *a, _real=real_default, **k:
                            _real(tensor, *a, **k) if tensor.is_meta else forbidden())
    model = LunarisCodex(tiny_model_config(**overrides))
    matrices = {p.data_ptr() for p in model.parameters() if p.dim() >= 2}
    assert draws.keys() == matrices and set(draws.values()) == {1}


@pytest.mark.parametrize("overrides", CONFIGS.values(), ids=CONFIGS.keys())
def test_the_weights_depend_on_the_seed_and_the_stated_order_only(overrides):
    config = tiny_model_config(**overrides)
    torch.manual_seed(0)
    model = LunarisCodex(config)
    again = LunarisCodex(config)
    torch.manual_seed(0)
    again.init_weights()                    # the same draws, in the same order: construction drew nothing
    for (name, a), b in zip(model.state_dict().items(), again.state_dict().values()):
        assert torch.equal(a, b), name
    # replayed by hand: Normal(0, std) for each >=2-D weight in named_parameters order, std by the rules
    residual = {f"{name}.{param}".lstrip(".") for name, module in model.named_modules()
                for param in getattr(module, "residual_out", ())}
    torch.manual_seed(0)
    for name, param in model.named_parameters():
        if param.dim() >= 2:
            std = 0.02 / math.sqrt(2 * config.n_layers) if name in residual else 0.02
            assert torch.equal(param, torch.empty_like(param).normal_(0.0, std)), name
        else:
            assert torch.equal(param, torch.ones_like(param) if name.endswith("norm.weight") else
                               torch.zeros_like(param)), name


def test_the_rules_hold_in_a_model_and_in_a_layer_built_alone():
    config = tiny_model_config(n_layers=8, d_model=128, ffn_hidden_size=256, n_experts=4, top_k=2, collab_mode="mha",
                               load_balance="bias")
    residual = 0.02 / math.sqrt(2 * 8)
    torch.manual_seed(0)
    model = LunarisCodex(config)
    layer = MoCLayer(config, 0)             # alone: initialized by the same function
    for ffn in (model.blocks[3].ffn, layer):
        assert ffn.experts.gate_up.std().item() == pytest.approx(0.02, rel=0.05)
        assert ffn.experts.down.std().item() == pytest.approx(residual, rel=0.05)
        assert ffn.router.weight.std().item() == pytest.approx(0.02, rel=0.1)
        assert ffn.collab.out.weight.std().item() == pytest.approx(residual, rel=0.1)
        assert torch.equal(ffn.collab.norm.weight, torch.ones(128))
        assert torch.equal(ffn.balance_bias, torch.zeros(4)) and ffn.balance_counts.sum() == 0
    assert torch.equal(model.blocks[0].attn_norm.bias, torch.zeros(128))
    rotary = RotaryEmbedding(config.head_dim, config.max_seq_len, config.rope_theta)
    assert torch.equal(model.rotary.cos, rotary.cos) and torch.equal(model.rotary.sin, rotary.sin)
    initialize(layer, config)               # callable on any layer: draws again, same rules
    assert layer.experts.down.std().item() == pytest.approx(residual, rel=0.05)


def test_a_model_built_on_the_meta_device_stays_there():
    with torch.device("meta"):
        model = LunarisCodex(tiny_model_config(n_experts=4, top_k=2))
    assert all(p.is_meta for p in model.parameters()) and model.lm_head.weight is model.wte.weight
    assert model.num_params() == LunarisCodex(tiny_model_config(n_experts=4, top_k=2)).num_params()
