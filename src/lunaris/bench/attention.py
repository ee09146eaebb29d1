"""Document masking and sliding windows measured: the training step of a small model under plain causal attention
and under each backend that masks documents (dense SDPA mask, FlexAttention block mask, varlen), at several
sequence lengths.

Every row packs documents whose lengths are drawn from an exponential distribution (mean `doc_len`, seeded, each
ended by the separator), the same rows for every variant. Per sequence length the variants' steps (forward with
the loss, backward; or the forward alone with `inference`) run in turns, the order rotating every round; reported
are median wall and process CPU seconds and the median of the per-round ratios to causal. Peak memory: each
variant's step in a fresh process after a warm-up step, the peak resident memory (Linux VmHWM, reset before the
step) on CPU and `max_memory_allocated` on CUDA, with its growth during the step (`delta_mib`): activations,
gradients and any mask.
"""

import statistics
from dataclasses import asdict, dataclass, field
from typing import Optional

import torch

SEPARATOR = 0
CAUSAL = "causal"


@dataclass
class AttentionBenchOptions:
    """What `bench_attention` measures, with bench/bench_attention.py's defaults."""
    seq_lens: list = field(default_factory=lambda: [1024, 2048, 4096])
    batch: int = 1
    d_model: int = 256
    n_layers: int = 4
    n_heads: int = 4                  # head_dim 64
    vocab_size: int = 512
    doc_len: int = 512                # mean document length (exponential), tokens
    backends: list = field(default_factory=lambda: ["mask", "flex", "varlen"])
    window: Optional[int] = None      # also time causal attention under this sliding window, per backend
    inference: bool = False           # time the forward pass alone, without gradients
    rounds: int = 5
    warmup: int = 1
    threads: Optional[int] = None
    device: str = "cpu"
    memory: bool = True
    seed: int = 0


QUICK = dict(seq_lens=[256, 512], n_layers=2, d_model=128, n_heads=2, doc_len=128, rounds=2, memory=False)


def variants(options: AttentionBenchOptions) -> dict:
    """{name: model config overrides}: causal first (the baseline), then every backend for documents (and windows)."""
    found = {CAUSAL: {}}
    for backend in options.backends:
        found[f"document, {backend}"] = dict(attention_mask="document", attention_backend=backend)
    if options.window is not None:
        for backend in options.backends:
            found[f"window {options.window}, {backend}"] = dict(attention_window=options.window,
                                                                attention_backend=backend)
    return found


def packed_rows(options: AttentionBenchOptions, T: int) -> torch.Tensor:
    """(batch, T + 1) token ids: documents of exponential lengths (mean doc_len), each ended by SEPARATOR."""
    generator = torch.Generator().manual_seed(options.seed + T)
    rows = torch.randint(1, options.vocab_size, (options.batch, T + 1), generator=generator)
    for row in rows:
        position = 0
        while True:
            length = max(1, int(torch.empty(1).exponential_(1 / options.doc_len, generator=generator)))
            position += length
            if position > T:
                break
            row[position - 1] = SEPARATOR
    return rows


def make_step(options: AttentionBenchOptions, T: int, overrides: dict):
    """A closure running one step of this variant (model built with a fixed seed: every variant the same weights)."""
    from lunaris.config import LunarisCodexConfig
    from lunaris.model.model import LunarisCodex
    config = LunarisCodexConfig(vocab_size=options.vocab_size, d_model=options.d_model, n_layers=options.n_layers,
                                n_heads=options.n_heads, max_seq_len=T, document_separator_id=SEPARATOR,
                                **overrides)
    torch.manual_seed(options.seed)
    model = LunarisCodex(config).to(options.device).train(not options.inference)
    rows = packed_rows(options, T).to(options.device)
    x, y = rows[:, :-1], rows[:, 1:]

    def step():
        if options.inference:
            with torch.no_grad():
                model(x)
            return
        model.zero_grad(set_to_none=True)
        model(x, targets=y).loss.backward()
    return step


def unavailable(options: AttentionBenchOptions, overrides: dict) -> Optional[str]:
    """Why a variant cannot run here (FlexAttention: missing, or training on the CPU), or None."""
    from lunaris.model.masking import FLEX_ATTENTION
    if overrides.get("attention_backend") != "flex":
        return None
    if not FLEX_ATTENTION:
        return f"torch {torch.__version__} has no FlexAttention with sequence lengths"
    if options.device == "cpu" and not options.inference:
        return f"FlexAttention has no CPU backward pass in torch {torch.__version__} (try --inference)"
    return None


def time_length(options: AttentionBenchOptions, T: int, log) -> list:
    """One row per variant at sequence length T: step times in turns, ratios to causal per round."""
    from lunaris.bench.step import median_ratio, time_in_turns
    rows, steps = [], {}
    for name, overrides in variants(options).items():
        reason = unavailable(options, overrides)
        rows.append({"seq_len": T, "name": name, **({"error": reason} if reason else {})})
        if reason is None:
            log(f"T={T}: building {name} ...")
            steps[name] = make_step(options, T, overrides)
    log(f"T={T}: timing {len(steps)} variants in turns ({options.rounds} rounds) ...")
    wall, cpu = time_in_turns(steps, options.warmup, options.rounds, options.device)
    for row in rows:
        if "error" in row:
            continue
        name = row["name"]
        row.update(step_s=statistics.median(wall[name]), cpu_s=statistics.median(cpu[name]),
                   vs_causal=median_ratio(wall[name], wall[CAUSAL]), cpu_vs_causal=median_ratio(cpu[name], cpu[CAUSAL]))
    return rows


def measure_memory(options: AttentionBenchOptions, T: int, name: str) -> dict:
    """The peak memory of one step of variant `name` at length T, in a fresh Python process."""
    from lunaris.bench.memory import run_worker
    return run_worker("--attention-worker", {**asdict(options), "seq_len": T, "name": name})


def memory_worker(spec: dict) -> dict:
    """Runs in the fresh process: a warm-up step, then the peak of one more step."""
    from lunaris.bench.memory import step_peak
    from lunaris.runtime import set_threads
    T, name = spec.pop("seq_len"), spec.pop("name")
    options = AttentionBenchOptions(**spec)
    set_threads(options.threads)
    return step_peak(make_step(options, T, variants(options)[name]), options.device)


def bench_attention(options: AttentionBenchOptions, log=print) -> dict:
    """Every variant at every sequence length: {"options", "torch", "rows"} (one row per variant and length)."""
    from lunaris.runtime import set_threads
    set_threads(options.threads)
    rows = []
    for T in options.seq_lens:
        timed = time_length(options, T, log)
        if options.memory:
            for row in timed:
                if "error" not in row:
                    log(f"T={T}: peak memory of {row['name']} (fresh process) ...")
                    row["memory"] = measure_memory(options, T, row["name"])
            causal = next(row for row in timed if row["name"] == CAUSAL).get("memory", {})
            for row in timed:
                memory = row.get("memory", {})
                if "peak_mib" in memory and "peak_mib" in causal:
                    memory["vs_causal"] = memory["peak_mib"] / causal["peak_mib"]
        rows += timed
    return {"options": asdict(options), "torch": torch.__version__, "threads": torch.get_num_threads(),
            "auto_backend": auto_backend(options.device), "rows": rows}


def auto_backend(device: str) -> str:
    """The backend attention_backend: auto takes on this device (outside torch.compile, without dropout)."""
    from lunaris.model.masking import choose_backend
    return choose_backend("auto", torch.device(device), dropout=False)


def attention_markdown(result: dict) -> str:
    """The result as a markdown table (times, ratios to causal, peak memory)."""
    o = result["options"]
    what = "forward (no gradients)" if o["inference"] else "forward + backward"
    lines = [f"{what} of a {o['n_layers']}-layer d_model {o['d_model']} model ({o['n_heads']} heads), batch "
             f"{o['batch']}, documents of mean length {o['doc_len']}; torch {result['torch']}, {o['device']}, "
             f"{result['threads']} threads; attention_backend auto here: {result['auto_backend']}", "",
             "| T | variant | step s (wall) | x causal (wall) | step s (CPU) | x causal (CPU) | peak MiB "
             "| +MiB in step | peak x causal |",
             "|---:|---|---:|---:|---:|---:|---:|---:|---:|"]
    for row in result["rows"]:
        if "error" in row:
            lines.append(f"| {row['seq_len']} | {row['name']} | n/a: {row['error']} | | | | | | |")
            continue
        memory = row.get("memory", {})
        peak = f"{memory['peak_mib']:,.0f}" if "peak_mib" in memory else memory.get("error", "")
        delta = f"{memory['delta_mib']:,.0f}" if "delta_mib" in memory else ""
        ratio = f"{memory['vs_causal']:.3f}" if "vs_causal" in memory else ""
        lines.append(f"| {row['seq_len']} | {row['name']} | {row['step_s']:.3f} | {row['vs_causal']:.3f} | "
                     f"{row['cpu_s']:.3f} | {row['cpu_vs_causal']:.3f} | {peak} | {delta} | {ratio} |")
    return "\n".join(lines)
