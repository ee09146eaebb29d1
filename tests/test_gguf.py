"""`lunaris export --format gguf` / `--gguf`: GGUF files for llama.cpp.

Two layers of checks:
- everywhere (the `gguf` package, in the dev extra): the file read back with gguf's GGUFReader holds the right
  metadata, tokenizer and tensors, and a numpy forward pass over its tensors with llama.cpp's semantics (its Llama
  rotates interleaved pairs, its Qwen3 rotates halves) gives the model's logits;
- with llama.cpp itself (marked `llamacpp`; skipped unless `llama_cpp`, llama-cpp-python, is installed; see the
  README's "Run it locally" for the command): a small model trained here on Python source and unicode text
  tokenizes, scores and greedily generates in llama.cpp exactly as in Lunaris.
"""

import dataclasses
import json
import re
import shlex
import sys
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import byte_level_tokenizer, tiny_model_config

from lunaris import LunarisCodex, LunarisError, TrainConfig
from lunaris.cli import main
from lunaris.export import export_checkpoint
from lunaris.export.gguf import SPLIT_PRE_TOKENIZERS

gguf = pytest.importorskip("gguf")  # the [gguf] extra; installed with [dev]

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()
EOS = "<|endoftext|>"


def trained_looking_model(**overrides) -> LunarisCodex:
    """A tiny random model with norm weights/biases far from their init and context-dependent attention."""
    model = LunarisCodex(tiny_model_config(vocab_size=320, **overrides))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:
                param.add_(torch.randn_like(param) * 0.5)
        for block in model.blocks:
            block.attn.qkv.weight.mul_(4.0)
    return model.eval()


def save_run(run_dir, model, tokenizer=None):
    run_dir.mkdir(parents=True)
    state = {"model": model.state_dict(), "config": dataclasses.asdict(TrainConfig(model=model.config)), "step": 3}
    torch.save(state, run_dir / "latest_checkpoint.pt")
    (tokenizer or byte_level_tokenizer()).save(str(run_dir / "tokenizer.json"))
    return run_dir


def read_gguf(path) -> tuple:
    """(metadata {key: value}, tensors {name: (fp32 array in PyTorch layout, GGML type name)})."""
    reader = gguf.GGUFReader(str(path))
    fields = {key: field.contents() for key, field in reader.fields.items()}
    tensors = {t.name: (np.asarray(gguf.quants.dequantize(t.data, t.tensor_type), dtype=np.float32),
                        t.tensor_type.name) for t in reader.tensors}
    return fields, tensors


# ---- a numpy forward pass with llama.cpp's semantics ------------------------------------------------------------

def rms_norm(x, weight, eps):
    return x / np.sqrt((x * x).mean(-1, keepdims=True) + eps) * weight


def rope(x, base: float, interleaved: bool):
    """x (T, H, hd) at positions 0..T-1: llama.cpp's NORM mode (Llama) rotates pairs (x[2i], x[2i+1]), its NEOX
    mode (Qwen3) pairs (x[i], x[i + hd/2])."""
    t, _, hd = x.shape
    angles = np.arange(t)[:, None] * base ** (-np.arange(0, hd, 2) / hd)[None]         # (T, hd/2)
    cos, sin = np.cos(angles)[:, None], np.sin(angles)[:, None]                          # (T, 1, hd/2)
    a, b = (x[..., 0::2], x[..., 1::2]) if interleaved else (x[..., :hd // 2], x[..., hd // 2:])
    ra, rb = a * cos - b * sin, a * sin + b * cos
    return np.stack([ra, rb], -1).reshape(x.shape) if interleaved else np.concatenate([ra, rb], -1)


def gguf_logits(fields, tensors, ids) -> np.ndarray:
    """(T, V) logits of token ids, computed from the GGUF file alone as llama.cpp's llama/qwen3 graphs do."""
    arch = fields["general.architecture"]
    meta = {key.split(".", 1)[1]: value for key, value in fields.items() if key.startswith(arch + ".")}
    w = {name: array.astype(np.float64) for name, (array, _) in tensors.items()}
    get = w.get
    eps, n_heads, n_kv = meta["attention.layer_norm_rms_epsilon"], meta["attention.head_count"], \
        meta["attention.head_count_kv"]
    x = w["token_embd.weight"][ids]                                                      # (T, D)
    t = len(ids)
    causal = np.triu(np.full((t, t), -np.inf), 1)
    for i in range(meta["block_count"]):
        p = f"blk.{i}."
        h = rms_norm(x, w[p + "attn_norm.weight"], eps)
        q, k, v = (h @ w[p + f"attn_{n}.weight"].T + get(p + f"attn_{n}.bias", 0) for n in "qkv")
        q, k, v = q.reshape(t, n_heads, -1), k.reshape(t, n_kv, -1), v.reshape(t, n_kv, -1)
        if p + "attn_q_norm.weight" in w:
            q, k = rms_norm(q, w[p + "attn_q_norm.weight"], eps), rms_norm(k, w[p + "attn_k_norm.weight"], eps)
        q, k = (rope(z, meta["rope.freq_base"], interleaved=arch == "llama") for z in (q, k))
        k, v = np.repeat(k, n_heads // n_kv, axis=1), np.repeat(v, n_heads // n_kv, axis=1)
        scores = np.einsum("qhd,khd->hqk", q, k) / np.sqrt(q.shape[-1]) + causal
        attn = np.exp(scores - scores.max(-1, keepdims=True))
        out = np.einsum("hqk,khd->qhd", attn / attn.sum(-1, keepdims=True), v).reshape(t, -1)
        x = x + out @ w[p + "attn_output.weight"].T + get(p + "attn_output.bias", 0)
        h = rms_norm(x, w[p + "ffn_norm.weight"], eps)
        gate = h @ w[p + "ffn_gate.weight"].T + get(p + "ffn_gate.bias", 0)
        up = h @ w[p + "ffn_up.weight"].T + get(p + "ffn_up.bias", 0)
        x = x + (gate / (1 + np.exp(-gate)) * up) @ w[p + "ffn_down.weight"].T + get(p + "ffn_down.bias", 0)
    return rms_norm(x, w["output_norm.weight"], eps) @ w.get("output.weight", w["token_embd.weight"]).T


# ---- the file: metadata, tensors, tokenizer --------------------------------------------------------------------

@pytest.mark.parametrize("overrides, arch", [
    (dict(norm_bias=True, n_heads=4, n_kv_heads=2, rope_theta=500.0), "llama"),
    (dict(norm_bias=False, tie_embeddings=False, n_kv_heads=1, irl_alpha=0.7), "llama"),
    (dict(qk_norm=True, norm_bias=False, n_heads=4, n_kv_heads=2, rope_theta=500.0), "qwen3"),
], ids=["llama-norm-bias-gqa-tied", "llama-mqa-untied-alpha", "qwen3-gqa-tied"])
def test_the_gguf_file_holds_the_model_and_computes_its_logits(tmp_path, overrides, arch):
    model = trained_looking_model(**overrides)
    c = model.config
    summary = export_checkpoint(save_run(tmp_path / "run", model), tmp_path / "model.gguf", fmt="gguf")
    assert summary["format"] == "gguf" and summary["architecture"] == arch and summary["files"] == ["model.gguf"]
    fields, tensors = read_gguf(tmp_path / "model.gguf")

    expected = {"general.architecture": arch, "general.name": "run", "general.file_type": 0,
                f"{arch}.context_length": c.max_seq_len, f"{arch}.embedding_length": c.d_model,
                f"{arch}.feed_forward_length": c.ffn_hidden, f"{arch}.block_count": c.n_layers,
                f"{arch}.attention.head_count": c.n_heads, f"{arch}.attention.head_count_kv": c.kv_heads,
                f"{arch}.attention.key_length": c.head_dim, f"{arch}.rope.dimension_count": c.head_dim,
                f"{arch}.rope.freq_base": c.rope_theta}
    assert {key: fields[key] for key in expected} == expected
    assert fields[f"{arch}.attention.layer_norm_rms_epsilon"] == pytest.approx(c.norm_eps)

    layer = {"attn_norm", "attn_q", "attn_k", "attn_v", "attn_output", "ffn_norm", "ffn_gate", "ffn_up", "ffn_down"}
    names = {"token_embd.weight", "output_norm.weight"} | {f"blk.{i}.{n}.weight" for i in range(c.n_layers)
                                                           for n in layer}
    names |= set() if c.tie_embeddings else {"output.weight"}
    names |= {f"blk.{i}.{n}.bias" for i in range(c.n_layers) for n in layer - {"attn_norm", "ffn_norm"}} \
        if c.norm_bias else set()
    names |= {f"blk.{i}.attn_{n}_norm.weight" for i in range(c.n_layers) for n in "qk"} if c.qk_norm else set()
    assert set(tensors) == names
    assert all(kind == "F32" for _, kind in tensors.values())
    assert tensors["token_embd.weight"][0].shape == (c.vocab_size, c.d_model)
    assert tensors["blk.0.attn_k.weight"][0].shape == (c.kv_heads * c.head_dim, c.d_model)
    assert tensors["blk.0.ffn_down.weight"][0].shape == (c.d_model, c.ffn_hidden)
    np.testing.assert_array_equal(tensors["token_embd.weight"][0], model.wte.weight.detach().numpy())
    np.testing.assert_array_equal(tensors["blk.1.ffn_norm.weight"][0], model.blocks[1].ffn_norm.weight.detach().numpy())
    if arch == "llama":  # q and k rows are permuted per head for llama.cpp's interleaved rotary pairs
        assert not np.array_equal(tensors["blk.0.attn_q.weight"][0],
                                  model.blocks[0].attn.qkv.weight[:c.d_model].detach().numpy())

    ids = torch.randint(0, 320, (24,))
    with torch.no_grad():
        expected_logits = model(ids[None]).logits[0].double().numpy()
    np.testing.assert_allclose(gguf_logits(fields, tensors, ids.numpy()), expected_logits, rtol=0, atol=1e-4)


def test_the_tokenizer_is_byte_level_bpe_with_end_of_text_and_no_bos(tmp_path):
    tokenizer = byte_level_tokenizer()
    run = save_run(tmp_path / "run", trained_looking_model(), tokenizer)
    data = json.loads((run / "tokenizer.json").read_text())
    export_checkpoint(run, tmp_path / "model.gguf", fmt="gguf")
    fields, _ = read_gguf(tmp_path / "model.gguf")
    assert fields["tokenizer.ggml.model"] == "gpt2" and fields["tokenizer.ggml.pre"] == "gpt-2"
    tokens, types = fields["tokenizer.ggml.tokens"], fields["tokenizer.ggml.token_type"]
    assert len(tokens) == len(types) == 320  # the model's rounded vocabulary
    n = tokenizer.get_vocab_size()
    assert tokens[:n] == [tokenizer.id_to_token(i) for i in range(n)]
    assert tokens[n:] == [f"[PAD{i}]" for i in range(n, 320)] and set(types[n:]) == {gguf.TokenType.UNUSED}
    eos = tokenizer.token_to_id(EOS)
    assert types[eos] == gguf.TokenType.CONTROL and set(types[:n]) - {types[eos]} == {gguf.TokenType.NORMAL}
    assert fields["tokenizer.ggml.merges"] == [" ".join(m) for m in data["model"]["merges"]]
    assert fields["tokenizer.ggml.eos_token_id"] == fields["tokenizer.ggml.bos_token_id"] == eos
    assert fields["tokenizer.ggml.padding_token_id"] == eos
    assert fields["tokenizer.ggml.add_bos_token"] is False and fields["tokenizer.ggml.add_eos_token"] is False
    assert "tokenizer.chat_template" not in fields

    template = "{% for m in messages %}<|{{ m.role }}|>{{ m.content }}" + EOS + "{% endfor %}"
    (run / "tokenizer_config.json").write_text(json.dumps({"chat_template": template}))
    export_checkpoint(run, tmp_path / "model.gguf", fmt="gguf", force=True)
    assert read_gguf(tmp_path / "model.gguf")[0]["tokenizer.chat_template"] == template


@pytest.mark.parametrize("dtype, matrix_type, atol", [("fp16", "F16", 2e-3), ("bf16", "BF16", 2e-2),
                                                      ("q8_0", "Q8_0", 2e-2)])
def test_half_precision_and_q8_0_files(tmp_path, dtype, matrix_type, atol):
    model = trained_looking_model(ffn_hidden_size=192)  # q8_0 blocks rows of 32: 64 and 192 both split
    run = save_run(tmp_path / "run", model)
    assert main(["export", "--checkpoint", str(run), "--out", str(tmp_path / "m.gguf"), "--format", "gguf",
                 "--dtype", dtype]) == 0
    fields, tensors = read_gguf(tmp_path / "m.gguf")
    file_types = {"fp16": gguf.LlamaFileType.MOSTLY_F16, "bf16": gguf.LlamaFileType.MOSTLY_BF16,
                  "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}
    assert fields["general.file_type"] == file_types[dtype]
    for name, (array, kind) in tensors.items():
        assert kind == (matrix_type if array.ndim == 2 else "F32"), name  # norms and biases stay fp32
    np.testing.assert_allclose(tensors["token_embd.weight"][0], model.wte.weight.detach().numpy(), rtol=0,
                               atol=atol * model.wte.weight.abs().max().item())
    ids = torch.randint(0, 320, (16,))
    with torch.no_grad():
        expected = model(ids[None]).logits[0].double().numpy()
    error = np.abs(gguf_logits(fields, tensors, ids.numpy()) - expected).max()
    assert 0 < error < 20 * atol * np.abs(expected).max()


def test_q8_0_keeps_matrices_it_cannot_block_in_fp16(tmp_path):
    model = trained_looking_model(ffn_hidden_size=48)  # ffn_down's rows have 48 values: not blocks of 32
    export_checkpoint(save_run(tmp_path / "run", model), tmp_path / "m.gguf", fmt="gguf", dtype="q8_0")
    _, tensors = read_gguf(tmp_path / "m.gguf")
    assert tensors["blk.0.ffn_down.weight"][1] == "F16" and tensors["blk.0.ffn_up.weight"][1] == "Q8_0"


# ---- beside a Hugging Face export, files and errors -------------------------------------------------------------

def test_gguf_beside_a_hugging_face_export_and_replaced_with_it(tmp_path, capsys):
    run = save_run(tmp_path / "run", trained_looking_model())
    out = tmp_path / "hf"
    assert main(["export", "--checkpoint", str(run), "--out", str(out), "--dtype", "fp16", "--gguf", "q8_0"]) == 0
    assert "model.gguf" in capsys.readouterr().out
    assert (out / "model.safetensors").is_file() and (out / "config.json").is_file()
    fields, _ = read_gguf(out / "model.gguf")
    assert fields["general.file_type"] == gguf.LlamaFileType.MOSTLY_Q8_0 and fields["general.name"] == "hf"
    assert main(["export", "--checkpoint", str(run), "--out", str(out), "--force", "--gguf"]) == 0  # --dtype's
    assert read_gguf(out / "model.gguf")[0]["general.file_type"] == gguf.LlamaFileType.ALL_F32
    assert main(["export", "--checkpoint", str(run), "--out", str(out), "--force"]) == 0
    assert not (out / "model.gguf").exists()  # an export without --gguf removes the one before
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_gguf_file_rules_overwriting_and_name(tmp_path, capsys):
    run = save_run(tmp_path / "run", trained_looking_model())
    out = tmp_path / "nested" / "demo.gguf"
    assert main(["export", "--checkpoint", str(run), "--out", str(out), "--format", "gguf"]) == 0
    printed = capsys.readouterr().out
    assert "as gguf" in printed and f"llama-completion -m {out} -no-cnv" in printed
    assert main(["export", "--checkpoint", str(run), "--out", str(out), "--format", "gguf"]) == 2
    assert "already exists" in capsys.readouterr().err
    assert main(["export", "--checkpoint", str(run), "--out", str(out), "--format", "gguf", "--force",
                 "--dtype", "fp16"]) == 0
    assert read_gguf(out)[0]["general.file_type"] == gguf.LlamaFileType.MOSTLY_F16
    assert sorted(p.name for p in out.parent.iterdir()) == ["demo.gguf"]  # no temporary file left
    assert main(["export", "--checkpoint", str(run), "--out", str(tmp_path / "gguf-dir"), "--format", "gguf"]) == 2
    assert "ending in .gguf" in capsys.readouterr().err
    assert main(["export", "--checkpoint", str(run), "--out", str(tmp_path / "hf"), "--dtype", "q8_0"]) == 2
    assert "--dtype must be one of" in capsys.readouterr().err
    assert main(["export", "--checkpoint", str(run), "--out", str(tmp_path / "hf"), "--gguf", "q4"]) == 2
    assert "--gguf for a GGUF file must be one of fp32, fp16, bf16, q8_0" in capsys.readouterr().err
    assert not (tmp_path / "hf").exists()


@pytest.mark.parametrize("overrides, named", [
    (dict(n_experts=4, top_k=2), "n_experts: 4"),
    (dict(n_reasoning_steps=2), "n_reasoning_steps: 2"),
    (dict(logit_softcap=30.0, norm_bias=False), "logit_softcap: 30.0"),
    (dict(attention_mask="document", document_separator_id=0), "attention_mask: document"),
    (dict(qk_norm=True, norm_bias=True), "qk_norm with norm_bias: true"),
], ids=["moc", "irl", "softcap", "document-mask", "qk-norm-bias"])
def test_models_llama_cpp_cannot_run_are_a_clear_error_before_anything_is_written(tmp_path, capsys, overrides,
                                                                                  named):
    run = save_run(tmp_path / "run", trained_looking_model(**overrides))
    assert main(["export", "--checkpoint", str(run), "--out", str(tmp_path / "m.gguf"), "--format", "gguf"]) == 2
    err = capsys.readouterr().err
    assert named in err and "--format lunaris" in err and "trust_remote_code=True" in err and "Traceback" not in err
    assert main(["export", "--checkpoint", str(run), "--out", str(tmp_path / "hf"), "--gguf"]) == 2
    assert named in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]


def test_a_tokenizer_llama_cpp_would_split_differently_is_a_clear_error(tmp_path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.train_from_iterator(["hello world"] * 5, trainers.BpeTrainer(vocab_size=60, special_tokens=[EOS],
                                                                           show_progress=False))
    run = save_run(tmp_path / "run", trained_looking_model(), tokenizer)
    with pytest.raises(LunarisError, match="pre-tokenizer .*Whitespace.* export it for Hugging Face instead"):
        export_checkpoint(run, tmp_path / "m.gguf", fmt="gguf")
    assert not (tmp_path / "m.gguf").exists()


def test_a_tokenizer_without_end_of_text_is_a_clear_error(tmp_path, capsys):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.train_from_iterator(["hello world"] * 5, trainers.BpeTrainer(
        vocab_size=280, special_tokens=["</s>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False))
    run = save_run(tmp_path / "run", trained_looking_model(), tokenizer)
    assert main(["export", "--checkpoint", str(run), "--out", str(tmp_path / "m.gguf"), "--format", "gguf"]) == 2
    assert "has no <|endoftext|> token" in capsys.readouterr().err
    assert main(["export", "--checkpoint", str(run), "--out", str(tmp_path / "m.gguf"), "--format", "gguf",
                 "--gguf", "q8_0"]) == 2
    assert "with --format gguf, give its type with --dtype" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]


def test_without_the_gguf_package_the_error_says_what_to_install(tmp_path, monkeypatch):
    run = save_run(tmp_path / "run", trained_looking_model())
    monkeypatch.setitem(sys.modules, "gguf", None)  # `import gguf` raises ImportError
    with pytest.raises(LunarisError, match=r'pip install "lunaris\[gguf\]"'):
        export_checkpoint(run, tmp_path / "m.gguf", fmt="gguf")
    with pytest.raises(LunarisError, match=r'pip install "lunaris\[gguf\]"'):
        export_checkpoint(run, tmp_path / "hf", gguf="fp16")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]


# ---- the README's "Run it locally" commands ---------------------------------------------------------------------

def readme_gguf_commands() -> list:
    blocks = [body for lang, info, body in re.findall(r"```(\w+)([^\n]*)\n(.*?)```", README, re.S)
              if lang == "bash" and "gguf-example" in info.split()]
    return [shlex.split(line, comments=True) for block in blocks for line in block.replace("\\\n", " ").splitlines()
            if line.strip()]


def test_the_readme_run_it_locally_commands_run(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    save_run(tmp_path / "runs/demo/dense", trained_looking_model(ffn_hidden_size=192))
    commands = readme_gguf_commands()
    assert len(commands) >= 2 and all(c[0] == "lunaris" for c in commands)
    for command in commands:
        assert main(command[1:]) == 0, command
    written = [Path(c[c.index("--out") + 1]) for c in commands]
    for path in written:
        gguf_path = path if path.suffix == ".gguf" else path / "model.gguf"
        assert read_gguf(gguf_path)[0]["general.architecture"] == "llama"


# ---- in llama.cpp itself (pip install llama-cpp-python; see the README's "Run it locally") ---------------------

TEXTS = [
    'def fibonacci(n):\n    """Return the n-th Fibonacci number."""\n    a, b = 0, 1\n    for _ in range(n):\n'
    '        a, b = b, a + b\n    return a\n',
    "class Config:\n\tpass\n\n\n\nx  =  {'key': [1, 2.5, -3e10], \"k2\": None}  # comment\r\nif x:  \n        y = 1",
    "日本語のテキスト、中文文本和한국어 텍스트。全角スペース　と句読点！",
    "emoji 🚀🦙✅ 😶‍🌫️ 👩‍💻 flags 🇫🇷🇯🇵 and skin tones 👋🏽",
    "héllo wörld café naïve Ελληνικά русский текст עברית العربية ﬁ ligature",
    "   leading spaces, trailing   \n\n\n    \t\t  mixed whitespace runs     \n \n  \n",
    "digits 3 33 333 3333 33333 1234567890 3.14159 1,000,000 0x1F 2024-05-17 ٣٤٥",
    "I'm sure you'll see they've done it, isn't it? We'RE 'D 'LL you'd",
    "first document" + EOS + "second document " + EOS,
    "\n",
    "",
]


@contextmanager
def llama_cpp_model(path, **options):
    """The GGUF file loaded by llama.cpp (through llama-cpp-python), freed on exit."""
    llama_cpp = pytest.importorskip("llama_cpp")
    llm = llama_cpp.Llama(str(path), verbose=False, **options)
    try:
        yield llm
    finally:
        llm.close()


def python_functions(n: int) -> str:
    """Small Python functions from a few templates: code a tiny model learns to continue in a few dozen steps."""
    rng = np.random.default_rng(0)
    names, ops = ["x", "n", "value", "count", "total"], [("add", "+"), ("sub", "-"), ("mul", "*"), ("div", "//")]
    out = []
    for i in range(n):
        (word, op), name, k = ops[i % 4], names[int(rng.integers(5))], int(rng.integers(2, 100))
        out.append(f'def {word}_{k}({name}):\n    """Return {name} {op} {k}."""\n    return {name} {op} {k}\n\n\n')
    return "".join(out)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """`lunaris prepare` of Python functions and unicode text (an 800-id tokenizer), and two small dense models
    trained on it: a Llama (norm biases, GQA) and a Qwen3 (qk_norm)."""
    from lunaris.data.prepare import PrepareOptions, prepare
    from lunaris.train.trainer import train

    pytest.importorskip("llama_cpp")
    root = tmp_path_factory.mktemp("gguf-llamacpp")
    (root / "docs").mkdir()
    for i in range(4):
        (root / "docs" / f"functions{i}.txt").write_text(python_functions(150), encoding="utf-8")
    (root / "docs" / "unicode.txt").write_text("\n".join(TEXTS[:8] * 10), encoding="utf-8")
    manifest = prepare(PrepareOptions(sources=[root / "docs"], out=root / "data", vocab_size=800, val_tokens=1000,
                                      shard_tokens=50_000, progress=False))
    runs, threads = {}, torch.get_num_threads()
    torch.set_num_threads(1)  # module fixtures run before the autouse one that sets this for every test
    try:
        for arch, keys in (("llama", dict(norm_bias=True)), ("qwen3", dict(qk_norm=True, norm_bias=False))):
            model = dict(vocab_size=manifest["model_vocab_size"], d_model=64, n_layers=2, n_heads=4, n_kv_heads=2,
                         max_seq_len=128, multiple_of=32, **keys)
            train(TrainConfig.from_dict(dict(
                model=model, data_dir=str(root / "data"), out_dir=str(root / arch), optimizer="muon",
                learning_rate=3e-3, warmup_steps=5, max_steps=80, batch_size=8, save_interval=1000,
                log_interval=20, eval_interval=0, num_workers=0, device="cpu", dtype="fp32", seed=1234)))
            runs[arch] = root / arch
    finally:
        torch.set_num_threads(threads)
    return runs


def lunaris_tokenizer(run):
    from tokenizers import Tokenizer
    return Tokenizer.from_file(str(run / "tokenizer.json"))


@pytest.mark.llamacpp
def test_llama_cpp_tokenizes_text_exactly_as_lunaris(trained, tmp_path):
    run = trained["llama"]
    export_checkpoint(run, tmp_path / "model.gguf", fmt="gguf")
    tokenizer = lunaris_tokenizer(run)
    with llama_cpp_model(tmp_path / "model.gguf", vocab_only=True) as llm:
        for text in TEXTS:
            ids = tokenizer.encode(text, add_special_tokens=False).ids  # as `lunaris generate` encodes a prompt
            assert llm.tokenize(text.encode(), add_bos=False, special=True) == ids, text
            assert llm.detokenize(ids, special=True).decode() == text
        assert llm.token_eos() == tokenizer.token_to_id(EOS)


@pytest.mark.llamacpp
@pytest.mark.parametrize("pattern", list(SPLIT_PRE_TOKENIZERS), ids=[n for n, _ in SPLIT_PRE_TOKENIZERS.values()])
def test_llama_cpp_splits_text_as_the_llama3_and_qwen2_pre_tokenizers_do(trained, tmp_path, pattern):
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

    name, ignore_merges = SPLIT_PRE_TOKENIZERS[pattern]
    tokenizer = Tokenizer(models.BPE(ignore_merges=ignore_merges))
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(pattern), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tokenizer.decoder = decoders.ByteLevel()
    corpus = [p.read_text(encoding="utf-8") for p in sorted((trained["llama"].parent / "docs").iterdir())]
    trainer = trainers.BpeTrainer(vocab_size=1000, special_tokens=[EOS], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(corpus, trainer)
    model = LunarisCodex(tiny_model_config(vocab_size=1024)).eval()
    export_checkpoint(save_run(tmp_path / "run", model, tokenizer), tmp_path / "model.gguf", fmt="gguf")
    assert read_gguf(tmp_path / "model.gguf")[0]["tokenizer.ggml.pre"] == name
    with llama_cpp_model(tmp_path / "model.gguf", vocab_only=True) as llm:
        for text in TEXTS:
            assert llm.tokenize(text.encode(), add_bos=False, special=True) == tokenizer.encode(text).ids, text


PROMPT = "def fibonacci(n):\n    "


@pytest.mark.llamacpp
@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_llama_cpp_gives_lunaris_logits_and_greedy_tokens(trained, tmp_path, capsys, arch):
    from lunaris.train.checkpoint import model_from_checkpoint

    run = trained[arch]
    assert main(["export", "--checkpoint", str(run), "--out", str(tmp_path / "model.gguf"), "--format", "gguf"]) == 0
    model = model_from_checkpoint(run)
    tokenizer = lunaris_tokenizer(run)
    ids = tokenizer.encode(PROMPT).ids
    eos = tokenizer.token_to_id(EOS)
    # fp32 everywhere: an fp32 KV cache (llama.cpp's default is fp16), logits of every position
    with llama_cpp_model(tmp_path / "model.gguf", n_ctx=128, n_batch=128, n_ubatch=128, n_threads=1,
                         logits_all=True, type_k=0, type_v=0) as llm:
        llm.eval(ids)
        with torch.no_grad():
            expected = model(torch.tensor([ids])).logits[0].numpy()                   # (T, V)
        np.testing.assert_allclose(llm.scores[:len(ids)], expected, rtol=0, atol=1e-4)
        llm.reset()
        greedy = []
        for token in llm.generate(ids, temp=0.0, repeat_penalty=1.0):
            if token == eos or len(greedy) == 64:
                break
            greedy.append(token)
        text = llm.detokenize(greedy).decode()
    ours = model.generate([torch.tensor(ids)], 64, temperature=0, eos_token_id=eos)[0][len(ids):].tolist()
    assert greedy == [t for t in ours if t != eos]
    assert len(set(greedy)) >= 8, "a trained model's greedy continuation is not one token repeated"
    capsys.readouterr()
    assert main(["generate", "--checkpoint", str(run), "--prompt", PROMPT, "--temperature", "0",
                 "--max-new-tokens", "64"]) == 0
    assert capsys.readouterr().out == PROMPT + text + "\n"


@pytest.mark.llamacpp
@pytest.mark.parametrize("dtype, tolerance", [("fp16", 2e-3), ("bf16", 1e-2), ("q8_0", 2e-2)])
def test_llama_cpp_runs_the_half_precision_and_q8_0_files(trained, tmp_path, dtype, tolerance):
    from lunaris.train.checkpoint import model_from_checkpoint

    run = trained["llama"]
    export_checkpoint(run, tmp_path / "model.gguf", fmt="gguf", dtype=dtype)
    model = model_from_checkpoint(run)
    ids = lunaris_tokenizer(run).encode(TEXTS[0]).ids[:100]
    with llama_cpp_model(tmp_path / "model.gguf", n_ctx=128, n_batch=128, n_ubatch=128, n_threads=1,
                         logits_all=True) as llm:
        llm.eval(ids)
        scores = llm.scores[:len(ids)].copy()                                         # (T, V)
    with torch.no_grad():
        expected = model(torch.tensor([ids])).logits[0].numpy()
    assert 0 < np.abs(scores - expected).max() < tolerance * np.abs(expected).max()   # measured: 2e-4, 4e-3, 6e-3
    assert (scores.argmax(-1) == expected.argmax(-1)).mean() > 0.95
