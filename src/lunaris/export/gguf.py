"""`lunaris export --format gguf` (and `--gguf`): a dense checkpoint as one GGUF file, the format llama.cpp (and
Ollama and LM Studio, built on it) runs.

The weights are the Hugging Face export's (llama.py: fused projections split, norm biases folded, IRL alpha folded),
renamed to llama.cpp's tensor names by the table of the `gguf` package that the llama.cpp project maintains, and
written the way its convert_hf_to_gguf.py writes Llama and Qwen3:
- architecture `llama`, or `qwen3` with qk_norm. llama.cpp's Llama rotates interleaved pairs of each head where
  Hugging Face (and Lunaris) rotate halves, so the rows of q and k are permuted per head (the converter's
  `permute`); Qwen3 rotates halves in llama.cpp too and needs nothing;
- 2-D weights in the requested type (fp32, fp16, bf16, or q8_0 quantized in numpy by `gguf.quants`), norms and
  biases in fp32 as llama.cpp expects; a matrix whose rows q8_0 cannot split into blocks of 32 is fp16, as in the
  converter;
- the byte-level BPE tokenizer: tokens (padded to the model's rounded vocabulary with unused `[PAD<id>]` entries),
  merges, token types and the name of the pre-tokenizer llama.cpp splits text with; <|endoftext|> is the eos, bos
  and padding token, and llama.cpp adds no BOS (Lunaris adds none); the `chat_template` of a tokenizer_config.json
  beside the tokenizer.json is copied.
"""

import json
import os
from pathlib import Path

from lunaris.data.chat_template import template_text
from lunaris.data.tokenizer import end_of_text_id, find_tokenizer, load_tokenizer
from lunaris.errors import LunarisError
from lunaris.export.llama import llama_compatible, llama_state_dict, qwen3_compatible, qwen3_state_dict
from lunaris.fileio import fsync_dir, temp_path
from lunaris.model import model_from_checkpoint
from lunaris.runtime import END_OF_TEXT

GGUF_TYPES = ("fp32", "fp16", "bf16", "q8_0")
GGUF_FILE = "model.gguf"  # the name `--gguf` writes into a Hugging Face export directory

# Split regexes of tokenizer.json pre-tokenizers -> (llama.cpp's pre-tokenizer name, the BPE `ignore_merges` it
# implies). llama.cpp implements each name by hand (llama-vocab.cpp); tests/test_gguf.py checks every entry against
# llama.cpp itself. The GPT-2 pattern of `ByteLevel(use_regex=True)`, which `lunaris prepare` trains, is "gpt-2".
_WORDS = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|"
_REST = r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
SPLIT_PRE_TOKENIZERS = {
    _WORDS + r"\p{N}{1,3}" + _REST: ("llama-bpe", True),   # Llama 3: numbers in groups of up to three digits
    _WORDS + r"\p{N}" + _REST: ("qwen2", False),           # Qwen2 and Qwen3: one digit per piece
}


def gguf_package():
    """The `gguf` package (the [gguf] extra), or a clear error."""
    try:
        import gguf
    except ImportError:
        raise LunarisError("GGUF export needs the `gguf` package, which the llama.cpp project maintains: "
                           "pip install \"lunaris[gguf]\" (or pip install gguf).") from None
    return gguf


def check_gguf(config, gguf_type: str, option: str = "--dtype") -> str:
    """Everything a GGUF export needs before it writes: the package, a known type and a model llama.cpp runs;
    returns the llama.cpp architecture."""
    gguf_package()
    if gguf_type not in GGUF_TYPES:
        raise LunarisError(f"{option} for a GGUF file must be one of {', '.join(GGUF_TYPES)}, got {gguf_type!r}.")
    return gguf_architecture(config)


def gguf_architecture(config) -> str:
    """`llama` or `qwen3`: the llama.cpp architecture that computes exactly what this model computes."""
    if llama_compatible(config):
        return "llama"
    if qwen3_compatible(config):
        return "qwen3"
    blockers = [text for present, text in (
        (config.is_moc, f"n_experts: {config.n_experts} (MoC layers)"),
        (config.n_reasoning_steps > 1, f"n_reasoning_steps: {config.n_reasoning_steps} (IRL steps)"),
        (config.logit_softcap is not None, f"logit_softcap: {config.logit_softcap}"),
        (config.attention_mask != "causal", f"attention_mask: {config.attention_mask}"),
        (config.mlp != "swiglu", f"mlp: {config.mlp} (an MLP without a gate)"),
        (bool(config.value_embeddings), f"value_embeddings: {config.value_embeddings}"),
        (config.residual_scalars, "residual_scalars: true"),
        (config.windowed, f"attention_window: {config.attention_window} (sliding-window attention)"),
        (config.qk_norm and config.norm_bias, "qk_norm with norm_bias: true (Qwen3 has no MLP bias to fold the "
                                              "norm biases into)"),
    ) if present]
    raise LunarisError(f"GGUF holds models that llama.cpp runs as Llama or Qwen3, and this model has "
                       f"{', '.join(blockers)}, which neither has, so llama.cpp (and Ollama, LM Studio) cannot run "
                       f"it. Export it for Hugging Face instead: lunaris export --format lunaris (its own modeling "
                       f"code, loaded with trust_remote_code=True), without --format gguf or --gguf.")


def export_gguf(checkpoint, out, tokenizer=None, dtype: str = "fp32", force: bool = False) -> dict:
    """`lunaris export --format gguf`: the checkpoint (file or run directory) as the GGUF file `out`."""
    out = Path(out)
    if out.suffix != ".gguf":
        raise LunarisError(f"--format gguf writes one file: give --out a file name ending in .gguf (for example "
                           f"--out {out.with_suffix('.gguf')}), got {out}.")
    if out.is_dir() or (out.exists() and not force):
        raise LunarisError(f"{out} already exists; choose another --out, or pass --force to replace it.")
    model = model_from_checkpoint(checkpoint)
    check_gguf(model.config, dtype)
    tokenizer_path = find_tokenizer(checkpoint, tokenizer)
    out.parent.mkdir(parents=True, exist_ok=True)
    checkpoint = Path(checkpoint)
    name = (checkpoint if checkpoint.is_dir() else checkpoint.parent).resolve().name
    architecture = write_gguf(model, tokenizer_path, out, dtype, name=name)
    return {"format": "gguf", "architecture": architecture, "out_dir": str(out.parent), "files": [out.name],
            "parameters": model.num_params(), "dtype": dtype, "tokenizer": str(tokenizer_path)}


def write_gguf(model, tokenizer_path, path, gguf_type: str, name: str = "lunaris") -> str:
    """Write `model` and its tokenizer as the GGUF file `path` (atomically), named `name` (general.name, which
    llama.cpp and Ollama show); returns the architecture."""
    gguf = gguf_package()
    architecture = check_gguf(model.config, gguf_type)
    writer = gguf.GGUFWriter(None, architecture)
    writer.add_type(gguf.GGUFType.MODEL)
    writer.add_name(name)
    add_hyperparameters(writer, model.config, gguf_type)
    add_tokenizer(writer, Path(tokenizer_path), model.config.vocab_size)
    for tensor_name, array in gguf_tensors(model, architecture).items():
        data, qtype = encode(array, gguf_type)
        writer.add_tensor(tensor_name, data, raw_dtype=qtype)
    path = Path(path)
    temp = temp_path(path)
    try:
        writer.write_header_to_file(temp)
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        with open(temp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(temp, path)
    except BaseException:
        writer.close()
        temp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)
    return architecture


def add_hyperparameters(writer, config, gguf_type: str) -> None:
    """The `{arch}.*` keys llama.cpp builds the model from, and the file type."""
    gguf = gguf_package()
    file_types = {"fp32": gguf.LlamaFileType.ALL_F32, "fp16": gguf.LlamaFileType.MOSTLY_F16,
                  "bf16": gguf.LlamaFileType.MOSTLY_BF16, "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}
    writer.add_vocab_size(config.vocab_size)
    writer.add_context_length(config.max_seq_len)
    writer.add_embedding_length(config.d_model)
    writer.add_feed_forward_length(config.ffn_hidden)
    writer.add_block_count(config.n_layers)
    writer.add_head_count(config.n_heads)
    writer.add_head_count_kv(config.kv_heads)
    writer.add_key_length(config.head_dim)
    writer.add_value_length(config.head_dim)
    writer.add_rope_dimension_count(config.head_dim)  # rotary over the whole head
    writer.add_rope_freq_base(config.rope_theta)
    writer.add_layer_norm_rms_eps(config.norm_eps)
    writer.add_file_type(file_types[gguf_type])
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)


def gguf_tensors(model, architecture: str) -> dict:
    """llama.cpp's tensor names -> fp32 numpy arrays, in PyTorch's (out, in) layout (the writer reverses it)."""
    gguf = gguf_package()
    c = model.config
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA if architecture == "llama" else gguf.MODEL_ARCH.QWEN3,
                                     c.n_layers)
    hf_tensors = llama_state_dict(model) if architecture == "llama" else qwen3_state_dict(model)
    out = {}
    for hf_name, tensor in hf_tensors.items():
        tensor = tensor.detach().float().cpu()
        if architecture == "llama" and (".q_proj." in hf_name or ".k_proj." in hf_name):
            tensor = interleave_rotary_pairs(tensor, c.n_heads if ".q_proj." in hf_name else c.kv_heads)
        out[names.get_name(hf_name, try_suffixes=(".weight", ".bias"))] = tensor.numpy()
    return out


def interleave_rotary_pairs(rows, n_heads: int):
    """Rows of q or k (weight (H*hd, D) or bias (H*hd,)) from rotate-half order [x_0..x_{hd/2-1}, y_0..] per head
    to llama.cpp Llama's interleaved pairs [x_0, y_0, x_1, y_1, ...]; convert_hf_to_gguf.py's `permute`."""
    shape = rows.shape
    return rows.reshape(n_heads, 2, shape[0] // n_heads // 2, *shape[1:]).transpose(1, 2).reshape(shape)


def encode(array, gguf_type: str):
    """(data, GGML type) of one tensor: 1-D tensors (norms, biases) in fp32; matrices in `gguf_type`, fp16 when
    q8_0 cannot block their rows."""
    gguf = gguf_package()
    types = {"fp32": gguf.GGMLQuantizationType.F32, "fp16": gguf.GGMLQuantizationType.F16,
             "bf16": gguf.GGMLQuantizationType.BF16, "q8_0": gguf.GGMLQuantizationType.Q8_0}
    qtype = types[gguf_type] if array.ndim >= 2 else gguf.GGMLQuantizationType.F32
    try:
        return gguf.quants.quantize(array, qtype), qtype
    except gguf.QuantError:
        return gguf.quants.quantize(array, gguf.GGMLQuantizationType.F16), gguf.GGMLQuantizationType.F16


# ---- the tokenizer -------------------------------------------------------------------------------------------

def add_tokenizer(writer, tokenizer_path: Path, vocab_size: int) -> None:
    """tokenizer.ggml.* keys: llama.cpp's `gpt2` (byte-level BPE) tokenizer, exactly as tokenizer.json encodes."""
    eos = end_of_text_id(load_tokenizer(tokenizer_path, vocab_size))  # also checks the ids fit the model
    if eos is None:
        raise LunarisError(f"{tokenizer_path} has no {END_OF_TEXT} token. Lunaris ends documents and generation with "
                           f"it, and a GGUF file without an end-of-text id makes llama.cpp stop at token 11 instead. "
                           f"GGUF export needs a tokenizer with {END_OF_TEXT} (the one `lunaris prepare "
                           f"--vocab-size` trains has it); export this model for Hugging Face instead.")
    data = json.loads(tokenizer_path.read_text(encoding="utf-8"))
    tokens, types = token_list(data, vocab_size)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre_tokenizer_name(data, tokenizer_path))
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    # tokenizers writes merges as "a b" (before 0.20) or ["a", "b"]; GGUF holds "a b"
    writer.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in data["model"]["merges"]])
    writer.add_eos_token_id(eos)
    writer.add_bos_token_id(eos)  # pre-training has no BOS or padding token: <|endoftext|> stands for both
    writer.add_pad_token_id(eos)
    writer.add_add_bos_token(False)
    writer.add_add_eos_token(False)
    template = chat_template(tokenizer_path)
    if template is not None:
        writer.add_chat_template(template)


def token_list(data: dict, vocab_size: int) -> tuple:
    """(tokens, token types) for ids 0..vocab_size-1: the BPE vocabulary and added tokens (special ones are
    CONTROL), ids no token has (the model's vocabulary is rounded up) as UNUSED `[PAD<id>]`."""
    gguf = gguf_package()
    by_id = {i: (token, gguf.TokenType.NORMAL) for token, i in data["model"]["vocab"].items()}
    for added in data.get("added_tokens", []):
        kind = gguf.TokenType.CONTROL if added.get("special") else gguf.TokenType.USER_DEFINED
        by_id[added["id"]] = (added["content"], kind)
    entries = [by_id.get(i, (f"[PAD{i}]", gguf.TokenType.UNUSED)) for i in range(vocab_size)]
    return [token for token, _ in entries], [int(kind) for _, kind in entries]


def pre_tokenizer_name(data: dict, path) -> str:
    """The llama.cpp pre-tokenizer that splits text exactly as this tokenizer.json's pre-tokenizer does."""
    model, pre = data.get("model") or {}, data.get("pre_tokenizer") or {}
    byte_level = model.get("type") == "BPE" and data.get("normalizer") is None and not model.get("byte_fallback") \
        and (data.get("decoder") or {}).get("type") == "ByteLevel"
    ignore_merges = bool(model.get("ignore_merges"))
    if byte_level and _is_byte_level(pre, use_regex=True) and not ignore_merges:
        return "gpt-2"
    steps = pre.get("pretokenizers") or []
    if byte_level and pre.get("type") == "Sequence" and len(steps) == 2 and _is_byte_level(steps[1], use_regex=False):
        split = steps[0]
        known = SPLIT_PRE_TOKENIZERS.get((split.get("pattern") or {}).get("Regex"))
        if (split.get("type") == "Split" and split.get("behavior") == "Isolated" and not split.get("invert")
                and known is not None and known[1] == ignore_merges):
            return known[0]
    raise LunarisError(f"GGUF export needs a byte-level BPE tokenizer that llama.cpp splits text exactly like: the "
                       f"GPT-2 pre-tokenizer `lunaris prepare` trains, or the Llama 3 or Qwen2 one, without a "
                       f"normalizer; {path} has pre-tokenizer {json.dumps(pre)[:300]} and normalizer "
                       f"{json.dumps(data.get('normalizer'))[:100]}. llama.cpp would tokenize text differently "
                       f"from training, so export it for Hugging Face instead (lunaris export without --format "
                       f"gguf or --gguf).")


def _is_byte_level(step: dict, use_regex: bool) -> bool:
    return (step.get("type") == "ByteLevel" and not step.get("add_prefix_space")
            and step.get("use_regex", True) == use_regex)


def chat_template(tokenizer_path: Path):
    """`chat_template` of the tokenizer_config.json beside tokenizer.json (a string or a list of named
    templates), or None: read as every command reads it (lunaris.data.chat_template)."""
    return template_text(tokenizer_path)
