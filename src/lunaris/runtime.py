"""What every command shares about where it runs: device and precision, device names and peak FLOP/s, the
source commit, the end-of-text token, and file hashes.

One module so that training, generation, evaluation, the benchmark and the demo resolve `auto` the same way.
"""

import hashlib
import platform
import subprocess
from contextlib import nullcontext
from pathlib import Path
from typing import Optional

import torch

from lunaris.errors import ConfigError

END_OF_TEXT = "<|endoftext|>"  # the document separator `lunaris prepare` trains into every tokenizer

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
DTYPE_NAMES = {dtype: name for name, dtype in DTYPES.items()}


# ---- device and precision --------------------------------------------------------------------------

def mps_available() -> bool:
    backend = getattr(torch.backends, "mps", None)
    return bool(backend and backend.is_available())


def resolve_device(name: str = "auto", local_rank: int = 0) -> torch.device:
    """`auto` picks CUDA (this process's GPU), then Apple MPS, then CPU; an unavailable choice is an error.

    Accepts auto, cpu, cuda, cuda:N and mps; `cuda` means the GPU of `local_rank` (one per torchrun process).
    """
    cuda = torch.cuda.is_available()
    if name == "auto":
        name = "cuda" if cuda else "mps" if mps_available() else "cpu"
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError):
        raise ConfigError(f"device {name!r} is not a device; use auto, cpu, cuda, cuda:N or mps.") from None
    if device.type == "cuda":
        if not cuda:
            raise ConfigError(f"device {name!r} was requested but no CUDA GPU is visible to PyTorch "
                              f"(torch.cuda.is_available() is False; torch {torch.__version__}). Install a CUDA "
                              f"build of torch, check CUDA_VISIBLE_DEVICES, or use device cpu.")
        index = local_rank if device.index is None else device.index
        if index >= torch.cuda.device_count():
            raise ConfigError(f"GPU {index} was requested but only {torch.cuda.device_count()} are visible; launch "
                              f"at most that many processes per node (torchrun --nproc_per_node) or pick cuda:N.")
        return torch.device("cuda", index)
    if device.type == "mps" and not mps_available():
        raise ConfigError("device 'mps' was requested but Apple's Metal backend is not available; use cpu or auto.")
    if device.type not in ("cpu", "mps"):
        raise ConfigError(f"device {name!r} is not supported; use auto, cpu, cuda, cuda:N or mps.")
    return device


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """The compute precision for `name` (auto, fp32, bf16, fp16) on `device`.

    auto: bf16 on GPUs that support it, else fp16 there (training adds a GradScaler); fp32 on CPU and MPS,
    where bf16 matmuls are slow without AVX-512 BF16 and MPS autocast is young.
    """
    if name == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    if name not in DTYPES:
        raise ConfigError(f"dtype {name!r} is not a precision; use auto, fp32, bf16 or fp16.")
    if device.type == "cuda" and name == "bf16" and not torch.cuda.is_bf16_supported():
        raise ConfigError(f"dtype 'bf16' was requested but {torch.cuda.get_device_name(device)} does not support "
                          f"bfloat16; use fp16 (training adds loss scaling) or auto.")
    if device.type != "cuda" and name == "fp16":
        raise ConfigError(f"dtype 'fp16' needs a CUDA GPU (training runs it with a GradScaler); on {device.type} "
                          f"use bf16 or fp32.")
    if device.type == "mps" and name == "bf16":
        raise ConfigError("dtype 'bf16' is not supported on mps by Lunaris; use fp32 (or auto).")
    return DTYPES[name]


def autocast(device: torch.device, dtype: torch.dtype):
    """Mixed precision around a forward pass: fp32 weights, matmuls in `dtype`; nothing for fp32."""
    if dtype == torch.float32:
        return nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def enable_tf32(device: torch.device) -> None:
    """TF32 tensor cores for fp32 matmuls and convolutions on CUDA (weights stay fp32)."""
    if device.type == "cuda":
        torch.set_float32_matmul_precision("high")
        torch.backends.cudnn.allow_tf32 = True


# Below this many parameters, generation and evaluation on a CPU default to one thread: a decode step's matrix-vector
# products are too small for several threads to pay, and on a busy machine every op waits at the OpenMP barrier for
# the slowest core (measured in BENCHMARKS.md, "Threads for small models").
SMALL_MODEL_PARAMS = 50_000_000


def set_threads(threads: Optional[int]) -> None:
    """Intra-op CPU threads (--threads); None leaves PyTorch's choice."""
    if threads is None:
        return
    if not isinstance(threads, int) or threads < 1:
        raise ConfigError(f"--threads must be a positive integer, got {threads!r}.")
    torch.set_num_threads(threads)


def inference_threads(threads: Optional[int], num_params: int, device: torch.device) -> Optional[int]:
    """The thread count for generation and evaluation: `threads` if given, else 1 for a small model on a CPU,
    else None (PyTorch's choice)."""
    if threads is not None:
        return threads
    return 1 if device.type == "cpu" and num_params < SMALL_MODEL_PARAMS else None


# ---- what the machine is ---------------------------------------------------------------------------

def cpu_name() -> str:
    """The CPU model ("AMD EPYC 7B13"), not just its architecture."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "cpu"


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    if device.type == "mps":
        return f"Apple MPS ({cpu_name()})"
    return cpu_name()


# Dense bf16/fp16 tensor-core peak FLOP/s per device (no sparsity), checked in order: put the more
# specific names first. MFU on these GPUs is relative to this peak whatever the dtype (the usual
# convention, as in PaLM); set `peak_flops` in the config for anything else.
GPU_PEAK_FLOPS = (
    ("GB200", 2.5e15),
    ("B200", 2.25e15),
    ("H200", 989e12),
    ("GH200", 989e12),
    ("H100 PCIe", 756e12),
    ("H100 NVL", 835e12),
    ("H100", 989e12),       # SXM
    ("H800", 989e12),
    ("H20", 148e12),
    ("A100", 312e12),
    ("A800", 312e12),
    ("L40S", 362e12),
    ("L40", 181e12),
    ("L4", 121e12),
    ("A10G", 70e12),
    ("A10", 125e12),
    ("A6000", 155e12),
    ("RTX 6000 Ada", 364e12),
    ("4090", 165e12),
    ("3090", 71e12),
    ("V100", 125e12),
    ("T4", 65e12),
    ("MI300X", 1307e12),
    ("MI250X", 383e12),
)


def peak_flops_for_name(name: str) -> Optional[float]:
    for key, flops in GPU_PEAK_FLOPS:
        if key.lower() in name.lower():
            return flops
    return None


# Memory per GPU in GiB (the datasheet's GB; the driver shows a little less, which the CUDA context reserve of
# `lunaris plan` covers), for planning a run on GPUs this machine does not have (`lunaris plan --gpu NAME`); a GPU
# that is here reports its own. Matched like GPU_PEAK_FLOPS, more specific names first.
GPU_MEMORY_GIB = (
    ("GB200", 186),
    ("B200", 180),
    ("GH200", 96),
    ("H200", 141),
    ("H100 NVL", 94),
    ("H100", 80),
    ("H800", 80),
    ("H20", 96),
    ("A100 40GB", 40),
    ("A100", 80),
    ("A800", 80),
    ("L40S", 48),
    ("L40", 48),
    ("L4", 24),
    ("A10G", 24),
    ("A10", 24),
    ("A6000", 48),
    ("RTX 6000 Ada", 48),
    ("4090", 24),
    ("3090", 24),
    ("V100", 32),
    ("T4", 16),
    ("MI300X", 192),
    ("MI250X", 128),
)
GPUS_WITHOUT_BF16 = ("V100", "T4")  # dtype auto means fp16 there (with a GradScaler)


def _squeeze(name: str) -> str:
    return "".join(ch for ch in name.lower() if ch.isalnum())


def find_gpu(name: str) -> Optional[str]:
    """The GPU_MEMORY_GIB entry a user's or the driver's name means ("h100", "a100-40gb", "NVIDIA GeForce RTX 4090"
    -> "H100", "A100 40GB", "4090"); None if none. Case, spaces and dashes do not matter."""
    squeezed = _squeeze(name)
    return next((key for key, _ in GPU_MEMORY_GIB if _squeeze(key) in squeezed), None)


def peak_flops_per_device(device: torch.device, configured: Optional[float] = None) -> Optional[float]:
    """`configured` (the config's peak_flops), else the table entry for this GPU; None if unknown (e.g. CPU)."""
    if configured:
        return float(configured)
    if device.type != "cuda":
        return None
    return peak_flops_for_name(torch.cuda.get_device_name(device))


def device_memory(device: torch.device) -> Optional[tuple]:
    """(free, total) bytes of `device`: a GPU's free and total memory, or a CPU's available RAM and its total
    (Linux /proc/meminfo); None where unknown."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)
    if device.type != "cpu":
        return None
    try:
        fields = dict(line.split(":", 1) for line in Path("/proc/meminfo").read_text().splitlines() if ":" in line)
        return int(fields["MemAvailable"].split()[0]) * 1024, int(fields["MemTotal"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):
        return None


def git_commit() -> Optional[str]:
    """The commit of the Lunaris source tree ("+dirty" if tracked files changed), or None outside a checkout.

    The package's own files must be tracked: an installed copy inside some other repository (a virtualenv
    in a project directory) must not report that project's commit.
    """
    source = Path(__file__).resolve().parent

    def git(*args) -> subprocess.CompletedProcess:
        return subprocess.run(["git", "-C", str(source), *args], capture_output=True, text=True, check=False,
                              timeout=10)

    try:
        if git("ls-files", "--error-unmatch", "__init__.py").returncode != 0:
            return None
        commit = git("rev-parse", "HEAD").stdout.strip()
        dirty = git("status", "--porcelain", "--untracked-files=no").stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return (commit + ("+dirty" if dirty else "")) if commit else None


# ---- files -----------------------------------------------------------------------------------------

def file_sha256(path, chunk_bytes: int = 1 << 24) -> str:
    """Hex sha256 of a file, read in chunks (shards can be larger than memory)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(chunk_bytes):
            digest.update(chunk)
    return digest.hexdigest()
