"""Scoring tasks: log-likelihood of continuations, batched, on any device, for dense and MoC models.

The definitions are lm-evaluation-harness's, so that `lunaris eval --tasks`, the training loop and the `lunaris`
model of lm-eval (lm_eval_adapter.py, which calls `score` below) give the same numbers:

* a request is (context, continuation); the context's trailing whitespace moves to the continuation, the pair is
  encoded whole and split where the encoded context ends (an empty context is replaced by <|endoftext|>);
* the model reads `(context + continuation)[-(max_seq_len + 1):][:-1]`: contexts are truncated from the left;
* the log-likelihood is the sum of the continuation tokens' log-probabilities; the continuation is greedy when
  every one of its tokens is the argmax of its position;
* multiple choice: `acc` picks the choice of highest log-likelihood, `acc_norm` of highest log-likelihood per
  character of the choice (ties: the first); cloze: `acc` is the share of greedy targets; each with the standard
  error of the mean, sqrt(sample variance / n).

Requests run sorted by length (longest first) in batches of `batch_size`, right-padded: a causal model's
logits at a position do not depend on later positions, and MoC layers run dropless in eval mode, so padding
changes nothing. (A model with `eval_capacity_factor` set routes with capacity, and then batch neighbours can
change a result.)
"""

import math

import numpy as np
import torch

from lunaris.errors import LunarisError
from lunaris.runtime import autocast
from lunaris.tasks.types import CLOZE, MULTIPLE_CHOICE, Task


def encode_pair(encode, context: str, continuation: str, prefix_id: int) -> tuple:
    """(context ids, continuation ids) as lm-evaluation-harness encodes a request for a causal model."""
    if context == "":
        cont = encode(continuation)
        if prefix_id is None:
            raise LunarisError("a request has an empty context and the tokenizer has no <|endoftext|> token to "
                               "start it with.")
        return ([prefix_id], cont) if not cont or cont[0] != prefix_id else (cont[:1], cont[1:])
    spaces = len(context) - len(context.rstrip())
    if spaces:
        continuation = context[-spaces:] + continuation
        context = context[:-spaces]
    whole = encode(context + continuation)
    ctx = encode(context)
    return ctx, whole[len(ctx):]


def token_encoder(tokenizer):
    """ids of a text, as `lunaris prepare` encodes documents (no special tokens added)."""
    return lambda text: tokenizer.encode(text, add_special_tokens=False).ids


def encode_task(task: Task, encode, prefix_id: int, max_seq_len: int) -> list:
    """(context ids, continuation ids) of every request of a task; a continuation longer than the context
    window is an error (lm-eval refuses it too)."""
    pairs = []
    for context, continuation in task.requests():
        ctx, cont = encode_pair(encode, context, continuation, prefix_id)
        if not cont:
            raise LunarisError(f"task {task.name}: the continuation {continuation!r} encodes to no token.")
        if len(cont) > max_seq_len:
            raise LunarisError(f"task {task.name}: the continuation {continuation[:60]!r}... has {len(cont)} tokens, "
                               f"more than the model's context (max_seq_len {max_seq_len}).")
        pairs.append((ctx, cont))
    return pairs


@torch.no_grad()
def score(model, pairs: list, batch_size: int, dtype: torch.dtype = torch.float32, rank: int = 0,
          world_size: int = 1) -> torch.Tensor:
    """(2, R) float64 on the model's device: the log-likelihood and the greedy flag of each (context ids,
    continuation ids) pair that this rank scores, zeros for the others (sum over ranks to get them all).

    Rank r takes every world_size-th request of the length-sorted order; every rank runs the same number of
    batches (FSDP runs a collective per forward), the short one repeating a request it does not count.
    The model runs in eval mode (dropout off, MoC dropless) and its mode is restored.
    """
    if batch_size < 1:
        raise LunarisError(f"the batch size must be a positive integer, got {batch_size}.")
    device = model.wte.weight.device
    limit = model.config.max_seq_len
    windows = [((ctx + cont)[-(limit + 1):], len(cont)) for ctx, cont in pairs]  # input = window[:-1]
    order = sorted(range(len(windows)), key=lambda i: -len(windows[i][0]))
    per_rank = math.ceil(len(order) / world_size) if order else 0
    mine = [(i, True) for i in order[rank::world_size]]
    mine += [(order[0], False)] * (per_rank - len(mine))        # padding: same batch count on every rank
    logliks = torch.zeros(len(pairs), dtype=torch.float64, device=device)
    misses = torch.zeros(len(pairs), dtype=torch.float64, device=device)     # continuation tokens not the argmax
    counted = torch.zeros(len(pairs), dtype=torch.float64, device=device)
    was_training = model.training
    model.eval()
    try:
        for start in range(0, len(mine), batch_size):
            chunk = mine[start:start + batch_size]
            length = max(len(windows[i][0]) - 1 for i, _ in chunk)
            idx = torch.zeros(len(chunk), length, dtype=torch.long)
            rows, columns, targets, owners = [], [], [], []   # one entry per continuation token of the chunk
            for row, (i, keep) in enumerate(chunk):
                window, n_cont = windows[i]
                n = len(window) - 1
                idx[row, :n] = torch.tensor(window[:-1])
                if keep:  # the logits at positions n - n_cont .. n - 1 predict the continuation's tokens
                    rows += [row] * n_cont
                    columns += range(n - n_cont, n)
                    targets += window[-n_cont:]
                    owners += [i] * n_cont
            with autocast(device, dtype):
                logits = model(idx.to(device)).logits                            # (B, T, vocab)
            if not owners:
                continue
            rows_t, columns_t, targets_t, owners_t = (torch.tensor(v, device=device)
                                                      for v in (rows, columns, targets, owners))
            log_probs = logits[rows_t, columns_t].float().log_softmax(-1)       # (tokens, vocab)
            logliks.index_add_(0, owners_t, log_probs.gather(1, targets_t[:, None])[:, 0].double())
            misses.index_add_(0, owners_t, (log_probs.argmax(-1) != targets_t).double())
            counted[owners_t] = 1.0
    finally:
        model.train(was_training)
    return torch.stack([logliks, counted * (misses == 0).double()])


def _mean_and_stderr(values) -> tuple:
    values = np.asarray(values, dtype=np.float64)
    stderr = float(values.std(ddof=1) / math.sqrt(len(values))) if len(values) > 1 else None
    return float(values.mean()), stderr


def task_result(task: Task, logliks, greedy) -> dict:
    """Accuracy (and normalized accuracy, chance) of a task from the scores of its requests, in order."""
    logliks, greedy = np.asarray(logliks, dtype=np.float64), np.asarray(greedy, dtype=bool)
    result = {"task": task.name, "kind": task.kind, "examples": len(task.examples),
              "examples_total": max(task.examples_total, len(task.examples)), "source": task.source}
    if task.kind == CLOZE:
        acc, acc_se = _mean_and_stderr(greedy.astype(np.float64))
        result.update(acc=acc, acc_stderr=acc_se, acc_norm=None, acc_norm_stderr=None, chance=None,
                      perplexity=float(np.exp(-logliks.mean())))
        return result
    assert task.kind == MULTIPLE_CHOICE
    right, right_norm, at = [], [], 0
    for example in task.examples:
        lls = logliks[at:at + len(example.choices)]
        at += len(example.choices)
        lengths = np.array([float(len(choice)) for choice in example.choices])
        right.append(float(np.argmax(lls) == example.label))
        right_norm.append(float(np.argmax(lls / lengths) == example.label))
    acc, acc_se = _mean_and_stderr(right)
    acc_norm, acc_norm_se = _mean_and_stderr(right_norm)
    result.update(acc=acc, acc_stderr=acc_se, acc_norm=acc_norm, acc_norm_stderr=acc_norm_se, chance=task.chance)
    return result


def evaluate_tasks(model, tasks: list, encoded: list, batch_size: int, dtype: torch.dtype = torch.float32,
                   rank: int = 0, world_size: int = 1, reduce=None) -> dict:
    """{task name: result} for tasks and their encoded requests (`encode_task`); `reduce` sums a tensor over ranks
    (the trainer's all-reduce) when world_size > 1. All tasks' requests go through the model together."""
    pairs = [pair for task_pairs in encoded for pair in task_pairs]
    scores = score(model, pairs, batch_size, dtype, rank, world_size)
    if reduce is not None:
        scores = reduce(scores)
    logliks, greedy = scores.cpu().numpy()
    results, at = {}, 0
    for task, task_pairs in zip(tasks, encoded):
        n = len(task_pairs)
        results[task.name] = task_result(task, logliks[at:at + n], greedy[at:at + n] > 0.5)
        at += n
    return results


def _cell(value, stderr=None) -> str:
    if value is None:
        return "-"
    return f"{value:.4f}" + (f" ± {stderr:.4f}" if stderr is not None else "")


def format_table(results: dict) -> str:
    """A markdown table of task results."""
    lines = ["| task | examples | acc | acc_norm | chance |", "| --- | ---: | --- | --- | ---: |"]
    for result in results.values():
        lines.append(f"| {result['task']} | {result['examples']} | {_cell(result['acc'], result['acc_stderr'])} | "
                     f"{_cell(result['acc_norm'], result['acc_norm_stderr'])} | {_cell(result['chance'])} |")
    return "\n".join(lines)
