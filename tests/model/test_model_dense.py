"""The dense Llama-style model: causality, attention, rotary, precision, checkpointing, tying, loss, init."""

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_model_config

from lunaris import ConfigError, LunarisCodex
from lunaris.model.layers import RotaryEmbedding, apply_rotary


def test_changing_a_future_token_leaves_earlier_logits_unchanged():
    model = LunarisCodex(tiny_model_config()).eval()
    idx = torch.randint(0, 128, (2, 20))
    changed = idx.clone()
    changed[:, 12] = (changed[:, 12] + 1) % 128
    a, b = model(idx).logits, model(changed).logits
    torch.testing.assert_close(a[:, :12], b[:, :12], rtol=0, atol=0)
    assert not torch.allclose(a[:, 12:], b[:, 12:])


def test_attention_with_equal_kv_heads_is_plain_multi_head_attention():
    config = tiny_model_config(n_kv_heads=None)
    attn = LunarisCodex(config).blocks[0].attn.eval()
    B, T, D, H = 2, 10, config.d_model, config.n_heads
    hd = D // H
    x = torch.randn(B, T, D)
    rotary = RotaryEmbedding(hd, 64, config.rope_theta)
    cos, sin = rotary(0, T)
    # by hand: project, rotate, softmax(q k^T / sqrt(hd)) with a causal mask, weighted sum, project
    q, k, v = (x @ attn.qkv.weight.T).split(D, dim=-1)
    q, k, v = (t.view(B, T, H, hd).transpose(1, 2) for t in (q, k, v))
    q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
    scores = q @ k.transpose(-1, -2) / math.sqrt(hd)
    scores = scores.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), float("-inf"))
    y = (scores.softmax(-1) @ v).transpose(1, 2).reshape(B, T, D) @ attn.proj.weight.T
    torch.testing.assert_close(attn(x, cos, sin), y, rtol=1e-5, atol=1e-5)


def test_grouped_query_attention_shares_each_kv_head_across_its_query_group():
    config = tiny_model_config(n_heads=4, n_kv_heads=2)
    attn = LunarisCodex(config).blocks[0].attn.eval()
    hd = config.head_dim
    assert attn.qkv.weight.shape[0] == (4 + 2 * 2) * hd
    # with K/V weights of KV head 0 copied to KV head 1, GQA equals MHA with those K/V heads repeated
    x = torch.randn(1, 8, config.d_model)
    cos, sin = RotaryEmbedding(hd, 64, config.rope_theta)(0, 8)
    mha_config = tiny_model_config(n_heads=4, n_kv_heads=None)
    mha = LunarisCodex(mha_config).blocks[0].attn.eval()
    wq, wk, wv = attn.qkv.weight.split([4 * hd, 2 * hd, 2 * hd])
    repeat = lambda w: w.view(2, hd, -1).repeat_interleave(2, dim=0).reshape(4 * hd, -1)  # noqa: E731
    with torch.no_grad():
        mha.qkv.weight.copy_(torch.cat([wq, repeat(wk), repeat(wv)]))
        mha.proj.weight.copy_(attn.proj.weight)
    torch.testing.assert_close(attn(x, cos, sin), mha(x, cos, sin), rtol=1e-5, atol=1e-5)


def test_rotary_scores_depend_only_on_relative_distance():
    rotary = RotaryEmbedding(16, 128, 10000.0)
    q, k = torch.randn(1, 1, 1, 16), torch.randn(1, 1, 1, 16)

    def score(m, n):
        cos_m, sin_m = rotary(m, 1)
        cos_n, sin_n = rotary(n, 1)
        return (apply_rotary(q, cos_m, sin_m) * apply_rotary(k, cos_n, sin_n)).sum()

    for distance in (0, 3, 17):
        reference = score(distance, 0)
        for offset in (1, 20, 90):
            torch.testing.assert_close(score(offset + distance, offset), reference, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(score(5, 0), score(9, 0))


def test_bfloat16_model_keeps_fp32_rotary_tables_and_rotation_preserves_norm():
    model = LunarisCodex(tiny_model_config()).to(torch.bfloat16)
    assert model.rotary.cos.dtype == torch.float32 and model.rotary.sin.dtype == torch.float32
    reference = RotaryEmbedding(model.config.head_dim, model.config.max_seq_len, model.config.rope_theta)
    torch.testing.assert_close(model.rotary.cos, reference.cos, rtol=0, atol=0)
    # a rotation, not a scaling: norms are preserved at every position (the original's bug made this fail)
    x = torch.randn(1, 1, 64, model.config.head_dim)
    cos, sin = model.rotary(0, 64)
    torch.testing.assert_close(apply_rotary(x, cos, sin).norm(dim=-1), x.norm(dim=-1), rtol=1e-5, atol=1e-5)
    out = model(torch.randint(0, 128, (1, 16)))
    assert out.logits.dtype == torch.bfloat16 and torch.isfinite(out.logits.float()).all()


def test_meta_construction_then_to_empty_rebuilds_rotary_tables():
    with torch.device("meta"):
        model = LunarisCodex(tiny_model_config())
    model.to_empty(device="cpu")
    reference = RotaryEmbedding(model.config.head_dim, model.config.max_seq_len, model.config.rope_theta)
    torch.testing.assert_close(model.rotary.sin, reference.sin, rtol=0, atol=0)


def test_gradient_checkpointing_gives_same_loss_and_gradients():
    torch.manual_seed(0)
    plain = LunarisCodex(tiny_model_config())
    ckpt = LunarisCodex(tiny_model_config(use_gradient_checkpointing=True))
    ckpt.load_state_dict(plain.state_dict())
    idx = torch.randint(0, 128, (2, 24))
    losses = []
    for model in (plain, ckpt):
        model.train()
        loss = model(idx, idx.roll(-1, 1)).loss
        loss.backward()
        losses.append(loss)
    torch.testing.assert_close(losses[0], losses[1], rtol=0, atol=0)
    for (name, a), (_, b) in zip(plain.named_parameters(), ckpt.named_parameters()):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-6, atol=1e-7, msg=name)


def test_lm_head_shares_the_embedding_storage():
    model = LunarisCodex(tiny_model_config())
    assert model.lm_head.weight.data_ptr() == model.wte.weight.data_ptr()
    assert model.num_params() == sum(p.numel() for p in set(model.parameters()))
    untied = LunarisCodex(tiny_model_config(tie_embeddings=False))
    assert untied.lm_head.weight.data_ptr() != untied.wte.weight.data_ptr()
    assert untied.num_params() == model.num_params() + 128 * 64


def test_targets_equal_to_minus_one_are_ignored():
    model = LunarisCodex(tiny_model_config()).eval()
    idx = torch.randint(0, 128, (2, 16))
    targets = idx.roll(-1, 1)
    masked = targets.clone()
    masked[:, 10:] = -1
    out = model(idx, masked)
    expected = F.cross_entropy(out.logits[:, :10].reshape(-1, 128), targets[:, :10].reshape(-1))
    torch.testing.assert_close(out.main_loss, expected)
    assert out.aux_loss.item() == 0.0 and torch.equal(out.loss, out.main_loss)
    assert model(idx, torch.full_like(idx, -1)).loss.item() == 0.0  # all ignored: 0, not NaN
    assert model(idx).loss is None


def test_norm_biases_exist_only_in_block_norms():
    model = LunarisCodex(tiny_model_config())
    assert model.blocks[0].attn_norm.bias is not None and model.blocks[0].ffn_norm.bias is not None
    assert model.norm.bias is None
    assert LunarisCodex(tiny_model_config(norm_bias=False)).blocks[0].attn_norm.bias is None


def test_depth_aware_initialization():
    torch.manual_seed(0)
    model = LunarisCodex(tiny_model_config(d_model=256, n_heads=4, n_layers=8, vocab_size=1024))
    residual = 0.02 / math.sqrt(16)
    assert model.blocks[0].attn.proj.weight.std().item() == pytest.approx(residual, rel=0.05)
    assert model.blocks[3].ffn.ffn.down.weight.std().item() == pytest.approx(residual, rel=0.05)
    assert model.blocks[0].attn.qkv.weight.std().item() == pytest.approx(0.02, rel=0.05)
    assert model.wte.weight.std().item() == pytest.approx(0.02, rel=0.05)


def test_optimizer_groups_carry_lr_scale():
    model = LunarisCodex(tiny_model_config())
    optimizer = model.configure_optimizers(weight_decay=0.1, learning_rate=1e-3, betas=(0.9, 0.95))
    groups = {g["name"]: g for g in optimizer.param_groups}
    assert set(groups) == {"decay", "no_decay"}
    assert groups["decay"]["weight_decay"] == 0.1 and groups["no_decay"]["weight_decay"] == 0.0
    assert all(g["lr_scale"] == 1.0 for g in groups.values())
    assert all(p.dim() >= 2 for p in groups["decay"]["params"])
    assert all(p.dim() == 1 for p in groups["no_decay"]["params"])
    n_grouped = sum(p.numel() for g in optimizer.param_groups for p in g["params"])
    assert n_grouped == model.num_params()


def test_flops_per_token_counts_irl_steps():
    base = LunarisCodex(tiny_model_config())
    irl = LunarisCodex(tiny_model_config(n_reasoning_steps=3))
    ffn_weights = 3 * 64 * base.config.ffn_hidden * base.config.n_layers
    assert irl.flops_per_token(32) - base.flops_per_token(32) == pytest.approx(6 * 2 * ffn_weights)
    assert irl.num_params() == base.num_params()  # IRL reuses the same weights


def test_invalid_config_is_rejected_by_the_model():
    with pytest.raises(ConfigError, match="divisible"):
        LunarisCodex(tiny_model_config(n_heads=5))


def test_two_layer_model_learns_a_repeating_sequence():
    torch.manual_seed(0)
    model = LunarisCodex(tiny_model_config(vocab_size=32, d_model=64, n_layers=2, max_seq_len=32))
    pattern = torch.tensor([3, 1, 4, 1, 5, 9, 2, 6, 5, 3, 5, 8])
    stream = pattern.repeat(20)
    optimizer = model.configure_optimizers(weight_decay=0.0, learning_rate=3e-3)
    for step in range(300):  # noqa: B007  (reported below)
        starts = torch.randint(0, len(stream) - 33, (8,))
        batch = torch.stack([stream[s:s + 33] for s in starts])
        loss = model(batch[:, :-1], batch[:, 1:]).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if loss.item() < 0.05:
            break
    assert loss.item() < 0.5, f"loss {loss.item():.3f} after {step + 1} steps"
