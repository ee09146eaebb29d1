"""Held-out loss, written once: the trainer's periodic evaluation and `lunaris eval` both sum it here.

The loss is the mean cross-entropy over every evaluated target token (targets -1 excluded), in nats, with MoC
layers dropless (eval mode) and without auxiliary losses.
"""

import math

import torch
import torch.nn.functional as F

from lunaris.runtime import autocast


@torch.no_grad()
def held_out_sums(model, batches, device: torch.device, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """[cross-entropy sum in nats, target tokens, batches] over `batches` of (x, y), each (B, T); float64 on device.

    Sums, not means, so ranks and batches of different sizes combine exactly (all-reduce, then divide).
    The model runs in eval mode and its previous mode is restored.
    """
    was_training = model.training
    model.eval()
    totals = torch.zeros(3, dtype=torch.float64, device=device)
    try:
        for x, y in batches:
            x, y = x.to(device), y.to(device)                      # (B, T) each
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
    from lunaris.data import sequential_batches
    B, W = batch_size, world_size
    # batches j = 0, 1, ... that the last rank also has (its j-th batch starts at (W-1)*B + j*B*W)
    common = max(0, math.ceil((len(dataset) - (W - 1) * B) / (B * W)))
    count = min(max_batches, common)
    if count == 0:  # held-out split smaller than one global batch: every rank evaluates the same samples
        return [dataset.get_batch(range(min(B, len(dataset))))]
    return list(sequential_batches(dataset, B, rank=rank, world_size=W, max_batches=count))
