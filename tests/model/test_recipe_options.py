"""Recipe options of the model config: qk_norm, zero_init_out, logit_softcap and attention_mask: document."""

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_model_config

from lunaris import ConfigError, LunarisCodex, TrainConfig, load_config
from lunaris.model.layers import RotaryEmbedding, apply_rotary
from lunaris.model.masking import FLEX_ATTENTION
from lunaris.model.model import document_mask

SEP = 0  # the end-of-text id of these tests


def random_model(**overrides) -> LunarisCodex:
    """A tiny eval-mode model with every weight random (norm weights and the norms of qk_norm included)."""
    model = LunarisCodex(tiny_model_config(**overrides))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:
                param.add_(torch.randn_like(param) * 0.3)
    return model.eval()


def assert_decoding_matches_forward(model, steps: int = 8):
    """Static decode_step (whole cache) and the eager one (length) give the logits of a full forward."""
    idx = torch.randint(1, model.config.vocab_size, (2, 5))
    for length in (None, "eager"):
        caches = model.new_kv_caches(2, 32)
        logits = model(idx, caches=caches, last_logits_only=True).logits[:, -1]
        sequence, slot = idx, torch.tensor([5])
        for _ in range(steps):
            torch.testing.assert_close(logits, model(sequence).logits[:, -1], rtol=0, atol=1e-5)
            token = logits.argmax(-1, keepdim=True)
            sequence = torch.cat([sequence, token], dim=1)
            logits = model.decode_step(token, slot, caches, length=None if length is None else int(slot) + 1)
            slot += 1


# ---- qk_norm -------------------------------------------------------------------------------------------------

def test_qk_norm_creates_per_head_norms_only_when_on_and_changes_the_outputs():
    torch.manual_seed(0)
    plain = LunarisCodex(tiny_model_config()).eval()
    torch.manual_seed(0)
    normed = LunarisCodex(tiny_model_config(qk_norm=True)).eval()
    assert not any("q_norm" in n or "k_norm" in n for n, _ in plain.named_parameters())
    extra = set(normed.state_dict()) - set(plain.state_dict())
    assert extra == {f"blocks.{i}.attn.{which}.weight" for i in range(2) for which in ("q_norm", "k_norm")}
    assert all(normed.state_dict()[k].shape == (normed.config.head_dim,) for k in extra)
    assert normed.blocks[0].attn.q_norm.bias is None                       # weight only, eps = norm_eps
    assert normed.blocks[0].attn.q_norm.eps == normed.config.norm_eps
    for key, value in plain.state_dict().items():                          # the norms draw no random numbers
        assert torch.equal(value, normed.state_dict()[key]), key
    idx = torch.randint(0, 128, (2, 12))
    assert not torch.allclose(plain(idx).logits, normed(idx).logits, atol=1e-3)


def test_qk_norm_normalizes_each_head_of_queries_and_keys_before_rotary():
    config = tiny_model_config(qk_norm=True, n_kv_heads=None)
    attn = random_model(qk_norm=True, n_kv_heads=None).blocks[0].attn
    B, T, D, H, hd = 2, 7, config.d_model, config.n_heads, config.head_dim
    x = torch.randn(B, T, D)
    cos, sin = RotaryEmbedding(hd, 64, config.rope_theta)(0, T)

    def rms(t, weight):
        return t * torch.rsqrt(t.pow(2).mean(-1, keepdim=True) + config.norm_eps) * weight

    q, k, v = (t.view(B, T, H, hd) for t in (x @ attn.qkv.weight.T).split(D, dim=-1))
    q, k = rms(q, attn.q_norm.weight).transpose(1, 2), rms(k, attn.k_norm.weight).transpose(1, 2)
    q, k, v = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin), v.transpose(1, 2)
    scores = (q @ k.transpose(-1, -2) / math.sqrt(hd)).masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1),
                                                                   float("-inf"))
    y = (scores.softmax(-1) @ v).transpose(1, 2).reshape(B, T, D) @ attn.proj.weight.T
    with torch.no_grad():
        torch.testing.assert_close(attn(x, cos, sin), y, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("overrides", [dict(n_kv_heads=2), dict(n_kv_heads=1, n_experts=4, top_k=2)],
                         ids=["dense-gqa", "moc-mqa"])
def test_cached_and_static_decoding_with_qk_norm_equal_the_forward(overrides):
    with torch.no_grad():
        assert_decoding_matches_forward(random_model(qk_norm=True, **overrides))


def test_qk_norm_weights_go_to_the_no_decay_adamw_group_never_to_muon():
    from lunaris.train.muon import muon_parameters
    from lunaris.train.optim import build_optimizer
    model = LunarisCodex(tiny_model_config(qk_norm=True))
    names = {id(p): n for n, p in model.named_parameters()}
    qk = {n for n in names.values() if "q_norm" in n or "k_norm" in n}
    assert len(qk) == 4
    adamw = model.configure_optimizers(0.1, 1e-3)
    groups = {g["name"]: {names[id(p)] for p in g["params"]} for g in adamw.param_groups}
    assert qk <= groups["no_decay"] and not qk & (groups["decay"] | groups.get("router", set()))
    assert not qk & {names[id(p)] for p in muon_parameters(model)}
    muon = build_optimizer(model, TrainConfig(model=model.config, optimizer="muon"), "cpu")
    by_group = {g["name"]: {names[id(p)] for p in g["params"]} for g in muon.param_groups}
    assert qk <= by_group["no_decay"]
    assert next(g for g in muon.param_groups if g["name"] == "no_decay")["weight_decay"] == 0.0


# ---- zero_init_out -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("overrides", [dict(), dict(n_experts=4, top_k=2, collab_mode="mha"),
                                       dict(n_experts=4, top_k=2, collab_mode="simple", moc_every=2)],
                         ids=["dense", "moc-mha", "moc-simple"])
def test_zero_init_out_zeroes_exactly_the_residual_output_projections(overrides):
    torch.manual_seed(0)
    default = LunarisCodex(tiny_model_config(**overrides))
    torch.manual_seed(0)
    model = LunarisCodex(tiny_model_config(zero_init_out=True, **overrides))
    residual = {f"{name}.{param}" for name, module in model.named_modules()
                for param in getattr(module, "residual_out", ())}
    assert any("attn.proj" in n for n in residual) and any("ffn" in n and "down" in n for n in residual)
    if overrides:
        assert any("experts.down" in n for n in residual)
        assert any(n.endswith(("collab.out.weight", "collab.mlp_out.weight")) for n in residual)
    for name, param in model.named_parameters():
        if name in residual:
            assert torch.count_nonzero(param) == 0, name
        else:  # the same random numbers are drawn: every other weight is the default model's
            assert torch.equal(param, dict(default.named_parameters())[name]), name
    # each block starts as the identity: the logits are those of the embedding through the final norm
    idx = torch.randint(0, 128, (2, 10))
    with torch.no_grad():
        expected = model.lm_head(model.norm(model.wte(idx)))
        torch.testing.assert_close(model.eval()(idx).logits, expected, rtol=0, atol=0)


def test_zero_init_out_still_learns():
    model = LunarisCodex(tiny_model_config(zero_init_out=True))
    idx = torch.randint(0, 128, (2, 10))
    model(idx, targets=idx).loss.backward()
    assert model.blocks[0].attn.proj.weight.grad.abs().sum() > 0
    assert model.blocks[0].ffn.ffn.down.weight.grad.abs().sum() > 0


# ---- logit_softcap -------------------------------------------------------------------------------------------

def test_logit_softcap_bounds_the_logits_and_is_cap_tanh_of_the_raw_logits():
    torch.manual_seed(0)
    raw_model = random_model()
    torch.manual_seed(0)
    capped = random_model(logit_softcap=2.0)
    with torch.no_grad():
        for model in (raw_model, capped):
            model.lm_head.weight.mul_(40.0)  # raw logits well beyond the cap
        idx = torch.randint(0, 128, (2, 12))
        raw, logits = raw_model(idx).logits, capped(idx).logits
    assert raw.abs().max() > 4.0
    assert logits.abs().max() <= 2.0
    torch.testing.assert_close(logits, 2.0 * torch.tanh(raw / 2.0), rtol=0, atol=1e-6)
    targets = torch.randint(0, 128, (2, 12))
    loss = capped(idx, targets=targets).main_loss
    torch.testing.assert_close(loss, F.cross_entropy(logits.reshape(-1, 128), targets.reshape(-1)))


@pytest.mark.parametrize("overrides", [dict(), dict(n_experts=4, top_k=2, qk_norm=True)], ids=["dense", "moc"])
def test_decode_step_with_logit_softcap_equals_the_forward(overrides):
    model = random_model(logit_softcap=3.0, **overrides)
    with torch.no_grad():
        model.lm_head.weight.mul_(20.0)
        assert_decoding_matches_forward(model)
        token, caches = torch.randint(0, 128, (2, 1)), model.new_kv_caches(2, 4)
        assert model.decode_step(token, torch.tensor([0]), caches).abs().max() <= 3.0
    greedy = model.generate(torch.randint(0, 128, (1, 4)), 6, temperature=0)
    assert greedy.shape == (1, 10)


# ---- attention_mask: document --------------------------------------------------------------------------------

def test_document_mask_positions_restart_after_each_separator():
    idx = torch.tensor([[5, 6, SEP, 7, SEP, SEP, 8, 9],
                        [SEP, 1, 2, 3, 4, 5, 6, 7]])
    positions, mask = document_mask(idx, SEP)
    assert positions.tolist() == [[0, 1, 2, 0, 1, 0, 0, 1], [0, 0, 1, 2, 3, 4, 5, 6]]
    assert mask.shape == (2, 1, 8, 8)
    # row 0: documents [5 6 SEP] [7 SEP] [SEP] [8 9]; the separator belongs to the document it ends
    assert mask[0, 0, 2].tolist() == [True, True, True, False, False, False, False, False]
    assert mask[0, 0, 4].tolist() == [False, False, False, True, True, False, False, False]
    assert mask[0, 0, 5].tolist() == [False] * 5 + [True, False, False]
    assert mask[0, 0, 7].tolist() == [False] * 6 + [True, True]
    assert mask[1, 0, 7].tolist() == [False] + [True] * 7
    assert not (mask & ~torch.ones(8, 8, dtype=torch.bool).tril()).any()  # causal


def packed_documents(vocab: int, lengths=(6, 11, 7)):
    """Three documents of different lengths, each ended by the separator but the last (cut off by the row end)."""
    docs = []
    for n, length in enumerate(lengths):
        doc = torch.randint(1, vocab, (length,))
        if n < len(lengths) - 1:
            doc[-1] = SEP
        docs.append(doc)
    return docs


@pytest.mark.parametrize("overrides", [
    dict(n_kv_heads=2),
    dict(n_kv_heads=1, qk_norm=True, logit_softcap=5.0, n_reasoning_steps=2),
    dict(n_experts=4, top_k=2, collab_mode="mha"),
], ids=["dense-gqa", "dense-every-option", "moc-eval-dropless"])
@pytest.mark.parametrize("backend", ["mask", "varlen", pytest.param("flex", marks=pytest.mark.skipif(
    not FLEX_ATTENTION, reason=f"torch {torch.__version__} has no usable FlexAttention"))])
def test_a_packed_row_gives_each_document_the_logits_it_gets_alone(overrides, backend):
    model = random_model(attention_mask="document", document_separator_id=SEP, attention_backend=backend, **overrides)
    assert model.config.eval_capacity_factor is None  # MoC evaluation is dropless: no token depends on another
    docs = packed_documents(128)
    rows = torch.stack([torch.cat(docs), torch.cat([docs[1], docs[0], docs[2]])])    # (2, 24)
    with torch.no_grad():
        packed = model(rows).logits
        alone = [model(doc[None]).logits[0] for doc in docs]
        causal = model(rows, attn_mask=torch.ones(24, 24, dtype=torch.bool).tril()[None, None]).logits
    starts = [0, 6, 17]
    for doc, logits, start in zip(docs, alone, starts):
        torch.testing.assert_close(packed[0, start:start + len(doc)], logits, rtol=0, atol=1e-5)
    torch.testing.assert_close(packed[1, :11], alone[1], rtol=0, atol=1e-5)
    torch.testing.assert_close(packed[1, 11:17], alone[0], rtol=0, atol=1e-5)
    torch.testing.assert_close(packed[1, 17:], alone[2], rtol=0, atol=1e-5)
    # the first document is the same either way; the later ones see only themselves with the document mask
    torch.testing.assert_close(causal[0, :6], packed[0, :6], rtol=0, atol=1e-5)
    assert not torch.allclose(causal[0, 6:], packed[0, 6:], atol=1e-3)


@pytest.mark.parametrize("backend", ["mask", "varlen"])
def test_document_mask_with_gradient_checkpointing_computes_the_same_loss_and_gradients(backend):
    docs = packed_documents(128)
    row = torch.cat(docs)[None]
    targets = torch.cat([row[:, 1:], torch.full((1, 1), -1)], dim=1)
    losses, grads = [], []
    for checkpointing in (False, True):
        torch.manual_seed(0)
        model = LunarisCodex(tiny_model_config(attention_mask="document", document_separator_id=SEP,
                                               attention_backend=backend,
                                               use_gradient_checkpointing=checkpointing)).train()
        loss = model(row, targets=targets).loss
        loss.backward()
        losses.append(loss.detach())
        grads.append(model.blocks[0].attn.qkv.weight.grad.clone())
    with torch.no_grad():
        model.eval()
        alone = model(docs[1][None]).logits[0]
        torch.testing.assert_close(model(row).logits[0, 6:17], alone, rtol=0, atol=1e-5)
    torch.testing.assert_close(losses[0], losses[1], rtol=0, atol=1e-6)
    torch.testing.assert_close(grads[0], grads[1], rtol=0, atol=1e-6)


def test_document_mode_leaves_a_single_document_and_generation_as_causal():
    torch.manual_seed(0)
    causal = random_model()
    torch.manual_seed(0)
    document = random_model(attention_mask="document", document_separator_id=SEP)
    idx = torch.randint(1, 128, (2, 16))
    with torch.no_grad():
        torch.testing.assert_close(document(idx).logits, causal(idx).logits, rtol=0, atol=1e-5)
    prompt = idx[:1, :5]
    assert torch.equal(document.generate(prompt, 8, temperature=0), causal.generate(prompt, 8, temperature=0))


# ---- config --------------------------------------------------------------------------------------------------

def test_recipe_option_defaults_keep_the_plain_model():
    config = tiny_model_config()
    assert (config.qk_norm, config.zero_init_out, config.logit_softcap, config.attention_mask,
            config.document_separator_id) == (False, False, None, "causal", None)


def test_recipe_option_values_are_checked_and_reported_together(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("model:\n  logit_softcap: 0\n  attention_mask: documnet\n  document_separator_id: 70000\n"
                    "  vocab_size: 512\n  qk_norm: maybe\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    message = str(info.value)
    assert "4 problems" in message
    assert "model.logit_softcap must be positive or null, got 0.0" in message
    assert "model.attention_mask must be one of causal, document, got 'documnet' (did you mean 'document'?)" \
        in message
    assert "model.document_separator_id must be a token id in [0, vocab_size), got 70000" in message
    assert "model.qk_norm must be true or false" in message
    for cap in (-1.0, 0.0):
        assert any("logit_softcap" in p for p in tiny_model_config(logit_softcap=cap).problems())
    assert tiny_model_config(logit_softcap=30.0, attention_mask="document").problems() == []


def test_a_document_model_without_a_separator_is_a_clear_error_but_its_config_loads():
    config = tiny_model_config(attention_mask="document")
    assert config.problems() == []  # `lunaris train` fills the separator in from the data's manifest
    with pytest.raises(ConfigError, match=r"attention_mask: document needs document_separator_id \(the end-of-text"):
        LunarisCodex(config)
    from lunaris.inspect_config import build_on_meta
    assert build_on_meta(config).num_params() == LunarisCodex(tiny_model_config()).num_params()
