"""Router options: temperature (constant or annealed through the training hooks), the entropy regulariser, the
load-balancing loss over the global batch, and the proportional routing-bias update."""

import pytest
import torch
from conftest import tiny_model_config

from lunaris import LunarisCodex
from lunaris.config import LunarisCodexConfig
from lunaris.model.moc import GlobalBalance, MoCLayer, RouterSchedule
from lunaris.train import step as steps


def layer_config(**overrides):
    keys = dict(d_model=32, n_heads=4, ffn_hidden_size=48, n_experts=4, top_k=2, collab_mode="none",
                capacity_factor=None)
    keys.update(overrides)
    return tiny_model_config(**keys)


def test_the_keys_are_validated_and_off_by_default():
    config = LunarisCodexConfig()
    assert (config.router_temperature, config.router_temperature_end, config.router_entropy_weight,
            config.balance_scope, config.balance_bias_update) == (1.0, None, 0.0, "micro_batch", "sign")
    problems = LunarisCodexConfig(n_experts=4, router_temperature=0.0, router_temperature_end=-1.0,
                                  balance_scope="global", balance_bias_update="log").problems()
    assert any("model.router_temperature must be positive, got 0.0" in p for p in problems)
    assert any("model.router_temperature_end must be positive or null, got -1.0" in p for p in problems)
    assert any("model.balance_scope must be one of micro_batch, global_batch, got 'global'" in p for p in problems)
    assert any("model.balance_bias_update must be one of sign, proportional" in p for p in problems)
    problems = LunarisCodexConfig(n_experts=4, load_balance="bias", balance_scope="global_batch").problems()
    assert any("has no such loss" in p for p in problems)
    plain = MoCLayer(layer_config(), 0)
    assert not [k for k in plain.state_dict() if "temp" in k or "step_" in k]   # older checkpoints load


# ---- temperature ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("temperature", [0.5, 2.0])
def test_the_temperature_divides_the_gate_logits_but_not_the_choice(temperature):
    torch.manual_seed(0)
    x = torch.randn(2, 6, 32)
    plain = MoCLayer(layer_config(), 0)
    tempered = MoCLayer(layer_config(router_temperature=temperature), 0)
    tempered.load_state_dict(plain.state_dict())
    logits = x.reshape(-1, 32) @ plain.router.weight.t()
    top_logits, top_experts = logits.topk(2, dim=-1)
    assert torch.equal(tempered.route(logits)[0], top_experts)
    torch.testing.assert_close(tempered.route(logits)[1], (top_logits / temperature).softmax(-1))
    assert not torch.allclose(tempered(x)[0], plain(x)[0])
    entropy = tempered.train()(x)[2]["experts/router_entropy_layer0"]       # of the tempered softmax
    probs = (logits / temperature).softmax(-1)
    torch.testing.assert_close(entropy, -(probs * probs.log()).sum(-1).mean())


def test_an_annealed_temperature_follows_the_training_progress_and_is_saved():
    model = LunarisCodex(tiny_model_config(n_experts=4, top_k=2, router_temperature=2.0,
                                           router_temperature_end=0.5)).train()
    layers = [block.ffn for block in model.blocks]
    assert all(layer.router_temp.item() == 0.5 for layer in layers)          # built from the config: the end value
    (hook,) = model.training_hooks()
    assert isinstance(hook, RouterSchedule)
    optimizer = model.configure_optimizers(0.0, 1e-3)
    batch = [(torch.randint(0, 128, (2, 8)), torch.randint(0, 128, (2, 8)))]
    for progress, expected in ((0.0, 2.0), (0.5, 1.25), (1.0, 0.5)):
        steps.train_step(model, optimizer, batch, progress=progress)
        assert all(layer.router_temp.item() == pytest.approx(expected) for layer in layers)
        out = model(batch[0][0])
        assert out.metrics["moc/router_temperature"].item() == pytest.approx(expected)
    steps.train_step(model, optimizer, batch)                                  # progress unknown: unchanged
    assert layers[0].router_temp.item() == pytest.approx(0.5)
    assert "blocks.0.ffn.router_temp" in model.state_dict()


def test_before_step_hands_the_progress_and_the_reduction_to_every_hook():
    seen = []

    class Spy:
        def before_step(self, progress, all_reduce_sum):
            seen.append((progress, all_reduce_sum(torch.ones(1)).item()))

        def after_update(self, applied, all_reduce_sum):
            pass

    steps.before_step([Spy()], 0.25)
    assert seen == [(0.25, 1.0)]                              # one process: the sum is the identity


# ---- entropy regulariser --------------------------------------------------------------------------------------

@pytest.mark.parametrize("weight", [1e-1, -1e-1])
def test_the_entropy_term_is_weighted_and_its_sign_sets_the_direction(weight):
    torch.manual_seed(0)
    x = torch.randn(2, 8, 32)
    plain = MoCLayer(layer_config(), 0).train()
    regularised = MoCLayer(layer_config(router_entropy_weight=weight), 0).train()
    regularised.load_state_dict(plain.state_dict())
    _, aux, stats = regularised(x)
    entropy = stats["experts/router_entropy_layer0"]
    torch.testing.assert_close(aux, plain(x)[1] + weight * entropy, rtol=1e-6, atol=1e-7)
    # a gradient step on the aux loss alone: positive weight lowers the entropy (confident), negative raises it
    aux.backward()
    with torch.no_grad():
        regularised.router.weight.sub_(10.0 * regularised.router.weight.grad)
    after = regularised(x)[2]["experts/router_entropy_layer0"]
    assert (after < entropy) if weight > 0 else (after > entropy)


# ---- load balance over the global batch -----------------------------------------------------------------------

def lb_of(layer, x):
    """The load-balancing term alone (aux_loss_weight 1, no z-loss)."""
    return layer(x)[1]


def global_layer(**overrides):
    return MoCLayer(layer_config(balance_scope="global_batch", aux_loss_weight=1.0, router_z_loss_weight=0.0,
                                 **overrides), 0).train()


def test_one_micro_batch_in_one_process_equals_the_micro_batch_loss():
    torch.manual_seed(0)
    x = torch.randn(2, 8, 32)
    local = MoCLayer(layer_config(aux_loss_weight=1.0, router_z_loss_weight=0.0), 0).train()
    layer = global_layer()
    layer.load_state_dict(local.state_dict())
    (hook,) = GlobalBalance.hooks_of(layer)
    hook.before_step(None, lambda t: t)
    torch.testing.assert_close(lb_of(layer, x), lb_of(local, x), rtol=1e-6, atol=1e-7)


def test_f_counts_the_steps_micro_batches_so_far_and_every_process():
    torch.manual_seed(0)
    layer = global_layer()
    (hook,) = GlobalBalance.hooks_of(layer)
    calls = []

    def doubled(tensor):                       # as if a second process had routed the same slots
        calls.append(tensor.shape)
        return tensor.mul_(2)

    a, b = torch.randn(2, 8, 32), torch.randn(2, 8, 32) * 3
    hook.before_step(0.0, doubled)
    lb_a, lb_b = lb_of(layer, a), lb_of(layer, b)
    assert calls == [(4,), (4,)]                                 # one E-sized reduction per forward
    counts = [layer_counts(layer, z) for z in (a, b)]
    probs = [torch.softmax(z.reshape(-1, 32) @ layer.router.weight.t(), -1).mean(0) for z in (a, b)]
    f_a = counts[0] / counts[0].sum()
    f_b = (counts[0] + counts[1]) / (counts[0] + counts[1]).sum()   # both micro-batches (doubling cancels)
    torch.testing.assert_close(lb_a, 4 * (f_a * probs[0]).sum())
    torch.testing.assert_close(lb_b, 4 * (f_b * probs[1]).sum())
    torch.testing.assert_close(layer.step_load, 2 * (counts[0] + counts[1]))
    hook.after_update(True, doubled)
    assert layer.count_reducer is None                           # outside a step: local counts, no collective
    layer.eval()
    assert torch.equal(layer.step_load, 2 * (counts[0] + counts[1]))   # evaluation counts nothing


def layer_counts(layer, x) -> torch.Tensor:
    logits = x.reshape(-1, 32) @ layer.router.weight.t()
    top = logits.topk(2, dim=-1).indices
    return torch.bincount(top.reshape(-1), minlength=4).float()


def test_gradient_checkpointing_recomputes_with_the_same_fraction_and_counts_once():
    torch.manual_seed(0)
    config = tiny_model_config(n_experts=4, top_k=2, balance_scope="global_batch", aux_loss_weight=1.0)
    plain = LunarisCodex(config).train()
    checkpointed = LunarisCodex(tiny_model_config(**{**vars(config), "use_gradient_checkpointing": True})).train()
    checkpointed.load_state_dict(plain.state_dict())
    batches = [torch.randint(0, 128, (2, 8)) for _ in range(2)]
    for model in (plain, checkpointed):
        steps.before_step(model.training_hooks(), 0.0, lambda t: t)
        for idx in batches:
            model(idx, targets=idx).loss.backward()
    loads = [[block.ffn.step_load for block in model.blocks] for model in (plain, checkpointed)]
    for a, b in zip(*loads):
        assert torch.equal(a, b) and a.sum().item() == 2 * 16 * 2    # two micro-batches of 16 tokens x top-2
    for (name, p), q in zip(plain.named_parameters(), checkpointed.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-7, msg=name)


# ---- routing bias, proportional update ------------------------------------------------------------------------

def test_the_proportional_update_moves_the_bias_by_the_relative_imbalance():
    layer = MoCLayer(layer_config(load_balance="bias", balance_bias_update="proportional", balance_bias_rate=0.5), 0)
    layer.apply_balance(torch.tensor([8, 4, 4, 0]))                  # mean load 4
    torch.testing.assert_close(layer.balance_bias, torch.tensor([-0.5, 0.0, 0.0, 0.5]))
    sign = MoCLayer(layer_config(load_balance="bias", balance_bias_rate=0.5), 0)
    sign.apply_balance(torch.tensor([5, 4, 4, 3]))
    torch.testing.assert_close(sign.balance_bias, torch.tensor([-0.5, 0.0, 0.0, 0.5]))   # the sign alone


@pytest.mark.parametrize("update, rate", [("sign", 1e-3), ("proportional", 0.05)])
def test_a_skewed_router_is_balanced_within_a_hundred_steps_by_the_proportional_rule(update, rate):
    torch.manual_seed(0)
    layer = MoCLayer(layer_config(load_balance="bias", balance_bias_update=update, balance_bias_rate=rate,
                                  capacity_factor=1.25), 0).train()
    with torch.no_grad():
        layer.router.weight.normal_(0.0, 0.1)
    x = torch.randn(4, 64, 32) + torch.randn(32)                     # a shared direction: some experts favoured
    (hook,) = layer_hooks(layer)
    drops = []
    for _ in range(100):
        hook.before_step(None, lambda t: t)
        drops.append(layer(x)[2]["experts/drop_rate_layer0"].item())
        hook.after_update(True, lambda t: t)
    assert drops[0] > 0.1                                            # 12% of the slots dropped at the start
    if update == "sign":
        assert drops[-1] > 0.05                                      # the default rule: still dropping slots
    else:
        assert max(drops[20:]) < 0.01                                # balanced within 20 steps


def layer_hooks(layer):
    from lunaris.model.moc import ExpertBalance
    return ExpertBalance.hooks_of(layer)
