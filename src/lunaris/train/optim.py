"""Optimizer and learning-rate schedule.

The schedule is linear warmup then cosine decay to `min_lr`. It is applied as
`group["lr"] = schedule(step) * group["lr_scale"]` so each group's multiplier (the MoC router's 0.5x)
survives every step: the original trainer overwrote every group's LR and lost it.
"""

import math

import torch

from lunaris.config import TrainConfig


def lr_at(step: int, config: TrainConfig) -> float:
    """Learning rate for optimizer step `step` (0-based), before each group's lr_scale.

    Warmup rises linearly to `learning_rate` at step `warmup_steps`; then a cosine falls to
    `min_lr` at `max_steps` (and stays there if the run is extended past it).
    """
    peak, floor = config.learning_rate, config.resolved_min_lr
    warmup, total = config.warmup_steps, config.max_steps
    if step < warmup:
        return peak * (step + 1) / (warmup + 1)
    if step >= total or total <= warmup:
        return floor
    progress = (step - warmup) / (total - warmup)               # 0 -> 1 over the decay
    return floor + 0.5 * (1.0 + math.cos(math.pi * progress)) * (peak - floor)


def apply_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Set every group's LR to `lr * lr_scale` (the scale is kept, never overwritten)."""
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)


def build_optimizer(model: torch.nn.Module, config: TrainConfig, device_type: str) -> torch.optim.Optimizer:
    """AdamW with the model's parameter groups (decay / no_decay / router with router_lr_scale).

    `model` is the unwrapped LunarisCodex (after FSDP sharding its parameters are DTensors, which
    AdamW handles). Fused AdamW is used on CUDA.
    """
    return model.configure_optimizers(
        weight_decay=config.weight_decay, learning_rate=config.learning_rate,
        betas=(config.beta1, config.beta2), device_type=device_type,
        router_lr_scale=config.router_lr_scale)


def restore_lr_scales(optimizer: torch.optim.Optimizer, config: TrainConfig) -> None:
    """After loading an optimizer state, take each group's lr_scale from the current config.

    `optimizer.load_state_dict` brings back the saved groups' hyperparameters; a user who changed
    `router_lr_scale` (or betas / weight decay) before resuming expects the new value to apply.
    """
    scales = {"router": config.router_lr_scale}
    for group in optimizer.param_groups:
        group["lr_scale"] = scales.get(group.get("name"), 1.0)
        group["betas"] = (config.beta1, config.beta2)
        if group.get("name") == "decay":
            group["weight_decay"] = config.weight_decay
