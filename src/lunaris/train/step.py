"""One training step, written once: forward under autocast, backward, gradient clipping, the update.

The trainer composes these pieces with its collectives in between (loss mean over ranks, the stop vote);
`train_step` composes them for one process, as the demo's step-time calibration, `lunaris selftest` and the
benchmark run them. Both do exactly the same arithmetic.

Fine-tuning data carries a loss mask beside its tokens (batches `(x, y, mask)`, see lunaris.data.shards): it
multiplies the per-token loss, so only the assistant's tokens are learned. A mask is 0 or 1, and a target multiplied
by 0 is a target the loss ignores: `loss_targets` turns those into -1, which the model's cross-entropy (and the
held-out loss) skip, so the same model call serves compiled, DDP, FSDP and MoC runs. Micro-batches are weighted
by their trained tokens, over the whole step and, with a mask, over every rank (see `micro_batch_weights`).

Whatever a model needs around the step is the model's own: its `training_hooks()` run before the step's first
micro-batch and right after the update (MoC's auxiliary-loss-free balancing is one), and on log steps its
`analysis()` is open around the forward and backward passes and adds its metrics (the IRL probe). Nothing here
names a layer type.
"""

import math
from contextlib import nullcontext
from typing import NamedTuple

import torch

from lunaris.metrics import GRAD_NORM, LOSS_AUX, LOSS_MAIN, LOSS_TOTAL
from lunaris.runtime import autocast
from lunaris.train.distributed import all_reduce_sum


class StepLosses(NamedTuple):
    main: torch.Tensor      # () detached: token-weighted cross-entropy of this process's micro-batches
    aux: torch.Tensor       # () detached: MoC auxiliary losses, averaged over micro-batches
    metrics: dict           # the model's metrics of the last micro-batch (detached tensors)


def loss_targets(batch) -> tuple:
    """(x, y) of a batch (x, y), or of (x, y, mask) with every target whose mask is 0 set to -1 (ignored): the
    per-token loss multiplied by the mask. x, y (B, T) int64, mask (B, T) bool."""
    if len(batch) == 2:
        return batch
    x, y, mask = batch
    return x, y.masked_fill(~mask.to(torch.bool), -1)


def micro_batch_weights(micro_batches: list, reduce_sum=None, device=None) -> list:
    """Each micro-batch's share of the step's target tokens (targets -1 are ignored); counted on the CPU.

    Without `reduce_sum`, the share of this process's tokens: every rank holds as many targets (but for the padded
    end of the stream), so the mean over ranks that the gradient all-reduce takes is the token mean. With a loss
    mask the ranks hold different numbers of trained tokens: `reduce_sum` (a sum over ranks) gives the step's total
    T and the number of ranks W, and a micro-batch of n trained tokens weighs n·W/T, so that after the ranks'
    mean every trained token of the step weighs the same (one small all-reduce per step).
    """
    counts = [int((y != -1).sum()) for _, y in micro_batches]
    if reduce_sum is None:
        total = max(sum(counts), 1)
        return [count / total for count in counts]
    total, ranks = reduce_sum(torch.tensor([float(sum(counts)), 1.0], dtype=torch.float64, device=device)).tolist()
    return [count * ranks / max(total, 1.0) for count in counts]


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
               sync_context=None, analysis=None, reduce_sum=all_reduce_sum) -> StepLosses:
    """forward_backward over every micro-batch [(x, y) or (x, y, mask), ...] of one step (each (B, T)).

    `sync_context(is_last)` wraps each micro-batch (DDP skips the gradient all-reduce on all but the last).
    `analysis` (the trainer's log steps: the model's `analysis()`) is a context manager open around every
    micro-batch; what it yields adds `metrics(loss_scale)` to the step's metrics once the backward passes are done
    (for IRL: the update cosines of the last micro-batch and the gradient norms of the states over the whole step).
    `reduce_sum` sums over the run's processes, for the token weights of masked batches (every rank calls it).
    """
    masked = any(len(batch) > 2 for batch in micro_batches)
    micro_batches = [loss_targets(batch) for batch in micro_batches]
    weights = micro_batch_weights(micro_batches, reduce_sum if masked else None, device)
    main = torch.zeros((), device=device)
    aux = torch.zeros((), device=device)
    out = None
    with analysis if analysis is not None else nullcontext() as probe:
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
        metrics = {**metrics, **probe.metrics(scale)}
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


def hooks_of(model) -> list:
    """The training hooks (`LunarisCodex.training_hooks`) of `model`, plain or wrapped (DDP, torch.compile): those
    of the first module inside it that has any; [] for a model without."""
    inner = next((m for m in model.modules() if hasattr(m, "training_hooks")), None)
    return inner.training_hooks() if inner is not None else []


def before_step(hooks: list, progress: float = None, reduce_sum=all_reduce_sum) -> None:
    """Every hook's `before_step(progress, reduce_sum)`: right before a step's first micro-batch (a probe forward or
    a failed compiled attempt before it is forgotten). `progress`: the step's index over max_steps (a schedule in
    the model reads it), None when unknown; `reduce_sum` as in `after_update` (hooks may keep it for the step's
    forwards, so call this on every rank)."""
    for hook in hooks:
        hook.before_step(progress, reduce_sum)


def after_update(hooks: list, applied: bool, reduce_sum=all_reduce_sum) -> None:
    """Every hook's `after_update`, right after the optimizer update (`applied` False: it was skipped).

    `reduce_sum(tensor)` sums a tensor over the run's processes in place (the trainer's collective; one process:
    nothing to sum): hooks may call it, so call this on every rank.
    """
    for hook in hooks:
        hook.after_update(applied, reduce_sum)


def train_step(model, optimizer, micro_batches: list, dtype: torch.dtype = torch.float32, grad_clip: float = 0.0,
               scaler=None, progress: float = None) -> dict:
    """One optimizer step in one process; returns floats: loss/main, loss/aux, loss/total, grad_norm.

    The update is skipped when the loss or the gradient is not finite (as the trainer does). `progress` (the
    step's index over the run's steps) reaches the model's hooks, as in the trainer.
    """
    device = next(model.parameters()).device
    hooks = hooks_of(model)
    before_step(hooks, progress)
    losses = accumulate(model, micro_batches, device, dtype, scaler)
    norm = clip_gradients(model.parameters(), optimizer, grad_clip, scaler)
    main, aux, grad_norm = torch.stack([losses.main.float(), losses.aux.float(), norm.float()]).tolist()
    applied = math.isfinite(main + aux) and math.isfinite(grad_norm)
    update(optimizer, applied, scaler)
    after_update(hooks, applied)
    return {LOSS_MAIN: main, LOSS_AUX: aux, LOSS_TOTAL: main + aux, GRAD_NORM: grad_norm}

