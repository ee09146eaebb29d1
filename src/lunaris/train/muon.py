"""Muon: momentum orthogonalized by Newton-Schulz, for the hidden matrices of the blocks (`optimizer: muon`).

Which parameters it takes is the model's grouping (`muon_parameters`: the `matrix` kind of
lunaris.model.param_groups: 2-D weights of the blocks and each expert of a stacked expert weight; never the
embedding, the LM head, norms, biases or the router); the optimizer registry (optim.py) pairs it with AdamW for
the rest.
"""

import math

import torch

from lunaris.model.param_groups import MATRIX, parameters_of_kind


def muon_parameters(model: torch.nn.Module) -> list:
    """The hidden matrices of the blocks: 2-D weights (attention, FFN, collaboration) and 3-D stacked expert
    weights; never the embedding, the LM head, norms, biases or the router."""
    return parameters_of_kind(model, MATRIX)


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
