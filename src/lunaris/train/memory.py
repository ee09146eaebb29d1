"""What one training step needs in memory, measured on the model itself without allocating anything.

The model is built on the meta device and given fake tensors (`FakeTensorMode`: shapes, dtypes and devices, no data),
then one micro-batch runs through the trainer's own forward/backward (`step.forward_backward`, autocast included);
the config's optimizer takes its first step (clipping included) on the meta device. `LiveBytes`, a dispatch mode,
sees every tensor an operation creates and when its storage is freed; afterwards each storage is given a kind
(activation, gradient, optimizer state, temporary), and the peak of any weighted sum of kinds can be read off (FSDP
counts a gradient 1/N). Nothing is a formula of the architecture: a new layer, a different attention kernel or
optimizer is counted as the code runs it.

Fake tensors cost Python time per operation, not memory. The traced device is this machine's GPU when the run is
for it, else the CPU (the CPU's attention kernel keeps the same O(T) statistics as FlashAttention; eager mode:
torch.compile usually needs somewhat less activation memory). What this needs of torch (dispatch modes, fake
tensors, weak references to storages) is in every torch 2.x this project supports; where an operation has no fake
kernel in an older torch, the trace fails as a TraceUnavailable with its reason, and the callers say so.
"""

import dataclasses
import functools
import math
import weakref
from dataclasses import dataclass

import numpy as np
import torch

from lunaris.config import TrainConfig
from lunaris.errors import LunarisError
from lunaris.model import build_on_meta
from lunaris.model.moc import grouped_mm_supported
from lunaris.train import step as steps
from lunaris.train.optim import build_optimizer

# the kinds of memory a step creates (parameters and buffers exist before it)
ACTIVATION, GRADIENT, OPTIMIZER_STATE, TEMPORARY, OPTIMIZER_TEMPORARY = (
    "activations", "gradients", "optimizer state", "temporaries", "optimizer temporaries")


class TraceUnavailable(RuntimeError):
    """The step could not run on fake tensors here (an operation without a fake kernel, an old torch)."""


def traced(function):
    """`function` runs the model or optimizer on fake tensors: any failure of that (not of the config) is a
    TraceUnavailable that says what failed, for a message instead of a traceback."""
    @functools.wraps(function)
    def run(*args, **kwargs):
        try:
            return function(*args, **kwargs)
        except LunarisError:
            raise
        except Exception as exc:
            raise TraceUnavailable(f"torch {torch.__version__} could not trace the training step on fake tensors: "
                                   f"{type(exc).__name__}: {' '.join(str(exc).split())[:300]}") from exc
    return run


class LiveBytes:
    """A dispatch mode that records every tensor storage created under it: bytes, shape, the phase it was created in,
    and when it was created and freed, counted in allocations (`clock`). Storages that existed before (parameters,
    optimizer state of an earlier step) are not counted."""

    def __init__(self):
        from torch.utils._python_dispatch import TorchDispatchMode
        from torch.utils.weak import WeakIdKeyDictionary

        tracker = self

        class Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                if func in METADATA_QUERIES:
                    return func(*args, **(kwargs or {}))
                out = (func(*args, **(kwargs or {})) if func not in FAKE_KERNELS_BF16_ONLY
                       else _in_bf16(func, args, kwargs or {}))
                # an output that shares an input's storage (a view, an in-place or out= op) allocated nothing
                inputs = {id(value.untyped_storage()) for value in flat_tensors((args, kwargs))}
                for value in flat_tensors(out):
                    if id(value.untyped_storage()) not in inputs:
                        tracker.note(value)
                return out

        self.mode = Mode()
        self.seen = WeakIdKeyDictionary()       # storage -> its record
        self.records: list = []                 # [bytes, born, died (None: alive), phase, shape]
        self.clock = 0
        self.phase = "forward"

    def __enter__(self):
        self.mode.__enter__()
        return self

    def __exit__(self, *exc):
        return self.mode.__exit__(*exc)

    def note(self, tensor: torch.Tensor) -> None:
        storage = tensor.untyped_storage()
        if storage in self.seen:
            return
        self.clock += 1
        record = [storage.nbytes(), self.clock, None, self.phase, tuple(tensor.shape)]
        self.records.append(record)
        self.seen[storage] = record
        weakref.finalize(storage, self._freed, record)

    def _freed(self, record: list) -> None:
        record[2] = self.clock

    def storage_record(self, tensor: torch.Tensor):
        return self.seen.get(tensor.untyped_storage())

    def live_series(self, kinds: list, names: tuple) -> dict:
        """For each kind in `names`: the bytes of that kind alive after each allocation (numpy array over the
        clock). `kinds[i]` is the kind of `records[i]`."""
        series = {name: np.zeros(self.clock + 2) for name in names}
        for (nbytes, born, died, _, _), kind in zip(self.records, kinds):
            if kind in series:
                series[kind][born] += nbytes
                series[kind][self.clock + 1 if died is None else died + 1] -= nbytes
        return {name: np.cumsum(values)[:-1] for name, values in series.items()}  # index k: after allocation k


@dataclass
class StepMemory:
    """One micro-batch's forward and backward at `batch_size`, single process, in bytes.

    `activations` is what the forward pass leaves alive for the backward (saved tensors, the logits and the loss);
    `other` and `grads` are the non-gradient and gradient bytes created by the step that are alive after each
    allocation, so the step's peak can be weighed for any sharding of the gradients.
    """

    batch_size: int
    seq_len: int
    checkpointing: bool
    activations: int
    logits: int                 # of the activations: tensors of B x T x vocab (the logits and their fp32 copies)
    other: np.ndarray           # (clock,) non-gradient bytes alive
    grads: np.ndarray           # (clock,) gradient bytes alive
    largest_grad: int           # one parameter's gradient (a micro-batch after the first adds it, then frees it)

    def peak(self, grad_share: float, accumulating: bool) -> int:
        """The most the step holds at once beyond parameters and optimizer state, with gradients counted at
        `grad_share` (FSDP: 1/N). `accumulating`: a micro-batch after the first of a step, which starts with every
        gradient already there and adds its own to them."""
        if accumulating:
            return int(self.other.max() + grad_share * (self.grads[-1] + self.largest_grad))
        return int((self.other + grad_share * self.grads).max())


@dataclass
class OptimizerMemory:
    """The optimizer's state (created by its first step) and the most its step allocates beyond it, in bytes."""

    name: str
    state: int
    step_peak: int


@dataclass
class ModelMemory:
    """What the model itself holds, in bytes: fp32 parameters (master weights), buffers, and how they split into
    FSDP units (each block, and the root: embedding, final norm, LM head)."""

    count: int                  # parameters (numbers)
    params: int
    buffers: int
    trainable: int              # parameters that get a gradient
    root_params: int
    largest_block: int
    shard_sizes: tuple          # (dim-0 size, bytes) of every parameter: FSDP shards dim 0


# Operations whose fake kernel takes bf16 only while the real one also runs fp32 (the grouped matmul of MoC experts,
# which the model uses in fp32 where the device has it): their output shapes are taken from the kernel in bf16.
FAKE_KERNELS_BF16_ONLY = {torch.ops.aten._grouped_mm.default} if hasattr(torch, "_grouped_mm") else set()


def _in_bf16(func, args, kwargs):
    """func's fake outputs for fp32 inputs: its fake kernel run on bf16 copies, outputs made in the inputs' dtype."""
    dtypes = {t.dtype for t in flat_tensors((args, kwargs)) if t.is_floating_point()}
    if dtypes != {torch.float32}:
        return func(*args, **kwargs)
    cast = torch.utils._pytree.tree_map_only(
        torch.Tensor, lambda t: t.to(torch.bfloat16) if t.is_floating_point() else t, (args, kwargs))
    out = func(*cast[0], **cast[1])
    return torch.utils._pytree.tree_map_only(torch.Tensor, lambda t: torch.empty_like(t, dtype=torch.float32), out)


METADATA_QUERIES = {torch.ops.prim.device.default}  # `tensor.device` under a mode: allocates nothing


def flat_tensors(tree) -> list:
    """The tensors in an operation's arguments or outputs (tensors, and lists, tuples and dicts of them)."""
    if isinstance(tree, torch.Tensor):
        return [tree]
    if isinstance(tree, (list, tuple)):
        return [t for item in tree for t in flat_tensors(item)]
    if isinstance(tree, dict):
        return [t for item in tree.values() for t in flat_tensors(item)]
    return []


class FakeTrainer:
    """The config's model on fake tensors, its forward and backward passes run as the trainer runs them."""

    @traced
    def __init__(self, config: TrainConfig, device: torch.device, dtype: torch.dtype):
        from torch._subclasses.fake_tensor import FakeTensorMode
        self.config, self.device, self.dtype = config, device, dtype
        self.mode = FakeTensorMode()
        if config.model.is_moc:  # the MoC layers ask once whether the grouped matmul works: on real tensors
            grouped_mm_supported(str(torch.empty(0, device=device).device), dtype)   # "cuda:0", as a tensor says
        self.model = build_on_meta(dataclasses.replace(config.model))  # its own copy: steps switch checkpointing
        with self.mode:
            self._fake_parameters()
        self.model.train()

    def _fake_parameters(self) -> None:
        """Give every parameter and buffer a fake tensor on the traced device (tied weights stay tied)."""
        made: dict = {}
        for module in self.model.modules():
            for table in (module._parameters, module._buffers):
                for name, tensor in table.items():
                    if tensor is None:
                        continue
                    if id(tensor) not in made:
                        fake = torch.empty(tensor.shape, dtype=tensor.dtype, device=self.device)
                        if isinstance(tensor, torch.nn.Parameter):
                            fake = torch.nn.Parameter(fake, requires_grad=tensor.requires_grad)
                        made[id(tensor)] = fake
                    table[name] = made[id(tensor)]

    @traced
    def step(self, batch_size: int, checkpointing: bool) -> StepMemory:
        """Trace one micro-batch's forward and backward (the gradients are dropped afterwards)."""
        model_config = self.model.config
        saved = model_config.use_gradient_checkpointing
        model_config.use_gradient_checkpointing = checkpointing
        tracker = LiveBytes()
        try:
            with torch.random.fork_rng(devices=[]), self.mode, tracker:
                T = self.config.model.max_seq_len
                x = torch.randint(0, self.config.model.vocab_size, (batch_size, T + 1), device=self.device)
                forward_end = _ForwardEnd(tracker)

                def model(idx, targets):  # the model; the backward pass starts with the loss's gradient
                    out = self.model(idx, targets)
                    out.main_loss.register_hook(forward_end)
                    return out

                out = steps.forward_backward(model, x[:, :-1], x[:, 1:], 1.0, 1, self.dtype)
                del out, x
                grads = [p.grad for p in self.model.parameters() if p.grad is not None]
        finally:
            model_config.use_gradient_checkpointing = saved
        grad_records = {id(tracker.storage_record(g)) for g in grads}
        kinds = [GRADIENT if id(r) in grad_records else ACTIVATION if forward_end.alive(r) else TEMPORARY
                 for r in tracker.records]
        largest_grad = max((g.untyped_storage().nbytes() for g in grads), default=0)
        live = tracker.live_series(kinds, (ACTIVATION, TEMPORARY, GRADIENT))  # while the gradients are alive
        self.model.zero_grad(set_to_none=True)
        vocab_size = self.config.model.vocab_size
        logits = sum(r[0] for r, kind in zip(tracker.records, kinds)
                     if kind == ACTIVATION and len(r[4]) >= 2 and r[4][-1] == vocab_size
                     and math.prod(r[4][:-1]) == batch_size * self.config.model.max_seq_len)
        return StepMemory(batch_size, self.config.model.max_seq_len, checkpointing,
                          activations=forward_end.bytes, logits=logits, other=live[ACTIVATION] + live[TEMPORARY],
                          grads=live[GRADIENT], largest_grad=largest_grad)


class _ForwardEnd:
    """A hook on the loss, called as the backward pass starts: notes which storages the forward pass left alive for
    it (after autocast has dropped its cache of low-precision weights; the saved ones stay)."""

    def __init__(self, tracker: LiveBytes):
        self.tracker, self.clock, self.bytes = tracker, None, 0

    def __call__(self, grad=None) -> None:
        self.clock = self.tracker.clock
        self.bytes = sum(r[0] for r in self.tracker.records if r[2] is None)
        self.tracker.phase = "backward"

    def alive(self, record: list) -> bool:
        return record[1] <= self.clock and (record[2] is None or record[2] > self.clock)


@traced
def optimizer_memory(config: TrainConfig) -> OptimizerMemory:
    """Trace the first step of the config's optimizer (gradient clipping included), which creates its state: what
    it keeps is the state, the rest is what every step allocates and frees (a later step holds both at once).

    On the meta device: no autocast or attention kernel is involved, and meta kernels are fast. A fused AdamW cannot
    run there, so AdamW runs unfused: its temporaries (a few tensors of one parameter's size) bound the fused
    kernel's, which has next to none.
    """
    model = build_on_meta(config.model)
    optimizer = build_optimizer(model, config, "meta")
    for p in model.parameters():
        if p.requires_grad:
            p.grad = torch.zeros_like(p)  # as a backward pass leaves them
    tracker = LiveBytes()
    with tracker:
        steps.clip_gradients(model.parameters(), optimizer, config.grad_clip)
        optimizer.step()
    state = {id(tracker.storage_record(t)) for t in _state_tensors(optimizer)}
    kinds = [OPTIMIZER_STATE if id(r) in state else OPTIMIZER_TEMPORARY for r in tracker.records]
    live = tracker.live_series(kinds, (OPTIMIZER_STATE, OPTIMIZER_TEMPORARY))
    return OptimizerMemory(config.optimizer, int(live[OPTIMIZER_STATE][-1]), int(live[OPTIMIZER_TEMPORARY].max()))


def _state_tensors(optimizer) -> list:
    return [value for state in optimizer.state.values() for value in state.values()
            if isinstance(value, torch.Tensor)]


def model_memory(model: torch.nn.Module) -> ModelMemory:
    """The bytes of a (meta) model's parameters and buffers, counted once each (a tied LM head is the embedding)."""
    params = {id(p): p for p in model.parameters()}.values()
    nbytes = {id(p): p.numel() * p.element_size() for p in params}
    blocks = [sum(nbytes[id(p)] for p in block.parameters()) for block in model.blocks]
    return ModelMemory(
        count=sum(p.numel() for p in params),
        params=sum(nbytes.values()),
        buffers=sum(b.numel() * b.element_size() for b in model.buffers()),
        trainable=sum(nbytes[id(p)] for p in params if p.requires_grad),
        root_params=sum(nbytes.values()) - sum(blocks),
        largest_block=max(blocks, default=0),
        shard_sizes=tuple((p.shape[0] if p.dim() else 1, nbytes[id(p)]) for p in params))


def sharded_share(memory: ModelMemory, world_size: int) -> float:
    """The share of the parameters one of `world_size` FSDP ranks holds: each parameter's dim 0 split in equal
    parts, the last padded (FSDP2's Shard(0))."""
    if world_size <= 1:
        return 1.0
    held = sum(math.ceil(rows / world_size) * nbytes / rows for rows, nbytes in memory.shard_sizes)
    return held / max(memory.params, 1)
