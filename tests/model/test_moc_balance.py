"""Auxiliary-loss-free load balancing (`load_balance: bias`): the bias selects, the gates stay unbiased, the
training step moves the bias toward balance after the update, and `aux_loss` (the default) is unchanged."""

import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_model_config

from lunaris import LunarisCodex
from lunaris.config import LunarisCodexConfig
from lunaris.model.moc import ExpertBalance, MoCLayer
from lunaris.train import step as steps


def layer_config(**overrides):
    keys = dict(d_model=32, n_heads=4, ffn_hidden_size=48, n_experts=4, top_k=1, collab_mode="none",
                capacity_factor=None, load_balance="bias", balance_bias_rate=0.1)
    keys.update(overrides)
    return tiny_model_config(**keys)


def expert_by_hand(layer: MoCLayer, e: int, x: torch.Tensor) -> torch.Tensor:
    gate_up, down = layer.experts.gate_up[e], layer.experts.down[e]   # (D, 2H), (H, D)
    h = x @ gate_up
    return (F.silu(h[..., :down.shape[0]]) * h[..., down.shape[0]:]) @ down


def skewed_layer(**overrides) -> MoCLayer:
    """A router that sends (nearly) every token to expert 0: its logit is 3·x[0] with x[0] >= 1, the others ~0."""
    layer = MoCLayer(layer_config(**overrides), 0)
    with torch.no_grad():
        layer.router.weight.normal_(0.0, 0.05)
        layer.router.weight[0, 0] = 3.0
    return layer


def skewed_batch(n: int = 64) -> torch.Tensor:
    x = torch.randn(1, n, 32)
    x[..., 0] = x[..., 0].abs() + 1.0
    return x


def test_config_validates_the_new_keys():
    problems = LunarisCodexConfig(load_balance="bias_free", balance_bias_rate=0.0).problems()
    assert any("model.load_balance must be one of aux_loss, bias, got 'bias_free'" in p for p in problems)
    assert any("model.balance_bias_rate must be positive" in p for p in problems)
    assert LunarisCodexConfig().load_balance == "aux_loss"


def test_the_bias_is_a_checkpointed_buffer_the_counts_are_not_and_aux_loss_models_have_neither():
    layer = MoCLayer(layer_config(), 0)
    assert layer.balance_bias.dtype == torch.float32 and torch.equal(layer.balance_bias, torch.zeros(4))
    keys = set(layer.state_dict())
    assert "balance_bias" in keys and "balance_counts" not in keys
    plain = MoCLayer(layer_config(load_balance="aux_loss"), 0)
    assert not [k for k in plain.state_dict() if "balance" in k]   # older checkpoints still load strictly


def test_repeated_updates_move_the_bias_toward_balance():
    layer = skewed_layer().train()
    x = skewed_batch()

    def load_of_expert0():
        layer.reset_balance_counts()
        layer(x)
        counts = layer.balance_counts.clone()
        return counts, counts[0].item() / counts.sum().item()

    counts, first = load_of_expert0()
    assert first > 0.9                                            # the skew: expert 0 takes nearly everything
    layer.apply_balance(counts)
    assert layer.balance_bias[0].item() == pytest.approx(-0.1)    # overloaded: down by the rate
    assert (layer.balance_bias[1:] >= 0).all()                    # underloaded ones up (or unchanged at the mean)
    for _ in range(40):
        counts, _ = load_of_expert0()
        layer.apply_balance(counts)
        layer.reset_balance_counts()
    _, last = load_of_expert0()
    assert layer.balance_bias[0].item() < -1.0
    assert last < 0.5                                              # the load has spread over the experts
    assert torch.equal(layer.balance_bias, layer.balance_bias.float())


def test_eval_mode_does_not_count():
    layer = skewed_layer().eval()
    layer(skewed_batch())
    assert layer.balance_counts.sum().item() == 0
    layer.train()(skewed_batch(10))
    assert layer.balance_counts.sum().item() == 10


def test_with_bias_the_aux_loss_is_the_z_loss_alone():
    x = skewed_batch(16)
    for weight in (0.0, 1e-3):
        layer = skewed_layer(aux_loss_weight=1.0, router_z_loss_weight=weight).train()
        _, aux, stats = layer(x)
        logits = x[0] @ layer.router.weight.t()
        torch.testing.assert_close(aux, weight * torch.logsumexp(logits, -1).square().mean(), rtol=1e-5, atol=1e-8)
        assert "moc/bias_spread" in stats
    plain = skewed_layer(load_balance="aux_loss", aux_loss_weight=1.0, router_z_loss_weight=0.0).train()
    plain.load_state_dict({k: v for k, v in layer.state_dict().items() if k != "balance_bias"})
    assert plain(x)[1].item() > 0.5                                # the skew costs an aux_loss model dearly


@pytest.mark.parametrize("backend", ["padded", "grouped"])
def test_the_bias_changes_the_selection_but_not_the_gate_weights(backend):
    from lunaris.model.moc import grouped_mm_supported
    if backend == "grouped" and not grouped_mm_supported("cpu", torch.float32):
        pytest.skip("no grouped matmul on this build")
    layer = MoCLayer(layer_config(top_k=2), 0).eval()
    layer.dispatch_backend = backend
    x = torch.randn(2, 6, 32)
    with torch.no_grad():
        layer.balance_bias.copy_(torch.tensor([5.0, 0.0, -5.0, 0.0]))   # expert 0 always in, expert 2 never
    y, _, _ = layer(x)
    logits = x.reshape(-1, 32) @ layer.router.weight.t()               # (N, E) unbiased
    selected = (logits + layer.balance_bias).topk(2, dim=-1).indices    # (N, 2)
    assert (selected == 0).any(-1).all() and not (selected == 2).any()
    assert not torch.equal(selected.sort(-1).values, logits.topk(2, dim=-1).indices.sort(-1).values)
    gates = logits.gather(1, selected).softmax(-1)                     # the unbiased probabilities
    xs = x.reshape(-1, 32)
    expected = torch.stack([sum(gates[n, k] * expert_by_hand(layer, int(selected[n, k]), xs[n]) for k in range(2))
                            for n in range(xs.shape[0])]).view_as(y)
    torch.testing.assert_close(y, expected, rtol=1e-5, atol=1e-6)


def test_the_training_step_counts_every_micro_batch_then_updates_and_resets(monkeypatch):
    config = tiny_model_config(n_experts=4, top_k=2, load_balance="bias", balance_bias_rate=0.25)
    model = LunarisCodex(config).train()
    optimizer = model.configure_optimizers(0.0, 1e-3)
    (hook,) = model.training_hooks()
    layers = hook.layers
    assert len(layers) == 2 and all(isinstance(layer, MoCLayer) for layer in layers)
    for layer in layers:
        layer.balance_counts.fill_(1000)                               # a stray forward's counts are forgotten
    batches = [(torch.randint(0, 128, (2, 8)), torch.randint(0, 128, (2, 8))) for _ in range(2)]
    seen = []
    original = steps.update

    def spy(*args, **kwargs):
        seen.append([layer.balance_counts.clone() for layer in layers])
        return original(*args, **kwargs)

    monkeypatch.setattr(steps, "update", spy)
    steps.train_step(model, optimizer, batches)
    for counts, layer in zip(seen[0], layers):
        assert counts.sum().item() == 2 * 2 * 8 * 2                    # both micro-batches: N·K slots each
        expected = 0.25 * torch.sign(counts.float().mean() - counts.float())
        assert torch.equal(layer.balance_bias, expected)
        assert layer.balance_counts.sum().item() == 0                  # reset after the update


def test_a_skipped_step_leaves_the_bias_alone():
    model = LunarisCodex(tiny_model_config(n_experts=4, top_k=2, load_balance="bias")).train()
    model(torch.randint(0, 128, (2, 8)))
    (hook,) = model.training_hooks()
    steps.after_update([hook], applied=False)
    assert all(torch.equal(layer.balance_bias, torch.zeros(4)) and layer.balance_counts.sum() == 0
               for layer in hook.layers)


def test_only_bias_balanced_models_have_a_training_hook_and_it_sums_loads_in_one_call():
    assert LunarisCodex(tiny_model_config(n_experts=4, top_k=2)).training_hooks() == []   # aux_loss
    assert LunarisCodex(tiny_model_config()).training_hooks() == []                        # dense
    model = LunarisCodex(tiny_model_config(n_experts=4, top_k=2, load_balance="bias", balance_bias_rate=0.5))
    (hook,) = model.training_hooks()
    assert isinstance(hook, ExpertBalance)
    for layer, counts in zip(hook.layers, ([4, 0, 0, 0], [0, 0, 0, 4])):
        layer.balance_counts.copy_(torch.tensor(counts))
    calls = []

    def doubled(tensor):                              # as if a second process had seen the same load
        calls.append(tensor.shape)
        return tensor.mul_(2)

    hook.after_update(True, doubled)
    assert calls == [(2, 4)]                          # every layer's loads in one reduction
    assert torch.equal(hook.layers[0].balance_bias, torch.tensor([-0.5, 0.5, 0.5, 0.5]))
    assert torch.equal(hook.layers[1].balance_bias, torch.tensor([0.5, 0.5, 0.5, -0.5]))
    assert all(layer.balance_counts.sum() == 0 for layer in hook.layers)
