"""IRL analysis metrics (layers.IRLProbe, opened by `LunarisCodex.analysis()`): successive-update cosines and state
gradient norms, by hand."""

import torch
from conftest import tiny_model_config

from lunaris.model.layers import IRLProbe, ReasoningFeedForward, irl_iterate, update_cosine
from lunaris.model.moc import MoCLayer


def linear_case():
    """A linear step function z -> z W, alpha 0.5, three tokens of width 4; everything computable by hand."""
    generator = torch.Generator().manual_seed(0)
    W = torch.randn(4, 4, generator=generator) * 0.5
    x = torch.randn(3, 4, generator=generator)
    c = torch.randn(3, 4, generator=generator)   # loss = sum(c * h_S)
    return W, x, c, 0.5


def row_cosine_mean(a, b):
    return torch.stack([torch.dot(a[i], b[i]) / (a[i].norm() * b[i].norm()) for i in range(a.shape[0])]).mean()


def test_cosines_and_gradient_norms_equal_the_hand_computed_values():
    W, x, c, alpha = linear_case()
    site = object()
    stats = {}
    probe = IRLProbe()
    h = irl_iterate(lambda z: z @ W, x.clone().requires_grad_(), 3, alpha, stats, site=site, probe=probe)
    (c * h).sum().backward()
    # by hand: u1 = a·xW, h1 = u1; u2 = a·(h1 + x)W, h2 = h1 + u2; u3 = a·(h2 + x)W
    u1 = alpha * x @ W
    u2 = alpha * (u1 + x) @ W
    u3 = alpha * (u1 + u2 + x) @ W
    assert set(stats) == {"irl/update_norm_step1", "irl/update_norm_step2", "irl/update_norm_step3",
                          "irl/step2_update_cosine", "irl/step3_update_cosine"}
    torch.testing.assert_close(stats["irl/step2_update_cosine"], row_cosine_mean(u1, u2))
    torch.testing.assert_close(stats["irl/step3_update_cosine"], row_cosine_mean(u2, u3))
    # dL/dh3 = c; h3 = h2 + a·(h2 + x)W gives dL/dh2 = dL/dh3 (I + a·Wᵀ); likewise dL/dh1 = dL/dh2 (I + a·Wᵀ)
    J = torch.eye(4) + alpha * W.t()
    g3, g2 = c, c @ J
    g1 = g2 @ J
    norms = probe.grad_norms()
    assert list(norms) == ["irl/step1_grad_norm", "irl/step2_grad_norm", "irl/step3_grad_norm"]
    for key, g in zip(norms, (g1, g2, g3)):
        torch.testing.assert_close(norms[key], g.norm())


def test_gradient_norms_agree_with_autograd_and_combine_micro_batches_and_layers():
    W, x, c, alpha = linear_case()
    site_a, site_b = object(), object()
    probe = IRLProbe()
    for rows in (slice(0, 2), slice(2, 3)):         # layer a: two micro-batches of the same layer
        h = irl_iterate(lambda z: z @ W, x[rows].clone().requires_grad_(), 2, alpha, {}, site=site_a, probe=probe)
        (c[rows] * h).sum().backward()
    h = irl_iterate(lambda z: z @ W, x.clone().requires_grad_(), 2, alpha, {}, site=site_b, probe=probe)
    (2 * c * h).sum().backward()                    # layer b: one batch, twice the loss

    def state_grads(scale):  # dL/dh_1, dL/dh_2 of the whole batch by autograd, the recurrence written out
        x_ = x.clone().requires_grad_()
        h1 = alpha * x_ @ W
        h2 = h1 + alpha * (h1 + x_) @ W
        return torch.autograd.grad((scale * c * h2).sum(), (h1, h2))

    (a1, a2), (b1, b2) = state_grads(1), state_grads(2)
    norms = probe.grad_norms()
    # layer a's micro-batches together: the norm of the whole batch's gradient (sqrt of the summed squares)
    torch.testing.assert_close(norms["irl/step1_grad_norm"], (a1.norm() + b1.norm()) / 2)
    torch.testing.assert_close(norms["irl/step2_grad_norm"], (a2.norm() + b2.norm()) / 2)
    torch.testing.assert_close(probe.grad_norms(scale=4.0)["irl/step2_grad_norm"], norms["irl/step2_grad_norm"] / 4)


def test_without_a_probe_nothing_is_added_and_without_grad_only_cosines():
    W, x, c, alpha = linear_case()
    stats = {}
    irl_iterate(lambda z: z @ W, x.requires_grad_(), 3, alpha, stats)
    assert set(stats) == {f"irl/update_norm_step{t}" for t in (1, 2, 3)}
    probe = IRLProbe()
    with torch.no_grad():
        stats = {}
        irl_iterate(lambda z: z @ W, x, 3, alpha, stats, probe=probe)
    assert "irl/step3_update_cosine" in stats and probe.squares == {} and probe.grad_norms() == {}
    stats = {}
    irl_iterate(lambda z: z @ W, x, 1, 1.0, stats, probe=probe)   # one step: nothing iterates, nothing is recorded
    assert stats == {}


def test_update_cosine_leaves_out_empty_rows():
    a = torch.tensor([[1.0, 0.0], [0.0, 0.0], [1.0, 1.0]])
    b = torch.tensor([[1.0, 1.0], [2.0, 0.0], [-1.0, -1.0]])
    expected = (torch.tensor(2.0).sqrt() / 2 + -1.0) / 2
    torch.testing.assert_close(update_cosine(a, b), expected)
    assert update_cosine(torch.zeros(3, 2), b).item() == 0.0


def test_dense_and_moc_layers_report_per_step_metrics_under_a_probe():
    dense = ReasoningFeedForward(tiny_model_config(n_reasoning_steps=3))
    moc = MoCLayer(tiny_model_config(n_reasoning_steps=2, n_experts=4, top_k=2, capacity_factor=1.0), 0)
    x = torch.randn(2, 6, 64)
    with IRLProbe(dense, moc) as probe:                         # attached to these modules' IRL only
        assert dense.irl_probe is probe and moc.experts.irl_probe is probe
        (y, _, stats) = dense(x)
        (z, _, moc_stats) = moc(x)
        (y.square().sum() + z.square().sum()).backward()
    assert dense.irl_probe is None and moc.experts.irl_probe is None
    assert "irl/step2_update_cosine" not in dense(x)[2]         # closed: nothing recorded
    assert {"irl/step2_update_cosine", "irl/step3_update_cosine"} <= stats.keys()
    assert "irl/step2_update_cosine" in moc_stats
    assert all(-1.0 <= v.item() <= 1.0 for k, v in {**stats, **moc_stats}.items() if k.endswith("cosine"))
    norms = probe.grad_norms()
    assert sorted(norms) == ["irl/step1_grad_norm", "irl/step2_grad_norm", "irl/step3_grad_norm"]
    assert len(probe.squares) == 3 + 2                          # dense: 3 states, experts: 2
    assert all(v.item() > 0 for v in norms.values())
    assert probe.metrics(2.0) == {k: v / 2.0 for k, v in norms.items()}   # what the training step reads


def test_a_probe_opened_through_one_model_leaves_another_alone():
    from lunaris import LunarisCodex
    config = tiny_model_config(n_reasoning_steps=2)
    watched, other = LunarisCodex(config), LunarisCodex(config)
    idx = torch.randint(0, 128, (1, 8))
    with watched.analysis():
        assert "irl/step2_update_cosine" in watched(idx, idx).metrics
        assert "irl/step2_update_cosine" not in other(idx, idx).metrics
