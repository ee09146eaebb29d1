"""`collab_gate`: the collaboration's change of each expert output scaled by a learned per-channel gate that starts
at 0, so a MoC layer starts as plain top-k MoE."""

import pytest
import torch
from conftest import tiny_model_config

from lunaris import LunarisCodex
from lunaris.config import LunarisCodexConfig
from lunaris.model.moc import MoCLayer
from lunaris.model.param_groups import VECTOR, parameter_kind


def layer_config(**overrides):
    keys = dict(d_model=32, n_heads=4, ffn_hidden_size=48, n_experts=4, top_k=2, collab_mode="mha",
                capacity_factor=1.0, simple_collab_dropout=0.0, collab_gate=True)
    keys.update(overrides)
    return tiny_model_config(**keys)


def test_off_by_default_and_absent_without_collaboration():
    assert LunarisCodexConfig().collab_gate is False
    assert MoCLayer(layer_config(collab_gate=False), 0).collab_gate is None
    assert MoCLayer(layer_config(collab_mode="none"), 0).collab_gate is None     # nothing to gate
    assert not [k for k in MoCLayer(layer_config(collab_gate=False), 0).state_dict() if "gate" in k.split(".")[0]]


@pytest.mark.parametrize("mode", ["mha", "simple"])
def test_a_gated_layer_starts_as_top_k_moe_and_the_gate_learns(mode):
    torch.manual_seed(0)
    gated = MoCLayer(layer_config(collab_mode=mode), 0).train()
    assert torch.equal(gated.collab_gate, torch.zeros(32))
    plain = MoCLayer(layer_config(collab_mode="none"), 0).train()
    plain.load_state_dict({k: v for k, v in gated.state_dict().items() if k.startswith(("router", "experts"))})
    x = torch.randn(2, 8, 32)
    y, aux, stats = gated(x)
    torch.testing.assert_close(y, plain(x)[0], rtol=0, atol=1e-7)           # collaboration contributes nothing yet
    assert stats["moc/collab_gate"].item() == 0.0
    (y.square().sum() + aux).backward()
    assert gated.collab_gate.grad.abs().sum() > 0                            # the gate gets a gradient
    with torch.no_grad():                                                    # a fully open gate: the collaboration
        gated.collab_gate.fill_(1.0)
        ungated = MoCLayer(layer_config(collab_mode=mode, collab_gate=False), 0).train()
        ungated.load_state_dict({k: v for k, v in gated.state_dict().items() if k != "collab_gate"})
        torch.testing.assert_close(gated(x)[0], ungated(x)[0], rtol=1e-5, atol=1e-6)


def test_the_gate_is_a_vector_parameter_trained_by_adamw_without_decay():
    model = LunarisCodex(tiny_model_config(n_experts=4, top_k=2, collab_mode="simple", collab_gate=True))
    gates = [(n, p) for n, p in model.named_parameters() if n.endswith("collab_gate")]
    assert len(gates) == 2 and all(parameter_kind(n, p) == VECTOR for n, p in gates)
    groups = {g["name"]: g for g in model.configure_optimizers(0.1, 1e-3).param_groups}
    assert all(any(p is q for q in groups["no_decay"]["params"]) for _, p in gates)
