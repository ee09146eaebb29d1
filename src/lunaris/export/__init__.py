"""`lunaris export`: a checkpoint -> a Hugging Face model directory.

Four formats:
- `llama`: a dense model with one IRL step is exactly `LlamaForCausalLM` (see llama.py), so every tool
  that reads Llama reads it, no Lunaris code needed;
- `qwen3`: the same with qk_norm (and no norm biases) is exactly `Qwen3ForCausalLM`;
- `lunaris`: any model (MoC, IRL > 1, logit_softcap, attention_mask: document, attention_window, mlp: relu2,
  value_embeddings, residual_scalars) with its own modeling code in the directory and `auto_map`, loaded with
  `AutoModelForCausalLM.from_pretrained(DIR, trust_remote_code=True)` (see remote_code.py);
- `gguf`: one GGUF file for llama.cpp (Ollama, LM Studio) instead of a directory, for the models `llama` and `qwen3`
  take (see gguf.py); `gguf=TYPE` also writes it into a Hugging Face directory as model.gguf.

The directory is written under a temporary name beside `out` and renamed when complete, so an interrupted
export never leaves a half-written model; `transformers` is not needed to export.
"""

import dataclasses
import json
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file

from lunaris.data.chat_template import END, template_text
from lunaris.data.tokenizer import end_of_text_id, find_tokenizer, load_tokenizer
from lunaris.errors import LunarisError
from lunaris.export.gguf import GGUF_FILE, check_gguf, export_gguf, write_gguf
from lunaris.export.llama import (
    llama_compatible,
    llama_config,
    llama_state_dict,
    qwen3_available,
    qwen3_compatible,
    qwen3_config,
    qwen3_state_dict,
)
from lunaris.export.remote_code import configuration_source, modeling_source
from lunaris.fileio import move_into
from lunaris.model import model_from_checkpoint
from lunaris.runtime import END_OF_TEXT

FORMATS = ("auto", "llama", "qwen3", "lunaris", "gguf")
DTYPE_NAMES = {"fp32": (torch.float32, "float32"), "bf16": (torch.bfloat16, "bfloat16"),
               "fp16": (torch.float16, "float16")}
# every file an export can write: replacing an export removes those the new one does not write
EXPORT_FILES = ("config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
                "tokenizer_config.json", "special_tokens_map.json", "configuration_lunaris.py", "modeling_lunaris.py",
                GGUF_FILE)


def export_checkpoint(checkpoint, out_dir, tokenizer=None, fmt: str = "auto", dtype: str = "fp32",
                      force: bool = False, gguf: str = None) -> dict:
    """Export a checkpoint (file or run directory) to `out_dir`; returns a summary (format, files, parameters).

    fmt "gguf" writes the GGUF file `out_dir` (a name ending in .gguf) instead; `gguf` (fp32, fp16, bf16, q8_0)
    also writes model.gguf into the Hugging Face directory."""
    if fmt not in FORMATS:
        raise LunarisError(f"--format must be one of {', '.join(FORMATS)}, got {fmt!r}.")
    if fmt == "gguf":  # one GGUF file; --gguf is for a GGUF file beside a Hugging Face export
        if gguf is not None:
            raise LunarisError("--gguf adds a GGUF file to a Hugging Face export; with --format gguf, give its type "
                               "with --dtype.")
        return export_gguf(checkpoint, out_dir, tokenizer, dtype, force)
    if dtype not in DTYPE_NAMES:
        raise LunarisError(f"--dtype must be one of {', '.join(DTYPE_NAMES)}, got {dtype!r}.")
    out_dir = Path(out_dir)
    if out_dir.exists() and (not out_dir.is_dir() or (any(out_dir.iterdir()) and not force)):
        raise LunarisError(f"{out_dir} already exists and is not empty; choose another --out, or pass --force to "
                           f"replace the exported files in it.")
    model = model_from_checkpoint(checkpoint)
    config = model.config
    fmt = choose_format(fmt, config)
    if gguf is not None:
        check_gguf(config, gguf, "--gguf")  # a model llama.cpp cannot run fails before anything is written
    tokenizer_path = find_tokenizer(checkpoint, tokenizer)
    loaded = load_tokenizer(tokenizer_path, config.vocab_size)
    eos = end_of_text_id(loaded)
    template = template_text(tokenizer_path)  # a chat model's: its replies end with <|end|>
    reply_end = loaded.token_to_id(END) if template is not None else None
    torch_dtype, dtype_name = DTYPE_NAMES[dtype]
    tensors, hf_config = hf_weights_and_config(model, fmt, eos, dtype_name)

    temp = out_dir.parent / f".{out_dir.name}.partial-{os.getpid()}"
    shutil.rmtree(temp, ignore_errors=True)
    temp.mkdir(parents=True)
    try:
        save_safetensors(tensors, temp / "model.safetensors", torch_dtype)
        write_json(temp / "config.json", hf_config)
        write_json(temp / "generation_config.json", generation_config(eos, reply_end))
        write_tokenizer_files(temp, tokenizer_path, eos, config.max_seq_len, template)
        if gguf is not None:
            write_gguf(model, tokenizer_path, temp / GGUF_FILE, gguf, name=out_dir.name)
        if fmt == "lunaris":
            (temp / "configuration_lunaris.py").write_text(configuration_source(), encoding="utf-8")
            (temp / "modeling_lunaris.py").write_text(modeling_source(), encoding="utf-8")
        files = sorted(p.name for p in temp.iterdir())
        move_into(temp, out_dir, owned=EXPORT_FILES)  # an export in the other format leaves other files
    finally:
        shutil.rmtree(temp, ignore_errors=True)
    return {"format": fmt, "out_dir": str(out_dir), "files": files, "parameters": model.num_params(),
            "dtype": dtype_name, "tokenizer": str(tokenizer_path)}


def choose_format(fmt: str, config) -> str:
    """The format to write: `fmt`, or for auto the first of llama, qwen3, lunaris that the model fits; a format the
    model does not fit is an error naming the one that does."""
    if fmt == "auto":
        return ("llama" if llama_compatible(config) else
                "qwen3" if qwen3_compatible(config) and qwen3_available() else "lunaris")
    if fmt == "llama" and not llama_compatible(config):
        raise LunarisError("--format llama needs a dense model with n_reasoning_steps 1, no qk_norm, no "
                           "logit_softcap, attention_mask: causal, no attention_window, mlp: swiglu and no "
                           "value_embeddings or residual_scalars (Llama has no MoC layers, IRL steps, query/key norms, "
                           "logit cap, document mask, sliding window, relu² MLP, value embeddings or residual "
                           f"scalars); use --format {'qwen3' if qwen3_compatible(config) else 'lunaris'} for this "
                           "model.")
    if fmt == "qwen3" and not qwen3_compatible(config):
        raise LunarisError("--format qwen3 needs a dense model with n_reasoning_steps 1, qk_norm, norm_bias false, "
                           "no logit_softcap, attention_mask: causal, no attention_window, mlp: swiglu and no "
                           "value_embeddings or residual_scalars (Qwen3 has no MoC layers, IRL steps, MLP biases, "
                           "logit cap, document mask, per-layer sliding window, relu² MLP, value embeddings or "
                           f"residual scalars); use --format {'llama' if llama_compatible(config) else 'lunaris'} "
                           "for this model.")
    return fmt


def hf_weights_and_config(model, fmt: str, eos, dtype_name: str) -> tuple:
    """(tensors of model.safetensors, config.json) of the model in format `fmt`."""
    config = model.config
    if fmt == "llama":
        return llama_state_dict(model), llama_config(config, eos, eos, dtype_name)
    if fmt == "qwen3":
        return qwen3_state_dict(model), qwen3_config(config, eos, eos, dtype_name)
    tensors = {f"model.{key}": value for key, value in model.state_dict().items()}
    if config.tie_embeddings:  # one tensor in the file; the model ties lm_head to wte itself
        del tensors["model.lm_head.weight"]
    return tensors, lunaris_config(config, eos, dtype_name)


def lunaris_config(config, eos, dtype_name: str) -> dict:
    """config.json of the remote-code format: the whole Lunaris config under `lunaris`, plus auto_map."""
    return {
        "architectures": ["LunarisForCausalLM"],
        "model_type": "lunaris",
        "auto_map": {"AutoConfig": "configuration_lunaris.LunarisConfig",
                     "AutoModelForCausalLM": "modeling_lunaris.LunarisForCausalLM"},
        "lunaris": dataclasses.asdict(config),
        "bos_token_id": eos,
        "eos_token_id": eos,
        "tie_word_embeddings": config.tie_embeddings,
        # attention_mask: document masks documents in a forward without a cache, as Lunaris's forward does; a
        # plain call then gives Lunaris's logits (generate still passes use_cache=True and decodes with a cache)
        "use_cache": config.attention_mask != "document",
        "torch_dtype": dtype_name,
        "dtype": dtype_name,
    }


def generation_config(eos, reply_end=None) -> dict:
    """generate()'s defaults: stop at end-of-text, and for a chat model also at the end of a reply (<|end|>)."""
    # pad = eos: pre-training has no padding token, and generate() warns when pad is unset
    stop = eos if reply_end is None else [eos, reply_end]
    return {"bos_token_id": eos, "eos_token_id": stop, "pad_token_id": eos}


def save_safetensors(tensors: dict, path: Path, dtype: torch.dtype) -> None:
    ready = {name: (t.detach().to(dtype) if t.is_floating_point() else t.detach()).contiguous().clone()
             for name, t in tensors.items()}
    save_file(ready, str(path), metadata={"format": "pt"})
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)  # safetensors creates the file private (0600); make it like every other file


def write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def write_tokenizer_files(directory: Path, tokenizer_path: Path, eos, max_seq_len: int, chat_template=None) -> None:
    """tokenizer.json (as trained), tokenizer_config.json and special_tokens_map.json for AutoTokenizer; a chat
    model's template (the Jinja text beside its tokenizer, the one its data was rendered with) goes into
    tokenizer_config.json, where `apply_chat_template` and llama.cpp's converter read it."""
    shutil.copyfile(tokenizer_path, directory / "tokenizer.json")
    special = {"bos_token": END_OF_TEXT, "eos_token": END_OF_TEXT, "unk_token": END_OF_TEXT} if eos is not None else {}
    write_json(directory / "special_tokens_map.json", special)
    write_json(directory / "tokenizer_config.json", {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "model_max_length": max_seq_len,
        "clean_up_tokenization_spaces": False,  # decode exactly as the `tokenizers` library does
        **special,
        **({"chat_template": chat_template} if chat_template is not None else {}),
    })
