"""Optimizers and the learning-rate schedule.

`optimizer: adamw` is AdamW over the model's groups (decay / no_decay / router). `optimizer: muon` is Muon
(momentum orthogonalized by Newton-Schulz, `torch.optim.Muon`) for the hidden matrices of the blocks (attention,
FFN, collaboration; each expert of a stacked expert weight separately) and AdamW for the rest (embeddings, LM
head, norms, biases, router), stepped as one optimizer.

The schedule is applied as `group["lr"] = schedule(step) * group["lr_scale"]`, so each group's multiplier (the
MoC router's 0.5x, Muon's muon_lr / learning_rate) survives every step.
"""

import math

import torch

from lunaris.config import TrainConfig


def lr_at(step: int, config: TrainConfig) -> float:
    """Learning rate for optimizer step `step` (0-based), before each group's lr_scale.

    Warmup rises linearly to `learning_rate` at step `warmup_steps`; then `lr_schedule` falls to `min_lr` at
    `max_steps` (and stays there if the run is extended past it): `cosine` and `linear` over the whole rest of
    the run, `wsd` (warmup-stable-decay) holds the peak and decays linearly over the last `decay_fraction`.
    """
    peak, floor = config.learning_rate, config.resolved_min_lr
    warmup, total = config.warmup_steps, config.max_steps
    if step < warmup:
        return peak * (step + 1) / (warmup + 1)
    if step >= total or total <= warmup:
        return floor
    if config.lr_schedule == "wsd":
        decay_start = max(warmup, total - round(config.decay_fraction * total))
        progress = max(0.0, (step - decay_start) / max(total - decay_start, 1))
        return peak - progress * (peak - floor)
    progress = (step - warmup) / (total - warmup)               # 0 -> 1 over the decay
    if config.lr_schedule == "linear":
        return peak - progress * (peak - floor)
    return floor + 0.5 * (1.0 + math.cos(math.pi * progress)) * (peak - floor)


def apply_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Set every group's LR to `lr * lr_scale` (the scale is kept, never overwritten)."""
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)


def build_optimizer(model: torch.nn.Module, config: TrainConfig, device_type: str):
    """The optimizer `config.optimizer` names, over the unwrapped LunarisCodex `model`.

    adamw: the model's groups (decay / no_decay / router with router_lr_scale; fused on CUDA). muon: Muon for
    the hidden matrices, AdamW for the rest, as one CombinedOptimizer.
    """
    adamw_args = dict(weight_decay=config.weight_decay, learning_rate=config.learning_rate,
                      betas=(config.beta1, config.beta2), device_type=device_type,
                      router_lr_scale=config.router_lr_scale)
    if config.optimizer != "muon":
        return model.configure_optimizers(**adamw_args)
    matrices = muon_parameters(model)
    adamw = model.configure_optimizers(**adamw_args, exclude={id(p) for p in matrices})
    # decoupled weight decay per step as AdamW's (lr x wd), although Muon's lr is larger
    muon = Muon([{"params": matrices, "name": "muon", "lr_scale": config.muon_lr / config.learning_rate}],
                lr=config.muon_lr, weight_decay=config.weight_decay * config.learning_rate / config.muon_lr,
                momentum=config.muon_momentum)
    return CombinedOptimizer({"adamw": adamw, "muon": muon})


def muon_parameters(model: torch.nn.Module) -> list:
    """The hidden matrices of the blocks: 2-D weights (attention, FFN, collaboration) and 3-D stacked expert
    weights; never the embedding, the LM head, norms, biases or the router."""
    return [param for name, param in model.named_parameters()
            if param.requires_grad and name.startswith("blocks.") and param.dim() >= 2 and "router" not in name]


class Muon(torch.optim.Optimizer):
    """Muon: Nesterov momentum, orthogonalized by Newton-Schulz, then a shape-scaled step (torch.optim.Muon's
    algorithm, coefficients and LR adjustment, which a test checks against it).

    Two differences from torch.optim.Muon, both measured or needed: stacked expert weights (E, in, out) are
    orthogonalized one expert matrix at a time (torch's takes 2-D only), and the iteration runs in fp32 off CUDA
    (bf16 matmuls are about 7x slower than fp32 on CPUs without AVX-512 BF16; on CUDA it runs in bf16 as torch's).
    """

    def __init__(self, params, lr: float, weight_decay: float, momentum: float, ns_steps: int = 5):
        super().__init__(params, dict(lr=lr, weight_decay=weight_decay, momentum=momentum, ns_steps=ns_steps))

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            for param in group["params"]:
                if param.grad is None:
                    continue
                state = self.state[param]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(param)
                buffer = state["momentum_buffer"]
                buffer.lerp_(param.grad, 1 - group["momentum"])
                update = param.grad.lerp(buffer, group["momentum"])             # Nesterov
                # nn.Linear weights are (out, in); stacked expert weights (E, in, out): as (E, out, in)
                stacked = param.dim() == 3
                matrices = update.mT if stacked else update[None]               # (E, out, in)
                compute = torch.bfloat16 if param.is_cuda else torch.float32
                ortho = newton_schulz(matrices, group["ns_steps"], compute)
                ortho = (ortho.mT if stacked else ortho[0]).to(param.dtype)
                fan_out, fan_in = matrices.shape[-2:]
                param.mul_(1 - group["lr"] * group["weight_decay"])
                param.add_(ortho, alpha=-group["lr"] * math.sqrt(max(1.0, fan_out / fan_in)))
        return None


def newton_schulz(grad: torch.Tensor, steps: int = 5, dtype: torch.dtype = torch.bfloat16,
                  eps: float = 1e-7) -> torch.Tensor:
    """torch.optim.Muon's quintic Newton-Schulz iteration, batched over the leading dimension: grad (E, A, B)."""
    a, b, c = (3.4445, -4.775, 2.0315)
    x = grad.to(dtype)
    transposed = x.size(-2) > x.size(-1)
    if transposed:
        x = x.mT
    x = x / x.norm(dim=(-2, -1), keepdim=True).clamp(min=eps)  # spectral norm at most 1
    for _ in range(steps):  # the same fused ops as torch's (addmm there), so bf16 rounds the same way
        gram = x @ x.mT
        x = torch.baddbmm(x, torch.baddbmm(gram, gram, gram, beta=b, alpha=c), x, beta=a)
    return x.mT if transposed else x


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
        return self.optimizers["adamw"].defaults

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


def restore_lr_scales(optimizer: torch.optim.Optimizer, config: TrainConfig) -> None:
    """After loading an optimizer state, take each group's lr_scale from the current config.

    `optimizer.load_state_dict` brings back the saved groups' hyperparameters; a user who changed
    `router_lr_scale` (or betas / weight decay) before resuming expects the new value to apply.
    """
    scales = {"router": config.router_lr_scale, "muon": config.muon_lr / config.learning_rate}
    for group in optimizer.param_groups:
        name = group.get("name")
        group["lr_scale"] = scales.get(name, 1.0)
        if name == "muon":
            group["momentum"] = config.muon_momentum
            group["weight_decay"] = config.weight_decay * config.learning_rate / config.muon_lr
            continue
        group["betas"] = (config.beta1, config.beta2)
        if name == "decay":
            group["weight_decay"] = config.weight_decay
