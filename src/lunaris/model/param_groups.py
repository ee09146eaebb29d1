"""Which parameters of the model are which kind, for optimizers: a property of the model, written once.

Six kinds, decided by a parameter's name and shape:
- `matrix`: a >=2-D weight inside the blocks (attention q/k/v/o, FFN, collaboration, every stacked expert weight,
  the value-embedding gates): weight decay; the parameters Muon updates with `optimizer: muon`.
- `embedding`: the token embedding and the value embeddings: weight decay, always AdamW.
- `head`: an untied LM head: weight decay, always AdamW.
- `vector`: norms and biases (< 2-D): no weight decay.
- `scalar`: the residual scalars (residual_scalars): no weight decay.
- `router`: the MoC router: no weight decay, its own learning-rate scale (`router_lr_scale`).

`adamw` is the AdamW of DESIGN.md over them: groups decay (matrix + embedding + head), no_decay (vector + scalar)
and router, each carrying `lr_scale`; an embedding, head or scalar learning rate of their own (embedding_lr,
lm_head_lr, scalar_lr) moves that kind into a group of its own. `LunarisCodex.configure_optimizers` and the
trainer's optimizer registry (lunaris.train.optim) both build it here.
"""

import torch
import torch.nn as nn

MATRIX, EMBEDDING, HEAD, VECTOR, SCALAR, ROUTER = "matrix", "embedding", "head", "vector", "scalar", "router"
# a kind given a learning rate of its own -> (its group's name, whether it takes weight decay)
OWN_GROUPS = {EMBEDDING: ("embedding", True), HEAD: ("lm_head", True), SCALAR: ("scalars", False)}


def parameter_kind(name: str, param: torch.Tensor) -> str:
    """The kind of the parameter called `name` (as `named_parameters` names it) in the model."""
    if "router" in name:
        return ROUTER
    if name.startswith("residual_scalars."):
        return SCALAR
    if param.dim() < 2:
        return VECTOR
    if name.startswith("blocks."):
        return MATRIX
    return HEAD if name.startswith("lm_head.") else EMBEDDING


def parameters_of_kind(model: nn.Module, *kinds: str, exclude=frozenset()) -> list:
    """The trainable parameters of `model` whose kind is one of `kinds`, in `named_parameters` order (each once:
    a tied LM head is the embedding); those whose id() is in `exclude` are left out.

    The order is the optimizer state's order in a checkpoint: it must not change.
    """
    return [param for name, param in model.named_parameters()
            if param.requires_grad and id(param) not in exclude and parameter_kind(name, param) in kinds]


def adamw(model: nn.Module, weight_decay: float, learning_rate: float, betas=(0.9, 0.95), device_type: str = "cpu",
          router_lr_scale: float = 0.5, exclude=frozenset(), own_lr_scales=None) -> torch.optim.AdamW:
    """AdamW with groups decay (>=2-D weights), no_decay (norms, biases, scalars), router (no decay,
    `router_lr_scale`).

    Every group carries `name` and `lr_scale`; a schedule sets lr = schedule(step) * lr_scale. Parameters whose id()
    is in `exclude` are left out (another optimizer, e.g. Muon, updates them); an empty group is left out.
    `own_lr_scales` {kind: lr_scale} (kinds of OWN_GROUPS) gives those kinds a group of their own, after the others.
    """
    own = own_lr_scales or {}
    settings = {"decay": (tuple(k for k in (MATRIX, EMBEDDING, HEAD) if k not in own), weight_decay, 1.0),
                "no_decay": (tuple(k for k in (VECTOR, SCALAR) if k not in own), 0.0, 1.0),
                "router": ((ROUTER,), 0.0, router_lr_scale)}
    for kind, scale in own.items():
        name, decays = OWN_GROUPS[kind]
        settings[name] = ((kind,), weight_decay if decays else 0.0, scale)
    groups = []
    for name, (kinds, decay, scale) in settings.items():
        params = parameters_of_kind(model, *kinds, exclude=exclude)
        if params:
            groups.append({"params": params, "name": name, "weight_decay": decay, "lr_scale": scale,
                           "lr": learning_rate * scale})
    # Fused AdamW (one kernel per step instead of ~10 passes over every tensor): on CUDA, and on CPU
    # (torch >= 2.4, ~5x faster there) for plain tensors; FSDP's sharded DTensors on CPU keep the default.
    plain = all(type(p.data) is torch.Tensor for group in groups for p in group["params"])
    fused = device_type == "cuda" or (device_type == "cpu" and plain and torch.__version__ >= (2, 4))
    extra = {"fused": True} if fused else {}
    return torch.optim.AdamW(groups, lr=learning_rate, betas=tuple(betas), **extra)
