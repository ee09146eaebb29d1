"""Optimizers (a registry: name -> factory) and the learning-rate schedule.

`OPTIMIZERS` maps each `optimizer:` choice of the config to a factory `(model, config, device_type) -> optimizer`:
`adamw` is AdamW over the model's groups (decay / no_decay / router; which parameter is which kind is the model's
own grouping, lunaris.model.param_groups); `muon` is Muon (muon.py) for the hidden matrices of the blocks and AdamW
for the rest, stepped as one `CombinedOptimizer`. A new optimizer is one factory here and one config choice.

The schedule is applied as `group["lr"] = schedule(step) * group["lr_scale"]`, so each group's multiplier (the
MoC router's 0.5x, Muon's muon_lr / learning_rate) survives every step. A resumed run keeps the loaded state
(moments, step counts) and takes every group's hyperparameters from the current config (`load_state_only`).
"""

import math

import torch

from lunaris.config import TrainConfig
from lunaris.errors import CheckpointError
from lunaris.model.param_groups import EMBEDDING, HEAD, SCALAR, adamw
from lunaris.train.muon import Muon, muon_parameters


def lr_at(step: int, config: TrainConfig, seconds: float = 0.0) -> float:
    """Learning rate for optimizer step `step` (0-based), before each group's lr_scale.

    Warmup rises linearly to `learning_rate` at step `warmup_steps`; then `lr_schedule` falls to `min_lr` at
    `max_steps` (and stays there if the run is extended past it): `cosine` and `linear` over the whole rest of
    the run, `wsd` (warmup-stable-decay) holds the peak and decays linearly over the last `decay_fraction`.
    With a time budget (`max_train_seconds`) the same shapes follow `seconds`, the training time before this step,
    instead of the step: cosine and linear over the fraction of the budget spent, wsd decaying once the time left is
    decay_fraction of the budget; warmup stays in steps.
    """
    warmup, total = config.warmup_steps, config.max_steps
    if step < warmup:
        return config.learning_rate * (step + 1) / (warmup + 1)
    if config.max_train_seconds is not None:
        return time_lr(seconds / config.max_train_seconds, config)
    if step >= total or total <= warmup:
        return config.resolved_min_lr
    if config.lr_schedule == "wsd":
        decay_start = max(warmup, total - round(config.decay_fraction * total))
        return decayed(max(0.0, (step - decay_start) / max(total - decay_start, 1)), config, "linear")
    progress = (step - warmup) / (total - warmup)               # 0 -> 1 over the decay
    return decayed(progress, config)


def time_lr(spent: float, config: TrainConfig) -> float:
    """The learning rate after warmup when `spent` (0 -> 1) of the time budget is gone."""
    spent = min(max(spent, 0.0), 1.0)
    if config.lr_schedule == "wsd":
        start = 1.0 - config.decay_fraction
        return decayed(max(0.0, (spent - start) / config.decay_fraction), config, "linear")
    return decayed(spent, config)


def decayed(progress: float, config: TrainConfig, shape: str = None) -> float:
    """The learning rate `progress` (0 -> 1) of the way down from learning_rate to min_lr, by the schedule's shape."""
    peak, floor = config.learning_rate, config.resolved_min_lr
    if (shape or config.lr_schedule) == "linear":
        return peak - progress * (peak - floor)
    return floor + 0.5 * (1.0 + math.cos(math.pi * progress)) * (peak - floor)


def apply_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Set every group's LR to `lr * lr_scale` (the scale is kept, never overwritten)."""
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)


def build_adamw(model: torch.nn.Module, config: TrainConfig, device_type: str, exclude=frozenset()):
    """AdamW over the model's groups: decay, no_decay, router (router_lr_scale), and embedding, lm_head, scalars
    when embedding_lr, lm_head_lr, scalar_lr are set; fused on CUDA. Parameters whose id() is in `exclude` are
    another optimizer's."""
    own = {kind: lr / config.learning_rate for kind, lr in
           ((EMBEDDING, config.embedding_lr), (HEAD, config.lm_head_lr), (SCALAR, config.scalar_lr)) if lr is not None}
    return adamw(model, config.weight_decay, config.learning_rate, (config.beta1, config.beta2), device_type,
                 config.router_lr_scale, exclude, own)


def build_muon(model: torch.nn.Module, config: TrainConfig, device_type: str):
    """Muon for the hidden matrices, AdamW for the rest (embeddings, LM head, norms, biases, router)."""
    matrices = muon_parameters(model)
    # decoupled weight decay per step as AdamW's (lr x wd), although Muon's lr is larger
    muon = Muon([{"params": matrices, "name": "muon", "lr_scale": config.muon_lr / config.learning_rate}],
                lr=config.muon_lr, weight_decay=config.weight_decay * config.learning_rate / config.muon_lr,
                momentum=config.muon_momentum, ns_coefficients=config.muon_ns_coefficients,
                lr_scaling=config.muon_lr_scaling)
    return CombinedOptimizer({"adamw": build_adamw(model, config, device_type, {id(p) for p in matrices}),
                              "muon": muon})


# config.optimizer -> factory(model, config, device_type): the one place an optimizer is added
OPTIMIZERS = {"adamw": build_adamw, "muon": build_muon}


def build_optimizer(model: torch.nn.Module, config: TrainConfig, device_type: str):
    """The optimizer `config.optimizer` names (OPTIMIZERS), over the unwrapped LunarisCodex `model`."""
    return OPTIMIZERS[config.optimizer](model, config, device_type)


# Group keys that describe how a loaded state is laid out (where AdamW keeps its step counts), not how to train:
# they stay as loaded.
LAYOUT_KEYS = ("params", "fused", "foreach", "capturable", "differentiable")


def load_state_only(optimizer, load, saved: dict = None) -> None:
    """`load()` a checkpoint's optimizer state into `optimizer`, keeping this run's hyperparameters.

    Loading brings back the saved groups' settings; a user who changed `router_lr_scale`, betas, weight decay,
    `muon_lr` or `muon_momentum` before resuming expects the new values. So every group's settings (lr_scale,
    betas, weight_decay, momentum, ...: whatever the optimizer built for the current config holds) are put back
    after loading, and only the state (moments, step counts) is the checkpoint's. No group is named here.
    `saved`, the checkpoint's optimizer state when at hand, is first checked to hold this optimizer's groups.
    """
    check_groups(optimizer, saved)
    settings = [{k: v for k, v in group.items() if k not in LAYOUT_KEYS} for group in optimizer.param_groups]
    load()
    for group, own in zip(optimizer.param_groups, settings):
        group.update(own)


def check_groups(optimizer, saved: dict = None) -> None:
    """A clear error when a checkpoint's optimizer state `saved` has other parameter groups than `optimizer` (a
    learning rate of their own for embeddings, head or scalars set or cleared since the run started)."""
    def names(state: dict) -> list:  # an optimizer's state_dict, or a CombinedOptimizer's (one per optimizer)
        if "param_groups" in state:
            return [group.get("name") for group in state["param_groups"]]
        return [name for part in state.values() if isinstance(part, dict) for name in names(part)]
    if not saved:
        return
    before, now = names(saved), [group.get("name") for group in optimizer.param_groups]
    if None not in before and sorted(before) != sorted(now):
        raise CheckpointError(
            f"the checkpoint's optimizer has the parameter groups {', '.join(before)}, and this run's config makes "
            f"{', '.join(now)}: embedding_lr, lm_head_lr and scalar_lr each give a group of its own, so set them "
            f"(or leave them null) as the run started, or start a new run (--no-resume or another out_dir).")


class CombinedOptimizer:
    """Several optimizers stepped as one: what the trainer, the GradScaler and checkpoints see.

    `param_groups` lists every group of every optimizer (each with its `name` and `lr_scale`); `state_dict`
    holds each optimizer's state under its name, so a checkpoint resumes exactly.
    """

    def __init__(self, optimizers: dict):
        self.optimizers = optimizers

    @property
    def param_groups(self) -> list:
        return [group for optimizer in self.optimizers.values() for group in optimizer.param_groups]

    @property
    def state(self) -> dict:
        return {p: s for optimizer in self.optimizers.values() for p, s in optimizer.state.items()}

    @property
    def defaults(self) -> dict:
        """The first optimizer's defaults (what code asking an optimizer for its defaults, e.g. `fused`, reads)."""
        return next(iter(self.optimizers.values())).defaults

    def step(self, closure=None):
        for optimizer in self.optimizers.values():
            optimizer.step()

    def zero_grad(self, set_to_none: bool = True) -> None:
        for optimizer in self.optimizers.values():
            optimizer.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict:
        return {name: optimizer.state_dict() for name, optimizer in self.optimizers.items()}

    def load_state_dict(self, state: dict) -> None:
        if set(state) != set(self.optimizers):
            raise ValueError(f"the optimizer state holds {sorted(state)}, this run's optimizer "
                             f"{sorted(self.optimizers)} (another optimizer setting)")
        for name, optimizer in self.optimizers.items():
            optimizer.load_state_dict(state[name])
