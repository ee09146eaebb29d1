"""Held-out loss, written once: the trainer's periodic evaluation and `lunaris eval` both sum it here; and the
trainer's downstream tasks (`eval_tasks`, scored by lunaris.tasks).

The loss is the mean cross-entropy over every evaluated target token (targets -1 excluded, and with a loss mask
only the trained targets: the assistant's tokens of fine-tuning data), in nats, with MoC layers dropless (eval
mode) and without auxiliary losses.
"""

import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from lunaris.data import sequential_batches, tokenizer_path
from lunaris.data.tokenizer import end_of_text_id, load_tokenizer
from lunaris.errors import LunarisError
from lunaris.runtime import autocast
from lunaris.tasks import encode_task, evaluate_tasks, load_task, parse_specs
from lunaris.tasks.scoring import token_encoder
from lunaris.train.distributed import all_reduce_sum
from lunaris.train.step import loss_targets


@torch.no_grad()
def held_out_sums(model, batches, device: torch.device, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """[cross-entropy sum in nats, target tokens, batches] over `batches` of (x, y) or (x, y, mask), each (B, T);
    float64 on device. A loss mask leaves its untrained targets out, as training does (step.loss_targets).

    Sums, not means, so ranks and batches of different sizes combine exactly (all-reduce, then divide).
    The model runs in eval mode and its previous mode is restored.
    """
    was_training = model.training
    model.eval()
    totals = torch.zeros(3, dtype=torch.float64, device=device)
    try:
        for batch in batches:
            x, y = (t.to(device) for t in loss_targets(batch))     # (B, T) each
            with autocast(device, dtype):
                logits = model(x).logits                           # (B, T, vocab)
            nats = F.cross_entropy(logits.flatten(0, 1).float(), y.flatten(), ignore_index=-1, reduction="sum")
            totals += torch.stack([nats.double(), (y != -1).sum().double(), totals.new_ones(())])
    finally:
        model.train(was_training)
    return totals


def loss_and_perplexity(nats: float, tokens: float) -> tuple:
    loss = nats / max(tokens, 1.0)
    return loss, safe_exp(loss)


def safe_exp(value: float) -> float:
    try:
        return math.exp(value)
    except OverflowError:
        return float("inf")


def rank_batches(dataset, batch_size: int, max_batches: int, rank: int, world_size: int) -> list:
    """This rank's held-out batches: the first samples of the split in order, so every evaluation (and a
    resumed run's) sees the same ones. Every rank gets the same number of batches (FSDP runs a collective
    per forward)."""
    B, W = batch_size, world_size
    # batches j = 0, 1, ... that the last rank also has (its j-th batch starts at (W-1)*B + j*B*W)
    common = max(0, math.ceil((len(dataset) - (W - 1) * B) / (B * W)))
    count = min(max_batches, common)
    if count == 0:  # held-out split smaller than one global batch: every rank evaluates the same samples
        return [dataset.get_batch(range(min(B, len(dataset))))]
    return list(sequential_batches(dataset, B, rank=rank, world_size=W, max_batches=count))


class TaskEvaluator:
    """The config's `eval_tasks`, scored at every evaluation of a training run.

    Built before training (every task file read and tokenized, so a missing file or a continuation longer than
    the context stops the run before step 1). Each rank scores its share of the requests (the same number of
    batches on every rank) and the scores are summed over ranks; every rank then holds every result. Nothing
    random runs, and the generators are forked anyway: the training batches, dropout and resume stay exact.
    """

    def __init__(self, tasks: list, encoded: list, batch_size: int, rank: int, world_size: int, device):
        self.tasks, self.encoded, self.batch_size = tasks, encoded, batch_size
        self.rank, self.world_size, self.device = rank, world_size, device

    @classmethod
    def build(cls, config, info, out_dir) -> "TaskEvaluator":
        """None when the config has no eval_tasks."""
        if not config.eval_tasks:
            return None
        path = tokenizer_path(config.data_dir) or Path(out_dir) / "tokenizer.json"
        if not path.is_file():
            raise LunarisError(f"eval_tasks needs the tokenizer of the training data, and neither data_dir "
                               f"({config.data_dir}) nor out_dir ({out_dir}) holds a tokenizer.json; train on a "
                               f"directory made by `lunaris prepare`, or copy its tokenizer.json into out_dir.")
        tokenizer = load_tokenizer(path, config.model.vocab_size)
        tasks = [load_task(spec) for spec in parse_specs(config.eval_tasks)]
        encoded = [encode_task(task, token_encoder(tokenizer), end_of_text_id(tokenizer), config.model.max_seq_len)
                   for task in tasks]
        return cls(tasks, encoded, config.batch_size, info.rank, info.world_size, info.device)

    def __call__(self, model, dtype: torch.dtype) -> dict:
        """{"eval/<task>/acc": ..., "eval/<task>/acc_norm": ... (multiple choice), "eval/tasks_seconds": ...}"""
        start = time.perf_counter()
        devices = [self.device] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            results = evaluate_tasks(model, self.tasks, self.encoded, self.batch_size, dtype, self.rank,
                                     self.world_size, reduce=all_reduce_sum)
        record = {}
        for name, result in results.items():
            record[f"eval/{name}/acc"] = result["acc"]
            if result["acc_norm"] is not None:
                record[f"eval/{name}/acc_norm"] = result["acc_norm"]
        record["eval/tasks_seconds"] = time.perf_counter() - start
        return record
