"""Process group, device choice, and the two ways of spreading a model over processes.

Launch with `torchrun` (single node: `--standalone --nproc_per_node=N`; several nodes: a rendezvous
endpoint, see the README). torchrun sets RANK, LOCAL_RANK and WORLD_SIZE; without them the run is a
single process. NCCL is used between GPUs, gloo on CPU.

* DDP: every process holds the whole model; gradients are averaged in the backward pass (skipped
  with `no_sync` on all but the last micro-batch of an accumulation).
* FSDP2 (`parallelism: fsdp`): `fully_shard` on every transformer block and then on the root, so
  each process holds 1/world of the parameters, gradients and optimizer state.

Every collective in this module is called on every rank.
"""

import inspect
import os
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

from lunaris.errors import ConfigError, LunarisError
from lunaris.runtime import resolve_device


@dataclass
class DistInfo:
    rank: int
    local_rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def is_distributed(self) -> bool:
        return self.world_size > 1


def setup_distributed(device_preference: str) -> DistInfo:
    """Join the process group torchrun describes (if any) and choose this process's device."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = resolve_device(device_preference, local_rank)
    if world_size > 1:
        if device.type == "mps":
            raise ConfigError("several processes on device 'mps' are not supported; run one process "
                              "(python -m lunaris train ...) or use CUDA GPUs.")
        if device.type == "cuda":
            torch.cuda.set_device(device)
        if not dist.is_initialized():
            backend = "nccl" if device.type == "cuda" else "gloo"
            # long timeout: rank 0 may write a large checkpoint while the others wait at a barrier
            dist.init_process_group(backend=backend, timeout=timedelta(minutes=30))
    elif device.type == "cuda":
        torch.cuda.set_device(device)
    return DistInfo(rank, local_rank, world_size, device)


# The end-of-run barrier waits at most this long for the other processes (they are in step with this one after
# the final save, so a longer wait means a node died or hangs); the README's Multi-GPU section quotes it.
END_BARRIER_SECONDS = 60.0


class PeerLostError(LunarisError):
    """Another process of the run is gone (crashed, killed, or hung): this one stops instead of waiting forever."""


def is_peer_lost(exc: BaseException) -> bool:
    """Whether a collective failed because a peer process is gone: torch's distributed errors (NCCL watchdog,
    store, network), or gloo's RuntimeError for a connection the peer's exit closed."""
    dist_error = getattr(dist, "DistError", ())
    if dist_error and isinstance(exc, dist_error):
        return True
    text = str(exc)
    return isinstance(exc, RuntimeError) and ("gloo" in text or "Connection closed by peer" in text
                                              or "Connection reset by peer" in text)


def peer_lost(exc: BaseException, rank: int) -> PeerLostError:
    first_line = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
    return PeerLostError(f"rank {rank}: lost contact with another process of the run ({first_line}); it crashed, "
                         f"was killed or hangs, and its own output says why. This process stops without waiting "
                         f"for it; restart the same command to resume from the last checkpoint.")


def release_ddp(ddp) -> None:
    """Free a DDP wrapper's C++ reducer now, while the process group still exists.

    The reducer holds a reference to the process group, and pybind11 frees a reducer with the GIL held. If the
    reducer is the last owner (it outlives `destroy_process_group`), freeing it runs ProcessGroupGloo's
    destructor, which joins gloo's worker threads while holding the GIL; a worker thread that is still releasing
    the tensors of a finished collective needs the GIL for that: the process hangs at exit, forever
    (pytorch/pytorch#56297). Freed here, the reducer only drops its reference.
    """
    if ddp is not None:
        ddp.logger = None    # the C++ logger holds the reducer too
        ddp.reducer = None


def teardown_distributed(clean_exit: bool = False, rank: int = 0, ddp=None, group=None) -> None:
    """Leave the process group (`group`, default the whole run's); never waits longer than END_BARRIER_SECONDS.

    `ddp`, the run's DDP wrapper if any, gives up its reducer first (release_ddp). After a clean run every rank
    meets at a barrier: gloo aborts a process ("terminate called without an active exception") whose peer tears its
    connections down while it is still destroying its own. Not after an error, where a peer may never arrive. A
    barrier that times out raises PeerLostError and leaves the group as it is: destroying it would wait for the stuck
    barrier (the CLI then exits at once, see trainer.run_cli).
    """
    release_ddp(ddp)
    if not dist.is_initialized():
        return
    if clean_exit:
        work = dist.barrier(group=group, async_op=True)
        try:
            work.wait(timeout=timedelta(seconds=END_BARRIER_SECONDS))
        except RuntimeError as exc:  # a timeout, or a peer that already closed its connections
            raise PeerLostError(f"rank {rank}: the other processes did not reach the end of the run within "
                                f"{END_BARRIER_SECONDS:.0f} s ({(str(exc).splitlines() or [''])[0][:160]}); a node "
                                f"died or hangs. This process exits without waiting for it; the checkpoints "
                                f"written so far are complete.") from None
    dist.destroy_process_group(group)


# ---- small collectives (no-ops in a single process) ------------------------------------------------

def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    if dist.is_initialized():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def all_to_all_flat(send: list, recv_sizes: list, group=None) -> list:
    """Send `send[d]` (a 1-D tensor) to rank d; returns what each rank s sent to this one (`recv_sizes[s]` elements
    from rank s), as a list indexed by source. One all_to_all_single, whatever the number of tensors: callers pack
    many small pieces into each `send[d]`. Every rank must agree on the sizes (rank d's recv_sizes[s] is
    send[d].numel() on rank s)."""
    flat = torch.cat(send)
    received = flat.new_empty(sum(recv_sizes))
    dist.all_to_all_single(received, flat, output_split_sizes=list(recv_sizes),
                           input_split_sizes=[t.numel() for t in send], group=group)
    return list(received.split(list(recv_sizes)))


def all_gather_flat(tensor: torch.Tensor, sizes: list, group=None) -> list:
    """Every rank's 1-D `tensor` (rank s's holds `sizes[s]` elements), as a list indexed by rank: padded to the
    largest for one all_gather into a (world, max) buffer."""
    longest = max(sizes)
    padded = torch.cat([tensor, tensor.new_zeros(longest - tensor.numel())])
    gathered = tensor.new_empty(len(sizes) * longest)
    gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor  # renamed in torch 2.13
    gather(gathered, padded, group=group)
    return [row[:size] for row, size in zip(gathered.view(len(sizes), longest), sizes)]


def gather_objects(obj) -> list:
    """[obj of rank 0, obj of rank 1, ...] on every rank."""
    if not dist.is_initialized():
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def raise_together(error, info: DistInfo) -> None:
    """Every rank learns whether any rank failed (a pre-flight check, a save), so none is left
    waiting in a collective; the failing rank raises its own message, the others a pointer to it.
    A collective: call it on every rank."""
    if not info.is_distributed:
        if error is not None:
            raise error
        return
    failed = torch.tensor([0 if error is None else 1], device=info.device if info.device.type == "cuda" else "cpu")
    dist.all_reduce(failed, op=dist.ReduceOp.MAX)
    if error is not None:
        raise error
    if failed.item():
        raise LunarisError(f"rank {info.rank}: stopping because another rank failed (its message is above).")


@contextmanager
def stop_together(info: DistInfo):
    """`with stop_together(info): work`: a LunarisError raised by the work on any rank (rank 0 writing a file, say)
    stops every rank, as `raise_together`. A collective: enter it on every rank."""
    error = None
    try:
        yield
    except LunarisError as exc:
        error = exc
    raise_together(error, info)


# ---- model wrapping -------------------------------------------------------------------------------

def params_without_grad(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> list:
    """Names of trainable parameters that one forward/backward leaves without a gradient.

    DDP must be told about such parameters (find_unused_parameters) or it waits for their
    gradients forever; finding them costs one small step instead of a per-step graph traversal.
    """
    with torch.random.fork_rng(devices=[x.device] if x.device.type == "cuda" else []):
        out = model(x, y)
        out.loss.backward()
    unused = [name for name, p in model.named_parameters() if p.requires_grad and p.grad is None]
    model.zero_grad(set_to_none=True)
    return unused


def wrap_ddp(model: torch.nn.Module, info: DistInfo, find_unused: bool) -> DDP:
    # No buffer sync before each forward: the buffers are the rotary tables, identical on every rank by
    # construction, and MoC routing biases (load_balance: bias), which every rank updates identically from
    # loads summed over ranks (the model's training hook, moc.ExpertBalance). (torch 2.13 renamed broadcast_buffers to
    # forward_sync_buffers.)
    device_ids = [info.device.index] if info.device.type == "cuda" else None
    no_buffer_sync = ({"forward_sync_buffers": False} if "forward_sync_buffers" in inspect.signature(DDP).parameters
                      else {"broadcast_buffers": False})
    return DDP(model, device_ids=device_ids, find_unused_parameters=find_unused, **no_buffer_sync)


def _fully_shard():
    try:
        from torch.distributed.fsdp import fully_shard  # torch >= 2.6
    except ImportError:
        from torch.distributed._composable.fsdp import fully_shard  # torch 2.4 / 2.5
    return fully_shard


def apply_fsdp(model: torch.nn.Module, info: DistInfo) -> torch.nn.Module:
    """FSDP2: shard every transformer block, then the root (embedding, final norm, tied LM head).

    Parameters stay fp32 (master weights) and compute precision comes from autocast, as in DDP, so
    the MoC router still runs in fp32. The module is sharded in place and moved to `info.device`.
    """
    fully_shard = _fully_shard()
    try:
        from torch.distributed.device_mesh import init_device_mesh
    except ImportError as exc:  # pragma: no cover - torch < 2.2
        raise LunarisError(f"parallelism: fsdp needs torch >= 2.4 (found {torch.__version__}): {exc}") from None
    mesh = init_device_mesh(info.device.type, (info.world_size,))
    model.to(info.device)
    for block in model.blocks:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def no_sync_context(model, sync: bool):
    """Skip the gradient all-reduce for a DDP micro-batch that is not the last of its step.

    FSDP reduce-scatters every micro-batch: keeping unsharded gradients until the last one would
    cost the memory FSDP is there to save.
    """
    if sync or not isinstance(model, DDP):
        return nullcontext()
    return model.no_sync()


def full_norm(norm: torch.Tensor) -> torch.Tensor:
    """clip_grad_norm_ returns a DTensor for sharded gradients; make it a plain tensor."""
    return norm.full_tensor() if hasattr(norm, "full_tensor") else norm
