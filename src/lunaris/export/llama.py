"""Dense models as Hugging Face `LlamaForCausalLM`: the weight mapping and config.json.

A dense Lunaris model with one IRL step is a Llama model up to three re-arrangements:
- the fused QKV projection holds rows [q; k; v] and the fused gate/up projection rows [gate; up]: split them;
- rotary embeddings use the rotate-half layout, which is Hugging Face Llama's, so q/k need no permutation;
- the block norms have a bias: norm(x) = w * n(x) + b, so W @ norm(x) = W @ (w * n(x)) + W @ b. The bias
  folds into the projections that read the norm (q, k, v, gate, up get bias W @ b; Llama's
  `attention_bias`/`mlp_bias` also give o_proj and down_proj a bias, exported as zeros).
An IRL scale alpha != 1 (possible with one step when irl_alpha is set) folds into down_proj.

With qk_norm the same model is Hugging Face `Qwen3ForCausalLM` (q_norm/k_norm per head over head_dim, before
rotary), as long as no bias has to be folded: Qwen3 has `attention_bias` but no `mlp_bias`, so a model with
norm_bias exports with its own code. zero_init_out changes only the initialization, and an untied LM head
(tie_embeddings: false) is Llama's and Qwen3's own `tie_word_embeddings: false`. logit_softcap, attention_mask:
document, sliding windows (attention_window), mlp: relu2 (both classes' MLPs are gated), value_embeddings and
residual_scalars have no equivalent in either class: such models export with their own code.
"""

from importlib import metadata

import torch

from lunaris.config import LunarisCodexConfig


def _plain_dense(config: LunarisCodexConfig) -> bool:
    """Dense, one IRL step, raw logits, causal attention over the whole context, a SwiGLU MLP, no value embeddings
    or residual scalars: a Llama-family decoder."""
    return (not config.is_moc and config.n_reasoning_steps == 1 and config.logit_softcap is None
            and config.attention_mask == "causal" and not config.windowed and config.mlp == "swiglu"
            and not config.value_embeddings and not config.residual_scalars)


def llama_compatible(config: LunarisCodexConfig) -> bool:
    return _plain_dense(config) and not config.qk_norm


def qwen3_compatible(config: LunarisCodexConfig) -> bool:
    """Exactly Qwen3ForCausalLM: a plain dense model with qk_norm and no norm biases (Qwen3 has no mlp_bias)."""
    return _plain_dense(config) and config.qk_norm and not config.norm_bias


def qwen3_available() -> bool:
    """Whether the installed transformers has Qwen3 (4.51 and later); True when transformers is not installed
    (the export needs none; its reader needs a recent one)."""
    try:
        version = metadata.version("transformers")
    except metadata.PackageNotFoundError:
        return True
    try:
        major, minor = (int(part) for part in version.split(".")[:2])
    except ValueError:
        return True
    return (major, minor) >= (4, 51)


def llama_config(config: LunarisCodexConfig, bos_token_id, eos_token_id, dtype_name: str) -> dict:
    """config.json of the equivalent LlamaForCausalLM (readable by transformers 4.x and 5.x)."""
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": config.vocab_size,
        "hidden_size": config.d_model,
        "intermediate_size": config.ffn_hidden,
        "num_hidden_layers": config.n_layers,
        "num_attention_heads": config.n_heads,
        "num_key_value_heads": config.kv_heads,
        "head_dim": config.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": config.max_seq_len,
        "initializer_range": 0.02,
        "rms_norm_eps": config.norm_eps,
        "rope_theta": config.rope_theta,  # transformers 4.x reads this; 5.x reads rope_parameters
        "rope_parameters": {"rope_type": "default", "rope_theta": config.rope_theta},
        "attention_bias": config.norm_bias,
        "attention_dropout": 0.0,
        "mlp_bias": config.norm_bias,
        "tie_word_embeddings": config.tie_embeddings,
        "bos_token_id": bos_token_id,
        "eos_token_id": eos_token_id,
        "use_cache": True,
        "torch_dtype": dtype_name,  # transformers 4.x name
        "dtype": dtype_name,        # transformers 5.x name
    }


def qwen3_config(config: LunarisCodexConfig, bos_token_id, eos_token_id, dtype_name: str) -> dict:
    """config.json of the equivalent Qwen3ForCausalLM (transformers >= 4.51): Llama's fields, no mlp_bias, and
    full attention in every layer."""
    out = llama_config(config, bos_token_id, eos_token_id, dtype_name)
    del out["mlp_bias"]
    out.update({"architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3", "attention_bias": False,
                "use_sliding_window": False, "sliding_window": None, "max_window_layers": config.n_layers,
                "layer_types": ["full_attention"] * config.n_layers})
    return out


def qwen3_state_dict(model) -> dict:
    """Llama's mapping plus each layer's q_norm/k_norm weights (head_dim each)."""
    out = llama_state_dict(model)
    for i, block in enumerate(model.blocks):
        out[f"model.layers.{i}.self_attn.q_norm.weight"] = block.attn.q_norm.weight
        out[f"model.layers.{i}.self_attn.k_norm.weight"] = block.attn.k_norm.weight
    return out


def llama_state_dict(model) -> dict:
    """Our state dict -> LlamaForCausalLM's names and layout (fp32 arithmetic for the bias folding)."""
    c = model.config
    q_rows, kv_rows = c.n_heads * c.head_dim, c.kv_heads * c.head_dim
    out = {"model.embed_tokens.weight": model.wte.weight, "model.norm.weight": model.norm.weight}
    if not c.tie_embeddings:
        out["lm_head.weight"] = model.lm_head.weight
    for i, block in enumerate(model.blocks):
        prefix = f"model.layers.{i}."
        qkv = block.attn.qkv.weight                                   # (q_rows + 2 kv_rows, D)
        gate_up = block.ffn.ffn.gate_up.weight                        # (2H, D)
        down = block.ffn.ffn.down.weight * block.ffn.alpha            # (D, H)
        weights = {
            "self_attn.q_proj": qkv[:q_rows], "self_attn.k_proj": qkv[q_rows:q_rows + kv_rows],
            "self_attn.v_proj": qkv[q_rows + kv_rows:], "self_attn.o_proj": block.attn.proj.weight,
            "mlp.gate_proj": gate_up[:c.ffn_hidden], "mlp.up_proj": gate_up[c.ffn_hidden:], "mlp.down_proj": down,
        }
        for name, weight in weights.items():
            out[f"{prefix}{name}.weight"] = weight
        out[f"{prefix}input_layernorm.weight"] = block.attn_norm.weight
        out[f"{prefix}post_attention_layernorm.weight"] = block.ffn_norm.weight
        if c.norm_bias:
            out.update(_folded_biases(prefix, weights, block.attn_norm.bias, block.ffn_norm.bias))
    return out


def _folded_biases(prefix: str, weights: dict, attn_norm_bias, ffn_norm_bias) -> dict:
    """Bias W @ b for every projection that reads a biased norm; zeros for o_proj and down_proj."""
    biases = {}
    for name, weight in weights.items():
        if name in ("self_attn.o_proj", "mlp.down_proj"):
            bias = torch.zeros(weight.shape[0], dtype=weight.dtype)
        else:
            norm_bias = attn_norm_bias if name.startswith("self_attn") else ffn_norm_bias
            bias = (weight.double() @ norm_bias.double()).to(weight.dtype)
        biases[f"{prefix}{name}.bias"] = bias
    return biases
