"""One training step, written once: forward under autocast, backward, gradient clipping, the update.

The trainer composes these pieces with its collectives in between (loss mean over ranks, the stop vote);
`train_step` composes them for one process, as the demo's step-time calibration, `lunaris selftest` and the
benchmark run them. Both do exactly the same arithmetic.

Right after the update, `balance_experts` moves the routing bias of MoC layers with `load_balance: bias` by the
step's expert load (summed over processes); on log steps `accumulate(analyze=True)` adds the IRL analysis metrics.
"""

import math
from contextlib import nullcontext
from typing import NamedTuple

import torch

from lunaris.model.layers import IRLProbe
from lunaris.model.moc import MoCLayer
from lunaris.runtime import autocast
from lunaris.train.distributed import all_reduce_sum


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
               sync_context=None, analyze: bool = False) -> StepLosses:
    """forward_backward over every micro-batch [(x, y), ...] of one step (each (B, T) int64).

    `sync_context(is_last)` wraps each micro-batch (DDP skips the gradient all-reduce on all but the last).
    `analyze` (the trainer's log steps) adds the IRL analysis metrics (layers.IRLProbe): the update cosines of
    the last micro-batch and the gradient norms of the IRL states over the whole step.
    """
    weights = micro_batch_weights(micro_batches)
    main = torch.zeros((), device=device)
    aux = torch.zeros((), device=device)
    out = None
    probe = IRLProbe() if analyze else None
    with probe if probe is not None else nullcontext():
        for i, ((x, y), weight) in enumerate(zip(micro_batches, weights)):
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            is_last = i == len(micro_batches) - 1
            with sync_context(is_last) if sync_context is not None else nullcontext():
                out = forward_backward(model, x, y, weight, len(micro_batches), dtype, scaler)
            main += out.main_loss.detach() * weight
            aux += out.aux_loss.detach() / len(micro_batches)
    metrics = out.metrics if out is not None else {}
    if probe is not None:
        scale = scaler.get_scale() if scaler is not None and scaler.is_enabled() else 1.0  # a host sync: log steps
        metrics = {**metrics, **probe.grad_norms(scale)}
    return StepLosses(main, aux, metrics)


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


def balance_layers(model) -> list:
    """The MoC layers of `model` (plain, DDP-, FSDP- or compile-wrapped) that balance by routing bias."""
    return [m for m in model.modules() if isinstance(m, MoCLayer) and m.load_balance == "bias"]


def reset_balance_counts(model) -> None:
    """Forget the expert loads counted so far: a step counts its own micro-batches only (not a probe forward, not
    a failed compiled attempt)."""
    for layer in balance_layers(model):
        layer.reset_balance_counts()


def balance_experts(model, apply: bool = True) -> None:
    """Auxiliary-loss-free balancing, right after the optimizer update: every `load_balance: bias` layer moves
    its routing bias by the step's expert load, then forgets it. Nothing happens for other models.

    The loads of every layer are summed over processes in one all-reduce, so every rank applies the same update
    and the biases stay identical (call it on every rank). `apply` False (a skipped step) only resets the counts.
    """
    layers = balance_layers(model)
    if not layers:
        return
    counts = all_reduce_sum(torch.stack([layer.balance_counts for layer in layers]))   # (layers, E)
    for layer, layer_counts in zip(layers, counts):
        if apply:
            layer.apply_balance(layer_counts)
        layer.reset_balance_counts()


def train_step(model, optimizer, micro_batches: list, dtype: torch.dtype = torch.float32, grad_clip: float = 0.0,
               scaler=None) -> dict:
    """One optimizer step in one process; returns floats: loss/main, loss/aux, loss/total, grad_norm.

    The update is skipped when the loss or the gradient is not finite (as the trainer does).
    """
    device = next(model.parameters()).device
    reset_balance_counts(model)  # the step's expert load is counted from here (nothing left by stray forwards)
    losses = accumulate(model, micro_batches, device, dtype, scaler)
    norm = clip_gradients(model.parameters(), optimizer, grad_clip, scaler)
    main, aux, grad_norm = torch.stack([losses.main.float(), losses.aux.float(), norm.float()]).tolist()
    applied = math.isfinite(main + aux) and math.isfinite(grad_norm)
    update(optimizer, applied, scaler)
    balance_experts(model, applied)
    return {"loss/main": main, "loss/aux": aux, "loss/total": main + aux, "grad_norm": grad_norm}

