"""One training step, written once: forward under autocast, backward, gradient clipping, the update.

The trainer composes these pieces with its collectives in between (loss mean over ranks, the stop vote);
`train_step` composes them for one process, as the demo's step-time calibration, `lunaris selftest` and the
benchmark run them. Both do exactly the same arithmetic.
"""

import math
from contextlib import nullcontext
from typing import NamedTuple

import torch

from lunaris.runtime import autocast


class StepLosses(NamedTuple):
    main: torch.Tensor      # () detached: token-weighted cross-entropy of this process's micro-batches
    aux: torch.Tensor       # () detached: MoC auxiliary losses, averaged over micro-batches
    metrics: dict           # the model's metrics of the last micro-batch (detached tensors)


def micro_batch_weights(micro_batches: list) -> list:
    """Each micro-batch's share of the step's target tokens (targets -1 are ignored); counted on the CPU."""
    counts = [int((y != -1).sum()) for _, y in micro_batches]
    total = max(sum(counts), 1)
    return [count / total for count in counts]


def forward_backward(model, x, y, weight: float, accumulation: int, dtype: torch.dtype, scaler=None):
    """Forward of one micro-batch under autocast, then backward; returns the model's output.

    The loss is scaled by this micro-batch's share of the step's target tokens (main) and by 1/accumulation
    (aux), so the gradient is the same whatever the batch/accumulation split.
    """
    with autocast(x.device, dtype):
        out = model(x, y)
    loss = out.main_loss * weight + out.aux_loss / accumulation
    (scaler.scale(loss) if scaler is not None else loss).backward()
    return out


def accumulate(model, micro_batches: list, device: torch.device, dtype: torch.dtype, scaler=None,
               sync_context=None) -> StepLosses:
    """forward_backward over every micro-batch [(x, y), ...] of one step (each (B, T) int64).

    `sync_context(is_last)` wraps each micro-batch (DDP skips the gradient all-reduce on all but the last).
    """
    weights = micro_batch_weights(micro_batches)
    main = torch.zeros((), device=device)
    aux = torch.zeros((), device=device)
    out = None
    for i, ((x, y), weight) in enumerate(zip(micro_batches, weights)):
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        is_last = i == len(micro_batches) - 1
        with sync_context(is_last) if sync_context is not None else nullcontext():
            out = forward_backward(model, x, y, weight, len(micro_batches), dtype, scaler)
        main += out.main_loss.detach() * weight
        aux += out.aux_loss.detach() / len(micro_batches)
    return StepLosses(main, aux, out.metrics if out is not None else {})


def clip_gradients(parameters, optimizer, grad_clip: float, scaler=None) -> torch.Tensor:
    """Unscale (fp16), clip to `grad_clip` (0 = no clipping); returns the norm before clipping, a () tensor."""
    if scaler is not None:
        scaler.unscale_(optimizer)
    max_norm = grad_clip if grad_clip > 0 else float("inf")
    return torch.nn.utils.clip_grad_norm_(parameters, max_norm)


def update(optimizer, apply: bool, scaler=None) -> None:
    """The optimizer step (skipped unless `apply`; with fp16 the scaler skips inf/NaN steps itself)."""
    if scaler is not None and scaler.is_enabled():
        scaler.step(optimizer)
        scaler.update()
    elif apply:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def train_step(model, optimizer, micro_batches: list, dtype: torch.dtype = torch.float32, grad_clip: float = 0.0,
               scaler=None) -> dict:
    """One optimizer step in one process; returns floats: loss/main, loss/aux, loss/total, grad_norm.

    The update is skipped when the loss or the gradient is not finite (as the trainer does).
    """
    device = next(model.parameters()).device
    losses = accumulate(model, micro_batches, device, dtype, scaler)
    norm = clip_gradients(model.parameters(), optimizer, grad_clip, scaler)
    main, aux, grad_norm = torch.stack([losses.main.float(), losses.aux.float(), norm.float()]).tolist()
    update(optimizer, math.isfinite(main + aux) and math.isfinite(grad_norm), scaler)
    return {"loss/main": main, "loss/aux": aux, "loss/total": main + aux, "grad_norm": grad_norm}

