"""One MoC layer: routing, capacity and drops, aux losses, IRL in experts, collaboration, backends, compile."""

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_model_config

from lunaris.model.layers import ReasoningFeedForward
from lunaris.model.moc import MHACollaboration, MoCLayer, SimpleCollaboration, attendable_slots, grouped_mm_supported

BACKENDS = ["grouped", "padded"] if grouped_mm_supported("cpu", torch.float32) else ["padded"]
MODES = ["none", "mha", "simple"]


def layer_config(**overrides):
    keys = dict(d_model=32, n_heads=4, ffn_hidden_size=48, n_experts=4, top_k=2, collab_mode="none",
                capacity_factor=None, simple_collab_dropout=0.0)
    keys.update(overrides)
    return tiny_model_config(**keys)


def expert_by_hand(layer: MoCLayer, e: int, x: torch.Tensor) -> torch.Tensor:
    """Expert e's SwiGLU on x (..., D), from the stacked weights with plain matmuls."""
    gate_up, down = layer.experts.gate_up[e], layer.experts.down[e]   # (D, 2H), (H, D)
    H = down.shape[0]
    h = x @ gate_up
    return (F.silu(h[..., :H]) * h[..., H:]) @ down


def irl_by_hand(ffn, x: torch.Tensor, steps: int, alpha: float) -> torch.Tensor:
    """h_0 = 0; h_t = h_{t-1} + alpha * ffn(h_{t-1} + x), written out step by step."""
    h = torch.zeros_like(x)
    for _ in range(steps):
        h = h + alpha * ffn(h + x)
    return h


# ---- forced routing ---------------------------------------------------------------------------

def forced_routing_layer(capacity_factor, backend, **overrides):
    """E=3, K=2 and a router that reads preferences from x[:, :3]: logits = 10·x[:, :3]."""
    layer = MoCLayer(layer_config(n_experts=3, top_k=2, capacity_factor=capacity_factor, **overrides), 0)
    layer.dispatch_backend = backend
    with torch.no_grad():
        layer.router.weight.zero_()
        layer.router.weight[:, :3] = 10 * torch.eye(3)
    return layer


def forced_batch():
    """Six tokens: 0-2 prefer experts 0 > 1 > 2, tokens 3-5 prefer 1 > 2 > 0. Shape (1, 6, 32)."""
    x = torch.randn(1, 6, 32) * 0.1
    x[0, :3, :3] = torch.tensor([0.3, 0.2, 0.1])
    x[0, 3:, :3] = torch.tensor([0.1, 0.3, 0.2])
    return x


# Slots (token, choice) and which survive. Expert 1 receives first choices of tokens 3-5 and second
# choices of tokens 0-2; first choices are served first, so later tokens' first choices win.
EXPECTED_KEEP = {
    # C = ceil(1.0·6·2/3) = 4: expert 1 keeps 3, 4, 5 (first) and 0 (second); drops 1 and 2 (second).
    1.0: [[True, True], [True, False], [True, False], [True, True], [True, True], [True, True]],
    # C = 1: expert 0 keeps token 0; expert 1 keeps token 3's first choice; expert 2 token 3's second.
    0.25: [[True, False], [False, False], [False, False], [True, True], [False, False], [False, False]],
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("capacity_factor", [1.0, 0.25])
def test_capacity_drops_exactly_the_expected_slots(capacity_factor, backend):
    layer = forced_routing_layer(capacity_factor, backend).train()
    x = forced_batch()
    y, _, stats = layer(x)
    keep = torch.tensor(EXPECTED_KEEP[capacity_factor])
    N, K = keep.shape
    logits = layer.router_logits(x[0])
    top_logits, top_experts = logits.topk(2, dim=-1)
    assert top_experts.tolist() == [[0, 1]] * 3 + [[1, 2]] * 3
    weights = top_logits.softmax(-1) * keep
    weights = weights / weights.sum(-1, keepdim=True).clamp_min(1e-30)   # renormalized over kept slots
    for n in range(N):
        expected = sum(weights[n, k] * expert_by_hand(layer, top_experts[n, k], x[0, n]) for k in range(K))
        if not keep[n].any():
            assert torch.equal(y[0, n], torch.zeros(32)), "a token with no kept slot must pass through (0)"
        else:
            torch.testing.assert_close(y[0, n], expected, rtol=1e-5, atol=1e-6)
    dropped = (~keep).sum().item()
    assert stats["experts/drop_rate_layer0"].item() == pytest.approx(dropped / (N * K))


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_no_nan_in_any_mode_when_every_slot_of_some_tokens_is_dropped(mode, backend):
    layer = forced_routing_layer(0.25, backend, collab_mode=mode).train()
    x = forced_batch().requires_grad_()
    y, aux, _ = layer(x)
    assert torch.isfinite(y).all() and torch.isfinite(aux)
    for n in (1, 2, 4, 5):  # every slot dropped: MoC output exactly 0
        assert torch.equal(y[0, n], torch.zeros(32))
    (1e6 * y.sum() + aux).backward()   # large upstream gradients reach the zero weights of dropped slots
    assert torch.isfinite(x.grad).all()
    for name, p in layer.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name


def test_a_token_with_no_kept_slot_still_has_a_key_to_attend():
    """Older torch returns NaN for a fully masked softmax row; such tokens attend their zero slots."""
    keep = torch.tensor([[True, False], [False, False], [True, True]])
    assert attendable_slots(keep).tolist() == [[True, False], [True, True], [True, True]]


def test_capacity_makes_a_token_depend_on_future_tokens():
    """Why evaluation and generation are dropless by default: with C = 4, token 1's second choice
    (expert 1) is kept only if fewer than 4 later tokens chose expert 1 first."""
    layer = forced_routing_layer(1.0, BACKENDS[0]).train()
    x = forced_batch()
    before = layer(x)[0]
    x[0, 5, :3] = torch.tensor([0.3, 0.2, 0.1])   # future token 5 now prefers expert 0, freeing a slot
    after = layer(x)[0]
    assert not torch.allclose(before[0, 1], after[0, 1])       # token 1 changed because token 5 did
    torch.testing.assert_close(before[0, 0], after[0, 0])


# ---- exact equivalences -------------------------------------------------------------------------

@pytest.mark.parametrize("steps", [1, 3])
def test_top_k_equal_to_n_experts_is_the_softmax_mixture_of_all_experts(steps):
    """Dropless, collab none, K = E: y = sum_e softmax(logits)_e · IRL_e(x), computed by hand."""
    layer = MoCLayer(layer_config(n_experts=4, top_k=4, n_reasoning_steps=steps), 0)
    x = torch.randn(2, 5, 32)
    y, _, _ = layer(x)
    probs = (x @ layer.router.weight.t()).softmax(-1)                  # (2, 5, E)
    alpha = 1 / math.sqrt(steps)
    expected = sum(probs[..., e:e + 1] * irl_by_hand(lambda z, e=e: expert_by_hand(layer, e, z), x, steps, alpha)
                   for e in range(4))
    torch.testing.assert_close(y, expected, rtol=1e-5, atol=1e-6)


def test_dense_irl_with_one_step_is_swiglu_and_three_steps_the_recurrence():
    x = torch.randn(2, 5, 64)
    one = ReasoningFeedForward(tiny_model_config(n_reasoning_steps=1))
    gate, up = one.ffn.gate_up(x).chunk(2, dim=-1)
    torch.testing.assert_close(one(x)[0], one.ffn(x), rtol=0, atol=0)  # S = 1: exactly the SwiGLU itself
    # which is down(silu(gate) * up); float rounding only (SwiGLU runs gate and up as two products)
    torch.testing.assert_close(one(x)[0], one.ffn.down(F.silu(gate) * up), rtol=1e-6, atol=1e-7)
    three = ReasoningFeedForward(tiny_model_config(n_reasoning_steps=3))
    y, aux, stats = three(x)
    torch.testing.assert_close(y, irl_by_hand(three.ffn, x, 3, 1 / math.sqrt(3)), rtol=1e-5, atol=1e-6)
    assert aux is None and set(stats) == {f"irl/update_norm_step{t}" for t in (1, 2, 3)}
    explicit = ReasoningFeedForward(tiny_model_config(n_reasoning_steps=3, irl_alpha=0.5))
    explicit.load_state_dict(three.state_dict())
    torch.testing.assert_close(explicit(x)[0], irl_by_hand(three.ffn, x, 3, 0.5), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("capacity_factor", [None, 1.0])
@pytest.mark.parametrize("mode", MODES)
def test_grouped_and_padded_backends_agree(mode, capacity_factor):
    if len(BACKENDS) < 2:
        pytest.skip("torch._grouped_mm does not work on this CPU build; only the padded backend exists")
    layer = MoCLayer(layer_config(collab_mode=mode, capacity_factor=capacity_factor, n_reasoning_steps=2), 0)
    x = torch.randn(2, 8, 32)
    results = []
    for backend in BACKENDS:
        layer.dispatch_backend = backend
        y, aux, stats = layer(x)
        (y.square().sum() + aux).backward()
        results.append((y.detach(), stats, {n: p.grad.clone() for n, p in layer.named_parameters()}))
        layer.zero_grad()
    (y1, s1, g1), (y2, s2, g2) = results
    torch.testing.assert_close(y1, y2, rtol=1e-5, atol=1e-6)
    for name in g1:
        torch.testing.assert_close(g1[name], g2[name], rtol=1e-4, atol=1e-6, msg=name)
    assert s1.keys() == s2.keys()
    for key in s1:
        torch.testing.assert_close(s1[key], s2[key], rtol=1e-5, atol=1e-6)


# ---- router and auxiliary losses ------------------------------------------------------------------

def test_load_balance_loss_is_one_for_uniform_routing():
    layer = MoCLayer(layer_config(aux_loss_weight=1.0, router_z_loss_weight=0.0), 0)
    with torch.no_grad():
        layer.router.weight.zero_()   # every expert equally likely: P_i = 1/E
    _, aux, _ = layer(torch.randn(2, 8, 32))
    assert aux.dtype == torch.float32
    assert aux.item() == pytest.approx(1.0, abs=1e-6)


def test_load_balance_and_z_loss_match_their_formulas_on_a_crafted_batch():
    x = forced_batch()
    logits = 10 * x[0, :, :3]                                         # (6, 3): what the forced router computes
    f = torch.tensor([3, 6, 3]) / 12                                  # slots per expert / (N·K), before capacity
    P = logits.softmax(-1).mean(0)
    load_balance = 3 * (f * P).sum()
    z_loss = torch.logsumexp(logits, -1).square().mean()
    for lb_weight, z_weight in ((1.0, 0.0), (0.0, 1.0), (1e-2, 1e-3)):
        layer = forced_routing_layer(0.25, "padded", aux_loss_weight=lb_weight, router_z_loss_weight=z_weight)
        _, aux, _ = layer.train()(x)
        torch.testing.assert_close(aux, lb_weight * load_balance + z_weight * z_loss, rtol=1e-5, atol=1e-7)


def test_router_logits_are_fp32_under_bf16_autocast():
    layer = MoCLayer(layer_config(capacity_factor=1.25), 0)
    x = torch.randn(2, 8, 32)
    reference = x.reshape(-1, 32) @ layer.router.weight.t()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = layer.router_logits(x.reshape(-1, 32))
        y, aux, _ = layer(x)
    assert logits.dtype == torch.float32 and aux.dtype == torch.float32
    torch.testing.assert_close(logits, reference, rtol=1e-6, atol=1e-6)  # bf16 would be off by ~1e-3
    assert y.dtype == torch.bfloat16 and torch.isfinite(y.float()).all()


def test_router_jitter_is_training_only():
    layer = MoCLayer(layer_config(router_jitter=0.5), 0)
    x = torch.randn(2, 8, 32)
    layer.train()
    assert not torch.equal(layer.router_logits(x[0]), layer.router_logits(x[0]))
    layer.eval()
    torch.testing.assert_close(layer.router_logits(x[0]), x[0] @ layer.router.weight.t(), rtol=0, atol=0)


def test_evaluation_is_dropless_unless_eval_capacity_factor_is_set():
    x = torch.randn(2, 16, 32)
    layer = MoCLayer(layer_config(capacity_factor=0.25), 0)
    assert layer.train()(x)[2]["experts/drop_rate_layer0"] > 0
    assert layer.eval()(x)[2]["experts/drop_rate_layer0"] == 0
    layer = MoCLayer(layer_config(capacity_factor=None, eval_capacity_factor=0.25), 0)
    assert layer.train()(x)[2]["experts/drop_rate_layer0"] == 0
    assert layer.eval()(x)[2]["experts/drop_rate_layer0"] > 0


# ---- collaboration, gradients, metrics -------------------------------------------------------------

@pytest.mark.parametrize("config_keys, expected", [
    (dict(collab_mode="none"), None),
    (dict(collab_mode="mha"), MHACollaboration),
    (dict(collab_mode="simple"), SimpleCollaboration),
    (dict(collab_mode=None, use_simple_collab=True), SimpleCollaboration),   # the seeds' key
    (dict(collab_mode=None, use_simple_collab=False), MHACollaboration),
])
def test_only_the_selected_collaboration_mode_has_modules(config_keys, expected):
    layer = MoCLayer(layer_config(**config_keys), 0)
    if expected is None:
        assert layer.collab is None
        assert {n.split(".")[0] for n, _ in layer.named_parameters()} == {"router", "experts"}
    else:
        assert type(layer.collab) is expected
        others = [m for m in layer.modules() if isinstance(m, (MHACollaboration, SimpleCollaboration))]
        assert others == [layer.collab]


@pytest.mark.parametrize("mode", MODES)
def test_gradients_reach_router_experts_and_collaboration(mode):
    layer = MoCLayer(layer_config(collab_mode=mode, capacity_factor=1.25, n_reasoning_steps=2), 0).train()
    y, aux, _ = layer(torch.randn(2, 16, 32))
    (y.square().sum() + aux).backward()
    for name, p in layer.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, f"no gradient reaches {name}"
    for e in range(4):   # every expert got tokens here, so every slice of the stacked weights learns
        assert layer.experts.gate_up.grad[e].abs().sum() > 0 and layer.experts.down.grad[e].abs().sum() > 0
    # the router learns from the fused output (top-k weights), not only from the aux losses
    layer.zero_grad()
    y, _, _ = layer(torch.randn(2, 16, 32))
    y.square().sum().backward()
    assert layer.router.weight.grad.abs().sum() > 0


def test_metrics_are_detached_tensors_with_consistent_values():
    layer = MoCLayer(layer_config(capacity_factor=0.5, n_reasoning_steps=3, n_experts=4), 3).train()
    x = torch.randn(2, 16, 32)
    y, aux, stats = layer(x)
    expected = {f"experts/util_layer3/e{i}" for i in range(4)} | {
        "experts/drop_rate_layer3", "experts/router_entropy_layer3", "experts/max_load_ratio_layer3",
        "irl/update_norm_step1", "irl/update_norm_step2", "irl/update_norm_step3"}
    assert set(stats) == expected
    for key, value in stats.items():
        assert isinstance(value, torch.Tensor) and value.dim() == 0 and not value.requires_grad, key
    util = torch.stack([stats[f"experts/util_layer3/e{i}"] for i in range(4)])
    assert util.sum().item() == pytest.approx(1.0)
    assert stats["experts/max_load_ratio_layer3"].item() == pytest.approx(4 * util.max().item())
    log_probs = (x.reshape(-1, 32) @ layer.router.weight.t()).log_softmax(-1)
    entropy = -(log_probs.exp() * log_probs).sum(-1).mean()
    torch.testing.assert_close(stats["experts/router_entropy_layer3"], entropy)
    assert 0 < entropy <= math.log(4)
    # C = ceil(0.5·32·2/4) = 8 slots per expert: at least 64 - 4·8 = 32 of the 64 slots are dropped
    assert stats["experts/drop_rate_layer3"].item() >= 0.5
    assert stats["irl/update_norm_step1"].item() > 0


def test_matmul_params_per_token_counts_active_weights():
    D, H, E, K = 32, 48, 4, 2
    layer = MoCLayer(layer_config(n_reasoning_steps=3), 0)
    assert layer.matmul_params_per_token() == D * E + K * 3 * (3 * D * H)
    mha = MoCLayer(layer_config(collab_mode="mha"), 0)
    collab = 3 * D * D + D * D + 3 * D * D          # qkv, out, SwiGLU(D, D)
    assert mha.matmul_params_per_token() == D * E + K * (3 * D * H + collab)
    simple = MoCLayer(layer_config(collab_mode="simple"), 0)
    collab = 3 * D * D + 2 * D * D + D * D           # W_q|W_k|W_m, MLP 2D -> D -> D
    assert simple.matmul_params_per_token() == D * E + K * (3 * D * H + collab)


# ---- torch.compile ---------------------------------------------------------------------------------

@pytest.mark.parametrize("capacity_factor, dtype", [(1.0, torch.float32), (None, torch.float32),
                                                   (1.0, torch.bfloat16)])
def test_compiles_as_one_graph_and_matches_eager(capacity_factor, dtype):
    """fullgraph=True fails on any graph break: a host sync (.item(), nonzero) or a data-dependent shape.

    fp32 compiles the padded batched matmul; bf16 autocast (the GPU training setup) the grouped one.
    """
    torch._dynamo.reset()
    layer = MoCLayer(layer_config(collab_mode="mha", capacity_factor=capacity_factor, n_reasoning_steps=2), 0)
    x = torch.randn(2, 8, 32)
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16)
    tolerance = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-3)
    with autocast:
        y, aux, stats = layer(x)
        if dtype == torch.bfloat16:
            assert layer.use_grouped(x) == ("grouped" in BACKENDS)
    (y.float().square().sum() + aux).backward()
    eager_grads = {n: p.grad.clone() for n, p in layer.named_parameters()}
    layer.zero_grad()
    compiled = torch.compile(layer, backend="aot_eager", fullgraph=True)
    with autocast:
        cy, caux, cstats = compiled(x)
    (cy.float().square().sum() + caux).backward()
    assert cy.dtype == dtype
    torch.testing.assert_close(cy, y, **tolerance)
    torch.testing.assert_close(caux, aux)
    assert cstats.keys() == stats.keys()
    for name, p in layer.named_parameters():
        torch.testing.assert_close(p.grad, eager_grads[name], rtol=1e-4 if dtype == torch.float32 else 2e-2,
                                   atol=1e-6 if dtype == torch.float32 else 1e-4, msg=name)
