"""Shared experts (`n_shared_experts`): an always-on SwiGLU beside the routed experts, added to the fused output."""

import pytest
import torch
from conftest import tiny_model_config

from lunaris import LunarisCodex
from lunaris.analyze import irl_layers, reasoning_steps
from lunaris.config import LunarisCodexConfig, TrainConfig
from lunaris.model.layers import irl_iterate
from lunaris.model.moc import MoCLayer
from lunaris.sweep import variant_cost


def layer_config(**overrides):
    keys = dict(d_model=32, n_heads=4, ffn_hidden_size=48, n_experts=4, top_k=2, collab_mode="simple",
                capacity_factor=None, n_shared_experts=1)
    keys.update(overrides)
    return tiny_model_config(**keys)


def routed_only(layer: MoCLayer, **overrides) -> MoCLayer:
    """The same layer without its shared expert: same router, experts and collaboration weights."""
    plain = MoCLayer(layer_config(n_shared_experts=0, **overrides), 0)
    missing, unexpected = plain.load_state_dict(layer.state_dict(), strict=False)
    assert not missing and unexpected and all(key.startswith("shared.") for key in unexpected)
    return plain


def test_the_key_is_validated_and_off_by_default():
    assert LunarisCodexConfig().n_shared_experts == 0
    problems = LunarisCodexConfig(n_experts=4, n_shared_experts=-1).problems()
    assert any("model.n_shared_experts must be an integer >= 0, got -1" in p for p in problems)
    plain = MoCLayer(layer_config(n_shared_experts=0), 0)
    assert plain.shared is None and not [k for k in plain.state_dict() if "shared" in k]  # old checkpoints load


@pytest.mark.parametrize("steps", [1, 2])
def test_output_is_the_routed_output_plus_the_shared_ffn_with_its_irl_steps(steps):
    torch.manual_seed(0)
    layer = MoCLayer(layer_config(n_shared_experts=2, n_reasoning_steps=steps), 0).eval()
    assert layer.shared.ffn.down.weight.shape == (32, 2 * 48)   # two shared experts = one SwiGLU twice as wide
    x = torch.randn(2, 7, 32)
    with torch.no_grad():
        for weight in (layer.shared.ffn.down.weight, layer.experts.down):  # outputs of order 1, not 1e-3
            weight.mul_(100.0)
        y, _, stats = layer(x)
        routed, _, routed_stats = routed_only(layer, n_reasoning_steps=steps).eval()(x)
        shared = irl_iterate(layer.shared.ffn, x, steps, layer.shared.alpha)
        if steps == 1:  # one step is exactly the SwiGLU
            torch.testing.assert_close(shared, layer.shared.ffn(x), rtol=0, atol=0)
    assert shared.abs().mean() > 0.01 and routed.abs().mean() > 0.01   # both parts contribute
    torch.testing.assert_close(y, routed + shared, rtol=1e-5, atol=1e-7)
    assert stats.keys() == routed_stats.keys()             # its IRL stats do not overwrite the routed experts'


def test_a_token_whose_slots_were_all_dropped_still_gets_the_shared_expert():
    torch.manual_seed(1)
    layer = MoCLayer(layer_config(top_k=1, collab_mode="none", capacity_factor=0.25), 0).train()
    x = torch.randn(1, 32, 32)
    y, _, stats = layer(x)
    assert stats["experts/drop_rate_layer0"] > 0
    shared = layer.shared.ffn(x)
    rows = (y - shared).abs().amax(dim=-1)[0]              # (T,): 0 where every slot of the token was dropped
    dropped = rows == 0
    assert dropped.any() and (~dropped).any()
    torch.testing.assert_close(y[0, dropped], shared[0, dropped], rtol=0, atol=0)


def test_flops_and_active_parameters_count_the_shared_expert():
    train = TrainConfig(model=layer_config(n_layers=2, n_reasoning_steps=2, collab_mode="none"))
    with_shared = variant_cost(train)
    without = variant_cost(TrainConfig(model=layer_config(n_layers=2, n_reasoning_steps=2, collab_mode="none",
                                                          n_shared_experts=0)))
    shared_weights = 3 * 32 * 48                          # gate, up, down of one shared expert, per layer
    assert with_shared.params - without.params == 2 * shared_weights
    assert with_shared.active_params - without.active_params == 2 * shared_weights      # always active
    assert with_shared.flops_per_token - without.flops_per_token == 6 * 2 * 2 * shared_weights  # 2 layers x S=2


def test_analyze_lowers_the_shared_experts_reasoning_steps_too():
    model = LunarisCodex(layer_config(n_reasoning_steps=3))
    layers = irl_layers(model)
    with reasoning_steps(layers, 1):
        assert {block.ffn.shared.steps for block in model.blocks} == {1}
        assert {block.ffn.experts.steps for block in model.blocks} == {1}
    assert {block.ffn.shared.steps for block in model.blocks} == {3}


def test_zero_init_out_zeroes_the_shared_down_projection_and_training_updates_it():
    torch.manual_seed(0)
    model = LunarisCodex(layer_config(zero_init_out=True))
    down = model.blocks[0].ffn.shared.ffn.down.weight
    assert torch.equal(down, torch.zeros_like(down))
    assert model.blocks[0].ffn.shared.ffn.gate_up.weight.std() > 0.01
    idx = torch.randint(0, 128, (2, 16))
    model(idx, targets=idx).loss.backward()
    assert down.grad is not None and down.grad.abs().sum() > 0
