"""`lunaris bench`: every measurement of BenchSettings, run in this process (peak memory in fresh subprocesses),
into one report dict; printed as markdown and, with --json, written whole."""

import datetime
import os
import sys
import time
from dataclasses import asdict
from pathlib import Path

import torch

from lunaris.bench.data import QUICK as DATA_QUICK
from lunaris.bench.data import DataBenchOptions, bench_data
from lunaris.bench.generate import QUICK as GENERATE_QUICK
from lunaris.bench.generate import GenerateBenchOptions, bench_generate
from lunaris.bench.memory import add_memory
from lunaris.bench.moc import QUICK as MOC_LAYER_QUICK
from lunaris.bench.moc import MocLayerBenchOptions, bench_moc_layer
from lunaris.bench.report import check_targets, git_state, machine_info, markdown_report
from lunaris.bench.settings import SECTIONS, BenchSettings
from lunaris.bench.step import dense_comparison, moc_comparison
from lunaris.errors import LunarisError
from lunaris.fileio import atomic_write_json
from lunaris.runtime import enable_tf32, peak_flops_per_device, set_threads

MEASURE = {  # section: (its options, their --quick values, the measurement)
    "data": (DataBenchOptions, DATA_QUICK, bench_data),
    "generate": (GenerateBenchOptions, GENERATE_QUICK, bench_generate),
    "moc_layer": (MocLayerBenchOptions, MOC_LAYER_QUICK, bench_moc_layer),
}


def check_json_path(path) -> None:
    path = Path(path)
    if path.is_dir():
        raise LunarisError(f"lunaris bench --json {path}: that is a directory; give a file name such as "
                           f"{path}/bench.json.")
    if not path.parent.is_dir() or not os.access(path.parent, os.W_OK):
        raise LunarisError(f"lunaris bench --json {path}: directory {path.parent} does not exist or is not writable; "
                           f"create it or choose another path.")


def run_section(name: str, settings: BenchSettings, log) -> dict:
    """One of SECTIONS at its full or --quick size; a failure is reported in the section, not raised."""
    options_class, quick, measure = MEASURE[name]
    options = options_class(**(quick if settings.quick else {}))
    if name == "generate":  # --compile / --no-compile decide compiled decoding too
        options.compile = options.hf_compile = settings.compile
    start = time.perf_counter()
    try:
        result = measure(options, log)
    except Exception as exc:  # one failed measurement (a missing compiler, a library's bug) must not lose the rest
        log(f"{name} failed: {type(exc).__name__}: {exc}")
        result = {"options": asdict(options), "error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:300]}"}
    return {**result, "seconds": round(time.perf_counter() - start, 1)}


def run_bench(settings: BenchSettings, command: str, log=None) -> dict:
    """Run every measurement of `settings`; returns the report: command, date, git, machine, settings, peak_flops,
    results (a row per training-step configuration), targets, and data / generate / moc_layer where switched on."""
    log = log or (lambda message: print(message, file=sys.stderr, flush=True))
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
    sections = {}
    for name in (name for name in SECTIONS if getattr(settings, name)):
        if settings.device != "cpu":
            sections[name] = {"skipped": "a CPU measurement; run lunaris bench --device cpu for it"}
        else:
            sections[name] = run_section(name, settings, log)
    return {"command": command, "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
            "git": git_state(), "machine": machine_info(settings),
            "settings": {**vars(settings), "dtype": settings.dtype_name},
            "peak_flops": peak, "results": rows,
            # the targets are about the real sizes; a --quick run's tiny model says nothing about them
            "targets": [] if settings.quick else check_targets(rows, settings), **sections}


def main_bench(settings: BenchSettings, json_path=None, command: str = "lunaris bench") -> dict:
    if json_path is not None:  # fail before minutes of measuring, not after
        check_json_path(json_path)
    report = run_bench(settings, command)
    print(markdown_report(report))
    if json_path is not None:
        atomic_write_json(json_path, report)
    return report
