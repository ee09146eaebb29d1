"""Recipe options: qk_norm, zero_init_out, logit_softcap, attention_mask: document, mlp: relu2, value_embeddings,
residual_scalars, untied embeddings with learning rates of their own, and Muon's coefficients and LR scaling."""

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


# ---- mlp: relu2 ----------------------------------------------------------------------------------------------

def test_relu2_mlp_is_down_of_relu_up_squared_with_the_parameters_of_the_swiglu_default():
    from lunaris.model.layers import ReluSquared, SwiGLU
    for d_model in (48, 96):  # derived hidden sizes: relu2 ffn_mult*D, SwiGLU 2/3 of it: the same weights
        swiglu = LunarisCodex(tiny_model_config(d_model=d_model, multiple_of=1))
        relu2 = LunarisCodex(tiny_model_config(d_model=d_model, multiple_of=1, mlp="relu2"))
        assert relu2.config.ffn_hidden == 4 * d_model and swiglu.config.ffn_hidden == 4 * d_model * 2 // 3
        assert relu2.num_params() == swiglu.num_params()
        assert isinstance(relu2.blocks[0].ffn.ffn, ReluSquared) and isinstance(swiglu.blocks[0].ffn.ffn, SwiGLU)
    assert tiny_model_config(mlp="relu2", ffn_hidden_size=40).ffn_hidden == 40   # an explicit size is kept
    mlp = relu2.blocks[1].ffn.ffn
    x = torch.randn(2, 5, 96)
    with torch.no_grad():
        expected = torch.clamp(x @ mlp.up.weight.T, min=0) ** 2 @ mlp.down.weight.T
        torch.testing.assert_close(mlp(x), expected, rtol=1e-5, atol=1e-6)
    assert (mlp.up(x) < 0).any()                                           # the relu does cut something
    assert "blocks.0.ffn.ffn.down.weight" in {f"{n}.{p}" for n, m in relu2.named_modules()
                                              for p in getattr(m, "residual_out", ())}   # depth-scaled init
    assert relu2.flops_per_token() == swiglu.flops_per_token()


def test_relu2_is_for_dense_models():
    problems = tiny_model_config(mlp="relu2", n_experts=4, top_k=2).problems()
    assert problems == ["model.mlp: relu2 is for dense models: MoC experts are SwiGLU; remove it, or model.n_experts."]
    assert tiny_model_config().mlp == "swiglu"


# ---- value_embeddings ----------------------------------------------------------------------------------------

def test_value_embeddings_go_to_the_last_layer_and_every_second_one_before_it():
    assert tiny_model_config(n_layers=4, value_embeddings=2).value_embedding_layers == (1, 3)   # nanochat's
    assert tiny_model_config(n_layers=4, value_embeddings=1).value_embedding_layers == (3,)
    assert tiny_model_config(n_layers=5, value_embeddings=3).value_embedding_layers == (0, 2, 4)
    assert tiny_model_config(n_layers=4).value_embedding_layers == ()
    assert "use at most 2" in " ".join(tiny_model_config(n_layers=4, value_embeddings=3).problems())
    model = LunarisCodex(tiny_model_config(n_layers=4, value_embeddings=2))
    kv_width = model.config.kv_heads * model.config.head_dim
    assert {n: tuple(p.shape) for n, p in model.named_parameters() if "value" in n} == {
        "value_embeds.1.weight": (128, kv_width), "value_embeds.3.weight": (128, kv_width),
        "blocks.1.value_gate.proj.weight": (2, 12), "blocks.3.value_gate.proj.weight": (2, 12)}
    assert model.num_params(exclude_embedding=True) == model.num_params() - 128 * (64 + 2 * kv_width)


def copy_shared(source: LunarisCodex, target: LunarisCodex) -> LunarisCodex:
    """`target` with every weight `source` also has (the options' own parameters keep theirs)."""
    shared = {k: v for k, v in source.state_dict().items() if k in target.state_dict()}
    target.load_state_dict(shared, strict=False)
    return target.eval()


def test_a_value_embedding_adds_its_gated_row_to_the_values_of_its_layer_only():
    torch.manual_seed(0)
    model = random_model(n_layers=4, value_embeddings=2)
    plain = copy_shared(model, LunarisCodex(tiny_model_config(n_layers=4)))
    idx = torch.randint(1, 128, (2, 12))
    idx[0, 6] = 0                                                           # token 0 appears once, at position 6
    with torch.no_grad():
        with_ve = model(idx).logits
        assert not torch.allclose(with_ve, plain(idx).logits, atol=1e-3)
        for table in model.value_embeds.values():                          # empty tables: the plain model
            table.weight.zero_()
        torch.testing.assert_close(model(idx).logits, plain(idx).logits, rtol=0, atol=1e-6)
        model.value_embeds["1"].weight[0].normal_()                         # only token 0's row, in layer 1
        changed = (model(idx).logits - plain(idx).logits).abs().amax(-1)   # (2, 12)
    assert changed[1].max() < 1e-6 and changed[0, :6].max() < 1e-6       # rows and positions before it: untouched
    assert (changed[0, 6:] > 1e-4).all()                                    # from its position on (causal)
    # the gate: 2·sigmoid of the first 12 channels of the attention input, one value per KV head
    gate = model.blocks[1].value_gate
    x, ve = torch.randn(2, 3, 64), torch.randn(2, 3, 2 * 16)
    expected = ve.view(2, 3, 2, 16) * 2 * torch.sigmoid(x[..., :12] @ gate.proj.weight.T)[..., None]
    torch.testing.assert_close(gate(x, ve), expected.view(2, 3, 32))


def test_value_embeddings_train_with_adamw_their_gates_with_muon():
    from lunaris.train.muon import muon_parameters
    from lunaris.train.optim import build_optimizer
    model = LunarisCodex(tiny_model_config(n_layers=4, value_embeddings=2))
    names = {id(p): n for n, p in model.named_parameters()}
    muon = {names[id(p)] for p in muon_parameters(model)}
    assert {"blocks.1.value_gate.proj.weight", "blocks.3.value_gate.proj.weight"} <= muon
    assert not any(n.startswith("value_embeds") for n in muon)
    groups = build_optimizer(model, TrainConfig(model=model.config, optimizer="muon", embedding_lr=0.01), "cpu")
    embedding = next(g for g in groups.param_groups if g["name"] == "embedding")
    assert {names[id(p)] for p in embedding["params"]} == {"wte.weight", "value_embeds.1.weight",
                                                           "value_embeds.3.weight"}


# ---- residual_scalars ----------------------------------------------------------------------------------------

def test_residual_scalars_start_as_the_plain_model_and_mix_the_embedding_into_every_block():
    torch.manual_seed(0)
    plain = LunarisCodex(tiny_model_config(n_layers=3)).eval()
    torch.manual_seed(0)
    model = LunarisCodex(tiny_model_config(n_layers=3, residual_scalars=True)).eval()
    assert model.residual_scalars.residual.tolist() == [1.0] * 3 and model.residual_scalars.x0.tolist() == [0.0] * 3
    for name, value in plain.state_dict().items():                          # they draw no random numbers
        assert torch.equal(value, model.state_dict()[name]), name
    idx = torch.randint(0, 128, (2, 10))
    with torch.no_grad():
        torch.testing.assert_close(model(idx).logits, plain(idx).logits, rtol=0, atol=0)
        model.residual_scalars.residual.copy_(torch.tensor([0.5, 2.0, 0.0]))
        model.residual_scalars.x0.copy_(torch.tensor([0.3, -1.0, 1.0]))
        # by hand: before block i, x = r_i·x + s_i·x0; with r_2 = 0 and s_2 = 1 the last block reads x0 alone
        x0 = model.wte(idx)
        cos, sin = model.rotary(0, 10)
        x = model.blocks[2](x0, cos, sin)[0]
        torch.testing.assert_close(model(idx).logits, model.lm_head(model.norm(x)), rtol=1e-5, atol=1e-5)
        model.residual_scalars.residual.copy_(torch.tensor([0.5, 2.0, 0.7]))
        x = x0
        for i, (r, s) in enumerate(((0.5, 0.3), (2.0, -1.0), (0.7, 1.0))):
            x = model.blocks[i](r * x + s * x0, cos, sin)[0]
        torch.testing.assert_close(model(idx).logits, model.lm_head(model.norm(x)), rtol=1e-5, atol=1e-5)
    model.train()
    model(idx, targets=idx).loss.backward()
    assert model.residual_scalars.x0.grad.abs().min() > 0                  # each layer's scalars learn
    assert model.residual_scalars.residual.grad.abs().min() > 0


# ---- untied embeddings and the AdamW learning rates of their own -----------------------------------------------

def groups_by_name(optimizer, model) -> dict:
    names = {id(p): n for n, p in model.named_parameters()}
    return {g["name"]: ({names[id(p)] for p in g["params"]}, g["lr_scale"], g["weight_decay"])
            for g in optimizer.param_groups}


def test_without_learning_rates_of_their_own_the_groups_are_the_usual_ones():
    from lunaris.train.optim import build_optimizer
    model = LunarisCodex(tiny_model_config(tie_embeddings=False, residual_scalars=True, value_embeddings=1))
    groups = groups_by_name(build_optimizer(model, TrainConfig(model=model.config), "cpu"), model)
    assert list(groups) == ["decay", "no_decay"]
    assert {"wte.weight", "lm_head.weight", "value_embeds.1.weight"} <= groups["decay"][0]
    assert {"residual_scalars.residual", "residual_scalars.x0"} <= groups["no_decay"][0]


def test_embedding_head_and_scalar_learning_rates_get_groups_of_their_own_and_take_those_steps():
    from lunaris.train.optim import apply_lr, build_optimizer, lr_at
    model = LunarisCodex(tiny_model_config(tie_embeddings=False, residual_scalars=True))
    config = TrainConfig(model=model.config, optimizer="muon", learning_rate=1e-3, embedding_lr=5e-2,
                         lm_head_lr=1e-4, scalar_lr=2e-2, warmup_steps=0, max_steps=100)
    optimizer = build_optimizer(model, config, "cpu")
    groups = groups_by_name(optimizer, model)
    assert groups["embedding"] == ({"wte.weight"}, pytest.approx(50.0), 0.1)
    assert groups["lm_head"] == ({"lm_head.weight"}, pytest.approx(0.1), 0.1)
    assert groups["scalars"] == ({"residual_scalars.residual", "residual_scalars.x0"}, pytest.approx(20.0), 0.0)
    assert "decay" not in groups                                            # Muon has every block matrix
    apply_lr(optimizer, lr_at(0, config))
    lrs = {g["name"]: g["lr"] for g in optimizer.param_groups}
    assert (lrs["embedding"], lrs["lm_head"], lrs["scalars"]) == pytest.approx((5e-2, 1e-4, 2e-2))
    # one AdamW step moves each weight by about its group's learning rate (Adam's first step is lr·sign(grad))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    idx = torch.randint(0, 128, (4, 16))
    model(idx, targets=idx).loss.backward()
    optimizer.step()
    moved = {n: (p.detach() - before[n]).abs().max().item() for n, p in model.named_parameters()}
    assert moved["wte.weight"] == pytest.approx(5e-2, rel=0.05)
    assert moved["lm_head.weight"] == pytest.approx(1e-4, rel=0.05)
    assert moved["residual_scalars.x0"] == pytest.approx(2e-2, rel=0.05)


@pytest.mark.parametrize("optimizer", ["adamw", "muon"])
def test_resuming_with_a_learning_rate_of_its_own_set_or_cleared_is_a_clear_error(optimizer):
    from lunaris.errors import CheckpointError
    from lunaris.train.optim import build_optimizer, check_groups
    model = LunarisCodex(tiny_model_config(tie_embeddings=False))
    plain = build_optimizer(model, TrainConfig(model=model.config, optimizer=optimizer), "cpu")
    own = build_optimizer(model, TrainConfig(model=model.config, optimizer=optimizer, embedding_lr=1e-2), "cpu")
    check_groups(plain, plain.state_dict())                                 # the same groups: fine
    check_groups(own, build_optimizer(model, TrainConfig(model=model.config, optimizer=optimizer,
                                                         embedding_lr=5e-2), "cpu").state_dict())  # another value
    with pytest.raises(CheckpointError, match="embedding_lr, lm_head_lr and scalar_lr each give a group"):
        check_groups(own, plain.state_dict())
    with pytest.raises(CheckpointError, match="optimizer has the parameter groups .*embedding"):
        check_groups(plain, own.state_dict())


def test_learning_rates_of_parts_the_model_does_not_have_are_config_errors():
    from lunaris.config import LunarisCodexConfig
    problems = TrainConfig(model=LunarisCodexConfig(), lm_head_lr=1e-3, scalar_lr=1e-2).problems()
    assert any("lm_head_lr (0.001) is the learning rate of an untied LM head" in p for p in problems)
    assert any("scalar_lr (0.01) is the learning rate of the residual scalars" in p for p in problems)
    assert TrainConfig(model=LunarisCodexConfig(tie_embeddings=False, residual_scalars=True), lm_head_lr=1e-3,
                       scalar_lr=1e-2, embedding_lr=1e-2).problems() == []


# ---- every option together: decoding ---------------------------------------------------------------------------

@pytest.mark.parametrize("overrides", [
    dict(mlp="relu2"),
    dict(n_layers=3, value_embeddings=2, n_kv_heads=1),
    dict(residual_scalars=True),
    dict(n_layers=4, mlp="relu2", value_embeddings=2, residual_scalars=True, tie_embeddings=False, qk_norm=True,
         logit_softcap=10.0, n_reasoning_steps=2),
], ids=["relu2", "value-embeddings-mqa", "residual-scalars", "every-option"])
def test_cached_and_static_decoding_with_the_new_options_equal_the_forward(overrides):
    model = random_model(**overrides)
    with torch.no_grad():
        if model.residual_scalars is not None:
            model.residual_scalars.residual.uniform_(0.5, 1.5)
            model.residual_scalars.x0.uniform_(-1.0, 1.0)
        assert_decoding_matches_forward(model)


def test_gradient_checkpointing_with_value_embeddings_and_residual_scalars_gives_the_same_gradients():
    grads = []
    for checkpointing in (False, True):
        torch.manual_seed(0)
        model = LunarisCodex(tiny_model_config(n_layers=4, value_embeddings=2, residual_scalars=True,
                                               use_gradient_checkpointing=checkpointing)).train()
        idx = torch.randint(0, 128, (2, 16))
        model(idx, targets=idx).loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    for name, grad in grads[0].items():
        torch.testing.assert_close(grad, grads[1][name], rtol=0, atol=1e-6, msg=name)


# ---- Muon: coefficients and learning-rate scaling ----------------------------------------------------------------

def test_polar_express_is_its_quintic_steps_and_orthogonalizes_better_than_the_torch_coefficients():
    from lunaris.train.muon import POLAR_EXPRESS, newton_schulz, polar_express
    torch.manual_seed(0)
    grad = torch.randn(3, 32, 96) @ torch.diag(torch.logspace(-2, 0, 96))   # an ill-conditioned gradient
    x = grad / (grad.norm(dim=(-2, -1), keepdim=True) * 1.01 + 1e-6)
    for a, b, c in POLAR_EXPRESS:                                            # by hand: X <- aX + b(XXᵀ)X + c(XXᵀ)²X
        gram = x @ x.mT
        x = a * x + b * gram @ x + c * gram @ gram @ x
    ours = polar_express(grad, 5, torch.float32)
    torch.testing.assert_close(ours, x, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(polar_express(grad.mT, 5, torch.float32), x.mT, rtol=1e-4, atol=1e-5)  # tall
    spread = torch.linalg.svdvals(ours)
    torch_spread = torch.linalg.svdvals(newton_schulz(grad, 5, torch.float32))
    assert 0.8 < spread.min() and spread.max() < 1.2                       # every singular value near 1
    assert torch_spread.min() < 0.75                                        # the torch coefficients stop short


def muon_step(param: torch.Tensor, grad: torch.Tensor, **options) -> torch.Tensor:
    """The update one Muon step (no momentum history, no weight decay) makes to `param`."""
    from lunaris.train.muon import Muon
    p = torch.nn.Parameter(param.clone())
    p.grad = grad.clone()
    Muon([p], lr=0.02, weight_decay=0.0, momentum=0.0, **options).step()
    return p.detach() - param


@pytest.mark.parametrize("shape", [(48, 16), (16, 48)], ids=["tall", "wide"])
def test_muon_learning_rate_scalings_set_each_matrix_step(shape):
    from lunaris.train.muon import newton_schulz
    torch.manual_seed(0)
    param, grad = torch.randn(shape), torch.randn(shape)
    ortho = newton_schulz(grad[None], 5, torch.float32)[0]
    out, fan_in = shape
    expected = {"shape": math.sqrt(max(1, out / fan_in)), "spectral": math.sqrt(out / fan_in),
                "rms": 0.2 * math.sqrt(max(out, fan_in))}
    for scaling, multiple in expected.items():
        step = muon_step(param, grad, lr_scaling=scaling)
        torch.testing.assert_close(step, -0.02 * multiple * ortho, rtol=0, atol=1e-6)   # steps ~1e-3
    torch.testing.assert_close(muon_step(param, grad), muon_step(param, grad, lr_scaling="shape"), rtol=0, atol=0)


@pytest.mark.skipif(not hasattr(torch.optim, "Muon"), reason="torch.optim.Muon needs torch >= 2.9")
def test_muon_rms_scaling_is_torch_muons_match_rms_adamw():
    import lunaris.train.muon as muon_module
    torch.manual_seed(0)
    ours_param = torch.nn.Parameter(torch.randn(12, 40))
    theirs = torch.nn.Parameter(ours_param.detach().clone())
    ours = muon_module.Muon([ours_param], lr=0.02, weight_decay=0.1, momentum=0.95, lr_scaling="rms")
    reference = torch.optim.Muon([theirs], lr=0.02, weight_decay=0.1, momentum=0.95, adjust_lr_fn="match_rms_adamw")
    real = muon_module.newton_schulz
    try:  # torch's iteration runs in bf16: compare in bf16
        muon_module.newton_schulz = lambda g, steps, dtype: real(g, steps, torch.bfloat16)
        for _ in range(2):
            grad = torch.randn_like(ours_param)
            ours_param.grad, theirs.grad = grad.clone(), grad.clone()
            ours.step()
            reference.step()
    finally:
        muon_module.newton_schulz = real
    torch.testing.assert_close(ours_param.detach(), theirs.detach(), atol=1e-5, rtol=0)


def test_muon_options_reach_the_optimizer_and_default_to_torch_muon():
    from lunaris.train.optim import build_optimizer
    model = LunarisCodex(tiny_model_config())
    default = build_optimizer(model, TrainConfig(model=model.config, optimizer="muon"), "cpu").optimizers["muon"]
    assert (default.defaults["ns_coefficients"], default.defaults["lr_scaling"]) == ("torch", "shape")
    chosen = build_optimizer(model, TrainConfig(model=model.config, optimizer="muon", muon_lr_scaling="spectral",
                                                muon_ns_coefficients="polar_express"), "cpu").optimizers["muon"]
    assert (chosen.param_groups[0]["ns_coefficients"], chosen.param_groups[0]["lr_scaling"]) == (
        "polar_express", "spectral")
    with pytest.raises(ConfigError, match="muon_lr_scaling must be one of shape, spectral, rms, got 'spectrum'"):
        load_config(None, ["--muon_lr_scaling=spectrum"])
