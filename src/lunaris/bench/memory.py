"""Peak memory of one training step of every configuration, each in a fresh subprocess after one warm-up step.

On CPU the peak resident memory (Linux VmHWM, reset before the step), on CUDA `max_memory_allocated`; `delta_mib`
is the growth during the step (activations and gradients) over the model, optimizer state and inputs held before
it. The subprocess is `python -m lunaris.bench --memory-worker SPEC` (lunaris/bench/__main__.py); `run_worker` and
`step_peak` are shared with the attention benchmark's memory column.
"""

import json
import os
import resource
import subprocess
import sys
from pathlib import Path

import torch

from lunaris.bench.settings import MOC_NAME, BenchSettings
from lunaris.bench.step import LLAMA_NAME, build_contender, synchronize
from lunaris.runtime import set_threads


def run_worker(flag: str, spec: dict) -> dict:
    """`python -m lunaris.bench FLAG SPEC` in a fresh Python process (this lunaris first on its path, so a source
    checkout measures its own code): the JSON dict it prints last, or {"error": ...} saying how it failed."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).resolve().parents[2]), env.get("PYTHONPATH", "")])
    proc = subprocess.run([sys.executable, "-m", "lunaris.bench", flag, json.dumps(spec)], capture_output=True,
                          text=True, timeout=1800, env=env)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        return {"error": f"memory worker failed (exit {proc.returncode}): {tail[:200]}"}
    return json.loads(lines[-1])


def step_peak(step, device: str) -> dict:
    """Peak memory of `step()` after one warm-up call (which compiles a compiled step and creates the optimizer
    state): {"peak_mib", "delta_mib" (growth during the step), "measure"}. Run it in a fresh process."""
    step()
    synchronize(device)
    if device == "cuda":
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        step()
        synchronize("cuda")
        peak, measure = torch.cuda.max_memory_allocated(), "cuda max_memory_allocated"
    elif reset_peak_rss():
        before = proc_status_bytes("VmRSS")
        step()
        peak, measure = proc_status_bytes("VmHWM"), "VmHWM"
    else:  # ru_maxrss: the whole process's peak, compilation included (bytes on macOS, KiB elsewhere)
        scale = 1 if sys.platform == "darwin" else 1024
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale
        step()
        peak, measure = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale, "ru_maxrss"
    return {"peak_mib": peak / 2**20, "delta_mib": max(0, peak - before) / 2**20, "measure": measure}


def measure_memory(kind: str, size: str, compiled: bool, settings: BenchSettings) -> dict:
    """Build the configuration in a fresh Python process and return its training-step peak memory (MiB)."""
    return run_worker("--memory-worker", dict(kind=kind, size=size, compiled=compiled, device=settings.device,
                                              seq_len=settings.seq_len, batch=settings.batch,
                                              threads=torch.get_num_threads()))


def memory_worker(spec: dict) -> dict:
    """Runs in the subprocess: the peak memory of one training step of one configuration, after a warm-up step."""
    settings = BenchSettings(device=spec["device"], seq_len=spec["seq_len"], batch=spec["batch"],
                             threads=spec["threads"])
    set_threads(settings.threads)
    contender = build_contender(spec["kind"], spec["size"], settings, compiled=spec["compiled"])
    return step_peak(contender.step, settings.device)


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
                LLAMA_NAME: ("llama", False),
                f"{MOC_NAME} eager": ("lunaris-moc", False), f"{MOC_NAME} compiled": ("lunaris-moc", True)}


def add_memory(rows: list, settings: BenchSettings, log) -> None:
    """Each timed row's "memory": its configuration's peak, measured once per configuration."""
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

