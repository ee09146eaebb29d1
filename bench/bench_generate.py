"""Decode speed against the memory-bandwidth limit and against `transformers` generate on the same weights.

    python bench/bench_generate.py --threads 2                        # four sizes, 32 + 128 tokens, 3 rounds
    python bench/bench_generate.py --sizes small 124m --threads 2     # the sizes of the targets
    python bench/bench_generate.py --sizes micro --no-compile --no-hf-compile --rounds 1   # a quick look

For each model size a random model is saved as a checkpoint, exported with `lunaris export` (Llama format)
and loaded with `transformers.LlamaForCausalLM`. Each then continues the same prompt greedily for exactly
--new-tokens tokens (prefill included in the time, batch 1, fp32, CPU):

- lunaris eager (`model.generate(..., compile=False)`, the reference) and lunaris compiled (`compile=True`:
  the static-shape decode step through inductor);
- transformers `generate` (eager, its dynamic cache) and, where it works, transformers with its static
  cache and `torch.compile` (`cache_implementation="static"` and a CompileConfig that compiles on CPU).

The limit: a batch-1 decode step reads every weight once, so tokens/s cannot exceed (bytes read per second)
/ (bytes of weights). The bytes per second are measured in the same run by a matrix-vector probe (--probe-mb
of fp32 matrices, more than the CPU's caches hold): F.linear, which calls the BLAS, and the compiled
multiply-and-sum that lunaris's compiled step uses; the limit takes the faster of the two. A plain read
(`torch.sum` over the same bytes) is printed for reference.

Every round runs the probe and every implementation once, alternating, so load from other processes hits them
alike; tables show medians over rounds (of tokens/s, of per-round ratios). Compilation happens before the
rounds and is reported on its own, with the number of new tokens after which it has paid for itself.
Prints markdown tables.
"""

import argparse
import dataclasses
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from lunaris import LunarisCodex, LunarisCodexConfig, TrainConfig, load_config  # noqa: E402
from lunaris.export import export_checkpoint  # noqa: E402
from lunaris.model import attention  # noqa: E402
from lunaris.model.attention import decode_linear  # noqa: E402
from lunaris.runtime import END_OF_TEXT  # noqa: E402

SIZES = {  # name: model config (a shipped preset, or LunarisCodexConfig overrides)
    "micro": dict(d_model=128, n_layers=4, n_heads=4, n_kv_heads=2, vocab_size=4096, multiple_of=64),
    "demo": ROOT / "configs" / "demo-cpu.yaml",
    "small": dict(d_model=512, n_layers=8, n_heads=8, n_kv_heads=2, vocab_size=32768, multiple_of=64),
    "124m": ROOT / "configs" / "dense-124m.yaml",
}
TARGET_SPEEDUP, TARGET_FRACTION, TARGET_SIZES = 1.5, 0.60, ("small", "124m")


def model_config(size: str, max_seq_len: int) -> LunarisCodexConfig:
    spec = SIZES[size]
    config = load_config(spec).model if isinstance(spec, Path) else LunarisCodexConfig(**spec)
    return dataclasses.replace(config, max_seq_len=max_seq_len)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", nargs="+", default=list(SIZES), choices=list(SIZES))
    p.add_argument("--prompt-tokens", type=int, default=32)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    p.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                   help="wall-clock time, or this process's CPU time (steadier on a shared machine; "
                        "use with --threads 1)")
    p.add_argument("--probe-mb", type=int, default=256, help="MB of fp32 matrices the bandwidth probe reads")
    p.add_argument("--no-compile", action="store_true", help="skip lunaris compiled (and the compiled probe)")
    p.add_argument("--no-hf-compile", action="store_true", help="skip transformers with static cache + compile")
    p.add_argument("--no-blas-variant", action="store_true",
                   help="skip lunaris compiled with BLAS matrix-vector products (F.linear) instead of the streaming "
                        "multiply-and-sum, the comparison behind decode_linear's choice")
    return p.parse_args(argv)


def make_tokenizer(path: Path) -> None:
    """A small byte-level BPE tokenizer (the export needs one; its ids fit every size above)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=[END_OF_TEXT], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(["the quick brown fox jumps over the lazy dog"] * 10, trainer)
    tokenizer.save(str(path))


def exported_pair(size: str, workdir: Path, max_seq_len: int):
    """(our model, transformers' LlamaForCausalLM) holding the same weights, both in eval mode."""
    from transformers import LlamaForCausalLM
    config = model_config(size, max_seq_len)
    torch.manual_seed(0)
    model = LunarisCodex(config).eval()
    run = workdir / f"run-{size}"
    run.mkdir()
    torch.save({"model": model.state_dict(), "config": dataclasses.asdict(TrainConfig(model=config)), "step": 0},
               run / "latest_checkpoint.pt")
    make_tokenizer(run / "tokenizer.json")
    export_checkpoint(run, workdir / f"hf-{size}")
    hf_model = LlamaForCausalLM.from_pretrained(workdir / f"hf-{size}", dtype=torch.float32).eval()
    return model, hf_model


def weight_bytes(model: LunarisCodex) -> int:
    """Bytes a decode step must read: every parameter once (a tied LM head counts once), except that an untied
    embedding table is read one row at a time."""
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    if not model.config.tie_embeddings:
        table = model.wte.weight
        total -= (table.shape[0] - 1) * table.shape[1] * table.element_size()
    return total


# ---- the bandwidth probe -------------------------------------------------------------------------------

class BandwidthProbe:
    """Bytes per second of matrix-vector products over more memory than the caches hold."""

    def __init__(self, megabytes: int, compiled: bool):
        width = 1024
        rows = 4096
        count = max(1, megabytes * 2**20 // (rows * width * 4))
        gen = torch.Generator().manual_seed(0)
        self.weights = [torch.randn(rows, width, generator=gen) for _ in range(count)]
        self.x = torch.randn(1, width, generator=gen)
        self.flat = torch.randn(count * rows * width, generator=gen)
        self.bytes = count * rows * width * 4
        self.compiled = None
        self.compile_s = 0.0
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
    from lunaris.model import generation as model_module
    recorded, real = [], model_module.sample_next_token

    def spy(logits, *args, **kwargs):
        recorded.append(logits.clone())
        return real(logits, *args, **kwargs)

    model_module.sample_next_token = spy
    try:
        fn()
    finally:
        model_module.sample_next_token = real
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


def bench_size(size: str, args, workdir: Path, probe: BandwidthProbe, log) -> dict:
    n = args.new_tokens
    model, hf_model = exported_pair(size, workdir, args.prompt_tokens + n)
    prompt = torch.randint(0, model.config.vocab_size, (1, args.prompt_tokens),
                           generator=torch.Generator().manual_seed(1))
    reference = run_ours(model, prompt, n)
    run_transformers(hf_model, prompt, 8)  # warm-up (allocator, kernels, lazy imports)
    impls = {"eager": lambda: run_ours(model, prompt, n), "transformers": lambda: run_transformers(hf_model, prompt, n)}
    row = {"size": size, "params": model.num_params(), "bytes": weight_bytes(model), "errors": {}, "compile_s": {}}
    if not args.no_compile:
        log(f"{size}: compiling the lunaris decode step ...")
        stats = {}
        model.generate(prompt, n, temperature=0, compile=True, stats=stats)  # same cache length as the rounds
        row["compile_s"]["compiled"] = stats["compile_s"]
        impls["compiled"] = lambda: run_ours(model, prompt, n, compile=True)
        eager_logits = step_logits(impls["eager"])
        row["logits_diff"] = (step_logits(impls["compiled"]) - eager_logits).abs().max().item()
        if not args.no_blas_variant:
            log(f"{size}: compiling the lunaris decode step with BLAS products ...")
            run_ours_blas(model, prompt, n, stats)
            row["compile_s"]["compiled BLAS"] = stats["compile_s"]
            impls["compiled BLAS"] = lambda: run_ours_blas(model, prompt, n)
    if not args.no_hf_compile:
        log(f"{size}: compiling transformers with its static cache ...")
        try:
            hf_kwargs = hf_static_compile_kwargs()
            seconds, _ = timed(time.perf_counter, run_transformers, hf_model, prompt, n, **hf_kwargs)
            row["compile_s"]["transformers static"] = seconds
            impls["transformers static"] = lambda: run_transformers(hf_model, prompt, n, **hf_kwargs)
        except Exception as exc:  # report, do not stop the benchmark
            row["errors"]["transformers static"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    times = {name: [] for name in impls}
    probes, same = [], {name: True for name in impls}
    for r in range(args.rounds):
        log(f"{size}: round {r + 1}/{args.rounds}")
        probes.append(probe.measure())
        for name, fn in impls.items():
            seconds, out = timed(clock, fn)
            times[name].append(seconds)
            same[name] = same[name] and torch.equal(out, reference)
    limit = [p["best_matvec"] * 1e9 / row["bytes"] for p in probes]                  # tokens/s, per round
    row["probe"] = {key: statistics.median(p[key] for p in probes) for key in probes[0]}
    row["limit"] = statistics.median(limit)
    row["tps"] = {name: statistics.median(n / t for t in ts) for name, ts in times.items()}
    row["fraction"] = {name: statistics.median(n / t / lim for t, lim in zip(ts, limit)) for name, ts in times.items()}
    row["vs_hf"] = {name: statistics.median(hf / t for hf, t in zip(times["transformers"], ts))
                    for name, ts in times.items()}
    if "transformers static" in times:
        row["vs_static"] = {name: statistics.median(hf / t for hf, t in zip(times["transformers static"], ts))
                            for name, ts in times.items()}
    row["same"] = same
    if "compiled" in times:  # tokens after which compiling has paid for itself
        saved = statistics.median(times["eager"]) / n - statistics.median(times["compiled"]) / n
        row["break_even"] = row["compile_s"]["compiled"] / saved if saved > 0 else float("inf")
    return row


def shape(size: str) -> str:
    c = model_config(size, 1)
    return f"{size} (d{c.d_model} L{c.n_layers} H{c.n_heads}/{c.kv_heads}kv V{c.vocab_size})"


def cell(row, name, fmt="{:.1f}"):
    return fmt.format(row["tps"][name]) if name in row["tps"] else row["errors"].get(name, "not run")


def print_report(rows, args):
    import transformers
    print(f"\nDecode, batch 1, greedy, fp32, prompt {args.prompt_tokens} + {args.new_tokens} new tokens, "
          f"{torch.get_num_threads()} thread(s), torch {torch.__version__}, transformers {transformers.__version__}, "
          f"{args.clock} clock, median of {args.rounds} rounds\n")
    print("| model | parameters | weights MB | limit tokens/s | lunaris eager | lunaris compiled | "
          "lunaris compiled, BLAS products | transformers | transformers static+compile | same tokens |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---|")
    for r in rows:
        frac = {name: f" ({r['fraction'][name]:.0%})" for name in r["fraction"]}
        same = "yes" if all(r["same"].values()) else "NO: " + ", ".join(k for k, v in r["same"].items() if not v)
        print(f"| {shape(r['size'])} | {r['params'] / 1e6:.1f}M | {r['bytes'] / 1e6:.0f} | {r['limit']:.1f} | "
              + " | ".join(cell(r, name) + frac.get(name, "")
                           for name in ("eager", "compiled", "compiled BLAS", "transformers", "transformers static"))
              + f" | {same} |")
    print("\ntokens/s (fraction of the limit). Limit = best matrix-vector GB/s of the round / weight bytes. "
          "Largest difference between compiled and eager logits over all steps: "
          + ", ".join(f"{r['size']} {r['logits_diff']:.1e}" for r in rows if "logits_diff" in r) + ".\n")
    print("| model | probe F.linear GB/s | probe compiled GB/s | plain read GB/s | eager vs transformers | "
          "compiled vs transformers | compiled vs transformers static | lunaris compile s | break-even tokens | "
          "transformers static first call s |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        p, v, c, vs = r["probe"], r["vs_hf"], r["compile_s"], r.get("vs_static", {})
        cells = [r["size"], f"{p['linear']:.1f}", f"{p['compiled']:.1f}" if "compiled" in p else "-",
                 f"{p['read']:.1f}", f"{v['eager']:.2f}x", f"{v['compiled']:.2f}x" if "compiled" in v else "-",
                 f"{vs['compiled']:.2f}x" if "compiled" in vs else "-",
                 f"{c['compiled']:.1f}" if "compiled" in c else "-",
                 f"{r['break_even']:.0f}" if "break_even" in r else "-",
                 f"{c['transformers static']:.1f}" if "transformers static" in c else "-"]
        print("| " + " | ".join(cells) + " |")
    print("\nlunaris compile s: the first compiled step, compilation included; break-even tokens: new tokens after "
          "which that has paid for itself against eager decoding; transformers static first call: a whole first "
          "generate, compilation included.")
    targets = [r for r in rows if r["size"] in TARGET_SIZES]
    if targets:
        print(f"\n| target (sizes {', '.join(TARGET_SIZES)}) | measured | met |")
        print("|---|---|---|")
        for name in ("eager", "compiled"):
            if all(name in r["tps"] for r in targets):
                speed = ", ".join(f"{r['vs_hf'][name]:.2f}x" for r in targets)
                frac = ", ".join(f"{r['fraction'][name]:.0%}" for r in targets)
                print(f"| lunaris {name} >= {TARGET_SPEEDUP}x transformers generate | {speed} | "
                      f"{'yes' if all(r['vs_hf'][name] >= TARGET_SPEEDUP for r in targets) else 'no'} |")
                print(f"| lunaris {name} >= {TARGET_FRACTION:.0%} of the bandwidth limit | {frac} | "
                      f"{'yes' if all(r['fraction'][name] >= TARGET_FRACTION for r in targets) else 'no'} |")


def main(argv=None):
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)  # before any compilation: inductor sizes its loops for it
    limit_name = "recompile_limit" if hasattr(torch._dynamo.config, "recompile_limit") else "cache_size_limit"
    setattr(torch._dynamo.config, limit_name, 64)  # every size is a graph of its own, in both libraries
    import transformers
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()

    def log(message):
        print(message, file=sys.stderr, flush=True)

    log("bandwidth probe ...")
    probe = BandwidthProbe(args.probe_mb, compiled=not args.no_compile)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for size in args.sizes:
            rows.append(bench_size(size, args, Path(tmp), probe, log))
    print_report(rows, args)


if __name__ == "__main__":
    main()
