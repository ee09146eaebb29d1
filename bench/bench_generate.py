"""Decode speed: `LunarisCodex.generate` against `transformers` generate on the same exported weights.

    python bench/bench_generate.py                          # four sizes, 128 new tokens, 3 rounds
    python bench/bench_generate.py --sizes demo 124m --threads 1 --clock cpu

For each model size: a random model is saved as a checkpoint, exported with `lunaris export` (Llama
format) and loaded with `transformers.LlamaForCausalLM`; both then continue the same prompt greedily
for exactly --new-tokens tokens (prefill included in the time, batch 1, fp32, CPU). Rounds alternate
the two implementations so that load from other processes hits both alike; the table shows the
median tokens/s and the median of the per-round speed ratios, and checks that both produced the
same tokens. Prints a markdown table.
"""

import argparse
import dataclasses
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from lunaris import LunarisCodex, LunarisCodexConfig, TrainConfig, load_config  # noqa: E402
from lunaris.export import export_checkpoint  # noqa: E402
from lunaris.runtime import END_OF_TEXT  # noqa: E402

SIZES = {  # name: model config (a shipped preset, or LunarisCodexConfig overrides)
    "micro": dict(d_model=128, n_layers=4, n_heads=4, n_kv_heads=2, vocab_size=4096, multiple_of=64),
    "demo": ROOT / "configs" / "demo-cpu.yaml",
    "small": dict(d_model=512, n_layers=8, n_heads=8, n_kv_heads=2, vocab_size=32768, multiple_of=64),
    "124m": ROOT / "configs" / "dense-124m.yaml",
}


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


def run_ours(model, prompt, n):
    return model.generate(prompt, n, temperature=0)


def run_transformers(hf_model, prompt, n):
    with torch.no_grad():
        return hf_model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=n,
                                 min_new_tokens=n, do_sample=False)


def timed(clock, fn, *args):
    start = clock()
    out = fn(*args)
    return clock() - start, out


def bench_size(size: str, args, workdir: Path) -> dict:
    model, hf_model = exported_pair(size, workdir, args.prompt_tokens + args.new_tokens)
    prompt = torch.randint(0, model.config.vocab_size, (1, args.prompt_tokens),
                           generator=torch.Generator().manual_seed(1))
    run_ours(model, prompt, 8)  # warm-up (allocator, kernels, lazy imports)
    run_transformers(hf_model, prompt, 8)
    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    ours, theirs, ratios, same = [], [], [], True
    for _ in range(args.rounds):
        t_ours, out_ours = timed(clock, run_ours, model, prompt, args.new_tokens)
        t_hf, out_hf = timed(clock, run_transformers, hf_model, prompt, args.new_tokens)
        ours.append(args.new_tokens / t_ours)
        theirs.append(args.new_tokens / t_hf)
        ratios.append(t_hf / t_ours)
        same = same and torch.equal(out_ours, out_hf)
    return {"size": size, "params": model.num_params(), "ours": statistics.median(ours),
            "transformers": statistics.median(theirs), "ratio": statistics.median(ratios), "same": same}


def main(argv=None):
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    import transformers
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for size in args.sizes:
            rows.append(bench_size(size, args, Path(tmp)))
    print(f"\nDecode, batch 1, greedy, fp32, prompt {args.prompt_tokens} + {args.new_tokens} new tokens, "
          f"{torch.get_num_threads()} thread(s), torch {torch.__version__}, transformers {transformers.__version__}, "
          f"{args.clock} clock, median of {args.rounds} rounds\n")
    print("| model | parameters | lunaris tokens/s | transformers tokens/s | speed-up | same tokens |")
    print("|---|---:|---:|---:|---:|---|")
    for r in rows:
        c = model_config(r["size"], 1)
        shape = f"{r['size']} (d{c.d_model} L{c.n_layers} H{c.n_heads}/{c.kv_heads}kv V{c.vocab_size})"
        print(f"| {shape} | {r['params'] / 1e6:.1f}M | {r['ours']:.1f} | {r['transformers']:.1f} | "
              f"{r['ratio']:.2f}x | {'yes' if r['same'] else 'NO'} |")


if __name__ == "__main__":
    main()
