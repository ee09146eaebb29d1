"""Muon's optimizer step on one process against several (gloo on CPU, fp32), where Newton-Schulz dominates the step.

The model of a `SIZES` entry (default 30m: 8 layers of 512-wide attention and FFN matrices; `n_experts` stacks the
FFNs as experts) is built in each process; its hidden matrices get fixed random gradients and `Muon.step()` is timed
(a barrier before and after each step, so the slowest rank counts). One process is the single-process optimizer;
W processes are the FSDP2 split (each rank orthogonalizes its share of the matrices, two all_to_all move the rows)
or the DDP split (whole gradients, one all_gather of the results). Each process runs `threads` torch threads, so
W processes use W times the cores of one: the ratio to one process says how well the Newton-Schulz work divides.
"""

import statistics
import time
from dataclasses import asdict, dataclass, field

import torch

from lunaris.bench.settings import SIZES
from lunaris.errors import LunarisError


@dataclass
class MuonBenchOptions:
    """What `bench_muon` measures, with bench/bench_muon.py's defaults."""
    size: str = "30m"                                   # a lunaris.bench SIZES entry: the model's shapes
    n_experts: int = 0                                  # > 0: the FFNs are stacked experts (top-2)
    processes: list = field(default_factory=lambda: [1, 2])
    parallelism: list = field(default_factory=lambda: ["fsdp", "ddp"])
    steps: int = 5                                      # timed steps (median reported)
    warmup: int = 1
    threads: int = 1                                    # torch threads per process
    quick: bool = False                                 # tiny model, 2 steps: a smoke test in seconds


QUICK = dict(size="tiny", steps=2, warmup=1)


def bench_muon(options: MuonBenchOptions) -> dict:
    """{"options", "torch", "matrices", "seconds": {"1": s, "fsdp 2": s, ...}, "ratio": {"fsdp 2": s / s_1, ...}}:
    median seconds of one Muon step, and each split's ratio to one process (< 1 is faster)."""
    if options.quick:
        options = MuonBenchOptions(**{**asdict(options), **QUICK})
    if options.size not in SIZES:
        raise LunarisError(f"bench_muon size must be one of {', '.join(SIZES)}, got {options.size!r}.")
    seconds = {"1": _launch(options, "single", 1)}
    for parallelism in options.parallelism:
        for world in options.processes:
            if world > 1:
                seconds[f"{parallelism} {world}"] = _launch(options, parallelism, world)
    ratio = {name: value / seconds["1"] for name, value in seconds.items() if name != "1"}
    return {"options": asdict(options), "torch": torch.__version__, "matrices": _count_matrices(options),
            "seconds": seconds, "ratio": ratio}


def _model_config(options: MuonBenchOptions):
    from lunaris.config import LunarisCodexConfig
    experts = dict(n_experts=options.n_experts, top_k=2) if options.n_experts else {}
    return LunarisCodexConfig(**SIZES[options.size], max_seq_len=64, **experts)


def _count_matrices(options: MuonBenchOptions) -> int:
    from lunaris.model import build_on_meta
    from lunaris.train.muon import muon_parameters
    return sum(p.shape[0] if p.dim() == 3 else 1 for p in muon_parameters(build_on_meta(_model_config(options))))


def _launch(options: MuonBenchOptions, parallelism: str, world: int) -> float:
    """Median seconds of a Muon step in `world` fresh processes (spawned; a TCP rendezvous on a free port)."""
    import socket

    import torch.multiprocessing as mp
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    context = mp.get_context("spawn")
    results = context.SimpleQueue()
    mp.start_processes(_worker, args=(world, port, parallelism, options, results), nprocs=world, join=True,
                       start_method="spawn")
    return results.get()


def _worker(rank: int, world: int, port: int, parallelism: str, options: MuonBenchOptions, results) -> None:
    import torch.distributed as dist

    from lunaris.model import LunarisCodex
    from lunaris.train.distributed import DistInfo, apply_fsdp
    from lunaris.train.muon import Muon, local, muon_parameters
    torch.set_num_threads(options.threads)
    if world > 1:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        torch.manual_seed(0)
        model = LunarisCodex(_model_config(options))
        if parallelism == "fsdp":
            apply_fsdp(model, DistInfo(rank, rank, world, torch.device("cpu")))
        params = muon_parameters(model)
        optimizer = Muon(params, lr=0.02, weight_decay=0.0, momentum=0.95)
        for param in params:
            param.grad = torch.zeros_like(param)
            local(param.grad).normal_(generator=torch.Generator().manual_seed(0))
        times = []
        for _ in range(options.warmup + options.steps):
            if world > 1:
                dist.barrier()
            began = time.perf_counter()
            optimizer.step()
            if world > 1:
                dist.barrier()
            times.append(time.perf_counter() - began)
        if rank == 0:
            results.put(statistics.median(times[options.warmup:]))
    finally:
        if world > 1:
            dist.destroy_process_group()


def muon_markdown(result: dict) -> str:
    """The table of bench_muon's result."""
    o = result["options"]
    lines = [f"Muon step (Newton-Schulz, {o['size']} shapes, {result['matrices']} matrices), fp32 CPU, gloo, "
             f"{o['threads']} thread(s) per process, median of {o['steps']} steps, torch {result['torch']}", "",
             "| processes | seconds per step | x one process |", "|---|--:|--:|",
             f"| 1 | {result['seconds']['1']:.3f} | 1.00 |"]
    lines += [f"| {name} | {result['seconds'][name]:.3f} | {ratio:.2f} |" for name, ratio in result["ratio"].items()]
    return "\n".join(lines)
