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
    """Muon: Nesterov momentum, orthogonalized by Newton-Schulz, then a shape-scaled step (by default torch.optim.Muon's
    algorithm, coefficients and LR adjustment, which a test checks against it).

    Two differences from torch.optim.Muon, both measured or needed: stacked expert weights (E, in, out) are
    orthogonalized one expert matrix at a time (torch's takes 2-D only), and the iteration runs in fp32 off CUDA
    (bf16 matmuls are about 7x slower than fp32 on CPUs without AVX-512 BF16; on CUDA it runs in bf16 as torch's).
    Two options (config muon_ns_coefficients, muon_lr_scaling): `ns_coefficients` "polar_express" orthogonalizes
    with `polar_express` instead of `newton_schulz`; `lr_scaling` picks the step size per matrix (`lr_multiplier`).
    """

    def __init__(self, params, lr: float, weight_decay: float, momentum: float, ns_steps: int = 5,
                 ns_coefficients: str = "torch", lr_scaling: str = "shape"):
        super().__init__(params, dict(lr=lr, weight_decay=weight_decay, momentum=momentum, ns_steps=ns_steps,
                                      ns_coefficients=ns_coefficients, lr_scaling=lr_scaling))

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
                if group["ns_coefficients"] == "polar_express":
                    ortho = polar_express(matrices, group["ns_steps"], compute)
                else:
                    ortho = newton_schulz(matrices, group["ns_steps"], compute)
                ortho = (ortho.mT if stacked else ortho[0]).to(param.dtype)
                fan_out, fan_in = matrices.shape[-2:]
                param.mul_(1 - group["lr"] * group["weight_decay"])
                param.add_(ortho, alpha=-group["lr"] * lr_multiplier(fan_out, fan_in, group["lr_scaling"]))
        return None


def lr_multiplier(fan_out: int, fan_in: int, scaling: str = "shape") -> float:
    """The step of an (out x in) matrix as a multiple of the learning rate (muon_lr_scaling).

    An orthogonalized update of an out x in matrix has every singular value near 1, so its RMS entry is
    1/sqrt(max(out, in)) and its spectral norm is near 1. `shape` (torch.optim.Muon's default, nanochat's):
    sqrt(max(1, out/in)), a larger step for tall matrices only; `spectral`: sqrt(out/in), a spectral norm in
    proportion to sqrt(out/in) for every shape (the spectral condition of Yang, Simon & Bernstein 2023), so wide
    matrices (FFN down) step less; `rms` (Moonlight; torch.optim.Muon's "match_rms_adamw"): 0.2*sqrt(max(out, in)),
    an update RMS of 0.2 like AdamW's, for a muon_lr of AdamW's size.
    """
    if scaling == "spectral":
        return math.sqrt(fan_out / fan_in)
    if scaling == "rms":
        return 0.2 * math.sqrt(max(fan_out, fan_in))
    return math.sqrt(max(1.0, fan_out / fan_in))


def newton_schulz(grad: torch.Tensor, steps: int = 5, dtype: torch.dtype = torch.bfloat16,
                  eps: float = 1e-7) -> torch.Tensor:
    """torch.optim.Muon's quintic Newton-Schulz iteration, batched over the leading dimension: grad (E, A, B)."""
    return quintic_iteration(grad, [(3.4445, -4.775, 2.0315)] * steps, dtype, eps)


# Polar Express (Amsel, Persson, Musco, Gower 2025, arXiv:2505.16932): the quintic (a, b, c) of each of five steps,
# chosen so the iteration maps every singular value in [~1e-3, 1] as close to 1 as five steps can (computed there
# for 5 steps with a 2% safety margin and cushion 2; nanochat's Muon uses the same numbers).
POLAR_EXPRESS = (
    (8.156554524902461, -22.48329292557795, 15.878769915207462),
    (4.042929935166739, -2.808917465908714, 0.5000178451051316),
    (3.8916678022926607, -2.772484153217685, 0.5060648178503393),
    (3.285753657755655, -2.3681294933425376, 0.46449024233003106),
    (2.3465413258596377, -1.7097828382687081, 0.42323551169305323),
)


def polar_express(grad: torch.Tensor, steps: int = 5, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """Orthogonalize with the Polar Express coefficients (one set per step; steps past five repeat the last), after
    scaling the spectral norm below 1/1.01, the safety margin they were computed for. grad (E, A, B)."""
    coefficients = [POLAR_EXPRESS[min(t, len(POLAR_EXPRESS) - 1)] for t in range(steps)]
    return quintic_iteration(grad, coefficients, dtype, eps=1e-6, margin=1.01)


def quintic_iteration(grad: torch.Tensor, coefficients, dtype: torch.dtype, eps: float = 1e-7,
                      margin: float = 1.0) -> torch.Tensor:
    """X <- a·X + (b·G + c·G²)·X with G = X·Xᵀ, one (a, b, c) per step, from grad / (margin·|grad|_F): pushes every
    singular value of grad (E, A, B) toward 1, keeping its singular vectors; batched over the leading dimension."""
    x = grad.to(dtype)
    transposed = x.size(-2) > x.size(-1)
    if transposed:  # the Gram matrix of the shorter side: (E, A, A) with A <= B
        x = x.mT
    x = x / (x.norm(dim=(-2, -1), keepdim=True) * margin).clamp(min=eps)  # spectral norm at most 1/margin
    for a, b, c in coefficients:  # the same fused ops as torch's (addmm there), so bf16 rounds the same way
        gram = x @ x.mT
        x = torch.baddbmm(x, torch.baddbmm(gram, gram, gram, beta=b, alpha=c), x, beta=a)
    return x.mT if transposed else x
