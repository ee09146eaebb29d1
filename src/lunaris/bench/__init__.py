"""`lunaris bench`: this machine measured by Lunaris itself, no source checkout needed.

What is measured, each figure after warm-up, repeated, median reported (every ratio side by side in one run):

- step.py      the training step (forward, backward, AdamW step) of our dense model, eager and `torch.compile`d,
               against transformers' LlamaForCausalLM with identical shapes (when transformers is installed);
               MFU against the matmul rate measured in the same rounds (and a GPU's datasheet peak); MoC top-2
               of 8 against the dense model of equal active parameters. The sides run in turns, in an order that
               rotates every round; ratios are the median of the per-round ratios.
- memory.py    peak memory of one training step of every configuration, each in a fresh subprocess (VmHWM on
               CPU, max_memory_allocated on CUDA).
- data.py      `lunaris prepare` against the tokenizer library alone, and the loader's tokens/s.
- generate.py  decode tokens/s against the memory-bandwidth limit and transformers' generate on the same weights.
- moc.py       one MoC layer against a dense SwiGLU with the same active weights, and its dispatch share.
- muon.py      Muon's optimizer step on one process against its FSDP and DDP splits over several (gloo on CPU).
- report.py    the machine, the targets, markdown tables from the measurements' dicts; run.py runs them all.

Every measurement returns a dict; the bench/ scripts of a source checkout are command lines over the same
functions. Every option's default is written once, in settings.BenchSettings; the `lunaris bench` parser
(add_arguments) takes them from there. Importing this package does not import torch: the other modules load on
first use of their names.
"""

import importlib

from lunaris.bench.settings import (
    DEVICE_DEFAULTS,
    MOC_EXPERTS,
    MOC_NAME,
    MOC_TOP_K,
    PRECISION,
    QUICK_DEFAULTS,
    SECTIONS,
    SIZES,
    BenchSettings,
    add_arguments,
    command_line,
)

_LAZY = {  # public name: the module of this package that defines it (imported when the name is first used)
    **dict.fromkeys(("LLAMA_NAME", "Contender", "build_contender", "compare", "dense_comparison", "has_transformers",
                     "llama_config", "lunaris_config", "lunaris_fuses_adamw", "make_step", "matmul_probe",
                     "median_ratio", "moc_comparison", "synchronize", "time_in_turns", "try_compile"), "step"),
    **dict.fromkeys(("MEMORY_KINDS", "add_memory", "measure_memory", "memory_worker", "proc_status_bytes",
                     "reset_peak_rss"), "memory"),
    **dict.fromkeys(("DataBenchOptions", "bench_data"), "data"),
    **dict.fromkeys(("GenerateBenchOptions", "bench_generate"), "generate"),
    **dict.fromkeys(("MocLayerBenchOptions", "bench_moc_layer"), "moc"),
    **dict.fromkeys(("MuonBenchOptions", "bench_muon", "muon_markdown"), "muon"),
    **dict.fromkeys(("TARGETS", "check_targets", "git_state", "machine_info", "markdown_report", "versus"), "report"),
    **dict.fromkeys(("check_json_path", "main_bench", "run_bench", "run_section"), "run"),
}

__all__ = ["DEVICE_DEFAULTS", "MOC_EXPERTS", "MOC_NAME", "MOC_TOP_K", "PRECISION", "QUICK_DEFAULTS", "SECTIONS",
           "SIZES", "BenchSettings", "add_arguments", "command_line", *_LAZY]


def __getattr__(name):
    if name in _LAZY:
        return getattr(importlib.import_module(f"lunaris.bench.{_LAZY[name]}"), name)
    raise AttributeError(f"module 'lunaris.bench' has no attribute {name!r}")
