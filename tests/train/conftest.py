"""Fixtures for the trainer tests: a tiny learnable token corpus and tiny training configs."""

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import processes
import pytest
import torch
import yaml

from lunaris import TrainConfig

REPO = Path(__file__).resolve().parents[2]
VOCAB = 128


@pytest.fixture(scope="session")
def token_data(tmp_path_factory):
    """A flat train directory (two uint16 shards, so windows cross a shard boundary) and a val directory.

    The stream repeats a random pattern of 97 tokens: next tokens are predictable from context,
    so a tiny model's loss falls within a few steps.
    """
    root = tmp_path_factory.mktemp("tokens")
    pattern = np.random.default_rng(0).integers(0, VOCAB, size=97)
    stream = np.tile(pattern, 120).astype(np.uint16)                  # 11,640 tokens
    (root / "train").mkdir()
    (root / "val").mkdir()
    np.save(root / "train" / "shard_000.npy", stream[:6000])
    np.save(root / "train" / "shard_001.npy", stream[6000:])
    np.save(root / "val" / "shard_000.npy", np.tile(np.roll(pattern, 5), 10).astype(np.uint16))  # 970 tokens
    return SimpleNamespace(root=root, train=root / "train", val=root / "val")


def make_config(data, out_dir, model=None, **overrides) -> TrainConfig:
    """A tiny fp32 CPU run; `model` overrides model keys, other keywords training keys."""
    model_keys = dict(vocab_size=VOCAB, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=32,
                      multiple_of=16)
    model_keys.update(model or {})
    keys = dict(model=model_keys, data_dir=str(data.train), val_data_dir=str(data.val), learning_rate=3e-3,
                warmup_steps=2, max_steps=6, batch_size=4, save_interval=1000, log_interval=1, eval_interval=0,
                eval_batches=2, num_workers=0, out_dir=str(out_dir), device="cpu", dtype="fp32", seed=1234)
    keys.update(overrides)
    return TrainConfig.from_dict(keys)


@pytest.fixture(scope="session")
def train_config(token_data):
    return lambda out_dir, **overrides: make_config(token_data, out_dir, **overrides)


def write_yaml(config: TrainConfig, path: Path) -> Path:
    path.write_text(yaml.safe_dump(config.to_dict(), sort_keys=False))
    return path


def read_metrics(out_dir) -> list:
    return [json.loads(line) for line in (Path(out_dir) / "metrics.jsonl").read_text().splitlines()]


def losses_by_step(out_dir) -> dict:
    return {r["step"]: r["loss/total"] for r in read_metrics(out_dir) if "loss/total" in r}


def subprocess_env(**extra) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO / "src"), env.get("PYTHONPATH", "")])
    env.setdefault("OMP_NUM_THREADS", "1")
    env.update(extra)
    return env


def torchrun(args: list, timeout: float = 240, processes_per_node: int = 2) -> subprocess.CompletedProcess:
    """`torchrun --standalone --nproc_per_node=2 ARGS` (or `processes_per_node`) on CPU (gloo), from the repository
    root; a launch still running after `timeout` is killed with its workers and fails with its output."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               f"--nproc_per_node={processes_per_node}", *args]
    return processes.run(command, timeout, cwd=REPO, env=subprocess_env())


def final_weights(out_dir) -> dict:
    from lunaris.train.checkpoint import load_checkpoint_file
    return load_checkpoint_file(out_dir)["model"]


def assert_weights_close(a: dict, b: dict, atol: float = 0.0) -> None:
    assert a.keys() == b.keys()
    for key in a:
        if atol == 0.0:
            assert torch.equal(a[key], b[key]), key
        else:
            torch.testing.assert_close(a[key], b[key], atol=atol, rtol=0, msg=key)


@pytest.fixture(scope="session")
def helpers():
    return SimpleNamespace(write_yaml=write_yaml, read_metrics=read_metrics, losses_by_step=losses_by_step,
                           subprocess_env=subprocess_env, torchrun=torchrun, final_weights=final_weights,
                           assert_weights_close=assert_weights_close, make_config=make_config, REPO=REPO)
