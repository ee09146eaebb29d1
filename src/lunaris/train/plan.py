"""Will a config's training fit a device, and how fast will it go: memory per process for one process, DDP or FSDP
at N processes, with and without gradient checkpointing; the largest micro-batch that fits; step time at a stated MFU.

The parts are traced on the model itself (memory.py); this file only lays them out per process:

- one process or DDP: everything replicated; DDP also keeps its gradient buckets (torch's default
  gradient_as_bucket_view=False: a second copy of the gradients, for the all-reduce);
- FSDP (FSDP2, `fully_shard` per block then the root): parameters, gradients and optimizer state sharded 1/N (dim 0,
  padded), plus what is unsharded at a time: the root's parameters (embedding, LM head: not resharded between
  forward and backward) and its gradients (reduce-scattered last), and two blocks' parameters and gradients (the
  block computing and the one being all-gathered ahead or reduce-scattered behind).

A step's peak is the most alive at once: parameters and optimizer state, plus the worst moment of the forward and
backward passes (activations shrink as gradients grow) or of the optimizer step. A config fits when that peak plus
MARGIN, plus CUDA_RESERVE on a GPU, is at most the device's memory. `lunaris plan` prints all of it; `lunaris train`
prints one line and warns before step 1 when its config will not fit the device it is on.
"""

import dataclasses
import json
import math
import textwrap
from dataclasses import dataclass
from typing import Optional

import torch

from lunaris.config import TrainConfig, load_config
from lunaris.errors import LunarisError
from lunaris.model import build_on_meta
from lunaris.runtime import (
    DTYPE_NAMES,
    DTYPES,
    GPU_MEMORY_GIB,
    GPUS_WITHOUT_BF16,
    device_memory,
    device_name,
    find_gpu,
    peak_flops_for_name,
    peak_flops_per_device,
    resolve_device,
    resolve_dtype,
)
from lunaris.train.memory import (
    FakeTrainer,
    OptimizerMemory,
    TraceUnavailable,
    model_memory,
    optimizer_memory,
    sharded_share,
)

MARGIN = 0.10                   # the caching allocator's fragmentation: memory it holds beyond the live tensors
CUDA_RESERVE = 1 << 30          # the CUDA context, cuBLAS and NCCL workspaces: GPU memory no tensor gets
DEFAULT_MFU = 0.40              # model FLOPs utilization of a well-fed GPU in bf16 (Lunaris's benchmark, PaLM)
RECOMPUTE = 8 / 6               # gradient checkpointing runs each block's forward twice: 8 instead of 6 FLOPs/param
GIB = 1 << 30


@dataclass
class Layout:
    parallelism: str            # "single", "ddp" or "fsdp"
    world_size: int
    checkpointing: bool

    @property
    def name(self) -> str:
        base = {"single": "1 process", "ddp": "DDP", "fsdp": "FSDP"}[self.parallelism]
        return base + (" + ckpt" if self.checkpointing else "")


@dataclass
class RankMemory:
    """Memory of one process in bytes: its parts (`rows`, which are never all alive at once) and the step's peak."""

    layout: Layout
    batch_size: int
    rows: dict
    peak: int


def needed(peak: int, on_gpu: bool) -> int:
    """The device memory a step with this peak needs: the margin, and on a GPU the CUDA reserve."""
    return int(peak * (1 + MARGIN) + (CUDA_RESERVE if on_gpu else 0))


class Estimator:
    """The traced memory of a config's training step, laid out for any layout and micro-batch size.

    `device` is where the step is traced (this machine's GPU for a run on it, else the CPU), `dtype` the autocast
    precision of the run. Parameter counts and FSDP units come from the whole model built on the meta device. The
    step and the optimizer are traced on the model cut to one and two periods of its blocks (a period: one block of
    a dense model, `moc_every` blocks of a MoC model; plus the dense blocks after the last MoC one) and extrapolated
    linearly to its depth: every period adds the same activations, gradients and optimizer state, and a trace costs
    time per operation, so a deep model is planned as fast as a shallow one. Traces are made on first use and kept.
    """

    def __init__(self, config: TrainConfig, device: torch.device, dtype: torch.dtype):
        self.config, self.device, self.dtype = config, device, dtype
        whole = build_on_meta(config.model)
        self.model = model_memory(whole)
        self.depths, self.periods = self._cut(whole)    # periods: how often the second trace's extra blocks repeat
        self._fakes: dict = {}
        self._steps: dict = {}
        self._optimizer = None

    def _cut(self, whole) -> tuple:
        """The depths to trace and the periods to extrapolate to; the whole model's depth where its blocks do not
        repeat with the period (a part that depends on a block's place: its parameters, or its structure), which
        the parameter count of the cut models and the blocks' structure show."""
        n_layers = self.config.model.n_layers
        period = self.config.model.moc_every if self.config.model.is_moc else 1
        rest = n_layers % period                    # dense blocks after the last MoC block
        depths, periods = (period + rest, 2 * period + rest), n_layers // period
        if n_layers <= depths[1]:
            return (n_layers,), 1
        structure = [repr(block) + str([p.shape for p in block.parameters()]) for block in whole.blocks]
        if any(structure[i] != structure[i + period] for i in range(n_layers - period)):
            return (n_layers,), 1
        try:
            counts = [model_memory(build_on_meta(self._config_at(depth).model)).count for depth in depths]
        except LunarisError:                        # a key that needs more blocks than the cut model has
            return (n_layers,), 1
        if counts[0] + (periods - 1) * (counts[1] - counts[0]) != self.model.count:
            return (n_layers,), 1
        return depths, periods

    def _extrapolate(self, values: list) -> float:
        """A quantity traced at `depths` (one value each), at the model's depth."""
        if len(values) == 1:
            return values[0]
        return values[0] + (self.periods - 1) * (values[1] - values[0])

    def _config_at(self, depth: int) -> TrainConfig:
        return dataclasses.replace(self.config, model=dataclasses.replace(self.config.model, n_layers=depth))

    @property
    def optimizer(self) -> OptimizerMemory:
        if self._optimizer is None:
            traced = [optimizer_memory(self._config_at(depth)) for depth in self.depths]
            # the state grows with the blocks; a step's temporaries are those of its largest parameter(s)
            self._optimizer = OptimizerMemory(self.config.optimizer, int(self._extrapolate([t.state for t in traced])),
                                              max(t.step_peak for t in traced))
        return self._optimizer

    def step(self, batch_size: int, checkpointing: bool) -> "DeepStep":
        key = (batch_size, checkpointing)
        if key not in self._steps:
            traced = [self._trace(depth, batch_size, checkpointing) for depth in self.depths]
            if len(self.depths) > 1 and not self._linear(traced, batch_size, checkpointing):
                self.depths, self.periods, self._steps, self._optimizer = (self.config.model.n_layers,), 1, {}, None
                traced = [self._trace(self.depths[0], batch_size, checkpointing)]
            self._steps[key] = DeepStep(traced, self._extrapolate)
        return self._steps[key]

    def _trace(self, depth: int, batch_size: int, checkpointing: bool):
        if depth not in self._fakes:
            self._fakes[depth] = FakeTrainer(self._config_at(depth), self.device, self.dtype)
        return self._fakes[depth].step(batch_size, checkpointing)

    def _linear(self, traced: list, batch_size: int, checkpointing: bool) -> bool:
        """Whether the step's peak grows by the same amount with each period, checked on a third depth (one period
        deeper). A peak is the most of many moments, and which moment is largest can change with depth (the end of
        the forward pass in a deep model, the LM head's backward in a shallow one); then extrapolating would
        underestimate, and the whole model is traced instead."""
        third = 2 * self.depths[1] - self.depths[0]
        if third >= self.config.model.n_layers:
            return False                            # as cheap to trace the whole model
        deeper = self._trace(third, batch_size, checkpointing)
        for share in (1.0, 1 / 8):
            for accumulating in (False, True):
                a, b, c = (t.peak(share, accumulating) for t in (*traced, deeper))
                if abs((c - b) - (b - a)) > 0.01 * max(c, 1):
                    return False
        return True

    def rank(self, layout: Layout, batch_size: int) -> RankMemory:
        """One process's memory at `batch_size` sequences per micro-batch."""
        model, optimizer = self.model, self.optimizer
        step = self.step(batch_size, layout.checkpointing)
        fsdp = layout.parallelism == "fsdp" and layout.world_size > 1
        share = sharded_share(model, layout.world_size) if fsdp else 1.0
        rows = {"parameters": model.params * share, "gradients": model.trainable * share,
                "optimizer state": optimizer.state * share, "buffers": model.buffers}
        if layout.parallelism == "ddp" and layout.world_size > 1:
            rows["DDP gradient buckets"] = model.trainable
        if fsdp:  # unsharded while in use: the root throughout, two blocks at a time
            rows["FSDP unsharded in flight"] = 2 * model.root_params + 4 * model.largest_block
        rows["activations"] = step.activations
        rows["of which logits"] = step.logits
        accumulating = self.config.gradient_accumulation_steps > 1
        persistent = (rows["parameters"] + rows["optimizer state"] + model.buffers
                      + rows.get("DDP gradient buckets", 0) + rows.get("FSDP unsharded in flight", 0))
        worst = max(step.peak(share, accumulating), rows["gradients"] + optimizer.step_peak)
        # what the peak holds beyond the parts: the backward's working tensors (the logits' gradient, ...)
        rows["temporaries at the peak"] = max(0, worst - rows["gradients"] - rows["activations"])
        return RankMemory(layout, batch_size, {k: int(v) for k, v in rows.items()}, int(persistent + worst))

    def largest_batch(self, layout: Layout, capacity: int, on_gpu: bool) -> int:
        """The largest batch_size whose step fits `capacity` bytes (0: not even one sequence). The peak grows
        linearly with the batch (every activation has a batch dimension): traced at B and 2B, solved for the line."""
        b = self.config.batch_size
        low, high = self.rank(layout, b).peak, self.rank(layout, 2 * b).peak
        per_sequence = (high - low) / b
        budget = (capacity - (CUDA_RESERVE if on_gpu else 0)) / (1 + MARGIN)
        if per_sequence <= 0:
            return b if budget >= low else 0
        return max(0, math.floor(b + (budget - low) / per_sequence))


class DeepStep:
    """A micro-batch's step memory at the model's depth, from the traces at the estimator's depths."""

    def __init__(self, traced: list, extrapolate):
        self.traced, self.extrapolate = traced, extrapolate
        self.activations = int(extrapolate([s.activations for s in traced]))
        self.logits = traced[-1].logits       # one LM head whatever the depth

    def peak(self, grad_share: float, accumulating: bool) -> int:
        return int(self.extrapolate([s.peak(grad_share, accumulating) for s in self.traced]))


def flops_per_token(config: TrainConfig) -> float:
    return build_on_meta(config.model).flops_per_token(config.model.max_seq_len)


def step_time(config: TrainConfig, world_size: int, peak_flops: float, mfu: float, checkpointing: bool,
              flops: float) -> dict:
    """Seconds per optimizer step and tokens/s (all processes, and per device) at `mfu` of `peak_flops` per device,
    from the model's training FLOPs per token (`flops`); checkpointing recomputes each block's forward."""
    tokens = config.batch_size * config.model.max_seq_len * config.gradient_accumulation_steps * world_size
    per_device = mfu * peak_flops / (flops * (RECOMPUTE if checkpointing else 1.0))
    return {"tokens_per_step": tokens, "tokens_per_sec": per_device * world_size,
            "tokens_per_sec_per_device": per_device, "step_seconds": tokens / (per_device * world_size)}


# ---- where the run goes ----------------------------------------------------------------------------

@dataclass
class Target:
    """The device a plan is for: its name, memory per device (bytes; None: unknown), datasheet peak FLOP/s (None:
    unknown), where the step is traced, and the run's precision."""

    name: str
    capacity: Optional[int]
    on_gpu: bool
    peak_flops: Optional[float]
    trace_device: torch.device
    dtype: torch.dtype


def gpu_target(config: TrainConfig, gpu: Optional[str], gpu_memory: Optional[float]) -> Target:
    """A GPU this machine may not have, by name (`--gpu h100`) and/or memory (`--gpu-memory 80`, GiB)."""
    key = find_gpu(gpu) if gpu else None
    if gpu and key is None and gpu_memory is None:
        known = ", ".join(name for name, _ in GPU_MEMORY_GIB)
        raise LunarisError(f"--gpu {gpu!r} is not a GPU lunaris plan knows ({known}). Give its memory instead with "
                           f"--gpu-memory GiB (and its bf16 peak FLOP/s with --peak_flops=... for a step time).")
    gib = gpu_memory if gpu_memory is not None else dict(GPU_MEMORY_GIB)[key]
    no_bf16 = key in GPUS_WITHOUT_BF16
    dtype = DTYPES.get(config.dtype, torch.float16 if no_bf16 else torch.bfloat16)   # auto: what the GPU has
    trace = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    name = key or gpu or f"a GPU with {gib:g} GiB"
    return Target(name, int(gib * GIB), True, config.peak_flops or (peak_flops_for_name(key) if key else None),
                  trace, dtype)


def local_target(config: TrainConfig) -> Target:
    """This machine's device as the config picks it (`device`), with the memory free on it now."""
    device = resolve_device(config.device)
    memory = device_memory(device)
    return Target(device_name(device), memory[0] if memory else None, device.type == "cuda",
                  peak_flops_per_device(device, config.peak_flops), traced_on(device),
                  resolve_dtype(config.dtype, device))


def traced_on(device: torch.device) -> torch.device:
    """Where a run on `device` is traced: there, or on the CPU for a device without fake-tensor support (MPS)."""
    return device if device.type in ("cuda", "cpu") else torch.device("cpu")


def estimator_for(config: TrainConfig, target: Target) -> Estimator:
    """The config's estimator on `target` (fp16 is traced as bf16 on a CPU: same sizes, and CPU autocast is bf16)."""
    cpu_fp16 = target.trace_device.type == "cpu" and target.dtype == torch.float16
    return Estimator(config, target.trace_device, torch.bfloat16 if cpu_fp16 else target.dtype)


def layouts(config: TrainConfig, gpus: int) -> list:
    """The layouts a plan compares: one process, or DDP and FSDP at `gpus`; each without and with checkpointing,
    the config's own first."""
    kinds = ["single"] if gpus == 1 else sorted(("ddp", "fsdp"), key=lambda kind: kind != config.parallelism)
    own = config.model.use_gradient_checkpointing
    return [Layout(kind, gpus, ckpt) for kind in kinds for ckpt in (own, not own)]


def plan(config: TrainConfig, target: Target, gpus: int, mfu: float = DEFAULT_MFU) -> dict:
    """Memory per process and step time of every layout on `gpus` x `target` (the JSON `lunaris plan --json`
    prints; the text is `format_plan` of it)."""
    estimator = estimator_for(config, target)
    flops = flops_per_token(config)
    rows = []
    for layout in layouts(config, gpus):
        memory = estimator.rank(layout, config.batch_size)
        row = {"layout": layout.name, "parallelism": layout.parallelism, "checkpointing": layout.checkpointing,
               "memory": memory.rows, "peak": memory.peak, "needed": needed(memory.peak, target.on_gpu)}
        if target.capacity is not None:
            row["fits"] = row["needed"] <= target.capacity
            row["largest_batch_size"] = estimator.largest_batch(layout, target.capacity, target.on_gpu)
        if target.peak_flops:
            row.update(step_time(config, gpus, target.peak_flops, mfu, layout.checkpointing, flops))
        rows.append(row)
    kinds = sorted({layout.parallelism for layout in layouts(config, gpus)} - {"single"})
    unsupported = [(kind.upper(), str(problem)) for kind in kinds   # the config's rules for the other parallelism
                   for problem in dataclasses.replace(config, parallelism=kind).problems()]
    return {"not_supported": unsupported, "parameters": estimator.model.count, "batch_size": config.batch_size,
            "seq_len": config.model.max_seq_len, "gradient_accumulation_steps": config.gradient_accumulation_steps,
            "optimizer": config.optimizer, "dtype": DTYPE_NAMES[target.dtype], "gpus": gpus, "flops_per_token": flops,
            "device": target.name, "device_memory": target.capacity, "peak_flops": target.peak_flops,
            "mfu": mfu if target.peak_flops else None, "margin": MARGIN,
            "cuda_reserve": CUDA_RESERVE if target.on_gpu else 0, "layouts": rows}


def gib(nbytes: float) -> str:
    return f"{nbytes / GIB:.2f}"


def size(nbytes: float) -> str:
    """12.74 GiB, 310.5 MiB."""
    return f"{nbytes / GIB:.2f} GiB" if nbytes >= GIB else f"{nbytes / (1 << 20):.1f} MiB"


def format_plan(report: dict) -> str:
    """The plan as a table: one column per layout (the config's own first), rows in GiB per process."""
    rows = report["layouts"]
    first = (f"lunaris plan: {report['parameters'] / 1e6:,.2f}M parameters, batch_size {report['batch_size']} x "
             f"{report['seq_len']} tokens x accum {report['gradient_accumulation_steps']}, {report['optimizer']}, "
             f"{report['dtype']}, on {report['gpus']} x {report['device']}")
    if report["device_memory"] is not None:
        first += f" ({gib(report['device_memory'])} GiB{' free' if not report['cuda_reserve'] else ''})"
    table = [["memory per process (GiB)"] + [row["layout"] + (" (config)" if i == 0 else "")
                                             for i, row in enumerate(rows)]]
    for part in _all_parts(rows):
        indent = "    " if part.startswith("of which") else "  "
        table.append([indent + part] + [gib(row["memory"][part]) if part in row["memory"] else "-" for row in rows])
    table.append(["  peak of a step"] + [gib(row["peak"]) for row in rows])
    reserve = f" + {gib(report['cuda_reserve'])} CUDA" if report["cuda_reserve"] else ""
    table.append([f"needed (+{report['margin']:.0%} margin{reserve})"] + [gib(row["needed"]) for row in rows])
    if report["device_memory"] is not None:
        table.append(["fits"] + ["yes" if row["fits"] else "NO" for row in rows])
        table.append(["largest batch_size that fits"] + [str(row["largest_batch_size"]) for row in rows])
    if report["peak_flops"]:
        table.append(["step time (s)"] + [f"{row['step_seconds']:.3g}" for row in rows])
        table.append(["tokens/s (all processes)"] + [f"{row['tokens_per_sec']:,.0f}" for row in rows])
    widths = [max(len(line[i]) for line in table) for i in range(len(table[0]))]
    lines = [first] + ["  ".join(cell.ljust(widths[0]) if i == 0 else cell.rjust(widths[i])
                                 for i, cell in enumerate(line)).rstrip() for line in table]
    return "\n".join(lines + [textwrap.fill(note, 116, subsequent_indent="  ") for note in _notes(report)])


STEP_PARTS = ("activations", "of which logits", "temporaries at the peak")   # listed last


def _all_parts(rows: list) -> list:
    parts: list = []
    for row in rows:
        parts += [part for part in row["memory"] if part not in parts]
    return [part for part in parts if part not in STEP_PARTS] + [part for part in STEP_PARTS if part in parts]


def _notes(report: dict) -> list:
    notes = ["parts are not all alive at once: the peak is the most a step holds (activations are freed as the "
             "gradients are made)."]
    notes += [f"{parallelism}: not with this config: {problem}" for parallelism, problem in report["not_supported"]]
    if report["peak_flops"]:
        notes.append(f"step time: training FLOPs per token at {report['mfu']:.0%} MFU of "
                     f"{report['peak_flops'] / 1e12:,.0f} TFLOP/s per device (checkpointing adds a forward pass); "
                     f"communication is assumed overlapped.")
    else:
        notes.append("step time: n/a (no datasheet peak FLOP/s for this device; set --peak_flops=... to estimate).")
    return notes


def run_plan(config_path, overrides=None, gpus: int = 1, gpu: Optional[str] = None,
             gpu_memory: Optional[float] = None, mfu: float = DEFAULT_MFU, as_json: bool = False) -> int:
    """`lunaris plan`: print the plan of a config file or preset (with --key=value overrides)."""
    config = load_config(config_path, overrides)
    target = gpu_target(config, gpu, gpu_memory) if gpu or gpu_memory else local_target(config)
    try:
        report = plan(config, target, gpus, mfu)
    except TraceUnavailable as exc:
        raise LunarisError(f"lunaris plan cannot estimate {config_path}: {exc}. Upgrade torch, or try the config "
                           f"with a short run (`lunaris train CONFIG --max_steps=2`) and watch the device's "
                           f"memory.") from None
    print(json.dumps(report, indent=2) if as_json else format_plan(report))
    return 0


# ---- the line `lunaris train` starts with ---------------------------------------------------------------

def run_memory_lines(config: TrainConfig, device: torch.device, dtype: torch.dtype, parallelism: str,
                     world_size: int) -> list:
    """The banner's estimate for a run on `device`: one line (this process's peak, and whether it fits what the
    device has: free GPU memory plus what this process already holds there, or available RAM), and a warning with
    the largest batch_size that fits when it will not. Never raises: an estimate that cannot be made is a line."""
    estimator = Estimator(config, traced_on(device), dtype)
    layout = Layout(parallelism, world_size, config.model.use_gradient_checkpointing)
    # the run's generators are set for its first step: the trace (fake dropout, random tokens) must not move them
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        try:
            memory = estimator.rank(layout, config.batch_size)
        except TraceUnavailable as exc:
            return [f"memory: no estimate ({exc})"]
        return _fit_lines(estimator, layout, memory, device)


def _fit_lines(estimator: Estimator, layout: Layout, memory: RankMemory, device: torch.device) -> list:
    """The banner's line for a traced `memory`, and the warning when it does not fit `device`."""
    on_gpu = device.type == "cuda"
    rows = memory.rows
    line = (f"memory: about {size(memory.peak)} per process at the step's peak (activations "
            f"{size(rows['activations'])}, logits {size(rows['of which logits'])} of them), "
            f"{size(needed(memory.peak, on_gpu))} with the margin")
    free = device_memory(device)
    if free is None:
        return [line + "; the device's free memory is unknown"]
    held = torch.cuda.memory_reserved(device) if on_gpu else estimator.model.params + estimator.model.buffers
    capacity = free[0] + held
    where = "free on the GPU" if on_gpu else "of RAM available"
    if needed(memory.peak, on_gpu) <= capacity:
        return [line + f"; {size(capacity)} {where}: fits"]
    largest = estimator.largest_batch(layout, capacity, on_gpu)
    advice = (f"the largest batch_size that fits is about {largest} (raise gradient_accumulation_steps to keep the "
              f"tokens per step)" if largest else "not even batch_size 1 fits")
    return [line + f"; {size(capacity)} {where}: does NOT fit",
            f"warning: this run will probably run out of memory: {advice}; use_gradient_checkpointing: true or "
            f"parallelism: fsdp (several GPUs) need less. `lunaris plan CONFIG` compares them (estimates can be "
            f"off by 10-15%)."]
