"""The tokenizer: trained or loaded by `lunaris prepare`, found beside a run, loaded and decoded by every command.

One module for everything a tokenizer does in Lunaris:
- `lunaris prepare --vocab-size N` trains a byte-level BPE (GPT-2 pre-tokenization, `<|endoftext|>` special token
  with id 0) on the first `--tokenizer-sample-bytes` of the mix (the same interleaving the shards are written in);
  `--tokenizer FILE` loads an existing Hugging Face `tokenizer.json`, whose end-of-text token is named by
  `--eot-token`. The model's vocabulary is the tokenizer's size rounded up to a multiple of 64.
- `load_tokenizer` is the one way a `tokenizer.json` is read (prepare, training's downstream tasks, eval, generate,
  export, the lm-eval model); `find_tokenizer` finds the one the trainer copied into a run directory;
  `end_of_text_id` is its `<|endoftext|>` id; `StreamingDecoder` turns ids into text as they are generated.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from lunaris.checkpoints import run_directory
from lunaris.data.shards import TOKENIZER_NAME
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
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[END_OF_TEXT], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(texts, trainer=trainer)
    return tokenizer


def load_tokenizer(path, vocab_size: int = None, eot_token: str = None) -> Tokenizer:
    """The `tokenizers.Tokenizer` of a tokenizer.json (or of the directory holding one).

    With `vocab_size`, its ids must fit a model with that many embedding rows; with `eot_token`, it must have that
    token to end documents with (`lunaris prepare --eot-token`). Raises DataError naming the file otherwise.
    """
    path = Path(path)
    if path.is_dir():
        path = path / TOKENIZER_NAME
    if not path.is_file():
        raise DataError(f"The tokenizer file {path} does not exist. Pass a Hugging Face tokenizer.json (the one "
                        f"`lunaris prepare` wrote into the data directory) with --tokenizer, or train one with "
                        f"`lunaris prepare --vocab-size N`.")
    try:
        tokenizer = Tokenizer.from_file(str(path))
    except Exception as exc:  # the Rust library raises a generic Exception for bad files
        raise DataError(f"The tokenizer file {path} cannot be loaded ({exc}). It must be a Hugging Face "
                        f"`tokenizers` tokenizer.json (tokenizer.save(...), the file `lunaris prepare` writes, or "
                        f"the file in a model repository).") from None
    if vocab_size is not None and tokenizer.get_vocab_size() > vocab_size:
        raise DataError(f"The tokenizer {path} has {tokenizer.get_vocab_size()} tokens but the model only "
                        f"{vocab_size} (model.vocab_size); it is not the tokenizer this model was trained with. "
                        f"Pass the right one with --tokenizer.")
    if eot_token is not None and tokenizer.token_to_id(eot_token) is None:
        raise DataError(f"The tokenizer {path} has no token {eot_token!r} to end documents with. Name its "
                        f"end-of-text token with --eot-token (e.g. '</s>' or '<|end_of_text|>').")
    return tokenizer


def find_tokenizer(checkpoint, override=None) -> Path:
    """The tokenizer.json to use with a checkpoint: `override` (a file, or a directory holding tokenizer.json),
    else the one the trainer copied into the run directory."""
    if override is not None:
        path = Path(override)
        path = path / TOKENIZER_NAME if path.is_dir() else path
        if not path.is_file():
            raise DataError(f"tokenizer file {path} does not exist; pass the tokenizer.json that `lunaris prepare` "
                            f"wrote into the data directory.")
        return path
    run_dir = run_directory(checkpoint)
    path = run_dir / TOKENIZER_NAME
    if not path.is_file():
        raise DataError(f"no tokenizer.json next to the checkpoint (looked in {run_dir}); pass --tokenizer FILE, "
                        f"the tokenizer.json that `lunaris prepare` wrote into the data directory of this run.")
    return path


def end_of_text_id(tokenizer):
    """The id of <|endoftext|> in the tokenizer, or None if it has no such token."""
    return tokenizer.token_to_id(END_OF_TEXT)


class StreamingDecoder:
    """Turns token ids into text as they arrive.

    A byte-level BPE token can be part of a multi-byte character, so text is released only once it decodes
    without a trailing replacement character. A few earlier tokens are decoded along with the new ones
    because some decoders render a token differently at the start of a text (leading spaces).
    """

    def __init__(self, tokenizer, prompt_ids=()):
        self.tokenizer = tokenizer
        self.ids = list(prompt_ids)
        self.read_offset = len(self.ids)                  # ids[:read_offset] have been released as text
        self.prefix_offset = max(0, self.read_offset - 5)  # context decoded with the new ids

    def _new_text(self) -> tuple:
        prefix = self.tokenizer.decode(self.ids[self.prefix_offset:self.read_offset], skip_special_tokens=True)
        text = self.tokenizer.decode(self.ids[self.prefix_offset:], skip_special_tokens=True)
        return prefix, text

    def push(self, token_id: int) -> str:
        """Add one token; return the text that became complete ('' while a character is unfinished)."""
        self.ids.append(int(token_id))
        prefix, text = self._new_text()
        if len(text) > len(prefix) and not text.endswith("\ufffd"):
            self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
            return text[len(prefix):]
        return ""

    def flush(self) -> str:
        """Whatever is left at the end, incomplete characters included."""
        prefix, text = self._new_text()
        self.prefix_offset = self.read_offset = len(self.ids)
        return text[len(prefix):]


def vocab_size_of(tokenizer) -> int:
    """One more than the largest id the tokenizer can produce."""
    return max(tokenizer.get_vocab(with_added_tokens=True).values()) + 1


def round_vocab(vocab_size: int, multiple: int = 64) -> int:
    """`vocab_size` rounded up to a multiple of `multiple` (the model's embedding size)."""
    return -(-vocab_size // multiple) * multiple
