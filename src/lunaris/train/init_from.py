"""`init_from: CHECKPOINT`: a run that starts from another run's weights (fine-tuning, continued pre-training).

Weights only: the optimizer, the learning-rate schedule, the step counter and the data position start fresh, as in
any new run; the trainer calls `load_initial_weights` instead of drawing random weights, and only when it does not
resume (a run that has checkpoints of its own continues from them, and init_from no longer matters).

The architecture must be the checkpoint's: every weight keeps its shape, except that the vocabulary may have grown
(`lunaris prepare` of conversations appends the chat template's special tokens to the tokenizer, and
model.vocab_size grows with them). The token embedding and the LM head then keep the checkpoint's rows, and every
new row starts as the mean of the checkpoint's rows, a neutral guess that the fine-tuning moves. Settings that are
not weights (dropout, max_seq_len, attention_mask, capacity factors, ...) may differ.

The training data must be tokenized with the checkpoint's tokenizer or an extension of it (the same ids for every
token it had): `check_tokenizer` compares the run directory's tokenizer.json with the data's.
"""

import dataclasses

import torch

from lunaris.checkpoints import read_model_checkpoint, run_directory
from lunaris.data.shards import TOKENIZER_NAME
from lunaris.errors import CheckpointError, DataError
from lunaris.model import LunarisCodex

VOCABULARY_ROWS = ("wte.weight", "lm_head.weight")  # (vocab_size, d_model): the rows that grow with the vocabulary


def grow_rows(saved: torch.Tensor, rows: int) -> torch.Tensor:
    """`saved` (V0, D) extended to (rows, D): its rows, then the mean of its rows."""
    grown = saved.new_empty(rows, saved.shape[1])
    grown[:saved.shape[0]] = saved
    grown[saved.shape[0]:] = saved.float().mean(dim=0).to(saved.dtype)
    return grown


def fitted_weights(weights: dict, model, path) -> tuple:
    """The checkpoint's weights shaped for `model` (the vocabulary rows grown), and the old vocabulary size; a
    clear error for any other difference."""
    target = model.state_dict()
    old_vocab = weights["wte.weight"].shape[0] if "wte.weight" in weights else None
    problems = [f"{k} is missing" for k in target if k not in weights]
    problems += [f"{k} is not in the model" for k in weights if k not in target]
    fitted = {}
    for key, value in weights.items():
        if key not in target:
            continue
        want = target[key].shape
        if key in VOCABULARY_ROWS and value.shape[1:] == want[1:] and value.shape[0] < want[0]:
            value = grow_rows(value, want[0])
        elif key in VOCABULARY_ROWS and value.shape[1:] == want[1:] and value.shape[0] > want[0]:
            problems.append(f"model.vocab_size {want[0]} is smaller than the checkpoint's {value.shape[0]}")
        elif value.shape != want:
            problems.append(f"{key} has shape {tuple(value.shape)} in the checkpoint, {tuple(want)} in the model")
        fitted[key] = value
    if problems:
        listed = "; ".join(problems[:6]) + ("; ..." if len(problems) > 6 else "")
        raise CheckpointError(f"init_from {path}: the checkpoint's weights do not fit this model ({listed}). "
                              f"init_from needs the checkpoint's "
                              f"architecture (its d_model, layers, heads, FFN and experts: copy its model settings, "
                              f"`lunaris config` shows them); only model.vocab_size may grow.")
    return fitted, old_vocab


def check_tokenizer(checkpoint, data_tokenizer) -> None:
    """The data's tokenizer must give every token of the checkpoint's tokenizer the same id (it may add tokens).
    Nothing to check when either is unknown (a flat shard directory, a run without tokenizer.json)."""
    base = run_directory(checkpoint) / TOKENIZER_NAME
    if data_tokenizer is None or not base.is_file():
        return
    from lunaris.data.tokenizer import load_tokenizer
    old = load_tokenizer(base).get_vocab(with_added_tokens=True)
    new = load_tokenizer(data_tokenizer).get_vocab(with_added_tokens=True)
    changed = [token for token, i in old.items() if new.get(token) != i]
    if changed:
        raise DataError(f"init_from: the training data was tokenized with {data_tokenizer}, which is not the "
                        f"tokenizer of {run_directory(checkpoint)} nor an extension of it ({len(changed):,} of its "
                        f"tokens have other ids, e.g. {changed[0]!r}); the checkpoint's embeddings would read the "
                        f"wrong tokens. Prepare the data with --tokenizer {base}.")


def load_initial_weights(model, path, data_tokenizer=None) -> str:
    """Load the weights of checkpoint `path` into `model` (vocabulary grown if needed); returns a line for the log.

    `data_tokenizer` (the training data's tokenizer.json, or None) is checked against the checkpoint's first."""
    check_tokenizer(path, data_tokenizer)
    resolved, _, weights = read_model_checkpoint(path)
    fitted, old_vocab = fitted_weights(weights, model, resolved)
    model.load_state_dict(fitted)
    grown = model.config.vocab_size != old_vocab
    return (f"the weights of {resolved}" +
            (f" (vocabulary grown from {old_vocab:,} to {model.config.vocab_size:,}; new rows = the mean embedding)"
             if grown else ""))


def grown_model(model, checkpoint, vocab_size: int, data_tokenizer=None):
    """`model` (loaded from `checkpoint`) as a fine-tuning with init_from starts from it on data of `vocab_size`
    ids: a copy with the vocabulary grown (new rows = the mean embedding), on the same device and precision, in eval
    mode. `lunaris eval` scores a base model on conversations this way."""
    check_tokenizer(checkpoint, data_tokenizer)
    weight = model.wte.weight
    grown = LunarisCodex(dataclasses.replace(model.config, vocab_size=vocab_size))
    fitted, _ = fitted_weights(model.state_dict(), grown, checkpoint)
    grown.load_state_dict(fitted)
    return grown.to(device=weight.device, dtype=weight.dtype).eval()
