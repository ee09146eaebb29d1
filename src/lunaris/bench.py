"""`lunaris bench`: training-step speed measured side by side against what users would use instead.

What is measured, all in one process on one machine, each figure after warm-up, repeated, median reported:

- Training step (forward, backward, AdamW step) of our dense model, eager and `torch.compile`d, against
  `transformers`' LlamaForCausalLM with identical shapes: vocabulary, width, depth, heads, GQA, tied
  embeddings, sequence length, batch, dtype. Our block norms are built with `norm_bias: false` so the
  parameter counts are exactly equal (Llama's RMSNorm has no bias). Both sides use the same AdamW
  (fused where our `configure_optimizers` fuses it, as the Hugging Face Trainer's default
  `adamw_torch_fused` does). The sides run in turns, one step each per round, in an order that rotates
  from round to round, so load from other processes hits all of them alike; ratios are the median of
  the per-round ratios.
- MFU: model FLOPs/s (`flops_per_token` x tokens/s) over the dense matmul rate measured in the same
  rounds (a square matmul in the training dtype), and on a GPU also over the datasheet peak.
- MoC top-2 of 8 (`collab_mode: none`, S = 1) against the dense model of equal active parameters
  (dense FFN hidden = top_k x expert hidden).
- Peak memory of one training step of every configuration, each in a fresh subprocess after one
  warm-up step: on CPU the peak resident memory (Linux VmHWM, reset before the step), on CUDA
  `max_memory_allocated`; `+MiB` is the growth during the step (activations and gradients) over
  the model, optimizer state and inputs held before it.
- The data-loader, generation and MoC-layer figures of the scripts in the `bench/` folder of a source
  checkout (--repo, default the current directory; run as subprocesses, their markdown tables copied
  into the report). An installed Lunaris has no such folder: run from a checkout or pass --no-scripts.

Output: a markdown table on stdout, and with --json a file with the machine, versions, command, git
commit, settings, every raw timing and the targets.

Every default is written once, in BenchSettings; the `lunaris bench` parser (add_arguments) takes them
from there, and a setting left at None takes its value from DEVICE_DEFAULTS or QUICK_DEFAULTS.
"""

import argparse
import dataclasses
import datetime
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import torch

from lunaris.errors import LunarisError
from lunaris.fileio import atomic_write_json
from lunaris.runtime import (
    autocast,
    cpu_name,
    device_name,
    enable_tf32,
    git_commit,
    peak_flops_per_device,
    resolve_device,
    resolve_dtype,
    set_threads,
)

# ---------------------------------------------------------------------------------------------
# Model shapes
# ---------------------------------------------------------------------------------------------

# Dense shapes (Llama-style, GQA, tied embeddings). Parameter counts are exact for both models.
SIZES = {
    "tiny": dict(vocab_size=256, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_hidden_size=192),   # 0.1M
    "30m": dict(vocab_size=16384, d_model=512, n_layers=8, n_heads=8, n_kv_heads=4, ffn_hidden_size=1376),  # 31.6M
    "100m": dict(vocab_size=32000, d_model=768, n_layers=12, n_heads=12, n_kv_heads=4, ffn_hidden_size=2048),  # 100.1M
    "350m": dict(vocab_size=32000, d_model=1024, n_layers=24, n_heads=16, n_kv_heads=8, ffn_hidden_size=3072),  # 335M
    "1b": dict(vocab_size=32000, d_model=2048, n_layers=20, n_heads=32, n_kv_heads=8, ffn_hidden_size=5632),  # 967M
}
MOC_EXPERTS, MOC_TOP_K = 8, 2
MOC_NAME = f"lunaris MoC top-{MOC_TOP_K}/{MOC_EXPERTS}"

# What a BenchSettings field left at None becomes, per device, and with --quick (a smoke test in seconds).
DEVICE_DEFAULTS = {
    "cpu": dict(sizes=["30m", "100m"], seq_len=256, batch=4, warmup=2, repeats=7, compile=True),
    "cuda": dict(sizes=["350m", "1b"], seq_len=2048, batch=8, warmup=2, repeats=7, compile=True),
}
QUICK_DEFAULTS = dict(sizes=["tiny"], seq_len=32, batch=2, warmup=1, repeats=3, compile=False)
# fp32 on CPU (bf16 matmuls are slow there); bf16 autocast over fp32 weights on CUDA.
PRECISION = {"cpu": "fp32", "cuda": "bf16"}

# The project's performance targets (a --quick run's tiny model is not checked against them).
TARGETS = {
    "cpu": {"vs_llama": 1.10, "mfu_measured": 0.75, "moc_vs_dense": 0.75},
    "cuda": {"mfu_peak": 0.50, "moc_mfu_peak": 0.40},
}


@dataclass
class BenchSettings:
    """Every option of `lunaris bench` and its default (None: from DEVICE_DEFAULTS / QUICK_DEFAULTS).

    Construction fills those in and checks every value (LunarisError), so a settings object is always complete.
    """
    device: str = "cpu"
    quick: bool = False
    sizes: Optional[list] = None
    seq_len: Optional[int] = None
    batch: Optional[int] = None
    warmup: Optional[int] = None
    repeats: Optional[int] = None
    threads: Optional[int] = None  # None: torch's choice
    compile: Optional[bool] = None
    memory: bool = True
    moc: bool = True
    scripts: bool = True
    repo: Optional[str] = None  # the source checkout whose bench/ scripts run; None: the current directory

    def __post_init__(self):
        if self.device not in DEVICE_DEFAULTS:
            raise LunarisError(f"lunaris bench --device must be cpu or cuda, got {self.device!r}.")
        resolve_device(self.device)  # a clear error when CUDA is asked for and absent
        for name, value in (QUICK_DEFAULTS if self.quick else DEVICE_DEFAULTS[self.device]).items():
            if getattr(self, name) is None:
                setattr(self, name, list(value) if isinstance(value, list) else value)
        self.sizes = list(self.sizes)
        unknown = [s for s in self.sizes if s not in SIZES]
        if unknown or not self.sizes:
            raise LunarisError(f"lunaris bench --sizes: unknown size(s) {', '.join(unknown) or '(none given)'}; "
                               f"choose from {', '.join(SIZES)}.")
        for name in ("seq_len", "batch", "repeats"):
            if getattr(self, name) < 1:
                raise LunarisError(f"lunaris bench --{name.replace('_', '-')} must be at least 1, "
                                   f"got {getattr(self, name)}.")
        if self.warmup < 0 or (self.threads is not None and self.threads < 1):
            raise LunarisError("lunaris bench: --warmup must be >= 0 and --threads >= 1.")
        resolve_dtype(self.dtype_name, torch.device(self.device))  # a GPU without bf16: an error now

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> "BenchSettings":
        return cls(**{f.name: getattr(args, f.name) for f in dataclasses.fields(cls)})

    @property
    def dtype_name(self) -> str:
        return PRECISION[self.device]

    @property
    def dtype(self) -> torch.dtype:
        return resolve_dtype(self.dtype_name, torch.device(self.device))


def _defaults_help(name: str) -> str:
    """'default 256 on CPU, 2048 on CUDA, 32 with --quick', from DEVICE_DEFAULTS and QUICK_DEFAULTS."""
    def show(value):
        if isinstance(value, bool):
            return "on" if value else "off"
        return " ".join(value) if isinstance(value, list) else str(value)
    cpu, cuda = show(DEVICE_DEFAULTS["cpu"][name]), show(DEVICE_DEFAULTS["cuda"][name])
    by_device = cpu if cpu == cuda else f"{cpu} on CPU, {cuda} on CUDA"
    return f"default {by_device}, {show(QUICK_DEFAULTS[name])} with --quick"


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The options of `lunaris bench`, one per BenchSettings field (plus --json), with its defaults."""
    s = BenchSettings  # the class attributes are the fields' defaults
    p.add_argument("--quick", action="store_true", default=s.quick,
                   help="a smoke test in seconds: the smallest model, few rounds, no compile")
    p.add_argument("--json", metavar="FILE", help="also write every figure, the machine and the command to FILE")
    p.add_argument("--device", default=s.device, choices=tuple(DEVICE_DEFAULTS),
                   help="where to run (default %(default)s)")
    p.add_argument("--sizes", nargs="+", metavar="SIZE", default=s.sizes,
                   help=f"model sizes: {' '.join(SIZES)} ({_defaults_help('sizes')})")
    p.add_argument("--seq-len", type=int, default=s.seq_len, help=f"sequence length ({_defaults_help('seq_len')})")
    p.add_argument("--batch", type=int, default=s.batch, help=f"sequences per step ({_defaults_help('batch')})")
    p.add_argument("--repeats", type=int, default=s.repeats,
                   help=f"timed rounds; the median is reported ({_defaults_help('repeats')})")
    p.add_argument("--warmup", type=int, default=s.warmup,
                   help=f"untimed steps of each side first ({_defaults_help('warmup')})")
    p.add_argument("--threads", type=int, default=s.threads,
                   help="torch.set_num_threads (default: torch's choice; reported)")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=s.compile,
                   help=f"also time torch.compile'd Lunaris ({_defaults_help('compile')})")
    p.add_argument("--no-memory", dest="memory", action="store_false", default=s.memory,
                   help="skip the peak-memory subprocesses")
    p.add_argument("--no-moc", dest="moc", action="store_false", default=s.moc, help="skip MoC top-2/8 vs dense")
    p.add_argument("--no-scripts", dest="scripts", action="store_false", default=s.scripts,
                   help="skip the bench/ scripts of the source checkout")
    p.add_argument("--repo", metavar="DIR", default=s.repo,
                   help="the Lunaris source checkout whose bench/ scripts run (default: the current directory)")


def lunaris_config(size: str, seq_len: int, moc: bool = False):
    """Our dense model at SIZES[size] (norm_bias off: same parameters as Llama), or its MoC twin:
    top-2 of 8 experts of half the dense hidden size, so the active FFN weights per token are equal."""
    from lunaris.config import LunarisCodexConfig
    shape = dict(SIZES[size])
    if moc:
        shape.update(n_experts=MOC_EXPERTS, top_k=MOC_TOP_K, collab_mode="none", n_reasoning_steps=1,
                     ffn_hidden_size=shape["ffn_hidden_size"] // MOC_TOP_K)
    return LunarisCodexConfig(max_seq_len=seq_len, norm_bias=False, tie_embeddings=True, dropout=0.0, **shape)


def llama_config(config):
    """transformers LlamaConfig with the same shapes as our LunarisCodexConfig (SDPA attention)."""
    from transformers import LlamaConfig
    return LlamaConfig(
        vocab_size=config.vocab_size, hidden_size=config.d_model, intermediate_size=config.ffn_hidden,
        num_hidden_layers=config.n_layers, num_attention_heads=config.n_heads, num_key_value_heads=config.kv_heads,
        max_position_embeddings=config.max_seq_len, rms_norm_eps=config.norm_eps, rope_theta=config.rope_theta,
        tie_word_embeddings=True, attention_bias=False, mlp_bias=False, attention_dropout=0.0,
        attn_implementation="sdpa")


# ---------------------------------------------------------------------------------------------
# Training steps
# ---------------------------------------------------------------------------------------------

@dataclass
class Contender:
    """One side of a comparison: a model, its optimizer and a zero-argument training step."""
    name: str
    model: torch.nn.Module
    step: Callable[[], None]
    flops_per_token: float
    params: int
    error: Optional[str] = None


def make_step(model, optimizer, idx, targets, dtype: torch.dtype, hf: bool) -> Callable[[], None]:
    """forward (autocast in `dtype`), backward, AdamW step, zero_grad(set_to_none).

    Ours is the trainer's own step (lunaris.train.step: forward_backward, then update; without the gradient
    norm, which transformers' side would not compute either). Llama gets `labels=idx` and shifts them itself;
    ours gets next-token targets: the same work.
    """
    from lunaris.train.step import forward_backward, update
    if not hf:
        def step():
            forward_backward(model, idx, targets, weight=1.0, accumulation=1, dtype=dtype)
            update(optimizer, apply=True)
        return step

    def hf_step():
        with autocast(idx.device, dtype):
            loss = model(input_ids=idx, labels=idx).loss
        loss.backward()
        update(optimizer, apply=True)
    return hf_step


def lunaris_fuses_adamw(device: str) -> bool:
    """Whether our configure_optimizers picks fused AdamW on `device` (asked of a tiny model)."""
    from lunaris.model import LunarisCodex
    tiny = LunarisCodex(lunaris_config("tiny", 8)).to(device)
    optimizer = tiny.configure_optimizers(weight_decay=0.1, learning_rate=3e-4, device_type=device)
    return bool(optimizer.defaults.get("fused"))


def build_contender(kind: str, size: str, settings: BenchSettings, compiled: bool = False) -> Contender:
    """kind: 'lunaris' (dense), 'lunaris-moc' or 'llama'. Same seed, same batch of random tokens."""
    from lunaris.model import LunarisCodex
    torch.manual_seed(0)
    device, T, B = settings.device, settings.seq_len, settings.batch
    config = lunaris_config(size, T, moc=(kind == "lunaris-moc"))
    idx = torch.randint(0, config.vocab_size, (B, T), device=device)
    targets = torch.roll(idx, -1, dims=1)
    with torch.device("meta"):  # FLOPs from the shapes alone; identical shapes: the same FLOPs for Llama
        flops = LunarisCodex(config).flops_per_token(T)
    if kind == "llama":
        from transformers import LlamaForCausalLM
        model = LlamaForCausalLM(llama_config(config)).to(device).train()
        optimizer = torch.optim.AdamW(model.parameters(), lr=3e-4, betas=(0.9, 0.95), weight_decay=0.1,
                                      fused=lunaris_fuses_adamw(device))  # the same AdamW as ours
        params = sum(p.numel() for p in model.parameters())
        name = "transformers LlamaForCausalLM"
        step = make_step(model, optimizer, idx, targets, settings.dtype, hf=True)
        return Contender(name, model, step, flops, params)
    model = LunarisCodex(config).to(device).train()
    optimizer = model.configure_optimizers(weight_decay=0.1, learning_rate=3e-4, device_type=device)
    runnable = torch.compile(model) if compiled else model
    name = (MOC_NAME if kind == "lunaris-moc" else "lunaris") + (" compiled" if compiled else " eager")
    step = make_step(runnable, optimizer, idx, targets, settings.dtype, hf=False)
    return Contender(name, model, step, flops, model.num_params())


def matmul_probe(settings: BenchSettings):
    """(FLOPs, zero-argument function): square matmuls in the training dtype, the machine's dense rate."""
    n = {"cuda": 8192}.get(settings.device, 512 if settings.quick else 2048)
    calls = 10 if settings.device == "cuda" else 3
    a = torch.randn(n, n, device=settings.device, dtype=settings.dtype)
    b = torch.randn(n, n, device=settings.device, dtype=settings.dtype)

    def probe():
        for _ in range(calls):
            torch.mm(a, b)
    return 2.0 * n ** 3 * calls, probe


def synchronize(device: str):
    if device == "cuda":
        torch.cuda.synchronize()


def time_in_turns(steps: dict, warmup: int, repeats: int, device: str) -> tuple:
    """({name: [wall seconds per round]}, {name: [process CPU seconds per round]}): every step once per
    round, the order rotating each round. CPU time (all threads) barely grows while other processes
    hold the cores, so its ratios stay readable on a shared machine where wall-clock spikes."""
    for step in steps.values():
        for _ in range(warmup):
            step()
    synchronize(device)
    names = list(steps)
    wall, cpu = {name: [] for name in names}, {name: [] for name in names}
    for r in range(repeats):
        for name in names[r % len(names):] + names[:r % len(names)]:
            start, start_cpu = time.perf_counter(), time.process_time()
            steps[name]()
            synchronize(device)
            wall[name].append(time.perf_counter() - start)
            cpu[name].append(time.process_time() - start_cpu)
    return wall, cpu


def median_ratio(numerators: list, denominators: list) -> float:
    return statistics.median(n / d for n, d in zip(numerators, denominators))


def compare(title: str, contenders: list, baselines: dict, settings: BenchSettings, peak_flops) -> list:
    """Time the contenders in turns with the matmul probe; one result row per contender.

    `baselines` maps a contender's name to the name of the one it is compared with (x baseline > 1: faster).
    """
    probe_flops, probe = matmul_probe(settings)
    runnable = {c.name: c.step for c in contenders if c.error is None}
    times, cpu_times = time_in_turns({**runnable, "matmul": probe}, settings.warmup, settings.repeats,
                                     settings.device)
    tokens = settings.batch * settings.seq_len
    rows = []
    for c in contenders:
        row = {"comparison": title, "name": c.name, "params": c.params, "seq_len": settings.seq_len,
               "batch": settings.batch, "dtype": settings.dtype_name, "flops_per_token": c.flops_per_token}
        if c.error is not None:
            rows.append({**row, "error": c.error})
            continue
        ts = times[c.name]
        achieved = [c.flops_per_token * tokens / t for t in ts]          # model FLOP/s per round
        rates = [probe_flops / t for t in times["matmul"]]               # matmul FLOP/s per round
        row.update(step_s=ts, step_s_median=statistics.median(ts), tokens_per_s=tokens / statistics.median(ts),
                   tokens_per_s_best=tokens / min(ts), matmul_flops_per_s=statistics.median(rates),
                   mfu_measured=statistics.median(a / m for a, m in zip(achieved, rates)),
                   mfu_peak=statistics.median(achieved) / peak_flops if peak_flops else None)
        baseline = baselines.get(c.name)
        if baseline in times:
            row["baseline"] = baseline
            row["vs_baseline"] = median_ratio(times[baseline], ts)  # > 1: faster than the baseline
            row["vs_baseline_best"] = min(times[baseline]) / min(ts)  # the least disturbed round of each
            if settings.device == "cpu":
                row["vs_baseline_cpu"] = median_ratio(cpu_times[baseline], cpu_times[c.name])
        if settings.device == "cpu":
            row["cpu_s"] = cpu_times[c.name]
        rows.append(row)
    return rows


def try_compile(contender: Contender, settings: BenchSettings) -> Contender:
    """Run the compiled step once (that compiles it); on failure keep the row with the error."""
    try:
        contender.step()
        synchronize(settings.device)
    except Exception as exc:  # a missing C++ compiler, an unsupported op: report it, do not stop the bench
        contender.error = f"torch.compile failed: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
    return contender


def dense_comparison(size: str, settings: BenchSettings, peak_flops, log) -> list:
    log(f"dense {size}: building lunaris and transformers Llama ...")
    contenders = [build_contender("lunaris", size, settings), build_contender("llama", size, settings)]
    if settings.compile:
        log(f"dense {size}: compiling lunaris (first call) ...")
        contenders.append(try_compile(build_contender("lunaris", size, settings, compiled=True), settings))
    log(f"dense {size}: timing {settings.repeats} rounds ...")
    llama = "transformers LlamaForCausalLM"
    rows = compare(f"dense {size}", contenders, {"lunaris eager": llama, "lunaris compiled": llama}, settings,
                   peak_flops)
    del contenders
    return rows


def moc_comparison(size: str, settings: BenchSettings, peak_flops, log) -> list:
    log(f"MoC top-{MOC_TOP_K}/{MOC_EXPERTS} vs dense {size}: building ...")
    contenders = [build_contender("lunaris", size, settings), build_contender("lunaris-moc", size, settings)]
    if settings.compile:
        log("MoC: compiling dense and MoC (first calls) ...")
        contenders += [try_compile(build_contender(kind, size, settings, compiled=True), settings)
                       for kind in ("lunaris", "lunaris-moc")]
    log(f"MoC vs dense {size}: timing {settings.repeats} rounds ...")
    baselines = {f"{MOC_NAME} eager": "lunaris eager", f"{MOC_NAME} compiled": "lunaris compiled"}
    rows = compare(f"MoC vs dense {size}", contenders, baselines, settings, peak_flops)
    del contenders
    return rows


# ---------------------------------------------------------------------------------------------
# Peak memory: one fresh process per configuration
# ---------------------------------------------------------------------------------------------

def measure_memory(kind: str, size: str, compiled: bool, settings: BenchSettings) -> dict:
    """Build the configuration in a fresh Python process and return its training-step peak memory (MiB)."""
    spec = dict(kind=kind, size=size, compiled=compiled, device=settings.device, seq_len=settings.seq_len,
                batch=settings.batch, threads=torch.get_num_threads())
    proc = subprocess.run([sys.executable, "-m", "lunaris.bench", "--memory-worker", json.dumps(spec)],
                          capture_output=True, text=True, timeout=1800)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        return {"error": f"memory worker failed (exit {proc.returncode}): {tail[:200]}"}
    return json.loads(lines[-1])


def memory_worker(spec: dict) -> dict:
    """Runs in the subprocess: the peak memory of one training step of one configuration, after a
    warm-up step (which compiles a compiled configuration and creates the optimizer state)."""
    settings = BenchSettings(device=spec["device"], seq_len=spec["seq_len"], batch=spec["batch"],
                             threads=spec["threads"])
    set_threads(settings.threads)
    contender = build_contender(spec["kind"], spec["size"], settings, compiled=spec["compiled"])
    contender.step()
    synchronize(settings.device)
    if settings.device == "cuda":
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        contender.step()
        synchronize("cuda")
        peak, measure = torch.cuda.max_memory_allocated(), "cuda max_memory_allocated"
    elif reset_peak_rss():
        before = proc_status_bytes("VmRSS")
        contender.step()
        peak, measure = proc_status_bytes("VmHWM"), "VmHWM"
    else:  # ru_maxrss: the whole process's peak, compilation included (bytes on macOS, KiB elsewhere)
        scale = 1 if sys.platform == "darwin" else 1024
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale
        contender.step()
        peak, measure = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale, "ru_maxrss"
    return {"peak_mib": peak / 2**20, "delta_mib": max(0, peak - before) / 2**20, "measure": measure}


def proc_status_bytes(field: str) -> int:
    """A memory field of /proc/self/status (Linux) in bytes."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(field)


def reset_peak_rss() -> bool:
    """Reset this process's peak-RSS mark (Linux VmHWM) to its current RSS; False where impossible.

    Not ru_maxrss: Linux carries it over from the parent through fork and exec, so a worker started by
    a big benchmark process would report the parent's peak.
    """
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        proc_status_bytes("VmHWM")
        return True
    except (OSError, KeyError):
        return False


MEMORY_KINDS = {"lunaris eager": ("lunaris", False), "lunaris compiled": ("lunaris", True),
                "transformers LlamaForCausalLM": ("llama", False),
                f"{MOC_NAME} eager": ("lunaris-moc", False), f"{MOC_NAME} compiled": ("lunaris-moc", True)}


def add_memory(rows: list, settings: BenchSettings, log) -> None:
    done = {}
    for row in rows:
        if "error" in row or row["name"] not in MEMORY_KINDS:
            continue
        kind, compiled = MEMORY_KINDS[row["name"]]
        size = row["comparison"].split()[-1]
        key = (kind, size, compiled)
        if key not in done:
            log(f"peak memory: {row['name']} {size} (fresh process) ...")
            done[key] = measure_memory(kind, size, compiled, settings)
        row["memory"] = done[key]


# ---------------------------------------------------------------------------------------------
# The bench/ scripts of a source checkout (data loader, generation, MoC layer)
# ---------------------------------------------------------------------------------------------

SCRIPTS = {  # name: (file, quick arguments, full arguments)
    "data": ("bench_data.py", ["--corpus-mb", "2", "--loader-tokens", "4000000", "--repeats", "1"], []),
    "generate": ("bench_generate.py", ["--sizes", "micro", "--new-tokens", "32", "--rounds", "2"], []),
    "moc_layer": ("bench_moc.py", ["--quick", "--rounds", "3"], []),
}


def bench_scripts_dir(settings: BenchSettings) -> Path:
    """The bench/ folder of the checkout at --repo (default: the current directory); LunarisError without one."""
    folder = Path(settings.repo or ".").resolve() / "bench"
    missing = [file for file, _, _ in SCRIPTS.values() if not (folder / file).is_file()]
    if missing:
        raise LunarisError(f"lunaris bench runs the scripts in the bench/ folder of a Lunaris source checkout, and "
                           f"{folder} has no {', '.join(missing)}. Run it from the checkout's root directory, point "
                           f"--repo at the checkout, or pass --no-scripts (an installed Lunaris has no bench/ folder).")
    return folder


def markdown_tables(text: str) -> list:
    """Every markdown table in text as a list of rows (lists of cells), separator lines dropped."""
    tables, current = [], []
    for line in text.splitlines() + [""]:
        line = line.strip()
        if line.startswith("|") and line.endswith("|"):
            cells = [c.strip() for c in line[1:-1].split("|")]
            if not all(set(c) <= set("-: ") for c in cells):
                current.append(cells)
        elif current:
            tables.append(current)
            current = []
    return tables


def run_script(name: str, settings: BenchSettings) -> dict:
    folder = bench_scripts_dir(settings)
    file, quick_args, full_args = SCRIPTS[name]
    args = quick_args if settings.quick else full_args
    threads = ["--threads", str(torch.get_num_threads())] if name in ("moc_layer", "generate") else []
    command = [sys.executable, str(folder / file), *args, *threads]
    start = time.perf_counter()
    proc = subprocess.run(command, capture_output=True, text=True, timeout=3600, cwd=folder.parent)
    result = {"command": " ".join(["python", f"bench/{file}", *args, *threads]),
              "seconds": round(time.perf_counter() - start, 1)}
    if proc.returncode != 0:
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        return {**result, "error": f"exit {proc.returncode}: {tail[:300]}"}
    return {**result, "stdout": proc.stdout, "tables": markdown_tables(proc.stdout)}


# ---------------------------------------------------------------------------------------------
# Machine, report
# ---------------------------------------------------------------------------------------------

def git_state() -> Optional[dict]:
    """{"commit", "dirty"} of the Lunaris source tree (lunaris.runtime.git_commit); None for an installed copy."""
    commit = git_commit()
    if commit is None:
        return None
    sha, _, dirty = commit.partition("+")
    return {"commit": sha, "dirty": bool(dirty)}


def machine_info(settings: BenchSettings) -> dict:
    info = {"platform": platform.platform(), "cpu": cpu_name(), "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(), "device": settings.device, "python": platform.python_version(),
            "torch": torch.__version__}
    try:
        import transformers
        info["transformers"] = transformers.__version__
    except ImportError:
        info["transformers"] = None
    if settings.device == "cuda":
        info["gpu"] = device_name(torch.device("cuda"))
        info["cuda"] = torch.version.cuda
    return info


def check_targets(rows: list, settings: BenchSettings) -> list:
    """The TARGETS of this device, each with the measured value and whether it is met."""
    wanted = TARGETS[settings.device]
    checks = []
    for row in rows:
        if "error" in row:
            continue
        if row["comparison"].startswith("dense") and "vs_baseline" in row:
            if "vs_llama" in wanted:
                checks.append({"target": f"{row['comparison']}: {row['name']} tokens/s vs Llama",
                               "value": row["vs_baseline"], "at_least": wanted["vs_llama"]})
        if row["comparison"].startswith("dense") and row["name"].startswith("lunaris"):
            if "mfu_measured" in wanted:
                checks.append({"target": f"{row['comparison']}: {row['name']} MFU vs measured matmul rate",
                               "value": row["mfu_measured"], "at_least": wanted["mfu_measured"]})
            if "mfu_peak" in wanted and row["mfu_peak"] is not None:
                checks.append({"target": f"{row['comparison']}: {row['name']} MFU vs datasheet peak",
                               "value": row["mfu_peak"], "at_least": wanted["mfu_peak"]})
        if row["name"].startswith(MOC_NAME):
            if "moc_vs_dense" in wanted and "vs_baseline" in row:
                checks.append({"target": f"{row['comparison']}: {row['name']} tokens/s vs dense (equal active params)",
                               "value": row["vs_baseline"], "at_least": wanted["moc_vs_dense"]})
            if "moc_mfu_peak" in wanted and row["mfu_peak"] is not None:
                checks.append({"target": f"{row['comparison']}: {row['name']} MFU (active FLOPs) vs peak",
                               "value": row["mfu_peak"], "at_least": wanted["moc_mfu_peak"]})
    for check in checks:
        check["met"] = check["value"] >= check["at_least"]
    return checks


def _fmt(value, spec: str, missing: str = "") -> str:
    return missing if value is None else format(value, spec)


def versus(row: dict, baselines: set) -> str:
    """The 'x baseline' cell: '1.043 vs Llama', 'baseline', or empty."""
    if "vs_baseline" in row:
        short = "Llama" if row["baseline"].startswith("transformers") else row["baseline"].replace("lunaris ", "dense ")
        return f"{row['vs_baseline']:.3f} vs {short}"
    return "baseline" if (row["comparison"], row["name"]) in baselines else ""


def markdown_report(report: dict) -> str:
    m, s = report["machine"], report["settings"]
    lines = [f"lunaris bench — {report['date']}, commit {(report['git'] or {}).get('commit', 'unknown')[:12]}"
             f"{' (uncommitted changes)' if (report['git'] or {}).get('dirty') else ''}",
             f"{m['cpu']}, {m['cpu_count']} CPUs, {m['torch_threads']} torch threads"
             f"{', ' + m['gpu'] if m.get('gpu') else ''}; torch {m['torch']}, transformers {m['transformers']}; "
             f"{s['dtype']}, seq {s['seq_len']}, batch {s['batch']}, {s['warmup']} warm-up + {s['repeats']} rounds",
             f"command: {report['command']}", "",
             "| comparison | model | params | tokens/s | x baseline | x best rounds | x CPU time "
             "| MFU (measured matmul) | MFU (peak) | peak MiB | +MiB |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    baselines = {(row["comparison"], row["baseline"]) for row in report["results"] if "baseline" in row}
    for row in report["results"]:
        if "error" in row:
            lines.append(f"| {row['comparison']} | {row['name']} | {row['params'] / 1e6:.1f}M | {row['error']} "
                         f"| | | | | | | |")
            continue
        memory = row.get("memory", {})
        lines.append(
            f"| {row['comparison']} | {row['name']} | {row['params'] / 1e6:.1f}M | {row['tokens_per_s']:,.0f} | "
            f"{versus(row, baselines)} | {_fmt(row.get('vs_baseline_best'), '.3f')} | "
            f"{_fmt(row.get('vs_baseline_cpu'), '.3f')} | "
            f"{row['mfu_measured']:.3f} | {_fmt(row['mfu_peak'], '.3f', 'n/a')} | "
            f"{_fmt(memory.get('peak_mib'), ',.0f')} | {_fmt(memory.get('delta_mib'), ',.0f')} |")
    rates = [row["matmul_flops_per_s"] for row in report["results"] if "matmul_flops_per_s" in row]
    if rates:
        lines.append(f"\nmeasured {s['dtype']} matmul rate (median over rounds): {statistics.median(rates) / 1e9:,.1f} "
                     f"GFLOP/s" + (f"; datasheet peak {report['peak_flops'] / 1e12:,.0f} TFLOP/s"
                                   if report.get("peak_flops") else ""))
    if report["targets"]:
        lines += ["", "| target | measured | needed | met |", "|---|---:|---:|---|"]
        lines += [f"| {t['target']} | {t['value']:.3f} | >= {t['at_least']:.2f} | {'yes' if t['met'] else 'NO'} |"
                  for t in report["targets"]]
    for name, section in report["scripts"].items():
        lines.append(f"\n### {name} (`{section.get('command', 'bench/' + SCRIPTS[name][0])}`)")
        if "stdout" in section:
            lines.append(section["stdout"].strip())
        else:
            lines.append(section.get("error") or section.get("skipped"))
    return "\n".join(lines)


def check_json_path(path) -> None:
    path = Path(path)
    if path.is_dir():
        raise LunarisError(f"lunaris bench --json {path}: that is a directory; give a file name such as "
                           f"{path}/bench.json.")
    if not path.parent.is_dir() or not os.access(path.parent, os.W_OK):
        raise LunarisError(f"lunaris bench --json {path}: directory {path.parent} does not exist or is not writable; "
                           f"create it or choose another path.")


def run_bench(settings: BenchSettings, command: str, log=None) -> dict:
    """Run every measurement of `settings`; return the report dict (see markdown_report for its fields)."""
    log = log or (lambda message: print(message, file=sys.stderr, flush=True))
    run_scripts = settings.scripts and settings.device == "cpu"
    if run_scripts:
        bench_scripts_dir(settings)  # no checkout: an error now, not after minutes of measuring
    set_threads(settings.threads)  # torch's choice otherwise; reported either way
    device = torch.device(settings.device)
    enable_tf32(device)  # as the trainer runs: TF32 for the fp32 matmuls outside autocast
    peak = peak_flops_per_device(device)
    rows = []
    for size in settings.sizes:
        rows += dense_comparison(size, settings, peak, log)
    if settings.moc:
        rows += moc_comparison(settings.sizes[0], settings, peak, log)
    if settings.memory:
        add_memory(rows, settings, log)
    scripts = {}
    if run_scripts:
        for name in SCRIPTS:
            log(f"bench/{SCRIPTS[name][0]} ...")
            scripts[name] = run_script(name, settings)
    elif settings.scripts:
        scripts = {name: {"skipped": "CPU-only script; run lunaris bench --device cpu for it"} for name in SCRIPTS}
    return {"command": command, "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
            "git": git_state(), "machine": machine_info(settings),
            "settings": {**vars(settings), "dtype": settings.dtype_name},
            "peak_flops": peak, "results": rows, "scripts": scripts,
            # the targets are about the real sizes; a --quick run's tiny model says nothing about them
            "targets": [] if settings.quick else check_targets(rows, settings)}


def command_line(args) -> str:
    """The command as typed, rebuilt from the parsed arguments (also right when called from Python)."""
    words = ["lunaris", "bench"]
    for name, value in vars(args).items():
        if name in ("func", "accepts_overrides", "command") or value is None:
            continue
        flag = name.replace("_", "-")
        if isinstance(value, bool):  # a switch: written where it differs from BenchSettings' default
            if value != getattr(BenchSettings, name, False):
                words.append(f"--{flag}" if value else f"--no-{flag}")
        else:
            words += [f"--{flag}", *map(str, value if isinstance(value, list) else [value])]
    return " ".join(words)


def main_bench(settings: BenchSettings, json_path=None, command: str = "lunaris bench") -> dict:
    if json_path is not None:  # fail before minutes of measuring, not after
        check_json_path(json_path)
    report = run_bench(settings, command)
    print(markdown_report(report))
    if json_path is not None:
        atomic_write_json(json_path, report)
    return report


if __name__ == "__main__":  # the memory worker: python -m lunaris.bench --memory-worker '{...}'
    if len(sys.argv) == 3 and sys.argv[1] == "--memory-worker":
        print(json.dumps(memory_worker(json.loads(sys.argv[2]))))
    else:
        sys.exit("usage: python -m lunaris.bench --memory-worker SPEC (internal); use `lunaris bench`")
