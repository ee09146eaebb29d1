"""Decode speed against the memory-bandwidth limit and against `transformers` generate on the same weights.

For each model size a random model is saved as a checkpoint, exported with `lunaris export` (Llama format) and
loaded with `transformers.LlamaForCausalLM`. Each then continues the same prompt greedily for exactly
`new_tokens` tokens (prefill included in the time, batch 1, fp32, CPU):

- lunaris eager (`model.generate(..., compile=False)`, the reference) and lunaris compiled (`compile=True`:
  the static-shape decode step through inductor), and compiled with BLAS matrix-vector products (the comparison
  behind `decode_linear`'s choice);
- transformers `generate` (eager, its dynamic cache) and, where it works, transformers with its static cache and
  `torch.compile` (`cache_implementation="static"` and a CompileConfig that compiles on CPU). Without transformers
  installed, only lunaris is timed.

The limit: a batch-1 decode step reads every weight once, so tokens/s cannot exceed (bytes read per second) /
(bytes of weights). The bytes per second are measured in the same run by a matrix-vector probe (`probe_mb` of fp32
matrices, more than the CPU's caches hold): F.linear, which calls the BLAS, and the compiled multiply-and-sum that
lunaris's compiled step uses; the limit takes the faster of the two. A plain read (`torch.sum` over the same
bytes) is reported for reference.

Every round runs the probe and every implementation once, alternating, so load from other processes hits them
alike; medians over rounds (of tokens/s, of per-round ratios). Compilation happens before the rounds and is
reported on its own, with the number of new tokens after which it has paid for itself.
"""

import dataclasses
import statistics
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F

from lunaris.bench.step import has_transformers
from lunaris.config import LunarisCodexConfig, TrainConfig, load_config
from lunaris.data.tokenizer import train_tokenizer
from lunaris.errors import LunarisError
from lunaris.export import export_checkpoint
from lunaris.model import LunarisCodex, attention, generation
from lunaris.model.attention import decode_linear

DEMO_PRESET = Path(__file__).resolve().parents[1] / "presets" / "demo-cpu.yaml"  # the model `lunaris demo` trains

SIZES = {  # name: LunarisCodexConfig keys, or a preset's path
    "micro": dict(d_model=128, n_layers=4, n_heads=4, n_kv_heads=2, vocab_size=4096, multiple_of=64),
    "demo": DEMO_PRESET,
    "small": dict(d_model=512, n_layers=8, n_heads=8, n_kv_heads=2, vocab_size=32768, multiple_of=64),
    "124m": dict(d_model=768, n_layers=12, n_heads=12, n_kv_heads=12, vocab_size=50304),  # configs/dense-124m.yaml
}
TARGET_SPEEDUP, TARGET_FRACTION, TARGET_SIZES = 1.5, 0.60, ("small", "124m")
IMPLEMENTATIONS = ("eager", "compiled", "compiled BLAS", "transformers", "transformers static")


@dataclass
class GenerateBenchOptions:
    """What `bench_generate` measures, with bench/bench_generate.py's defaults."""
    sizes: list = field(default_factory=lambda: list(SIZES))
    prompt_tokens: int = 32
    new_tokens: int = 128
    rounds: int = 3
    clock: str = "wall"              # or "cpu": this process's CPU time (steadier on a shared machine, 1 thread)
    probe_mb: int = 256              # MB of fp32 matrices the bandwidth probe reads
    compile: bool = True             # lunaris compiled (and the compiled probe)
    hf_compile: bool = True          # transformers with static cache + compile
    blas_variant: bool = True        # lunaris compiled with F.linear products instead of the multiply-and-sum


QUICK = dict(sizes=["micro"], new_tokens=32, rounds=2)  # `lunaris bench --quick`


def model_config(size: str, max_seq_len: int):
    spec = SIZES[size]
    config = load_config(spec).model if isinstance(spec, Path) else LunarisCodexConfig(**spec)
    return dataclasses.replace(config, max_seq_len=max_seq_len)


def shape(size: str) -> str:
    c = model_config(size, 1)
    return f"{size} (d{c.d_model} L{c.n_layers} H{c.n_heads}/{c.kv_heads}kv V{c.vocab_size})"


def exported_pair(size: str, workdir: Path, max_seq_len: int, with_hf: bool):
    """(our model, transformers' LlamaForCausalLM holding the same weights or None), both in eval mode."""
    config = model_config(size, max_seq_len)
    torch.manual_seed(0)
    model = LunarisCodex(config).eval()
    if not with_hf:
        return model, None
    from transformers import LlamaForCausalLM
    run = workdir / f"run-{size}"
    run.mkdir()
    torch.save({"model": model.state_dict(), "config": dataclasses.asdict(TrainConfig(model=config)), "step": 0},
               run / "latest_checkpoint.pt")
    # the export needs a tokenizer; a tiny byte-level BPE's ids fit every size
    train_tokenizer(["the quick brown fox jumps over the lazy dog"] * 10, 300).save(str(run / "tokenizer.json"))
    export_checkpoint(run, workdir / f"hf-{size}")
    hf_model = LlamaForCausalLM.from_pretrained(workdir / f"hf-{size}", dtype=torch.float32).eval()
    return model, hf_model


def weight_bytes(model) -> int:
    """Bytes a decode step must read: every parameter once (a tied LM head counts once), except that an untied
    embedding table is read one row at a time."""
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    if not model.config.tie_embeddings:
        table = model.wte.weight
        total -= (table.shape[0] - 1) * table.shape[1] * table.element_size()
    return total


class BandwidthProbe:
    """Bytes per second of matrix-vector products over more memory than the caches hold."""

    def __init__(self, megabytes: int, compiled: bool):
        width, rows = 1024, 4096
        count = max(1, megabytes * 2**20 // (rows * width * 4))
        gen = torch.Generator().manual_seed(0)
        self.weights = [torch.randn(rows, width, generator=gen) for _ in range(count)]
        self.x = torch.randn(1, width, generator=gen)
        self.flat = torch.randn(count * rows * width, generator=gen)
        self.bytes = count * rows * width * 4
        self.compiled, self.compile_s = None, 0.0
        if compiled:
            self.compiled = torch.compile(lambda x, weights: [decode_linear(x, w) for w in weights], dynamic=False)
            start = time.perf_counter()
            self.compiled(self.x, self.weights)
            self.compile_s = time.perf_counter() - start
            reference = [F.linear(self.x, w) for w in self.weights[:2]]
            for ours, ref in zip(self.compiled(self.x, self.weights), reference):
                torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-4)

    def measure(self, repeats: int = 3) -> dict:
        """GB/s (best of `repeats`) of F.linear, of the compiled multiply-and-sum, and of a plain read."""
        kernels = {"linear": lambda: [F.linear(self.x, w) for w in self.weights], "read": lambda: self.flat.sum()}
        if self.compiled is not None:
            kernels["compiled"] = lambda: self.compiled(self.x, self.weights)
        result = {}
        for name, fn in kernels.items():
            best = float("inf")
            for _ in range(repeats):
                start = time.perf_counter()
                fn()
                best = min(best, time.perf_counter() - start)
            result[name] = self.bytes / best / 1e9
        result["best_matvec"] = max(result["linear"], result.get("compiled", 0.0))
        return result


# ---- the implementations -------------------------------------------------------------------------------

def run_ours(model, prompt, n, compile=False):
    return model.generate(prompt, n, temperature=0, compile=compile)


def step_logits(fn):
    """Run fn() and return the (steps, B, vocab) logits lunaris sampled each new token from."""
    recorded, real = [], generation.sample_next_token

    def spy(logits, *args, **kwargs):
        recorded.append(logits.clone())
        return real(logits, *args, **kwargs)

    generation.sample_next_token = spy
    try:
        fn()
    finally:
        generation.sample_next_token = real
    return torch.stack(recorded)


def run_ours_blas(model, prompt, n, stats=None):
    """Compiled, with every decode product left to F.linear (MATVEC_MAX_ROWS = 0: its own compiled graph)."""
    saved, attention.MATVEC_MAX_ROWS = attention.MATVEC_MAX_ROWS, 0
    try:
        return model.generate(prompt, n, temperature=0, compile=True, stats=stats)
    finally:
        attention.MATVEC_MAX_ROWS = saved


def run_transformers(hf_model, prompt, n, **extra):
    with torch.no_grad():
        return hf_model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=n,
                                 min_new_tokens=n, do_sample=False, **extra)


def hf_static_compile_kwargs():
    """generate() arguments for transformers' static cache compiled with torch.compile on CPU."""
    from transformers import CompileConfig
    config = CompileConfig(fullgraph=False, dynamic=False, mode="default")
    config._compile_all_devices = True  # transformers compiles automatically on GPUs only otherwise
    return {"cache_implementation": "static", "compile_config": config}


def timed(clock, fn, *args, **kwargs):
    start = clock()
    out = fn(*args, **kwargs)
    return clock() - start, out


def compiled_lunaris(model, prompt, n: int, options: GenerateBenchOptions, row: dict, log) -> dict:
    """Compile our decode step (and its BLAS variant) before the rounds; their implementations."""
    log(f"{row['size']}: compiling the lunaris decode step ...")
    stats = {}
    model.generate(prompt, n, temperature=0, compile=True, stats=stats)  # same cache length as the rounds
    row["compile_s"]["compiled"] = stats["compile_s"]
    impls = {"compiled": lambda: run_ours(model, prompt, n, compile=True)}
    eager_logits = step_logits(lambda: run_ours(model, prompt, n))
    row["logits_diff"] = (step_logits(impls["compiled"]) - eager_logits).abs().max().item()
    if options.blas_variant:
        log(f"{row['size']}: compiling the lunaris decode step with BLAS products ...")
        run_ours_blas(model, prompt, n, stats)
        row["compile_s"]["compiled BLAS"] = stats["compile_s"]
        impls["compiled BLAS"] = lambda: run_ours_blas(model, prompt, n)
    return impls


def compiled_transformers(hf_model, prompt, n: int, row: dict, log) -> dict:
    """transformers' static cache + torch.compile, compiled by a first generate; {} (and the error) if it fails."""
    log(f"{row['size']}: compiling transformers with its static cache ...")
    try:
        hf_kwargs = hf_static_compile_kwargs()
        seconds, _ = timed(time.perf_counter, run_transformers, hf_model, prompt, n, **hf_kwargs)
    except Exception as exc:  # report, do not stop the benchmark
        row["errors"]["transformers static"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
        return {}
    row["compile_s"]["transformers static"] = seconds
    return {"transformers static": lambda: run_transformers(hf_model, prompt, n, **hf_kwargs)}


def time_rounds(impls: dict, probe: BandwidthProbe, reference, options: GenerateBenchOptions, size: str, log):
    """({name: [seconds per round]}, [probe results per round], {name: same tokens as eager every round})."""
    clock = time.process_time if options.clock == "cpu" else time.perf_counter
    times, probes, same = {name: [] for name in impls}, [], {name: True for name in impls}
    for r in range(options.rounds):
        log(f"{size}: round {r + 1}/{options.rounds}")
        probes.append(probe.measure())
        for name, fn in impls.items():
            seconds, out = timed(clock, fn)
            times[name].append(seconds)
            same[name] = same[name] and torch.equal(out, reference)
    return times, probes, same


def summarize(row: dict, times: dict, probes: list, n: int) -> None:
    """Tokens/s, fractions of the limit and ratios (medians over rounds) into `row`."""
    limit = [p["best_matvec"] * 1e9 / row["bytes"] for p in probes]                  # tokens/s, per round
    row["probe"] = {key: statistics.median(p[key] for p in probes) for key in probes[0]}
    row["limit"] = statistics.median(limit)
    row["times_s"] = times
    row["tps"] = {name: statistics.median(n / t for t in ts) for name, ts in times.items()}
    row["fraction"] = {name: statistics.median(n / t / lim for t, lim in zip(ts, limit)) for name, ts in times.items()}
    for key, baseline in (("vs_hf", "transformers"), ("vs_static", "transformers static")):
        if baseline in times:
            row[key] = {name: statistics.median(b / t for b, t in zip(times[baseline], ts))
                        for name, ts in times.items()}
    if "compiled" in times:  # tokens after which compiling has paid for itself (None: never)
        saved = statistics.median(times["eager"]) / n - statistics.median(times["compiled"]) / n
        row["break_even"] = row["compile_s"]["compiled"] / saved if saved > 0 else None


def bench_size(size: str, options: GenerateBenchOptions, workdir: Path, probe: BandwidthProbe, log) -> dict:
    n = options.new_tokens
    model, hf_model = exported_pair(size, workdir, options.prompt_tokens + n, with_hf=has_transformers())
    prompt = torch.randint(0, model.config.vocab_size, (1, options.prompt_tokens),
                           generator=torch.Generator().manual_seed(1))
    reference = run_ours(model, prompt, n)
    row = {"size": size, "shape": shape(size), "params": model.num_params(), "bytes": weight_bytes(model),
           "errors": {}, "compile_s": {}}
    impls = {"eager": lambda: run_ours(model, prompt, n)}
    if hf_model is not None:
        run_transformers(hf_model, prompt, 8)  # warm-up (allocator, kernels, lazy imports)
        impls["transformers"] = lambda: run_transformers(hf_model, prompt, n)
    else:
        row["errors"].update({"transformers": "not installed", "transformers static": "not installed"})
    if options.compile:
        impls.update(compiled_lunaris(model, prompt, n, options, row, log))
    if options.hf_compile and hf_model is not None:
        impls.update(compiled_transformers(hf_model, prompt, n, row, log))
    times, probes, row["same"] = time_rounds(impls, probe, reference, options, size, log)
    summarize(row, times, probes, n)
    return row


def generate_targets(rows: list) -> list:
    """The decode targets over the TARGET_SIZES measured: speed-up over transformers, fraction of the limit."""
    measured = [r for r in rows if r["size"] in TARGET_SIZES]
    checks = []
    for name in ("eager", "compiled"):
        if not measured or not all(name in r["tps"] for r in measured):
            continue
        if all(name in r.get("vs_hf", {}) for r in measured):
            values = [r["vs_hf"][name] for r in measured]
            checks.append({"target": f"lunaris {name} >= {TARGET_SPEEDUP}x transformers generate", "kind": "speedup",
                           "values": values, "at_least": TARGET_SPEEDUP, "met": min(values) >= TARGET_SPEEDUP})
        values = [r["fraction"][name] for r in measured]
        checks.append({"target": f"lunaris {name} >= {TARGET_FRACTION:.0%} of the bandwidth limit", "kind": "fraction",
                       "values": values, "at_least": TARGET_FRACTION, "met": min(values) >= TARGET_FRACTION})
    return checks


def _quiet_transformers() -> Optional[str]:
    """transformers' version, its warnings and progress bars off; None without it."""
    if not has_transformers():
        return None
    import transformers
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    return transformers.__version__


def bench_generate(options: GenerateBenchOptions, log=None) -> dict:
    """Every size of `options`: {"options", "threads", "torch", "transformers", "sizes": [rows], "targets"}."""
    unknown = [s for s in options.sizes if s not in SIZES]
    if unknown or options.clock not in ("wall", "cpu"):
        raise LunarisError(f"generation benchmark: sizes must be among {', '.join(SIZES)} (got {options.sizes}) and "
                           f"clock wall or cpu (got {options.clock!r}).")
    log = log or (lambda message: None)
    version = _quiet_transformers()
    dynamo = torch._dynamo.config
    limit_name = "recompile_limit" if hasattr(dynamo, "recompile_limit") else "cache_size_limit"
    saved = getattr(dynamo, limit_name)
    setattr(dynamo, limit_name, 64)  # every size is a graph of its own, in both libraries
    try:
        log("generate: bandwidth probe ...")
        probe = BandwidthProbe(options.probe_mb, compiled=options.compile)
        with tempfile.TemporaryDirectory(prefix="lunaris-bench-generate-") as tmp:
            rows = [bench_size(size, options, Path(tmp), probe, log) for size in options.sizes]
    finally:
        setattr(dynamo, limit_name, saved)
    return {"options": asdict(options), "threads": torch.get_num_threads(), "torch": torch.__version__,
            "transformers": version, "implementations": list(IMPLEMENTATIONS), "sizes": rows,
            "targets": generate_targets(rows)}
