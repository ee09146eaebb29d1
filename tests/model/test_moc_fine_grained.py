"""Fine-grained experts (`expert_hidden_size`): many narrow experts, a larger top_k; their dispatch and accounting."""

import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_model_config

from lunaris import LunarisCodex
from lunaris.config import LunarisCodexConfig, TrainConfig
from lunaris.model.moc import MoCLayer, gather_rows, grouped_mm_supported, plan_dispatch
from lunaris.sweep import variant_cost

BACKENDS = ["grouped", "padded"] if grouped_mm_supported("cpu", torch.float32) else ["padded"]


def layer_config(**overrides):
    keys = dict(d_model=32, n_heads=4, ffn_hidden_size=96, expert_hidden_size=16, n_experts=16, top_k=4,
                collab_mode="none", capacity_factor=None, simple_collab_dropout=0.0)
    keys.update(overrides)
    return tiny_model_config(**keys)


def expert_by_hand(layer: MoCLayer, e: int, x: torch.Tensor) -> torch.Tensor:
    gate_up, down = layer.experts.gate_up[e], layer.experts.down[e]   # (D, 2H), (H, D)
    h = x @ gate_up
    return (F.silu(h[..., :down.shape[0]]) * h[..., down.shape[0]:]) @ down


def test_the_key_is_validated_and_null_keeps_experts_as_wide_as_the_dense_ffn():
    assert LunarisCodexConfig().expert_hidden_size is None
    assert LunarisCodexConfig(ffn_hidden_size=96).expert_hidden == 96
    assert LunarisCodexConfig(ffn_hidden_size=96, expert_hidden_size=16).expert_hidden == 16
    problems = LunarisCodexConfig(n_experts=4, expert_hidden_size=0).problems()
    assert any("model.expert_hidden_size must be a positive integer or null, got 0" in p for p in problems)
    plain = MoCLayer(layer_config(expert_hidden_size=None), 0)
    assert plain.experts.gate_up.shape == (16, 32, 2 * 96)               # today's behaviour: the dense width


def test_experts_and_shared_experts_take_the_expert_width_and_dense_layers_keep_theirs():
    model = LunarisCodex(layer_config(n_layers=2, moc_every=2, n_shared_experts=2))
    dense, moc = model.blocks[0].ffn, model.blocks[1].ffn
    assert dense.ffn.down.weight.shape == (32, 96)                       # ffn_hidden_size
    assert moc.experts.gate_up.shape == (16, 32, 32) and moc.experts.down.shape == (16, 16, 32)
    assert moc.shared.ffn.down.weight.shape == (32, 2 * 16)              # two shared experts of the routed width


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("capacity_factor", [None, 1.0])
def test_sixteen_narrow_experts_top_four_compute_the_weighted_sum_of_their_experts(backend, capacity_factor):
    torch.manual_seed(0)
    layer = MoCLayer(layer_config(capacity_factor=capacity_factor), 0).train()
    layer.dispatch_backend = backend
    x = torch.randn(2, 6, 32)
    y, _, stats = layer(x)
    xs = x.reshape(-1, 32)
    logits = xs @ layer.router.weight.t()
    top_logits, top_experts = logits.topk(4, dim=-1)
    plan = plan_dispatch(top_experts, 16, layer.capacity(12), backend == "grouped")
    weights = top_logits.softmax(-1) * plan.keep
    weights = weights / weights.sum(-1, keepdim=True).clamp_min(1e-30)
    expected = torch.stack([sum(weights[n, k] * expert_by_hand(layer, int(top_experts[n, k]), xs[n])
                                for k in range(4)) for n in range(12)]).view_as(y)
    torch.testing.assert_close(y, expected, rtol=1e-5, atol=1e-6)
    assert (stats["experts/drop_rate_layer0"] > 0) == (capacity_factor is not None)


def test_a_dropless_grouped_plan_is_the_sorted_slots_and_matches_the_general_plan():
    torch.manual_seed(0)
    N, K, E = 10, 3, 8
    top = torch.rand(N, E).topk(K, dim=-1).indices                        # distinct experts per token
    fast = plan_dispatch(top, E, None, grouped=True)                      # capacity >= N: nothing can drop
    general = plan_dispatch(top, E, 10 * N, grouped=False)                # the padded plan, C = N
    assert fast.full and not general.full and fast.keep.all()
    assert fast.group_ends.tolist() == fast.counts.cumsum(0).tolist() and fast.group_ends.dtype == torch.int32
    expert_of_row = torch.repeat_interleave(torch.arange(E), fast.counts)  # rows are packed expert by expert
    for n in range(N):
        for k in range(K):
            row = fast.row_of_slot[n, k]
            assert fast.token_of_row[row] == n and expert_of_row[row] == top[n, k]
            padded_row = general.row_of_slot[n, k]
            assert general.token_of_row[padded_row] == n and padded_row // general.capacity == top[n, k]
    x = torch.randn(N, 4)
    torch.testing.assert_close(gather_rows(x, fast, x.dtype), x[fast.token_of_row], rtol=0, atol=0)
    rows = gather_rows(x, general, x.dtype)                               # empty rows read the zero row
    torch.testing.assert_close(rows[general.token_of_row == N], torch.zeros((general.token_of_row == N).sum(), 4))


@pytest.mark.parametrize("experts, top_k", [(8, 2), (32, 8), (64, 8)])
def test_backends_agree_with_many_experts(experts, top_k):
    if len(BACKENDS) < 2:
        pytest.skip("torch._grouped_mm does not work on this CPU build; only the padded backend exists")
    torch.manual_seed(0)
    layer = MoCLayer(layer_config(n_experts=experts, top_k=top_k, capacity_factor=1.25, expert_hidden_size=8), 0)
    x = torch.randn(2, 16, 32)
    results = []
    for backend in BACKENDS:
        layer.dispatch_backend = backend
        y, aux, _ = layer(x)
        (y.square().sum() + aux).backward()
        results.append((y.detach(), {n: p.grad.clone() for n, p in layer.named_parameters()}))
        layer.zero_grad()
    (y1, g1), (y2, g2) = results
    torch.testing.assert_close(y1, y2, rtol=1e-5, atol=1e-6)
    for name in g1:
        torch.testing.assert_close(g1[name], g2[name], rtol=1e-4, atol=1e-6, msg=name)


def test_flops_and_active_parameters_follow_the_expert_width():
    D, E, K, H, L = 32, 16, 4, 16, 2
    layer = MoCLayer(layer_config(n_reasoning_steps=2), 0)
    assert layer.matmul_params_per_token() == D * E + K * 2 * (3 * D * H)
    narrow = variant_cost(TrainConfig(model=layer_config(n_layers=L, n_shared_experts=1)))
    wide = variant_cost(TrainConfig(model=layer_config(n_layers=L, n_shared_experts=1, expert_hidden_size=32)))
    assert wide.params - narrow.params == L * (E + 1) * 3 * D * (32 - H)             # 16 routed + 1 shared
    assert wide.active_params - narrow.active_params == L * (K + 1) * 3 * D * (32 - H)
    assert wide.flops_per_token - narrow.flops_per_token == 6 * L * (K + 1) * 3 * D * (32 - H)


def test_interleaved_flops_sum_each_layers_own_count():
    """moc_every 2 with fine-grained and shared experts and halting: dense FFNs count ffn_hidden_size, MoC layers
    the router, K narrow experts and the shared one, each with S steps and S - 1 halting decisions per IRL module."""
    D, E, K, H, F, S, L, V, T = 32, 16, 4, 16, 96, 2, 4, 128, 64
    model = LunarisCodex(layer_config(n_layers=L, moc_every=2, n_shared_experts=1, n_reasoning_steps=S,
                                      irl_halting="act", vocab_size=V, max_seq_len=T))
    kinds = [type(block.ffn).__name__ for block in model.blocks]
    assert kinds == ["ReasoningFeedForward", "MoCLayer"] * 2
    halting = (S - 1) * D
    dense_ffn = S * 3 * D * F + halting
    moc_ffn = D * E + K * (S * 3 * D * H + halting) + (S * 3 * D * H + halting)     # routed slots + shared
    attention = model.blocks[0].attn.qkv.weight.numel() + model.blocks[0].attn.proj.weight.numel()
    matmul = D * V + L * attention + (L // 2) * (dense_ffn + moc_ffn)
    assert model.flops_per_token() == 6.0 * matmul + 12.0 * L * 4 * (D // 4) * T


def test_a_fine_grained_model_trains_and_its_loss_falls():
    torch.manual_seed(0)
    model = LunarisCodex(tiny_model_config(n_experts=32, top_k=8, expert_hidden_size=16, n_shared_experts=1,
                                           capacity_factor=1.25)).train()
    optimizer = model.configure_optimizers(0.0, 3e-3)
    idx = torch.randint(0, 128, (4, 16))
    losses = []
    for _ in range(12):
        out = model(idx, targets=idx.roll(-1, dims=1))
        optimizer.zero_grad()
        out.loss.backward()
        optimizer.step()
        losses.append(out.main_loss.item())
    assert losses[-1] < losses[0] - 0.5
