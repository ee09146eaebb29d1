"""Running a sweep: every run in a fresh process (`python -m lunaris.sweep --worker ...`, under the launcher if one is
set), SIGINT/SIGTERM passed on so the run stops with a checkpoint, the state saved after every change; and the
worker, the child process's side."""

import argparse
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections import deque
from pathlib import Path
from typing import Optional

import yaml

from lunaris.errors import LunarisError, exit_status
from lunaris.sweep.plan import format_plan, plan_runs, schedule_variant
from lunaris.sweep.report import read_run_metrics, write_report
from lunaris.sweep.spec import read_sweep
from lunaris.sweep.state import check_state, fingerprint, load_state, record_calibration, save_state

WORKER = ["-m", "lunaris.sweep"]  # python WORKER --worker ...: lunaris/sweep/__main__.py


class _Interrupts:
    """SIGINT/SIGTERM while the sweep runs: no new run starts, and the training run stops after its current step.

    The child process shares the terminal's process group, so Ctrl-C reaches it directly (a second Ctrl-C aborts
    it, as for `lunaris train`); SIGTERM, which a scheduler may send to this process only, is passed on.
    """

    def __init__(self):
        self.requested = None
        self.child = None
        self._old = {}

    def _on_signal(self, signum, frame):
        self.requested = signal.Signals(signum).name
        child = self.child
        if signum == signal.SIGTERM and child is not None and child.poll() is None:
            child.send_signal(signal.SIGTERM)

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._old[sig] = signal.signal(sig, self._on_signal)
        return self

    def __exit__(self, *exc):
        for sig, handler in self._old.items():
            signal.signal(sig, handler)
        return False


def _child_env() -> dict:
    import lunaris
    env = dict(os.environ)
    package_root = str(Path(lunaris.__file__).resolve().parents[1])  # the children import this very lunaris
    env["PYTHONPATH"] = os.pathsep.join(p for p in (package_root, env.get("PYTHONPATH")) if p)
    env["PYTHONUNBUFFERED"] = "1"
    return env


def _run_child(command: list, log_path: Path, prefix: str, interrupts: _Interrupts, echo) -> tuple:
    """Run `command`, its output to `log_path` and echoed with `prefix`; returns (exit status, last lines)."""
    tail = deque(maxlen=25)
    with open(log_path, "a", encoding="utf-8") as log:
        log.write(f"$ {' '.join(command)}\n")
        log.flush()
        process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                   errors="replace", env=_child_env())
        interrupts.child = process
        try:
            for line in process.stdout:
                log.write(line)
                log.flush()
                tail.append(line.rstrip())
                echo(f"  [{prefix}] {line.rstrip()}")
            status = process.wait()
        finally:
            interrupts.child = None
            if process.poll() is None:  # an exception here (not a signal: those only set a flag)
                process.kill()
                process.wait()
    return status, list(tail)


def _failure(what: str, status: int, tail: list, log_path: Path) -> LunarisError:
    lines = "\n".join(f"    {line}" for line in tail[-15:])
    return LunarisError(f"{what} failed (exit status {status}); the sweep stops here (rerun it to retry; finished "
                        f"runs are kept). The end of {log_path}:\n{lines}")


def _write_config(path: Path, config) -> None:
    from lunaris.fileio import atomic_write_text
    atomic_write_text(path, yaml.safe_dump(config.to_dict(), sort_keys=False))


def _now() -> str:
    return time.strftime("%H:%M:%S")


def _calibrate(sweep, variant: str, runs: list, out: Path, state: dict, interrupts, echo) -> Optional[int]:
    """Time a few steps of the variant in a fresh process; the step count filling the budget, kept in the state and
    given to every run of the variant. None if a signal stopped it."""
    run_dir = next(r for r in runs if r.variant == variant).dir
    run_dir.mkdir(parents=True, exist_ok=True)
    config_path, result_path = run_dir / "sweep-calibration.yaml", run_dir / "sweep-calibration.json"
    _write_config(config_path, sweep.configs[variant])
    result_path.unlink(missing_ok=True)
    echo(f"[{_now()}] {variant}: timing a few steps for the {sweep.budget_text()} budget")
    command = [sys.executable, *WORKER, "--worker", "calibrate", str(config_path), "--result", str(result_path),
               "--seconds", repr(sweep.budget)]
    status, tail = _run_child(command, run_dir / "sweep.log", f"{variant} calibrate", interrupts, echo)
    if not result_path.is_file():
        if interrupts.requested:
            return None
        raise _failure(f"calibrating variant '{variant}'", status, tail, run_dir / "sweep.log")
    steps = int(json.loads(result_path.read_text())["steps"])
    record_calibration(sweep, variant, steps, state)
    save_state(out, state)
    schedule_variant(sweep, runs, variant, steps)
    for note in next(r for r in runs if r.variant == variant).notes:
        echo(f"note: {variant}: {note}")
    return steps


def _train(sweep, run, interrupts, echo) -> tuple:
    """Train and score one run in a fresh process; returns (worker result or None, exit status, last lines)."""
    run.dir.mkdir(parents=True, exist_ok=True)
    config_path, result_path = run.dir / "sweep-config.yaml", run.dir / "sweep-result.json"
    _write_config(config_path, run.config)
    result_path.unlink(missing_ok=True)
    command = [*(sweep.launcher or [sys.executable]), *WORKER, "--worker", "train", str(config_path),
               "--result", str(result_path), "--eval-batch-size", str(sweep.eval_batch_size)]
    if sweep.eval_batches:
        command += ["--eval-batches", str(sweep.eval_batches)]
    status, tail = _run_child(command, run.dir / "sweep.log", run.name, interrupts, echo)
    result = json.loads(result_path.read_text()) if status == 0 and result_path.is_file() else None
    return result, status, tail


def _train_and_record(sweep, run, out: Path, state: dict, interrupts, echo) -> bool:
    """Train and score one run, recording it in the state; False when a signal stopped it (with a checkpoint)."""
    record = state["runs"].get(run.name)
    state["runs"][run.name] = {"variant": run.variant, "seed": run.seed, "status": "started",
                               "config": fingerprint(sweep, run), "max_steps": run.steps,
                               "started": record.get("started") if record else time.strftime("%F %T")}
    save_state(out, state)
    cost = sweep.costs[run.variant]
    echo(f"[{_now()}] {run.name}: {run.steps} steps, {run.steps * cost.tokens_per_step:,} tokens, "
         f"{run.steps * cost.tokens_per_step * cost.flops_per_token:.3g} FLOPs -> {run.dir}")
    result, status, tail = _train(sweep, run, interrupts, echo)
    if result is None:
        if interrupts.requested or status == 0:  # stopped by a signal, with a checkpoint to resume from
            return False
        raise _failure(f"run {run.name}", status, tail, run.dir / "sweep.log")
    result.update(read_run_metrics(run.dir))
    state["runs"][run.name].update(status="finished", result=result, finished=time.strftime("%F %T"))
    save_state(out, state)
    bpb = result.get("val_bpb")
    echo(f"[{_now()}] {run.name}: val loss {result['val_loss']:.4f}"
         + (f", {bpb:.4f} bits/byte" if bpb is not None else ""))
    return True


def _run_all(sweep, runs: list, out: Path, state: dict, interrupts, echo):
    """Train every run that is not finished, in order; returns the run a signal stopped, or None."""
    for run in runs:
        record = state["runs"].get(run.name)
        if run.variant not in sweep.only or (record and record.get("status") == "finished"):
            continue
        if interrupts.requested:
            return None
        if run.steps is None and _calibrate(sweep, run.variant, runs, out, state, interrupts, echo) is None:
            return None  # a seconds budget: calibrated once per variant (every seed gets these steps)
        if not _train_and_record(sweep, run, out, state, interrupts, echo):
            return run
    return None


def check_data(sweep) -> None:
    """Before anything trains: every variant to train has its data (ids within its vocabulary) and a held-out split
    to be scored on."""
    from lunaris.config import raise_problems
    from lunaris.data import check_vocab, resolve_data_dirs
    problems, seen = [], set()
    for variant in sweep.only:
        config = sweep.configs[variant]
        dirs = (config.data_dir, config.val_data_dir)
        if (dirs, config.model.vocab_size) in seen:
            continue
        seen.add((dirs, config.model.vocab_size))
        try:
            train_dir, val_dir = resolve_data_dirs(*dirs)
            for directory in (train_dir, val_dir):
                if directory is not None:
                    check_vocab(directory, config.model.vocab_size)
        except LunarisError as exc:
            problems.append(f"variant '{variant}': {exc}")
            continue
        if val_dir is None:
            problems.append(f"variant '{variant}': data_dir {config.data_dir} has no val/ split and val_data_dir is "
                            f"not set, so there are no held-out batches to score the variants on; set "
                            f"val_data_dir (in overrides: --val_data_dir=DIR).")
    raise_problems(problems, "the sweep's data")


def _print(line: str) -> None:
    print(line, flush=True)


def run_sweep(path, out=None, seeds: int = None, only=None, dry_run: bool = False, overrides=(), echo=_print) -> int:
    """`lunaris sweep`: check, plan, train what is not done, report. Returns the exit status."""
    sweep = read_sweep(path, seeds, only, overrides)
    out = Path(out) if out is not None else Path("runs") / "sweeps" / Path(path).stem
    state = load_state(out)
    state["out"] = str(out)
    runs = plan_runs(sweep, out, state)
    check_state(sweep, runs, state, echo)
    echo(format_plan(sweep, runs, state, out))
    if dry_run:
        echo("dry run: nothing was trained.")
        return 0
    check_data(sweep)
    out.mkdir(parents=True, exist_ok=True)
    state["sweep"] = str(path)
    save_state(out, state)
    with _Interrupts() as interrupts:
        stopped = _run_all(sweep, runs, out, state, interrupts, echo)
        requested = interrupts.requested
    report = write_report(sweep, runs, state, out, echo)
    if report["variants"]:
        echo(report["table"])
    if stopped is not None or requested:
        where = f" ({stopped.name} stopped with a checkpoint)" if stopped is not None else ""
        echo(f"sweep interrupted{where}; run the same command again to continue.")
        return 143 if requested == "SIGTERM" else 130
    return 0


# ---- the worker (a fresh process per run) ----------------------------------------------------------------------

def worker_main(argv=None) -> int:
    """`python -m lunaris.sweep --worker train|calibrate CONFIG --result FILE ...` (started by run_sweep)."""
    p = argparse.ArgumentParser(prog="python -m lunaris.sweep", description="One run of `lunaris sweep`.")
    p.add_argument("--worker", choices=["train", "calibrate"], required=True)
    p.add_argument("config", help="the run's resolved config (YAML)")
    p.add_argument("--result", required=True, help="JSON file written when the job is complete")
    p.add_argument("--seconds", type=float, help="calibrate: the training-time budget")
    p.add_argument("--eval-batches", type=int, help="train: held-out batches to score (default: all)")
    p.add_argument("--eval-batch-size", type=int, help="train: sequences per held-out batch")
    args = p.parse_args(argv)
    return exit_status(lambda: _work(args))


def _work(args) -> int:
    """The worker's job (see worker_main)."""
    from lunaris.config import load_config
    from lunaris.fileio import atomic_write_json
    config = load_config(args.config)
    if args.worker == "calibrate":
        from lunaris.train.calibrate import calibrate_steps
        atomic_write_json(args.result, {"steps": calibrate_steps(config, args.seconds / 60, share=1.0)})
        return 0
    from lunaris.evaluate import run_eval
    from lunaris.train.trainer import train
    trained = train(config)
    if int(os.environ.get("RANK", "0")) != 0:
        return 0
    if trained.step < config.max_steps:  # stopped by SIGTERM/SIGINT: the checkpoint resumes it; no result
        return 0
    scores = run_eval(config.out_dir, max_batches=args.eval_batches, batch_size=args.eval_batch_size,
                      device=config.device, dtype=config.dtype)
    atomic_write_json(args.result, {"steps": trained.step, "val_loss": scores["loss"],
                                    "val_bpb": scores["bits_per_byte"], "eval_tokens": scores["tokens"],
                                    "eval_batches": scores["batches"]})
    return 0
