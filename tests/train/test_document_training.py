"""attention_mask: document in training: the separator comes from the data's manifest and is saved with the run."""

import json

import numpy as np
import pytest

from lunaris.errors import ConfigError
from lunaris.runtime import file_sha256
from lunaris.train import train
from lunaris.train.checkpoint import load_checkpoint_file, model_from_checkpoint

EOT = 3


def write_prepared(root, vocab: int = 128):
    """A `lunaris prepare` layout (train split only) whose manifest names end-of-text id EOT; documents of 5 to 20
    tokens, each ended by EOT."""
    rng = np.random.default_rng(0)
    tokens = []
    while len(tokens) < 3000:
        doc = rng.integers(4, vocab, size=int(rng.integers(4, 20))).tolist()
        tokens += doc + [EOT]
    (root / "train").mkdir(parents=True)
    shard = root / "train" / "shard_00000.npy"
    np.save(shard, np.array(tokens, dtype=np.uint16))
    splits = {"train": {"documents": tokens.count(EOT), "tokens": len(tokens), "bytes": 4 * len(tokens),
                        "shards": [{"file": shard.name, "tokens": len(tokens), "sha256": file_sha256(shard)}]}}
    (root / "tokenizer.json").write_text("{}")
    manifest = {"format_version": 1, "vocab_size": vocab, "model_vocab_size": vocab, "eot_token": "<|endoftext|>",
                "eot_id": EOT, "dtype": "uint16", "tokenizer_sha256": "x", "splits": splits}
    (root / "manifest.json").write_text(json.dumps(manifest))
    return root


def test_document_training_fills_the_separator_from_the_manifest_saves_it_and_resumes(tmp_path, train_config):
    data = write_prepared(tmp_path / "data")
    model_keys = dict(attention_mask="document", use_gradient_checkpointing=True)
    config = train_config(tmp_path / "run", model=model_keys, data_dir=str(data), val_data_dir=None, max_steps=2)
    assert config.model.document_separator_id is None
    result = train(config)
    assert result.step == 2
    state = load_checkpoint_file(tmp_path / "run", include_optimizer=False)
    assert state["config"]["model"]["document_separator_id"] == EOT
    assert "document_separator_id: 3" in (tmp_path / "run" / "config.yaml").read_text()
    assert model_from_checkpoint(tmp_path / "run").config.document_separator_id == EOT
    # the same config (separator null) resumes the run: the separator is filled in before the configs are compared
    again = train_config(tmp_path / "run", model=model_keys, data_dir=str(data), val_data_dir=None, max_steps=3)
    assert train(again).step == 3


def test_document_training_on_shards_without_a_manifest_asks_for_the_separator(tmp_path, train_config):
    config = train_config(tmp_path / "run", model=dict(attention_mask="document"))
    with pytest.raises(ConfigError, match="has no manifest that gives it; set model.document_separator_id"):
        train(config)
