"""CUDA tests: the `cuda` marker, tiny models and batches on the GPU, a token corpus for the trainer.

Every module here skips itself when torch.cuda.is_available() is False, so `pytest tests/cuda` collects
everything and skips it cleanly on a CPU machine. Run them on a GPU with `pytest tests/cuda` (or `-m cuda`
once the marker is registered in pyproject.toml), or `bench/gpu_check.sh`.
"""

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from lunaris import LunarisCodex, LunarisCodexConfig, TrainConfig

VOCAB = 128
NO_CUDA = "needs a CUDA GPU: torch.cuda.is_available() is False (CPU-only torch build or no visible GPU)"


def pytest_configure(config):
    config.addinivalue_line("markers", "cuda: needs a CUDA GPU; skipped when torch.cuda.is_available() is False")


@pytest.fixture(autouse=True)
def _exact_fp32_matmuls():
    """fp32 matmuls in full fp32 (no TF32) during each test; the trainer switches TF32 on for its process."""
    precision = torch.get_float32_matmul_precision()
    cudnn_tf32 = torch.backends.cudnn.allow_tf32
    torch.set_float32_matmul_precision("highest")
    torch.backends.cudnn.allow_tf32 = False
    yield
    torch.set_float32_matmul_precision(precision)
    torch.backends.cudnn.allow_tf32 = cudnn_tf32


def model_config(arch: str = "dense", **overrides) -> LunarisCodexConfig:
    """A tiny dense model, or MoC top-2 of 8 experts with mha collaboration (`arch="moc"`)."""
    keys = dict(vocab_size=VOCAB, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=64, multiple_of=16)
    if arch == "moc":
        keys.update(n_experts=8, top_k=2, collab_mode="mha", ffn_hidden_size=128, simple_collab_dropout=0.0)
    keys.update(overrides)
    return LunarisCodexConfig(**keys)


def make_model(arch: str = "dense", seed: int = 0, **overrides) -> LunarisCodex:
    torch.manual_seed(seed)
    return LunarisCodex(model_config(arch, **overrides)).cuda()


def optimizer_for(model, learning_rate: float = 1e-3):
    """The model's own AdamW groups, as the trainer builds them on CUDA (fused)."""
    return model.configure_optimizers(weight_decay=0.1, learning_rate=learning_rate, device_type="cuda")


def batches(n: int, batch: int = 4, seq_len: int = 32, seed: int = 1) -> list:
    """n micro-batches (x, y) of random tokens, on the CPU (train_step moves them)."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        tokens = torch.randint(0, VOCAB, (batch, seq_len + 1), generator=gen)
        out.append((tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()))
    return out


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    """|a - b| / |b| over the whole tensor (0 when both are 0)."""
    a, b = a.detach().float(), b.detach().float()
    return float((a - b).norm() / b.norm().clamp_min(1e-12))


@pytest.fixture(scope="session")
def token_dirs(tmp_path_factory):
    """A flat directory of two uint16 shards (a repeated random pattern: learnable) and a val directory."""
    root = tmp_path_factory.mktemp("cuda_tokens")
    pattern = np.random.default_rng(0).integers(0, VOCAB, size=97)
    stream = np.tile(pattern, 120).astype(np.uint16)
    (root / "train").mkdir()
    (root / "val").mkdir()
    np.save(root / "train" / "shard_000.npy", stream[:6000])
    np.save(root / "train" / "shard_001.npy", stream[6000:])
    np.save(root / "val" / "shard_000.npy", np.tile(np.roll(pattern, 5), 10).astype(np.uint16))
    return SimpleNamespace(train=root / "train", val=root / "val")


@pytest.fixture
def cuda_train_config(token_dirs):
    """TrainConfig of a tiny CUDA run; `model` overrides model keys, other keywords training keys."""

    def make(out_dir, model=None, **overrides) -> TrainConfig:
        model_keys = dict(vocab_size=VOCAB, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=32,
                          multiple_of=16)
        model_keys.update(model or {})
        keys = dict(model=model_keys, data_dir=str(token_dirs.train), val_data_dir=str(token_dirs.val),
                    learning_rate=3e-3, min_lr=3e-3, warmup_steps=0, max_steps=6, batch_size=4, save_interval=1000,
                    log_interval=1, eval_interval=0, num_workers=0, out_dir=str(out_dir), device="cuda",
                    dtype="bf16", seed=1234)
        keys.update(overrides)
        return TrainConfig.from_dict(keys)

    return make


@pytest.fixture(scope="session")
def cuda_helpers():
    return SimpleNamespace(model_config=model_config, make_model=make_model, optimizer_for=optimizer_for,
                           batches=batches, relative_error=relative_error, NO_CUDA=NO_CUDA)
