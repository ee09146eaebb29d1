"""Shared fixtures: tiny configs that build and run in milliseconds on CPU."""

import time

import pytest
import torch

from lunaris import LunarisCodexConfig


def tiny_model_config(**overrides) -> LunarisCodexConfig:
    base = dict(vocab_size=128, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=64,
                multiple_of=16)
    base.update(overrides)
    return LunarisCodexConfig(**base)


@pytest.fixture
def tiny_config():
    return tiny_model_config()


def byte_level_tokenizer():
    """A small byte-level BPE tokenizer with <|endoftext|> (id 0), trained in milliseconds."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(["hello world, the quick brown fox jumps over the lazy dog"] * 20, trainer)
    return tokenizer


def prepared_words(root, words: str, n_docs: int, doc_words: int, val_tokens: int, shard_tokens: int):
    """`lunaris prepare` of n_docs random sentences of `words` (train/ and val/ splits, a manifest with byte counts
    for bits per byte) with the byte-level tokenizer; returns the data directory root/data."""
    import numpy as np

    from lunaris.data.prepare import PrepareOptions, prepare
    docs = root / "docs"
    docs.mkdir()
    rng = np.random.default_rng(0)
    for i in range(n_docs):
        (docs / f"doc{i:02d}.txt").write_text(" ".join(rng.choice(words.split(), size=doc_words)), encoding="utf-8")
    byte_level_tokenizer().save(str(root / "tokenizer.json"))
    prepare(PrepareOptions(sources=[docs], out=root / "data", tokenizer=root / "tokenizer.json",
                           val_tokens=val_tokens, shard_tokens=shard_tokens, progress=False))
    return root / "data"


@pytest.fixture(autouse=True)
def _seed_and_one_thread():
    """Seeded, and one intra-op thread: tiny tensors run faster (and steadier on a busy machine) on one."""
    torch.manual_seed(0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def _no_process_left_behind():
    """A test that leaves a child process running (a hung torchrun worker, say) fails in its teardown, naming it;
    the process is killed so that it cannot load the machine or hold a port during the next tests."""
    from processes import kill_tree, leftover_processes
    yield
    left = leftover_processes()
    if left:
        time.sleep(2.0)   # an agent that is exiting right now
        left = leftover_processes()
    for pid, _ in left:
        kill_tree(pid)
    if left:
        pytest.fail("processes still running after the test (killed):\n"
                    + "\n".join(f"  {pid}: {line[:200]}" for pid, line in left), pytrace=False)
