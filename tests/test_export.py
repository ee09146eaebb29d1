"""`lunaris export`: Hugging Face directories that `transformers` loads and that compute what our model computes."""

import ast
import dataclasses
import json

import pytest
import torch
from conftest import byte_level_tokenizer, tiny_model_config

from lunaris import LunarisCodex, LunarisError, TrainConfig
from lunaris.cli import main
from lunaris.export import export_checkpoint

transformers = pytest.importorskip("transformers")  # the [hf] extra; installed with [dev]


def trained_looking_model(**overrides) -> LunarisCodex:
    """A tiny random model whose norm weights and biases are far from their init (so folding them matters)."""
    model = LunarisCodex(tiny_model_config(vocab_size=320, **overrides))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name or "collab_gate" in name or "halting" in name:   # halting: tokens stop at different steps
                param.add_(torch.randn_like(param) * 0.5)
        for name, buffer in model.named_buffers():   # MoC state a checkpoint carries: routing bias, temperature
            if name.endswith("balance_bias"):
                buffer.normal_()
            elif name.endswith("router_temp"):
                buffer.fill_(1.3)
    return model.eval()


def save_run(run_dir, model):
    run_dir.mkdir(parents=True)
    state = {"model": model.state_dict(), "config": dataclasses.asdict(TrainConfig(model=model.config)), "step": 3}
    torch.save(state, run_dir / "latest_checkpoint.pt")
    byte_level_tokenizer().save(str(run_dir / "tokenizer.json"))
    return run_dir


def hf_greedy(hf_model, idx, n):
    out = hf_model.generate(idx, attention_mask=torch.ones_like(idx), max_new_tokens=n, min_new_tokens=n,
                            do_sample=False)
    return out


def assert_cached_generation_matches_full_recompute(hf_model, vocab_size: int, steps: int = 20):
    """The logits `generate` sees at each cached decode step (batch 2) equal a full forward over the sequence.

    The check cannot pass by coincidence: the model's next-token logits must depend on the context (a decode step
    that lost its cache sees only the newest token, at position 0, and gets the logits of that token alone).
    """
    prompt = torch.randint(0, vocab_size, (2, 6))
    with torch.no_grad():
        out = hf_model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=steps,
                                min_new_tokens=steps, do_sample=False, output_logits=True,
                                return_dict_in_generate=True)
        sequences = out.sequences                                              # (2, 6 + steps)
        full = hf_model(sequences, use_cache=False).logits                     # (2, 6 + steps, V)
        assert len(out.logits) == steps
        for step, logits in enumerate(out.logits):                             # each (2, V)
            position = prompt.size(1) + step - 1  # the logits at this position chose token `position + 1`
            torch.testing.assert_close(logits.float(), full[:, position].float(), rtol=0, atol=1e-4)
            alone = hf_model(sequences[:, position:position + 1], use_cache=False).logits[:, 0]
            assert (alone - full[:, position]).abs().max() > 1e-2, "the test model must depend on its context"


def context_dependent_model(**overrides) -> LunarisCodex:
    """A trained-looking model with larger attention weights, so its next token depends strongly on the context."""
    model = trained_looking_model(**overrides)
    with torch.no_grad():
        for block in model.blocks:
            block.attn.qkv.weight.mul_(8.0)
    return model


# ---- dense -> LlamaForCausalLM ---------------------------------------------------------------------------

@pytest.mark.parametrize("overrides", [
    dict(norm_bias=True, n_heads=4, n_kv_heads=2, rope_theta=500.0),
    dict(norm_bias=False, tie_embeddings=False, n_kv_heads=None, irl_alpha=0.7),
], ids=["norm-bias-gqa-tied", "no-bias-mha-untied-alpha"])
def test_dense_model_exports_as_llama_with_the_same_logits(tmp_path, overrides):
    model = trained_looking_model(**overrides)
    summary = export_checkpoint(save_run(tmp_path / "run", model), tmp_path / "hf")
    assert summary["format"] == "llama" and "modeling_lunaris.py" not in summary["files"]
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert config["attention_bias"] == config["mlp_bias"] == model.config.norm_bias

    hf = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "hf").eval()
    idx = torch.randint(0, 320, (2, 24))
    with torch.no_grad():
        torch.testing.assert_close(hf(idx).logits, model(idx).logits, rtol=0, atol=1e-4)
    # cached decoding through Hugging Face's own generate agrees with ours
    assert torch.equal(hf_greedy(hf, idx[:, :6], 10), model.generate(idx[:, :6], 10, temperature=0))


# ---- MoC and IRL -> remote code ---------------------------------------------------------------------------

@pytest.mark.parametrize("overrides", [
    dict(n_experts=4, top_k=2, capacity_factor=1.0, n_reasoning_steps=2),
    dict(n_experts=4, top_k=1, n_shared_experts=1, n_reasoning_steps=2, collab_mode="none"),
    dict(n_reasoning_steps=3, n_kv_heads=1, tie_embeddings=False),
    dict(n_experts=8, top_k=4, expert_hidden_size=16, n_shared_experts=1, collab_mode="simple", collab_gate=True,
         router_temperature=2.0, router_temperature_end=0.7, n_reasoning_steps=2, irl_halting="act",
         load_balance="bias", balance_bias_update="proportional"),
    dict(n_experts=4, top_k=2, collab_mode="mha", collab_gate=True, moc_every=2, n_reasoning_steps=3,
         irl_halting="act", balance_scope="global_batch", router_entropy_weight=0.01, tie_embeddings=False),
], ids=["moc-irl2", "moc-shared-irl2-topk", "dense-irl3-untied", "moc-fine-grained-gated-halting-annealed",
        "moc-interleaved-halting-mha-gate-global"])
def test_other_models_export_with_their_own_code_and_load_through_auto_model(tmp_path, overrides):
    model = trained_looking_model(**overrides)
    summary = export_checkpoint(save_run(tmp_path / "run", model), tmp_path / "hf")
    assert summary["format"] == "lunaris"
    modeling = (tmp_path / "hf" / "modeling_lunaris.py").read_text()
    imported = [node.module if isinstance(node, ast.ImportFrom) else alias.name
                for node in ast.walk(ast.parse(modeling)) if isinstance(node, (ast.Import, ast.ImportFrom))
                for alias in node.names]
    assert not [name for name in imported if name and name.split(".")[0] == "lunaris"]  # self-contained

    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf", trust_remote_code=True).eval()
    assert type(hf).__name__ == "LunarisForCausalLM"
    idx = torch.randint(0, 320, (2, 20))
    with torch.no_grad():
        torch.testing.assert_close(hf(idx).logits, model(idx).logits, rtol=0, atol=1e-5)
        labels_loss = hf(idx, labels=idx).loss
    next_tokens = torch.cat([idx[:, 1:], torch.full((2, 1), -1)], dim=1)  # the last position has no target
    expected_loss = model(idx, targets=next_tokens).loss                  # cross-entropy + MoC aux losses
    torch.testing.assert_close(labels_loss, expected_loss, rtol=1e-5, atol=1e-5)
    assert torch.equal(hf_greedy(hf, idx[:, :5], 12), model.generate(idx[:, :5], 12, temperature=0))


@pytest.mark.parametrize("overrides", [
    dict(n_heads=4, n_kv_heads=2),                                                      # llama: GQA, tied
    dict(n_heads=4, n_kv_heads=1, tie_embeddings=False),                                # llama: MQA, untied
    dict(n_heads=4, n_kv_heads=None, n_reasoning_steps=2, tie_embeddings=False),        # lunaris: MHA, untied
    dict(n_experts=4, top_k=2, n_kv_heads=2, n_reasoning_steps=2),                      # lunaris: MoC, GQA, tied
    dict(n_experts=4, top_k=1, n_kv_heads=1, tie_embeddings=False),                     # lunaris: MoC, MQA, untied
], ids=["llama-gqa-tied", "llama-mqa-untied", "lunaris-irl2-mha-untied", "lunaris-moc-gqa-tied",
        "lunaris-moc-mqa-untied"])
def test_cached_generate_of_every_export_format_sees_the_logits_of_a_full_recompute(tmp_path, overrides):
    model = context_dependent_model(**overrides)
    summary = export_checkpoint(save_run(tmp_path / "run", model), tmp_path / "hf")
    assert summary["format"] == ("lunaris" if model.config.n_experts or model.config.n_reasoning_steps > 1
                                 else "llama")
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf", trust_remote_code=True).eval()
    assert_cached_generation_matches_full_recompute(hf, model.config.vocab_size)


def test_exported_tokenizer_loads_with_auto_tokenizer_and_encodes_like_tokenizers(tmp_path):
    run = save_run(tmp_path / "run", trained_looking_model())
    export_checkpoint(run, tmp_path / "hf")
    hf_tokenizer = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    ours = byte_level_tokenizer()
    for text in ["hello world", " the  quick\nbrown fox", "héllo ☃ 日本<|endoftext|>next document"]:
        assert hf_tokenizer(text)["input_ids"] == ours.encode(text).ids
        ids = ours.encode(text).ids
        assert hf_tokenizer.decode(ids) == ours.decode(ids, skip_special_tokens=False)
    eos = ours.token_to_id("<|endoftext|>")
    assert hf_tokenizer.eos_token == hf_tokenizer.bos_token == "<|endoftext|>" and hf_tokenizer.eos_token_id == eos
    generation = json.loads((tmp_path / "hf" / "generation_config.json").read_text())
    assert generation["eos_token_id"] == eos


# ---- files, formats and errors ------------------------------------------------------------------------------

def test_export_command_refuses_to_overwrite_and_force_replaces_the_other_format(tmp_path, capsys):
    run = save_run(tmp_path / "run", trained_looking_model())
    out = tmp_path / "hf"
    assert main(["export", "--checkpoint", str(run), "--out", str(out), "--format", "lunaris"]) == 0
    assert "trust_remote_code=True" in capsys.readouterr().out
    assert (out / "modeling_lunaris.py").is_file()

    assert main(["export", "--checkpoint", str(run), "--out", str(out)]) == 2
    assert "already exists and is not empty" in capsys.readouterr().err

    (out / "README.md").write_text("the user's notes")
    assert main(["export", "--checkpoint", str(run), "--out", str(out), "--force", "--dtype", "bf16"]) == 0
    assert "as llama" in capsys.readouterr().out
    assert not (out / "modeling_lunaris.py").exists() and not (out / "configuration_lunaris.py").exists()
    assert (out / "README.md").read_text() == "the user's notes"  # files an export does not write stay
    from safetensors import safe_open
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        assert f.get_tensor("model.embed_tokens.weight").dtype == torch.bfloat16
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "bfloat16"
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temporary directory left


def test_llama_format_for_a_moc_model_is_a_clear_error(tmp_path):
    run = save_run(tmp_path / "run", trained_looking_model(n_experts=4))
    with pytest.raises(LunarisError, match="--format llama needs a dense model"):
        export_checkpoint(run, tmp_path / "hf", fmt="llama")


def test_a_failed_export_leaves_no_output_directory(tmp_path, monkeypatch):
    import lunaris.export as export_module
    run = save_run(tmp_path / "run", trained_looking_model(n_experts=4))

    def broken():
        raise OSError("disk full")

    monkeypatch.setattr(export_module, "modeling_source", broken)
    with pytest.raises(OSError, match="disk full"):
        export_checkpoint(run, tmp_path / "hf")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]


def test_export_without_a_tokenizer_says_how_to_pass_one(tmp_path):
    run = save_run(tmp_path / "run", trained_looking_model())
    (run / "tokenizer.json").unlink()
    with pytest.raises(LunarisError, match="pass --tokenizer FILE"):
        export_checkpoint(run, tmp_path / "hf")


def test_the_modeling_file_is_assembled_from_the_lunaris_modules_and_refuses_name_clashes():
    from lunaris.export.remote_code import _check_unique, modeling_source
    source = modeling_source()
    for module in ("lunaris.model.layers", "lunaris.model.attention", "lunaris.model.moc", "lunaris.model.model",
                   "lunaris.config", "Hugging Face classes"):
        assert f"# {module}\n" in source
    compile(source, "modeling_lunaris.py", "exec")
    _check_unique([("a", "import math\ndef f(): pass"), ("b", "import math\nx = 1")])  # same import: fine
    with pytest.raises(LunarisError, match="'f' means different things in a and b"):
        _check_unique([("a", "def f(): pass"), ("b", "def f(): return 1")])
    with pytest.raises(LunarisError, match="'checkpoint' means different things"):
        _check_unique([("a", "def checkpoint(): pass"), ("b", "from torch.utils.checkpoint import checkpoint")])


# ---- recipe options: qk_norm -> Qwen3, zero_init_out -> Llama, softcap and document mask -> remote code -----------

def test_zero_init_out_changes_only_the_initialization_and_exports_as_llama(tmp_path):
    model = trained_looking_model(zero_init_out=True, norm_bias=False)
    with torch.no_grad():  # trained: the zero-initialized projections have moved
        for block in model.blocks:
            block.attn.proj.weight.normal_(0.0, 0.05)
            block.ffn.ffn.down.weight.normal_(0.0, 0.05)
    summary = export_checkpoint(save_run(tmp_path / "run", model), tmp_path / "hf")
    assert summary["format"] == "llama"
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    assert type(hf).__name__ == "LlamaForCausalLM"
    idx = torch.randint(0, 320, (2, 16))
    with torch.no_grad():
        torch.testing.assert_close(hf(idx).logits, model(idx).logits, rtol=0, atol=1e-4)


@pytest.mark.parametrize("overrides", [dict(n_heads=4, n_kv_heads=2), dict(n_heads=4, n_kv_heads=1,
                                                                          tie_embeddings=False, irl_alpha=0.7)],
                         ids=["gqa-tied", "mqa-untied-alpha"])
def test_a_dense_qk_norm_model_exports_as_qwen3_with_the_same_logits(tmp_path, overrides):
    qwen3 = pytest.importorskip("transformers.models.qwen3", reason="Qwen3 needs transformers >= 4.51")
    model = context_dependent_model(qk_norm=True, norm_bias=False, rope_theta=500.0, **overrides)
    summary = export_checkpoint(save_run(tmp_path / "run", model), tmp_path / "hf")
    assert summary["format"] == "qwen3" and "modeling_lunaris.py" not in summary["files"]
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert config["architectures"] == ["Qwen3ForCausalLM"] and config["model_type"] == "qwen3"
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    assert isinstance(hf, qwen3.Qwen3ForCausalLM)
    assert hf.config.head_dim == model.config.head_dim and hf.config.rms_norm_eps == model.config.norm_eps
    idx = torch.randint(0, 320, (2, 24))
    with torch.no_grad():
        torch.testing.assert_close(hf(idx).logits, model(idx).logits, rtol=0, atol=1e-4)
    assert torch.equal(hf_greedy(hf, idx[:, :6], 10), model.generate(idx[:, :6], 10, temperature=0))
    assert_cached_generation_matches_full_recompute(hf, model.config.vocab_size, steps=8)


def test_qk_norm_models_qwen3_cannot_express_export_with_their_own_code(tmp_path, monkeypatch):
    import lunaris.export as export_module
    biased = trained_looking_model(qk_norm=True, norm_bias=True)       # Qwen3 has no mlp_bias to fold into
    run = save_run(tmp_path / "run", biased)
    assert export_checkpoint(run, tmp_path / "hf")["format"] == "lunaris"
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf", trust_remote_code=True).eval()
    idx = torch.randint(0, 320, (2, 16))
    with torch.no_grad():
        torch.testing.assert_close(hf(idx).logits, biased(idx).logits, rtol=0, atol=1e-5)
    with pytest.raises(LunarisError, match="--format qwen3 needs .* norm_bias false"):
        export_checkpoint(run, tmp_path / "hf2", fmt="qwen3")
    with pytest.raises(LunarisError, match="--format llama needs a dense model .* no qk_norm"):
        export_checkpoint(run, tmp_path / "hf2", fmt="llama")
    # a transformers without Qwen3 (older than 4.51) gets the remote code
    monkeypatch.setattr(export_module, "qwen3_available", lambda: False)
    plain = save_run(tmp_path / "run2", trained_looking_model(qk_norm=True, norm_bias=False))
    assert export_checkpoint(plain, tmp_path / "hf3")["format"] == "lunaris"


def test_logit_softcap_exports_with_its_own_code_and_the_same_logits(tmp_path):
    model = context_dependent_model(logit_softcap=2.0, norm_bias=False)
    with torch.no_grad():
        model.lm_head.weight.mul_(30.0)
    run = save_run(tmp_path / "run", model)
    summary = export_checkpoint(run, tmp_path / "hf")
    assert summary["format"] == "lunaris"
    assert "soft_cap" in (tmp_path / "hf" / "modeling_lunaris.py").read_text()
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf", trust_remote_code=True).eval()
    assert type(hf).__name__ == "LunarisForCausalLM"
    idx = torch.randint(0, 320, (2, 16))
    with torch.no_grad():
        logits = hf(idx).logits
        torch.testing.assert_close(logits, model(idx).logits, rtol=0, atol=1e-4)
    assert logits.abs().max() <= 2.0
    assert torch.equal(hf_greedy(hf, idx[:, :5], 8), model.generate(idx[:, :5], 8, temperature=0))
    with pytest.raises(LunarisError, match="no logit_softcap"):
        export_checkpoint(run, tmp_path / "hf2", fmt="llama")


def with_trained_recipe_weights(model: LunarisCodex) -> LunarisCodex:
    """`model` with its value-embedding gates and residual scalars away from their start (so they matter)."""
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "value_gate" in name or name.startswith("value_embeds"):
                param.normal_(0.0, 0.5)
        if model.residual_scalars is not None:
            model.residual_scalars.residual.uniform_(0.5, 1.5)
            model.residual_scalars.x0.uniform_(-1.0, 1.0)
    return model


@pytest.mark.parametrize("overrides", [
    dict(mlp="relu2"),
    dict(n_layers=4, value_embeddings=2, n_kv_heads=2),
    dict(residual_scalars=True, tie_embeddings=False),
    dict(n_layers=4, mlp="relu2", value_embeddings=2, residual_scalars=True, tie_embeddings=False, qk_norm=True,
         norm_bias=False, logit_softcap=10.0),
], ids=["relu2", "value-embeddings", "residual-scalars-untied", "every-option"])
def test_relu2_value_embeddings_and_residual_scalars_export_with_their_own_code(tmp_path, overrides):
    model = with_trained_recipe_weights(context_dependent_model(**overrides))
    run = save_run(tmp_path / "run", model)
    summary = export_checkpoint(run, tmp_path / "hf")
    assert summary["format"] == "lunaris"                                  # Llama's and Qwen3's MLPs are gated
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf", trust_remote_code=True).eval()
    assert type(hf).__name__ == "LunarisForCausalLM"
    idx = torch.randint(0, 320, (2, 16))
    with torch.no_grad():
        torch.testing.assert_close(hf(idx).logits, model(idx).logits, rtol=0, atol=1e-4)
    assert torch.equal(hf_greedy(hf, idx[:, :5], 8), model.generate(idx[:, :5], 8, temperature=0))
    assert_cached_generation_matches_full_recompute(hf, model.config.vocab_size, steps=6)
    with pytest.raises(LunarisError, match="--format llama needs a dense model .*mlp: swiglu and no value_embed"):
        export_checkpoint(run, tmp_path / "hf2", fmt="llama")


def test_an_untied_model_with_embedding_and_head_learning_rates_still_exports_as_llama(tmp_path):
    model = trained_looking_model(tie_embeddings=False)
    run = tmp_path / "run"
    run.mkdir()
    config = TrainConfig(model=model.config, embedding_lr=0.05, lm_head_lr=1e-3)   # training keys, not the model's
    torch.save({"model": model.state_dict(), "config": dataclasses.asdict(config), "step": 3},
               run / "latest_checkpoint.pt")
    byte_level_tokenizer().save(str(run / "tokenizer.json"))
    assert export_checkpoint(run, tmp_path / "hf")["format"] == "llama"
    hf = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "hf").eval()
    assert hf.config.tie_word_embeddings is False
    idx = torch.randint(0, 320, (2, 12))
    with torch.no_grad():
        torch.testing.assert_close(hf(idx).logits, model(idx).logits, rtol=0, atol=1e-4)


def test_document_mask_exports_with_its_own_code_and_masks_documents_without_a_cache(tmp_path):
    eos = byte_level_tokenizer().token_to_id("<|endoftext|>")
    model = context_dependent_model(attention_mask="document", document_separator_id=eos)
    summary = export_checkpoint(save_run(tmp_path / "run", model), tmp_path / "hf")
    assert summary["format"] == "lunaris"
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert config["lunaris"]["attention_mask"] == "document" and config["lunaris"]["document_separator_id"] == eos
    assert config["use_cache"] is False  # a plain call computes what our forward computes: documents alone
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf", trust_remote_code=True).eval()
    docs = [torch.randint(1, 320, (n,)) for n in (7, 12, 5)]
    docs[0][-1] = docs[1][-1] = eos
    row = torch.cat(docs)[None]                                             # (1, 24): three documents
    with torch.no_grad():
        logits = hf(row).logits
        torch.testing.assert_close(logits, model(row).logits, rtol=0, atol=1e-5)
        torch.testing.assert_close(logits[0, 7:19], model(docs[1][None]).logits[0], rtol=0, atol=1e-5)
        torch.testing.assert_close(hf(row, labels=row).loss, model(row, targets=torch.cat(
            [row[:, 1:], torch.full((1, 1), -1)], dim=1)).loss, rtol=1e-5, atol=1e-5)
        with pytest.warns(UserWarning, match="treats its input as one document"):
            hf(row, use_cache=True)
    prompt = torch.randint(1, 320, (1, 6))                                  # generation: one document
    assert torch.equal(hf_greedy(hf, prompt, 8), model.generate(prompt, 8, temperature=0))


@pytest.mark.parametrize("overrides", [dict(attention_window=4), dict(attention_window=3, attention_window_pattern="SL",
                                                                      qk_norm=True, norm_bias=False)],
                         ids=["window-every-layer", "window-pattern-qk-norm"])
def test_sliding_window_exports_with_its_own_code_and_the_same_logits_and_generation(tmp_path, overrides):
    model = context_dependent_model(**overrides)
    run = save_run(tmp_path / "run", model)
    summary = export_checkpoint(run, tmp_path / "hf")
    assert summary["format"] == "lunaris"                                   # neither Llama nor Qwen3 has it
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert config["lunaris"]["attention_window"] == overrides["attention_window"]
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf", trust_remote_code=True).eval()
    idx = torch.randint(0, 320, (2, 24))
    with torch.no_grad():
        torch.testing.assert_close(hf(idx).logits, model(idx).logits, rtol=0, atol=1e-5)
    # cached decoding through Hugging Face's generate, well past the window, agrees with ours (decode == forward)
    assert torch.equal(hf_greedy(hf, idx[:, :5], 12), model.generate(idx[:, :5], 12, temperature=0))
    with pytest.raises(LunarisError, match="no attention_window"):
        export_checkpoint(run, tmp_path / "hf2", fmt="llama")
