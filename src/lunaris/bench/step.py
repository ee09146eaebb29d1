"""The training step, side by side: our dense model (eager and `torch.compile`d) against `transformers`'
LlamaForCausalLM with identical shapes, and MoC top-2 of 8 against the dense model of equal active parameters.

- Identical shapes: vocabulary, width, depth, heads, GQA, tied embeddings, sequence length, batch, dtype. Our
  block norms are built with `norm_bias: false` so the parameter counts are exactly equal (Llama's RMSNorm has
  no bias). Both sides use the same AdamW (fused where our `configure_optimizers` fuses it, as the Hugging Face
  Trainer's default `adamw_torch_fused` does). Without transformers installed, the Llama side is left out.
- The sides run in turns, one step each per round, in an order that rotates from round to round, so load from
  other processes hits all of them alike; ratios are the median of the per-round ratios.
- MFU: model FLOPs/s (`flops_per_token` x tokens/s) over the dense matmul rate measured in the same rounds (a
  square matmul in the training dtype), and on a GPU also over the datasheet peak.
- MoC: `collab_mode: none`, S = 1, experts half as wide as the dense FFN (dense hidden = top_k x expert hidden).
"""

import statistics
import time
from dataclasses import dataclass
from typing import Callable, Optional

import torch

from lunaris.bench.settings import MOC_EXPERTS, MOC_NAME, MOC_TOP_K, SIZES, BenchSettings
from lunaris.runtime import autocast

LLAMA_NAME = "transformers LlamaForCausalLM"


def has_transformers() -> bool:
    """Whether `transformers` imports (an optional dependency: pip install 'lunaris[hf]')."""
    try:
        import transformers  # noqa: F401
    except ImportError:
        return False
    return True


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
        name = LLAMA_NAME
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
    contenders = [build_contender("lunaris", size, settings)]
    if has_transformers():
        contenders.append(build_contender("llama", size, settings))
    else:
        log("transformers is not installed: no Llama baseline (pip install 'lunaris[hf]' for it)")
    if settings.compile:
        log(f"dense {size}: compiling lunaris (first call) ...")
        contenders.append(try_compile(build_contender("lunaris", size, settings, compiled=True), settings))
    log(f"dense {size}: timing {settings.repeats} rounds ...")
    rows = compare(f"dense {size}", contenders, {"lunaris eager": LLAMA_NAME, "lunaris compiled": LLAMA_NAME},
                   settings, peak_flops)
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

