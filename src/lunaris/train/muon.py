"""Muon: momentum orthogonalized by Newton-Schulz, for the hidden matrices of the blocks (`optimizer: muon`).

Which parameters it takes is the model's grouping (`muon_parameters`: the `matrix` kind of
lunaris.model.param_groups: 2-D weights of the blocks and each expert of a stacked expert weight; never the
embedding, the LM head, norms, biases or the router); the optimizer registry (optim.py) pairs it with AdamW for
the rest.

Under several processes every matrix (each expert of a stacked weight counts as one) is orthogonalized on exactly
one rank, its owner (`MatrixPlan`: largest first, each to the least-loaded rank), so each rank does about 1/world of
the Newton-Schulz work. Everything else in a step is elementwise and runs where the numbers are:

- FSDP2 (parameters are DTensors sharded on dim 0): the momentum stays sharded like its parameter. Each rank computes
  the Nesterov update of its rows, one all_to_all sends every matrix's rows to its owner, the owner orthogonalizes
  the whole matrix, a second all_to_all returns each rank its rows of the result, and each rank updates its shard.
- DDP (whole parameters and gradients on every rank): every rank updates its momentum (it is replicated, as the
  weights are), orthogonalizes the matrices it owns, and one all_gather hands every rank every result.

The arithmetic is single-process Muon's, element for element (a test checks it against one process).
"""

import math
from dataclasses import dataclass

import torch
import torch.distributed as dist

from lunaris.errors import LunarisError
from lunaris.model.param_groups import MATRIX, parameters_of_kind
from lunaris.train.distributed import all_gather_flat, all_to_all_flat


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

    Parameters may be plain tensors (one process, or DDP: every rank of the process group steps together) or
    FSDP2 DTensors sharded on dim 0; see the module docstring for how the work is split. Every rank must have
    gradients for the same parameters (DDP and FSDP guarantee it).
    """

    def __init__(self, params, lr: float, weight_decay: float, momentum: float, ns_steps: int = 5,
                 ns_coefficients: str = "torch", lr_scaling: str = "shape"):
        super().__init__(params, dict(lr=lr, weight_decay=weight_decay, momentum=momentum, ns_steps=ns_steps,
                                      ns_coefficients=ns_coefficients, lr_scaling=lr_scaling))
        self._plans: dict = {}  # the plan of each set of parameter shapes: built once, not saved

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if params:
                updates = [self._nesterov(p, group["momentum"]) for p in params]
                orthos = self._orthogonalize(params, updates, group["ns_steps"], group["ns_coefficients"])
                for param, ortho in zip(params, orthos):
                    weights = local(param)
                    weights.mul_(1 - group["lr"] * group["weight_decay"])
                    weights.add_(ortho.to(param.dtype),
                                 alpha=-group["lr"] * shape_scale(param.shape, group["lr_scaling"]))
        return None

    def _nesterov(self, param, momentum: float) -> torch.Tensor:
        """This rank's part of the Nesterov update (whole, or the shard's rows); the momentum is kept sharded
        like the parameter (torch.zeros_like of a DTensor is one)."""
        state = self.state[param]
        if "momentum_buffer" not in state:
            state["momentum_buffer"] = torch.zeros_like(param)
        buffer, grad = local(state["momentum_buffer"]), local(param.grad)
        buffer.lerp_(grad, 1 - momentum)
        return grad.lerp(buffer, momentum)

    def _orthogonalize(self, params: list, updates: list, ns_steps: int, coefficients: str = "torch") -> list:
        """Newton-Schulz of every matrix of `params`, each on its owner; returns this rank's part of each result
        (shaped as `updates`, this rank's part of each Nesterov update)."""
        plan = self._plan(params)
        # the iteration starts by casting to its compute dtype: casting before sending is the same arithmetic, and
        # bf16 on GPUs halves the traffic
        compute = torch.bfloat16 if updates[0].is_cuda else torch.float32
        updates = [u.to(compute) for u in updates]
        if plan.sharded:
            matrices = plan.gather(updates)
        else:
            matrices = {k: updates[plan.matrices[k].param][plan.matrices[k].rows].reshape(plan.matrices[k].shape)
                        for k in plan.mine}
        results = orthogonalize_by_shape(matrices, ns_steps, compute, coefficients)
        orthos = [torch.empty_like(u) for u in updates]
        if plan.sharded:
            plan.scatter(results, orthos)
        else:
            plan.share(results, orthos)
        return orthos

    def _plan(self, params: list) -> "MatrixPlan":
        key = tuple((id(p), tuple(p.shape)) for p in params)
        if key not in self._plans:
            self._plans[key] = MatrixPlan.of(params)
        return self._plans[key]


def local(tensor: torch.Tensor) -> torch.Tensor:
    """The part of `tensor` this process holds: a DTensor's local shard (a view: writing it writes the DTensor),
    else the tensor itself."""
    return tensor.to_local() if hasattr(tensor, "to_local") else tensor


def shape_scale(shape, scaling: str = "shape") -> float:
    """The step of a parameter as a multiple of the learning rate (`lr_multiplier` of its matrices' fan-out and
    fan-in): an nn.Linear weight is (out, in), a stacked expert weight (E, in, out)."""
    fan_out, fan_in = (shape[-1], shape[-2]) if len(shape) == 3 else (shape[0], shape[1])
    return lr_multiplier(fan_out, fan_in, scaling)


@dataclass(frozen=True)
class Matrix:
    """One matrix Muon orthogonalizes: rows [start, stop) along dim 0 of parameter `param` (all rows of a 2-D
    weight; row e of a stacked expert weight (E, in, out)), `shape` as stored, orthogonalized on rank `owner`."""
    param: int
    start: int
    stop: int
    shape: tuple
    owner: int

    @property
    def rows(self) -> slice:
        return slice(self.start, self.stop)


class MatrixPlan:
    """Who orthogonalizes which matrix of a list of parameters, and the collectives that move them.

    Owners: matrices sorted by Newton-Schulz work (rows x cols x min(rows, cols)), largest first, each given to the
    least-loaded rank (on a tie, the rank that holds most of its rows: nothing to send; then the lowest rank).
    Parameters are all plain tensors (one process or DDP: every rank holds every row) or all FSDP2 DTensors
    sharded on dim 0 in torch.chunk pieces (fully_shard's layout: rank r holds rows [r*c, (r+1)*c), c = ceil(n/W)).
    Every rank builds the same plan from the shapes alone.
    """

    def __init__(self, params: list, world: int, rank: int, group=None):
        self.world, self.rank, self.group = world, rank, group
        self.sharded = hasattr(params[0], "placements")
        self.row_numel = [math.prod(p.shape[1:]) for p in params]
        self.held = [self._held_rows(p) for p in params]  # held[i][r]: (start, stop) rows of param i on rank r
        self.matrices = self._assign([m for i, p in enumerate(params) for m in matrices_of(i, p.shape)])
        self._routes()

    @classmethod
    def of(cls, params: list) -> "MatrixPlan":
        """The plan for `params` over the processes that hold them: an FSDP2 mesh (DTensors), the default process
        group (whole tensors under DDP), or this process alone."""
        sharded = [hasattr(p, "placements") for p in params]
        if any(sharded) and not all(sharded):
            raise LunarisError("Muon got both FSDP-sharded and whole parameters in one group; shard every block "
                               "(parallelism: fsdp) or none.")
        if all(sharded):
            group = params[0].device_mesh.get_group()
            return cls(params, dist.get_world_size(group), dist.get_rank(group), group)
        if dist.is_available() and dist.is_initialized():
            return cls(params, dist.get_world_size(), dist.get_rank())
        return cls(params, 1, 0)

    def _held_rows(self, param) -> list:
        rows = param.shape[0]
        if not self.sharded:
            return [(0, rows)] * self.world
        chunk = -(-rows // self.world)
        held = [(min(r * chunk, rows), min((r + 1) * chunk, rows)) for r in range(self.world)]
        start, stop = held[self.rank]
        if len(param.placements) != 1 or not param.placements[0].is_shard(0) or \
                local(param).shape[0] != stop - start:
            raise LunarisError(f"Muon under FSDP needs parameters sharded on dim 0 in torch.chunk pieces "
                               f"(fully_shard's default); a parameter of shape {tuple(param.shape)} has placements "
                               f"{param.placements} and {local(param).shape[0]} rows on rank {self.rank}.")
        return held

    def _assign(self, matrices: list) -> list:
        def work(m):
            return m.shape[0] * m.shape[1] * min(m.shape)
        load = [0] * self.world
        owners = {}
        for k in sorted(range(len(matrices)), key=lambda k: -work(matrices[k])):   # stable: ties keep their order
            m = matrices[k]
            owner = min(range(self.world), key=lambda r: (load[r], -self.overlap(m, r), r))
            load[owner] += work(m)
            owners[k] = owner
        return [Matrix(m.param, m.start, m.stop, m.shape, owners[k]) for k, m in enumerate(matrices)]

    def owned_by(self, rank: int) -> list:
        """Indices (into self.matrices) of the matrices `rank` orthogonalizes, in plan order."""
        return [k for k, m in enumerate(self.matrices) if m.owner == rank]

    def overlap(self, m: Matrix, rank: int) -> int:
        """Rows of matrix `m` that `rank` holds."""
        start, stop = self.held[m.param][rank]
        return max(0, min(m.stop, stop) - max(m.start, start))

    def _piece(self, m: Matrix, rank: int) -> int:
        """Elements of matrix `m` that `rank` holds."""
        return self.overlap(m, rank) * self.row_numel[m.param]

    def _local_rows(self, m: Matrix, rank: int) -> slice:
        """The rows of `m` that `rank` holds, in `rank`'s local (shard) coordinates."""
        start, stop = self.held[m.param][rank]
        return slice(max(m.start, start) - start, min(m.stop, stop) - start)

    def _matrix_rows(self, m: Matrix, rank: int) -> slice:
        """The rows of `m` that `rank` holds, counted from the matrix's first row."""
        start, stop = self.held[m.param][rank]
        return slice(max(m.start, start) - m.start, min(m.stop, stop) - m.start)

    def _routes(self) -> None:
        """What moves in a step, worked out once: for every peer, the pieces this rank sends it and gets from it."""
        me, ranks = self.rank, range(self.world)
        self.owned = [self.owned_by(rank) for rank in ranks]
        self.mine = self.owned[me]
        self.owned_numel = [sum(math.prod(self.matrices[k].shape) for k in keys) for keys in self.owned]
        if not self.sharded:
            return
        held = [[m for m in self.matrices if m.owner == owner and self.overlap(m, me)] for owner in ranks]
        # gather: my rows of each owner's matrices to it; from each rank, the sizes of its rows of mine
        self.to_owner = [[(m.param, self._local_rows(m, me)) for m in held[owner]] for owner in ranks]
        self.from_holder = [[self._piece(self.matrices[k], rank) for k in self.mine] for rank in ranks]
        # scatter: each rank's rows of my results to it; from each owner, my rows of its results
        self.to_holder = [[(k, self._matrix_rows(self.matrices[k], rank)) for k in self.mine
                           if self.overlap(self.matrices[k], rank)] for rank in ranks]
        self.from_owner = [[(m.param, self._local_rows(m, me), self._piece(m, me)) for m in held[owner]]
                           for owner in ranks]

    # ---- FSDP: rows to their owner and back (two all_to_all) ----

    def gather(self, updates: list) -> dict:
        """{matrix index: the whole matrix} of the matrices this rank owns, from every rank's rows of them."""
        empty = updates[0].new_empty(0)
        send = [torch.cat([empty] + [updates[i][rows].reshape(-1) for i, rows in pieces]) for pieces in self.to_owner]
        received = all_to_all_flat(send, [sum(sizes) for sizes in self.from_holder], self.group)
        pieces = {k: [] for k in self.mine}
        for flat, sizes in zip(received, self.from_holder):   # ranks in order: a matrix's rows in order
            for k, piece in zip(self.mine, flat.split(sizes)):
                pieces[k].append(piece)
        return {k: torch.cat(pieces[k]).view(self.matrices[k].shape) for k in self.mine}

    def scatter(self, results: dict, orthos: list) -> None:
        """Write into `orthos` (this rank's shards) its rows of every result, from the results' owners."""
        empty = orthos[0].new_empty(0)
        send = [torch.cat([empty] + [results[k].reshape(self.matrices[k].stop - self.matrices[k].start, -1)[rows]
                                     .reshape(-1) for k, rows in pieces]) for pieces in self.to_holder]
        received = all_to_all_flat(send, [sum(n for _, _, n in pieces) for pieces in self.from_owner], self.group)
        for flat, pieces in zip(received, self.from_owner):
            for (i, rows, _), piece in zip(pieces, flat.split([n for _, _, n in pieces])):
                target = orthos[i][rows]
                target.copy_(piece.view_as(target))

    # ---- one process or DDP: every result to every rank (one all_gather) ----

    def share(self, results: dict, orthos: list) -> None:
        """Write every result into `orthos` (whole parameters), each rank's own results gathered from it."""
        if self.world == 1:
            values = results
        else:
            mine = torch.cat([orthos[0].new_empty(0)] + [results[k].reshape(-1) for k in self.mine])
            values = {}
            for keys, flat in zip(self.owned, all_gather_flat(mine, self.owned_numel, self.group)):
                values.update(zip(keys, flat.split([math.prod(self.matrices[k].shape) for k in keys])))
        for k, value in values.items():
            target = orthos[self.matrices[k].param][self.matrices[k].rows]
            target.copy_(value.view_as(target))


def matrices_of(index: int, shape) -> list:
    """The matrices Muon orthogonalizes in parameter `index` of `shape` (owner not yet chosen): a 2-D weight is
    one; a stacked expert weight (E, in, out) is E, one per row of dim 0."""
    if len(shape) == 2:
        return [Matrix(index, 0, shape[0], tuple(shape), -1)]
    if len(shape) == 3:
        return [Matrix(index, e, e + 1, tuple(shape[1:]), -1) for e in range(shape[0])]
    raise LunarisError(f"Muon orthogonalizes 2-D weights and stacked (E, in, out) expert weights, not a parameter "
                       f"of shape {tuple(shape)}.")


def orthogonalize_by_shape(matrices: dict, steps: int, dtype: torch.dtype, coefficients: str = "torch") -> dict:
    """{key: orthogonalized matrix}, one batched iteration per distinct shape; `coefficients` "torch" is
    `newton_schulz`, "polar_express" is `polar_express`."""
    iteration = polar_express if coefficients == "polar_express" else newton_schulz
    by_shape: dict = {}
    for key, matrix in matrices.items():
        by_shape.setdefault(tuple(matrix.shape), []).append(key)
    results = {}
    for keys in by_shape.values():
        results.update(zip(keys, iteration(torch.stack([matrices[k] for k in keys]), steps, dtype).unbind(0)))
    return results


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
    """torch.optim.Muon's quintic Newton-Schulz iteration, batched over the leading dimension: grad (E, A, B).

    The result of a matrix and of its transpose are each other's transposes (the iteration runs on the wide one),
    so a stacked expert (in, out) is orthogonalized as stored."""
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
