"""The options of `lunaris bench`, every default written once: BenchSettings and the parser built from it.

A BenchSettings field left at None takes its value from DEVICE_DEFAULTS or QUICK_DEFAULTS. This module does not
import torch at import time, so building the `lunaris` parser stays fast.
"""

import argparse
import dataclasses
from dataclasses import dataclass
from typing import Optional

from lunaris.errors import LunarisError

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

# The measurements after the training steps (lunaris.bench.data, .generate, .moc): the CPU decides them.
SECTIONS = ("data", "generate", "moc_layer")


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
    data: bool = True        # lunaris.bench.data: prepare's overhead over the tokenizer, the loader's tokens/s
    generate: bool = True    # lunaris.bench.generate: decode tokens/s against the bandwidth limit and transformers
    moc_layer: bool = True   # lunaris.bench.moc: one MoC layer against a dense SwiGLU, the dispatch share

    def __post_init__(self):
        import torch

        from lunaris.runtime import resolve_device, resolve_dtype
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
    def dtype(self):
        """The training steps' torch dtype."""
        import torch

        from lunaris.runtime import resolve_dtype
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


class _NoSections(argparse.Action):
    """--no-scripts: the old name of --no-data --no-generate --no-moc-layer (those measurements were scripts)."""

    def __init__(self, option_strings, dest, **kwargs):
        super().__init__(option_strings, dest=argparse.SUPPRESS, nargs=0, **kwargs)

    def __call__(self, parser, namespace, values, option_string=None):
        for name in SECTIONS:
            setattr(namespace, name, False)


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The options of `lunaris bench`, one per BenchSettings field (plus --json), with its defaults."""
    s = BenchSettings  # the class attributes are the fields' defaults
    p.add_argument("--quick", action="store_true", default=s.quick,
                   help="a smoke test in seconds: the smallest models, few rounds, no compile")
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
                   help=f"also time torch.compile'd Lunaris, training and decoding ({_defaults_help('compile')})")
    p.add_argument("--no-memory", dest="memory", action="store_false", default=s.memory,
                   help="skip the peak-memory subprocesses")
    p.add_argument("--no-moc", dest="moc", action="store_false", default=s.moc, help="skip MoC top-2/8 vs dense")
    p.add_argument("--no-data", dest="data", action="store_false", default=s.data,
                   help="skip the data pipeline: `lunaris prepare` against the tokenizer alone, loader tokens/s")
    p.add_argument("--no-generate", dest="generate", action="store_false", default=s.generate,
                   help="skip decoding: tokens/s against the memory-bandwidth limit and transformers' generate")
    p.add_argument("--no-moc-layer", dest="moc_layer", action="store_false", default=s.moc_layer,
                   help="skip one MoC layer against a dense SwiGLU (forward + backward) and its dispatch share")
    p.add_argument("--no-scripts", action=_NoSections, help="the old name of --no-data --no-generate --no-moc-layer")
    p.add_argument("--repo", metavar="DIR",
                   help="ignored (kept so older command lines run): lunaris bench no longer needs a source checkout")


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
