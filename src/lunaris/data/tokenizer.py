"""The tokenizer of `lunaris prepare`: trained on the start of the mix, or loaded from a file.

`--tokenizer FILE` uses an existing Hugging Face `tokenizer.json`, whose end-of-text token is named by
`--eot-token`. `--vocab-size N` trains a byte-level BPE (GPT-2 pre-tokenization, `<|endoftext|>` special
token with id 0) on the first `--tokenizer-sample-bytes` of the mix (the same interleaving the shards are
written in). The model's vocabulary is the tokenizer's size rounded up to a multiple of 64.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from lunaris.data.sources import MixStats, batched, mix_documents
from lunaris.errors import DataError
from lunaris.runtime import END_OF_TEXT


def tokenizer_sample(sources: list, honour_weights: bool, sample_bytes: int) -> Iterator[list]:
    """Batches of texts from the start of the mix, `sample_bytes` in total, for BPE training.

    Its own MixStats: what this pass skips or replaces is not counted in the run's report.
    """
    taken = 0
    for batch in batched(mix_documents(sources, honour_weights, MixStats()), 1024, 8_000_000):
        yield [text for _, text, _ in batch]
        taken += sum(size for _, _, size in batch)
        if taken >= sample_bytes:
            return


def train_tokenizer(texts: Iterator[str], vocab_size: int):
    """Byte-level BPE with GPT-2 pre-tokenization and `<|endoftext|>` as id 0."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[END_OF_TEXT], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(texts, trainer=trainer)
    return tokenizer


def load_tokenizer(path: Path, eot_token: str):
    """(tokenizer, eot id) from an existing tokenizer.json."""
    from tokenizers import Tokenizer
    if not path.is_file():
        raise DataError(f"The tokenizer file {path} does not exist. Pass a Hugging Face tokenizer.json with "
                        f"--tokenizer, or train one with --vocab-size N.")
    try:
        tokenizer = Tokenizer.from_file(str(path))
    except Exception as exc:  # the Rust library raises a generic Exception for bad files
        raise DataError(f"The tokenizer file {path} cannot be loaded ({exc}). It must be a Hugging Face "
                        f"`tokenizers` tokenizer.json (tokenizer.save(...) or the file in a model "
                        f"repository).") from None
    eot_id = tokenizer.token_to_id(eot_token)
    if eot_id is None:
        raise DataError(f"The tokenizer {path} has no token {eot_token!r} to end documents with. Name its "
                        f"end-of-text token with --eot-token (e.g. '</s>' or '<|end_of_text|>').")
    return tokenizer, eot_id


def vocab_size_of(tokenizer) -> int:
    """One more than the largest id the tokenizer can produce."""
    return max(tokenizer.get_vocab(with_added_tokens=True).values()) + 1


def round_vocab(vocab_size: int, multiple: int = 64) -> int:
    """`vocab_size` rounded up to a multiple of `multiple` (the model's embedding size)."""
    return -(-vocab_size // multiple) * multiple
