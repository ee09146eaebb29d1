"""Adaptive IRL (`irl_halting: act`): per-token halting of the reasoning steps, masked in training, skipped in
evaluation, with its ponder cost, steps-taken metric and FLOPs."""

import math

import pytest
import torch
from conftest import tiny_model_config

from lunaris import LunarisCodex
from lunaris.config import LunarisCodexConfig
from lunaris.metrics import IRL_PONDER, IRL_STEPS_TAKEN
from lunaris.model.layers import HALTING_BIAS_INIT, Halting, ReasoningFeedForward, irl_iterate
from lunaris.model.moc import MoCLayer, grouped_mm_supported

BACKENDS = ["grouped", "padded"] if grouped_mm_supported("cpu", torch.float32) else ["padded"]


def halting_config(**overrides):
    keys = dict(d_model=32, n_heads=4, ffn_hidden_size=48, n_reasoning_steps=3, irl_halting="act")
    keys.update(overrides)
    return tiny_model_config(**keys)


def test_the_keys_are_validated_and_off_by_default():
    config = LunarisCodexConfig()
    assert (config.irl_halting, config.irl_halting_epsilon, config.irl_ponder_weight) == ("none", 0.01, 1e-2)
    problems = LunarisCodexConfig(irl_halting="pondernet", irl_halting_epsilon=1.0, irl_ponder_weight=-1).problems()
    assert any("model.irl_halting must be one of none, act, got 'pondernet'" in p for p in problems)
    assert any("model.irl_halting_epsilon must be in (0, 1), got 1.0" in p for p in problems)
    assert any("model.irl_ponder_weight must be >= 0" in p for p in problems)
    problems = LunarisCodexConfig(irl_halting="act").problems()
    assert any("model.n_reasoning_steps (1) leaves none to skip" in p for p in problems)
    assert ReasoningFeedForward(tiny_model_config(n_reasoning_steps=3)).halting is None


def test_the_halting_unit_starts_at_its_bias_and_every_token_takes_every_step():
    ffn = ReasoningFeedForward(halting_config())
    assert torch.equal(ffn.halting.weight, torch.zeros(32)) and ffn.halting.bias.item() == HALTING_BIAS_INIT
    model = LunarisCodex(halting_config())                  # the model's own initialization draws the same
    assert all(block.ffn.halting.bias.item() == HALTING_BIAS_INIT for block in model.blocks)
    x = torch.randn(2, 5, 32)
    _, _, stats = ffn(x)
    assert stats[IRL_STEPS_TAKEN].item() == 3.0
    lam = 1 / (1 + math.exp(-HALTING_BIAS_INIT))
    assert stats[IRL_PONDER].item() == pytest.approx(3 + 1 - 2 * lam, abs=1e-6)   # N + remainder 1 - c_{N-1}


def by_hand(ffn, x, steps, alpha, lam, epsilon=0.01):
    """ACT written out for per-token halting probabilities lam (rows, steps-1): y = sum_{t<=N} (1 - c_{t-1}) u_t."""
    rows = x.reshape(-1, x.shape[-1])
    outputs, ponders, taken = [], [], []
    for r in range(rows.shape[0]):
        h, y, c = torch.zeros_like(rows[r]), torch.zeros_like(rows[r]), 0.0
        for t in range(1, steps + 1):
            u = alpha * ffn(h + rows[r])
            h = h + u
            y = y + (1 - c) * u
            if t == steps or c + lam[r, t - 1] >= 1 - epsilon:
                ponders.append(t + 1 - c)
                taken.append(t)
                break
            c += lam[r, t - 1]
        outputs.append(y)
    return torch.stack(outputs).view_as(x), torch.tensor(ponders).mean(), torch.tensor(taken, dtype=torch.float).mean()


class FixedHalting(Halting):
    """Halting probabilities read from x's first channel: token r halts with probability probs[r] at every step."""

    def __init__(self, probs):
        super().__init__(32, 0.01)
        self.probs = probs

    def forward(self, z):
        return self.probs.view(z.shape[:-1])


def test_tokens_halt_at_their_own_step_and_later_updates_are_masked():
    torch.manual_seed(0)
    ffn = ReasoningFeedForward(halting_config(n_reasoning_steps=4))
    x = torch.randn(1, 4, 32)
    probs = torch.tensor([0.995, 0.6, 0.3, 0.0])            # halts at steps 1, 2, 4 (c = 0.9 < 0.99), 4 (forced)
    ffn.halting = FixedHalting(probs)
    stats = {}
    y = irl_iterate(ffn.ffn, x, 4, 0.5, stats, halting=ffn.halting)
    expected, ponder, taken = by_hand(ffn.ffn, x, 4, 0.5, probs[:, None].expand(4, 3))
    torch.testing.assert_close(y, expected, rtol=1e-5, atol=1e-6)
    assert stats[IRL_STEPS_TAKEN].item() == pytest.approx(taken.item()) == (1 + 2 + 4 + 4) / 4
    assert stats[IRL_PONDER].item() == pytest.approx(ponder.item(), abs=1e-6)
    # a token that halted at step 1 is the first update alone: its later steps get no gradient
    x.requires_grad_(True)
    y = irl_iterate(ffn.ffn, x, 4, 0.5, {}, halting=ffn.halting)
    torch.testing.assert_close(y[0, 0], 0.5 * ffn.ffn(x[0, 0]), rtol=1e-6, atol=1e-7)


def test_the_ponder_cost_trains_the_halting_unit_toward_fewer_steps():
    torch.manual_seed(0)
    ffn = ReasoningFeedForward(halting_config())
    stats = {}
    ffn.iterate(torch.randn(2, 5, 32), stats)
    stats[IRL_PONDER].backward()
    assert ffn.halting.bias.grad.item() < 0                  # descending the ponder cost raises lambda: halt sooner


@pytest.mark.parametrize("probs", [[0.995, 0.6, 0.3, 0.0], [0.995] * 4])
def test_evaluation_skips_the_rows_that_halted_and_computes_the_same_output(probs):
    torch.manual_seed(0)
    ffn = ReasoningFeedForward(halting_config(n_reasoning_steps=4))
    ffn.halting = FixedHalting(torch.tensor(probs))
    x = torch.randn(1, 4, 32)
    rows_seen = []
    ffn.ffn.register_forward_hook(lambda module, args, out: rows_seen.append(args[0].reshape(-1, 32).shape[0]))
    masked = ffn(x)[0]                                       # autograd on: static shapes, every row every step
    assert rows_seen == [4, 4, 4, 4]
    rows_seen.clear()
    with torch.no_grad():
        skipped = ffn(x)[0]
    assert rows_seen == ([4, 3, 2, 2] if probs[1] < 0.99 else [4])   # the running rows only; none: stop
    torch.testing.assert_close(skipped, masked, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("capacity_factor", [None, 0.5])
def test_moc_experts_halt_per_slot_and_evaluation_matches_training_arithmetic(backend, capacity_factor):
    torch.manual_seed(0)
    layer = MoCLayer(halting_config(n_experts=4, top_k=2, collab_mode="none", capacity_factor=capacity_factor,
                                    n_shared_experts=1), 0)
    layer.dispatch_backend = backend
    with torch.no_grad():                                    # tokens differ in how soon they halt
        for halting in (layer.halting, layer.shared.halting):
            halting.weight.normal_(0.0, 2.0)
            halting.bias.fill_(0.0)
        layer.experts.down.mul_(30.0)
    x = torch.randn(2, 8, 32)
    layer.eval()
    y, aux, stats = layer(x)                                 # autograd on: masked
    with torch.no_grad():
        skipped, _, skipped_stats = layer(x)                 # skipping halted rows (grouped: regrouped rows)
    torch.testing.assert_close(skipped, y, rtol=1e-5, atol=1e-6)
    assert 1.0 < stats[IRL_STEPS_TAKEN].item() < 3.0
    torch.testing.assert_close(skipped_stats[IRL_STEPS_TAKEN], stats[IRL_STEPS_TAKEN])
    assert stats[IRL_PONDER].requires_grad and not stats[IRL_STEPS_TAKEN].requires_grad
    if capacity_factor is not None:                          # training with capacity: empty rows are not counted
        layer.train()
        _, _, train_stats = layer(x)
        assert train_stats["experts/drop_rate_layer0"] > 0 and 1.0 < train_stats[IRL_STEPS_TAKEN].item() < 3.0


def test_the_model_adds_the_weighted_ponder_cost_to_the_aux_loss_and_logs_the_steps():
    torch.manual_seed(0)
    model = LunarisCodex(halting_config(n_experts=4, top_k=2, moc_every=2, n_shared_experts=1,
                                        irl_ponder_weight=0.5)).train()
    idx = torch.randint(0, 128, (2, 8))
    out = model(idx, targets=idx)
    plain = LunarisCodex(halting_config(n_experts=4, top_k=2, moc_every=2, n_shared_experts=1,
                                        irl_ponder_weight=0.0)).train()
    plain.load_state_dict(model.state_dict())
    base = plain(idx, targets=idx)
    ponder = out.metrics[IRL_PONDER]
    assert not ponder.requires_grad and out.metrics[IRL_STEPS_TAKEN].item() == 3.0
    torch.testing.assert_close(out.aux_loss, base.aux_loss + 0.5 * ponder)
    out.loss.backward()
    assert all(block.ffn.halting.bias.grad is not None for block in model.blocks)   # dense and MoC layers


def test_flops_count_every_step_and_every_halting_decision():
    D, H = 32, 48
    dense = ReasoningFeedForward(halting_config())
    assert dense.matmul_params_per_token() == 3 * (3 * D * H) + 2 * D   # training computes all S steps
    layer = MoCLayer(halting_config(n_experts=4, top_k=2, collab_mode="none"), 0)
    assert layer.matmul_params_per_token() == D * 4 + 2 * (3 * (3 * D * H) + 2 * D)


def test_cached_generation_matches_the_full_forward_with_halting():
    torch.manual_seed(0)
    model = LunarisCodex(halting_config(n_experts=4, top_k=2, moc_every=2)).eval()
    with torch.no_grad():
        for block in model.blocks:
            ffn = block.ffn
            ffn.halting.weight.normal_(0.0, 2.0)
            ffn.halting.bias.fill_(0.0)
    prompt = torch.randint(0, 128, (2, 5))
    out = model.generate(prompt, 8, temperature=0)
    with torch.no_grad():
        logits = model(out[:, :-1]).logits
    assert torch.equal(logits[:, prompt.shape[1] - 1:].argmax(-1), out[:, prompt.shape[1]:])
