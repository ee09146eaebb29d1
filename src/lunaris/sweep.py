"""`lunaris sweep SWEEP.yaml`: train variants of one config at an equal budget, score them on the same held-out
batches, and report.

A sweep file (YAML)::

    base: ../configs/small.yaml     # a config file, relative to this file (or `config:` with the config inline)
    overrides: ["--data_dir=runs/demo/data"]   # applied to every variant (optional)
    budget:
      flops: 2.0e13                 # exactly one of: flops (training FLOPs per run), tokens, seconds (training time)
    seeds: 2                        # runs per variant, --seed=0..N-1 (optional, default 1)
    eval_batches: 20                # held-out batches every run is scored on, the same ones (optional, default all)
    eval_interval: 50               # held-out evaluations during training (optional, default about 8 per run)
    launcher: ["torchrun", "--standalone", "--nproc_per_node=2"]   # prefix of the training command (optional)
    world_size: 2                   # processes per run, where the launcher's --nproc_per_node is not a number
    variants:                       # name: its overrides
      dense: []
      moc-simple: ["--model.n_experts=4", "--model.collab_mode=simple"]

Each run (variant x seed) is the base config + `overrides` + the variant's overrides, with `seed`, `out_dir`
(OUT/<variant>-seed<k>) and the schedule set by the sweep: `max_steps` from the budget (tokens per step =
batch_size x max_seq_len x gradient_accumulation_steps x world size; a FLOPs budget divides by
`LunarisCodex.flops_per_token`, which counts the active MoC experts and IRL steps; a seconds budget times a few real
steps once per variant, and the sweep state keeps the step count), `eval_interval` for about 8 held-out
evaluations (the curves), `save_interval` no longer than that, and `warmup_steps` shortened to max_steps/20 only if
it is not shorter than the run. Paths inside configs are relative to the working directory, as for `lunaris train`.

Runs train one after another, each in a fresh process (`python -m lunaris.sweep --worker ...`, under the launcher
if one is set), which also scores the finished model on the first `eval_batches` batches of the held-out split, in
order, with the base config's batch_size: every variant sees the same tokens (`lunaris eval`'s `run_eval`).
OUT/sweep_state.json records each run's resolved config and result: a rerun skips finished runs, resumes an
interrupted one from its checkpoint, and refuses to mix in results of a config the sweep file no longer describes.
Ctrl-C or SIGTERM stops the training run after its current step with a checkpoint, and the sweep exits with status
130 (143 for SIGTERM); rerun to continue. A run that fails stops the sweep, quoting the end of OUT/<run>/sweep.log.
The report: OUT/results.md, OUT/results.json and OUT/sweep.png (held-out loss against training FLOPs and seconds).
"""

import argparse
import copy
import functools
import hashlib
import json
import math
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import defaultdict, deque
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import yaml

from lunaris.errors import ConfigError, LunarisError, exit_status

SWEEP_KEYS = ("base", "config", "overrides", "budget", "seeds", "eval_batches", "eval_interval", "launcher",
              "world_size", "variants")
BUDGET_KINDS = ("flops", "tokens", "seconds")
SET_BY_SWEEP = {"max_steps": "the budget", "seed": "seeds", "out_dir": "--out"}
EVALUATIONS = 8            # held-out evaluations per run during training, for the curves
STATE_FILE = "sweep_state.json"
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+=-]*$")
# keys that change what is logged or where, not what is trained: a finished run stays valid when they change
NOT_COMPARED = {"out_dir", "log_interval", "eval_interval", "eval_batches", "eval_tasks", "save_interval",
                "save_latest_always", "keep_last", "wandb_project", "wandb_run_name", "wandb_entity", "tensorboard",
                "num_workers", "pin_memory", "persistent_workers", "prefetch_factor"}
SCHEDULE = {"max_steps", "warmup_steps"}  # unknown before a seconds budget is calibrated
MOC_LAYER_METRIC = re.compile(r"^experts/(drop_rate|router_entropy|max_load_ratio)_layer\d+$")


# ---- the sweep file --------------------------------------------------------------------------------------------

@dataclass
class Cost:
    """What one optimizer step of a variant costs (from the model built on the meta device)."""
    params: int
    active_params: int          # parameters a token uses: the total less the experts it is not routed to
    flops_per_token: float      # training FLOPs per token (LunarisCodex.flops_per_token)
    tokens_per_step: int


@dataclass
class Sweep:
    path: Path
    base: Optional[Path]                 # the base config file, or None for an inline `config:`
    inline: Optional[dict]
    overrides: list
    budget_kind: str
    budget: float
    seeds: int
    eval_batches: Optional[int]          # None: the whole held-out split
    eval_interval: Optional[int]
    launcher: list
    world_size: int
    variants: dict                       # name -> its overrides, in file order
    only: list                           # the variants to train (all by default)
    configs: dict = field(default_factory=dict)   # name -> TrainConfig (before seed, out_dir and schedule)
    costs: dict = field(default_factory=dict)     # name -> Cost
    eval_batch_size: int = 8

    def budget_text(self) -> str:
        return {"flops": f"{self.budget:.3g} training FLOPs", "tokens": f"{self.budget:,.0f} tokens",
                "seconds": f"{self.budget:g} s of training"}[self.budget_kind]


def _suggest(word, candidates) -> str:
    from lunaris.config import _suggest as suggest
    return suggest(word, candidates)


def _number(value):
    """A YAML number, or a string like '2e13' (YAML 1.1 reads an exponent without a dot as text)."""
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return value
    if isinstance(value, str):
        try:
            return float(value.strip().replace("_", ""))
        except ValueError:
            return None
    return None


def _int(data: dict, key: str, problems: list, minimum: int):
    value = data.get(key)
    if value is None:
        return None
    number = _number(value)
    if number is None or not float(number).is_integer() or number < minimum:
        kind = "a positive integer" if minimum > 0 else "an integer >= 0"
        problems.append(f"{key} must be {kind}, got {value!r}.")
        return None
    return int(number)


def _string_list(value, what: str, problems: list) -> list:
    if value is None:
        return []
    if isinstance(value, str):
        value = value.split()
    if not isinstance(value, list) or not all(isinstance(v, (str, int, float)) for v in value):
        problems.append(f"{what} must be a list of --key=value strings, got {value!r}.")
        return []
    return [str(v) for v in value]


def _launcher_world_size(launcher: list):
    """Processes a torchrun-style launcher starts (--nproc_per_node x --nnodes), or None if not an integer."""
    values = {"nproc": "1", "nnodes": "1"}
    for i, arg in enumerate(launcher):
        for name, flags in (("nproc", ("--nproc_per_node", "--nproc-per-node")), ("nnodes", ("--nnodes",))):
            for flag in flags:
                if arg == flag and i + 1 < len(launcher):
                    values[name] = launcher[i + 1]
                elif arg.startswith(flag + "="):
                    values[name] = arg.split("=", 1)[1]
    try:
        return int(values["nproc"]) * int(values["nnodes"])
    except ValueError:
        return None


def _problem_lines(exc: ConfigError) -> list:
    """The individual problems of a ConfigError."""
    return exc.problems


def _override_keys(overrides: list) -> dict:
    """{flat key: the override text} of a list of --key=value words (malformed ones are load_config's to report)."""
    from lunaris.config import parse_overrides
    try:
        nested = parse_overrides(overrides)
    except ConfigError:
        return {}
    keys = {}
    for key, value in nested.items():
        if isinstance(value, dict):
            keys.update({f"{key}.{k}": v for k, v in value.items()})
        else:
            keys[key] = value
    return keys


@contextmanager
def _base_file(sweep: Sweep):
    """A path load_config can read: the base file, or the inline config written to a temporary file."""
    if sweep.base is not None:
        yield sweep.base
        return
    with tempfile.TemporaryDirectory(prefix="lunaris-sweep-") as tmp:
        path = Path(tmp) / "config.yaml"
        path.write_text(yaml.safe_dump(sweep.inline, sort_keys=False), encoding="utf-8")
        yield path


def read_sweep(path, seeds: int = None, only=None, extra_overrides=()) -> Sweep:
    """Read and check a sweep file; every problem (the file's and every variant's config) in one ConfigError."""
    from lunaris.config import read_yaml
    path = Path(path)
    data = read_yaml(path, "sweep file", "with base, budget and variants; bench/sweeps/ of a source checkout has "
                                         "examples")
    if not isinstance(data, dict):
        raise ConfigError(f"sweep file {path} must be a YAML mapping with base, budget and variants, got "
                          f"{type(data).__name__}.")
    problems: list = []
    for key in data:
        if key not in SWEEP_KEYS:
            problems.append(f"unknown key '{key}'{_suggest(str(key), SWEEP_KEYS)}; a sweep file has "
                            f"{', '.join(SWEEP_KEYS)}.")

    base = inline = None
    if data.get("base") is not None and data.get("config") is not None:
        problems.append("set base (a config file) or config (the config inline), not both.")
    elif data.get("base") is not None:
        if not isinstance(data["base"], str):
            problems.append(f"base must be the path of a config file, got {data['base']!r}.")
        else:
            base = path.parent / data["base"]
            if not base.is_file():
                problems.append(f"base config {data['base']} does not exist (paths are relative to the sweep "
                                f"file: {base}).")
    elif data.get("config") is not None:
        if isinstance(data["config"], dict):
            inline = data["config"]
        else:
            problems.append(f"config must be a mapping (the config inline, as in a config file), got "
                            f"{data['config']!r}.")
    else:
        problems.append("base is missing: set base to a config file (relative to the sweep file), or config to "
                        "the config inline.")
    overrides = _string_list(data.get("overrides"), "overrides", problems) + [str(o) for o in extra_overrides]

    budget_kind, budget = None, None
    raw_budget = data.get("budget")
    if not isinstance(raw_budget, dict):
        problems.append(f"budget must be a mapping with exactly one of {', '.join(BUDGET_KINDS)} (e.g. budget: "
                        f"{{flops: 2.0e13}}), got {raw_budget!r}." if raw_budget is not None else
                        f"budget is missing: set exactly one of {', '.join(BUDGET_KINDS)} (e.g. budget: "
                        f"{{flops: 2.0e13}}).")
    else:
        for key in raw_budget:
            if key not in BUDGET_KINDS:
                problems.append(f"unknown budget kind '{key}'{_suggest(str(key), BUDGET_KINDS)}; choose one of "
                                f"{', '.join(BUDGET_KINDS)}.")
        kinds = [k for k in BUDGET_KINDS if k in raw_budget]
        if len(kinds) != 1:
            problems.append(f"budget must set exactly one of {', '.join(BUDGET_KINDS)}, got "
                            f"{', '.join(kinds) if kinds else 'none'}.")
        for kind in kinds:
            number = _number(raw_budget[kind])
            if number is None or not math.isfinite(number) or number <= 0:
                problems.append(f"budget {kind} must be a positive number, got {raw_budget[kind]!r}.")
            elif len(kinds) == 1:
                budget_kind, budget = kind, float(number)

    if seeds is not None:
        if seeds < 1:
            problems.append(f"--seeds must be a positive integer, got {seeds}.")
    else:
        seeds = _int(data, "seeds", problems, 1) or 1
    eval_batches = _int(data, "eval_batches", problems, 1)
    eval_interval = _int(data, "eval_interval", problems, 0)

    launcher = _string_list(data.get("launcher"), "launcher", problems)
    world_size = _int(data, "world_size", problems, 1)
    if world_size is None:
        world_size = _launcher_world_size(launcher) if launcher else 1
        if world_size is None:
            problems.append(f"the number of processes of launcher {launcher} is not an integer; set world_size "
                            f"(processes per run, for tokens per step).")
            world_size = 1

    variants = {}
    raw_variants = data.get("variants")
    if not isinstance(raw_variants, dict) or not raw_variants:
        problems.append("variants must be a mapping of at least one name to its overrides (e.g. variants: "
                        "{dense: [], moc: [--model.n_experts=4]}), got " + repr(raw_variants) + ".")
    else:
        for name, value in raw_variants.items():
            if not isinstance(name, str) or not NAME.match(name):
                problems.append(f"variant name {name!r} must be letters, digits and . _ + = - (it names a "
                                f"directory).")
                continue
            variants[name] = _string_list(value, f"variant '{name}'", problems)
    only = list(only or [])
    unknown = [name for name in only if name not in variants]
    if unknown and variants:
        problems.append(f"--only names unknown variant{'s' if len(unknown) > 1 else ''} "
                        f"{', '.join(unknown)}; the variants are {', '.join(variants)}.")

    sweep = Sweep(path, base, inline, overrides, budget_kind, budget, seeds, eval_batches, eval_interval,
                  launcher, world_size, variants, [n for n in variants if not only or n in only])
    if base is not None or inline is not None:
        _check_configs(sweep, problems)
    from lunaris.config import raise_problems
    raise_problems(problems, f"sweep file {path}")
    return sweep


def _check_configs(sweep: Sweep, problems: list) -> None:
    """load_config for the base and every variant; their problems (each once), and what a step costs."""
    from lunaris.config import load_config
    for key, value in _override_keys(sweep.overrides).items():
        if key in SET_BY_SWEEP:
            problems.append(f"overrides set {key} (to {value!r}); the sweep sets it from {SET_BY_SWEEP[key]}.")
    with _base_file(sweep) as base_path:
        base_problems = []
        try:
            base_config = load_config(base_path, sweep.overrides)
            sweep.eval_batch_size = base_config.batch_size
        except ConfigError as exc:
            base_problems = _problem_lines(exc)
            problems.extend(f"base config: {p}" for p in base_problems)
        for name, overrides in sweep.variants.items():
            for key, value in _override_keys(overrides).items():
                if key in SET_BY_SWEEP:
                    problems.append(f"variant '{name}' sets {key} (to {value!r}); the sweep sets it from "
                                    f"{SET_BY_SWEEP[key]}.")
            try:
                sweep.configs[name] = load_config(base_path, sweep.overrides + overrides)
            except ConfigError as exc:
                problems.extend(f"variant '{name}': {p}" for p in _problem_lines(exc) if p not in base_problems)
    if base_problems and sweep.configs:  # the base alone is invalid, but some variants fix it
        sweep.eval_batch_size = min(c.batch_size for c in sweep.configs.values())
    for name, config in sweep.configs.items():
        cost = sweep.costs[name] = variant_cost(config, sweep.world_size)
        if sweep.budget_kind in ("flops", "tokens") and _budget_steps(sweep, cost) < 1:
            one = cost.flops_per_token * cost.tokens_per_step if sweep.budget_kind == "flops" else cost.tokens_per_step
            problems.append(f"variant '{name}': the budget of {sweep.budget_text()} is less than one optimizer step "
                            f"({one:.3g} {'FLOPs' if sweep.budget_kind == 'flops' else 'tokens'}).")


def variant_cost(config, world_size: int = 1) -> Cost:
    """Parameters and training FLOPs per token of the config's model (built on the meta device), tokens per step."""
    from lunaris.inspect_config import build_on_meta
    model = build_on_meta(config.model)
    total = model.num_params()
    inactive = 0
    c = config.model
    for block in model.blocks:
        experts = getattr(block.ffn, "experts", None)
        if c.is_moc and experts is not None:
            inactive += sum(p.numel() for p in experts.parameters()) * (c.n_experts - c.top_k) // c.n_experts
    tokens_per_step = config.batch_size * c.max_seq_len * config.gradient_accumulation_steps * world_size
    return Cost(total, total - inactive, model.flops_per_token(c.max_seq_len), tokens_per_step)


def _budget_steps(sweep: Sweep, cost: Cost) -> int:
    per_step = cost.tokens_per_step * (cost.flops_per_token if sweep.budget_kind == "flops" else 1.0)
    return math.floor(sweep.budget / per_step + 1e-9)  # the epsilon: an exact multiple is not rounded down


# ---- the plan ------------------------------------------------------------------------------------------------

@dataclass
class Run:
    variant: str
    seed: int
    config: object                 # TrainConfig of this run (schedule set once steps are known)
    steps: Optional[int]           # None: a seconds budget not calibrated yet
    notes: list

    @property
    def name(self) -> str:
        return f"{self.variant}-seed{self.seed}"

    @property
    def dir(self) -> Path:
        return Path(self.config.out_dir)


def apply_schedule(config, steps: int, eval_interval: Optional[int] = None) -> list:
    """Set max_steps and the intervals that follow from it; returns notes on what changed the user's config."""
    notes = []
    config.max_steps = steps
    if config.warmup_steps >= steps:
        new = max(1, steps // 20)
        notes.append(f"warmup_steps {config.warmup_steps} -> {new} (not shorter than the {steps}-step run)")
        config.warmup_steps = new
    if eval_interval is None:  # about EVALUATIONS evaluations, each on a logged step (the curve's time axis)
        every = max(1, steps // EVALUATIONS)
        config.log_interval = min(config.log_interval, every)
        every -= every % config.log_interval
    else:
        every = eval_interval
        if every and every % config.log_interval:
            config.log_interval = math.gcd(config.log_interval, every)
    config.eval_interval = every
    config.save_interval = min(config.save_interval, every or max(1, steps // EVALUATIONS))
    return notes


def plan_runs(sweep: Sweep, out: Path, state: dict) -> list:
    """Every run of every variant (file order, then seed), with its config resolved as far as known."""
    runs = []
    for variant, base_config in sweep.configs.items():
        steps = _steps(sweep, variant, state)
        for seed in range(sweep.seeds):
            config = copy.deepcopy(base_config)
            config.seed, config.out_dir = seed, str(out / f"{variant}-seed{seed}")
            notes = apply_schedule(config, steps, sweep.eval_interval) if steps else []
            runs.append(Run(variant, seed, config, steps, notes))
    return runs


def _steps(sweep: Sweep, variant: str, state: dict) -> Optional[int]:
    if sweep.budget_kind != "seconds":
        return _budget_steps(sweep, sweep.costs[variant])
    record = state.get("calibrated", {}).get(variant)
    if not record:
        return None
    if "config" in record:
        same = not _differences(record["config"], calibration_config(sweep, variant))
    else:  # recorded by the first version of the state, which kept only a hash
        same = record.get("key") == calibration_key(sweep, variant)
    return record["steps"] if same else None


def _flat(config) -> dict:
    data = config.to_dict()
    flat = {f"model.{k}": v for k, v in data.pop("model").items()}
    flat.update(data)
    return flat


def _jsonable(value):
    return json.loads(json.dumps(value, default=str))


def fingerprint(sweep: Sweep, run: Run) -> dict:
    """What a run's result depends on: its resolved config (less logging and paths), the budget and the scoring."""
    flat = {k: v for k, v in _flat(run.config).items() if k not in NOT_COMPARED}
    flat.update({"sweep.budget": f"{sweep.budget_kind}={sweep.budget:g}", "sweep.world_size": sweep.world_size,
                 "sweep.eval_batches": sweep.eval_batches or "all", "sweep.eval_batch_size": sweep.eval_batch_size})
    return _jsonable(flat)


def calibration_config(sweep: Sweep, variant: str) -> dict:
    """What a variant's step time depends on: its config less seed, schedule, logging and paths, and the budget."""
    flat = {k: v for k, v in _flat(sweep.configs[variant]).items() if k not in NOT_COMPARED | SCHEDULE | {"seed"}}
    flat.update({"seconds": sweep.budget, "world_size": sweep.world_size})
    return _jsonable(flat)


def calibration_key(sweep: Sweep, variant: str) -> str:
    return hashlib.sha256(json.dumps(calibration_config(sweep, variant), sort_keys=True).encode()).hexdigest()[:16]


@functools.lru_cache(maxsize=1)
def _defaults() -> dict:
    from lunaris.config import TrainConfig
    return _jsonable(_flat(TrainConfig()))


def _differences(old: dict, new: dict, skip=()) -> list:
    """`key old -> new` for each differing key. A key the old record lacks is no difference while the new value is
    that key's default: a later Lunaris added the key, and at its default it trains what the earlier one trained."""
    defaults = _defaults()
    keys = [k for k in dict.fromkeys([*old, *new]) if k not in skip and old.get(k) != new.get(k)
            and not (k not in old and k in defaults and new.get(k) == defaults[k])]
    return [f"{k} {old.get(k)!r} -> {new.get(k)!r}" for k in keys]


def check_state(sweep: Sweep, runs: list, state: dict, echo) -> None:
    """Refuse to resume or report a run whose recorded config differs from what the sweep file now describes."""
    from lunaris.config import raise_problems
    from lunaris.train.checkpoint import find_latest
    problems = []
    records = state.setdefault("runs", {})
    for run in runs:
        record = records.get(run.name)
        if record is not None and not run.dir.exists():
            echo(f"note: {run.dir} was deleted; {run.name} trains from the start.")
            del records[run.name]
            record = None
        if record is None:
            if run.dir.is_dir() and find_latest(run.dir) is not None:
                problems.append(f"{run.dir} holds checkpoints that this sweep did not start; use another --out, or "
                                f"delete that directory.")
            continue
        changes = _differences(record["config"], fingerprint(sweep, run), skip=() if run.steps else SCHEDULE)
        if changes:
            what = "trained" if record.get("status") == "finished" else "started"
            shown = "; ".join(changes[:6]) + (f"; and {len(changes) - 6} more" if len(changes) > 6 else "")
            problems.append(f"variant '{run.variant}' (seed {run.seed}) was {what} with another config than the "
                            f"sweep file now gives it ({shown}). Use a new --out, or delete {run.dir} to train it "
                            f"again.")
    raise_problems(problems, f"the sweep in {state.get('out', 'OUT')}")


def check_data(sweep: Sweep) -> None:
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


# ---- state -----------------------------------------------------------------------------------------------------

def load_state(out: Path) -> dict:
    path = out / STATE_FILE
    if not path.is_file():
        return {"version": 1, "runs": {}, "calibrated": {}}
    try:
        state = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise LunarisError(f"{path} cannot be read ({exc}); it records which runs of the sweep are done. Delete "
                           f"it to start the sweep over, or use another --out.") from None
    state.setdefault("runs", {})
    state.setdefault("calibrated", {})
    return state


def save_state(out: Path, state: dict) -> None:
    from lunaris.fileio import atomic_write_json
    atomic_write_json(out / STATE_FILE, state)


# ---- running ---------------------------------------------------------------------------------------------------

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


def _calibrate(sweep: Sweep, variant: str, runs: list, out: Path, state: dict, interrupts, echo) -> Optional[int]:
    """Time a few steps of the variant in a fresh process; the step count filling the budget, kept in the state."""
    first = next(r for r in runs if r.variant == variant)
    run_dir = first.dir
    run_dir.mkdir(parents=True, exist_ok=True)
    config_path, result_path = run_dir / "sweep-calibration.yaml", run_dir / "sweep-calibration.json"
    _write_config(config_path, sweep.configs[variant])
    result_path.unlink(missing_ok=True)
    echo(f"[{time.strftime('%H:%M:%S')}] {variant}: timing a few steps for the {sweep.budget_text()} budget")
    command = [sys.executable, "-m", "lunaris.sweep", "--worker", "calibrate", str(config_path), "--result",
               str(result_path), "--seconds", repr(sweep.budget)]
    status, tail = _run_child(command, run_dir / "sweep.log", f"{variant} calibrate", interrupts, echo)
    if not result_path.is_file():
        if interrupts.requested:
            return None
        raise _failure(f"calibrating variant '{variant}'", status, tail, run_dir / "sweep.log")
    steps = int(json.loads(result_path.read_text())["steps"])
    state["calibrated"][variant] = {"config": calibration_config(sweep, variant), "steps": steps,
                                    "seconds": sweep.budget}
    save_state(out, state)
    return steps


def _write_config(path: Path, config) -> None:
    from lunaris.fileio import atomic_write_text
    atomic_write_text(path, yaml.safe_dump(config.to_dict(), sort_keys=False))


def _train(sweep: Sweep, run: Run, interrupts, echo) -> tuple:
    """Train and score one run in a fresh process; returns (worker result or None, exit status, last lines)."""
    run.dir.mkdir(parents=True, exist_ok=True)
    config_path, result_path = run.dir / "sweep-config.yaml", run.dir / "sweep-result.json"
    _write_config(config_path, run.config)
    result_path.unlink(missing_ok=True)
    command = [*(sweep.launcher or [sys.executable]), "-m", "lunaris.sweep", "--worker", "train", str(config_path),
               "--result", str(result_path), "--eval-batch-size", str(sweep.eval_batch_size)]
    if sweep.eval_batches:
        command += ["--eval-batches", str(sweep.eval_batches)]
    status, tail = _run_child(command, run.dir / "sweep.log", run.name, interrupts, echo)
    result = json.loads(result_path.read_text()) if status == 0 and result_path.is_file() else None
    return result, status, tail


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
    stopped = None
    with _Interrupts() as interrupts:
        for run in runs:
            record = state["runs"].get(run.name)
            if run.variant not in sweep.only or (record and record.get("status") == "finished"):
                continue
            if interrupts.requested:
                break
            if run.steps is None:  # a seconds budget: calibrate once per variant (every seed gets these steps)
                steps = _calibrate(sweep, run.variant, runs, out, state, interrupts, echo)
                if steps is None:
                    break
                for other in runs:
                    if other.variant == run.variant:
                        other.steps, other.notes = steps, apply_schedule(other.config, steps, sweep.eval_interval)
                        other.config.validate()
                for note in run.notes:
                    echo(f"note: {run.variant}: {note}")
            state["runs"][run.name] = {"variant": run.variant, "seed": run.seed, "status": "started",
                                       "config": fingerprint(sweep, run), "max_steps": run.steps,
                                       "started": record.get("started") if record else time.strftime("%F %T")}
            save_state(out, state)
            cost = sweep.costs[run.variant]
            echo(f"[{time.strftime('%H:%M:%S')}] {run.name}: {run.steps} steps, "
                 f"{run.steps * cost.tokens_per_step:,} tokens, "
                 f"{run.steps * cost.tokens_per_step * cost.flops_per_token:.3g} FLOPs -> {run.dir}")
            result, status, tail = _train(sweep, run, interrupts, echo)
            if result is None:
                if interrupts.requested or status == 0:  # stopped by a signal, with a checkpoint to resume from
                    stopped = run
                    break
                raise _failure(f"run {run.name}", status, tail, run.dir / "sweep.log")
            result.update(read_run_metrics(run.dir))
            state["runs"][run.name].update(status="finished", result=result, finished=time.strftime("%F %T"))
            save_state(out, state)
            bpb = result.get("val_bpb")
            echo(f"[{time.strftime('%H:%M:%S')}] {run.name}: val loss {result['val_loss']:.4f}"
                 + (f", {bpb:.4f} bits/byte" if bpb is not None else ""))
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
        from lunaris.demo import calibrate_steps
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


# ---- the report ------------------------------------------------------------------------------------------------

def _metric_rows(run_dir: Path) -> list:
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            rows.append(json.loads(line))
        except ValueError:
            continue  # a truncated last line of a killed run
    return rows


def model_metrics(row: dict) -> dict:
    """A few scalars of the MoC and IRL layers from one metrics row: moc/* and irl/* as logged, and the
    per-layer expert drop rate, router entropy and max load ratio averaged over layers (moc/<name>)."""
    metrics, layers = {}, defaultdict(list)
    for key, value in row.items():
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            continue
        if key.startswith(("moc/", "irl/")):
            metrics[key] = value
        match = MOC_LAYER_METRIC.match(key)
        if match:
            layers[match.group(1)].append(value)
    metrics.update({f"moc/{name}": statistics.fmean(values) for name, values in sorted(layers.items())})
    return metrics


def read_run_metrics(run_dir: Path) -> dict:
    """train_seconds, the held-out curve [(step, train seconds or None, val loss)] and the last model metrics."""
    rows = _metric_rows(run_dir)
    timed = [r for r in rows if isinstance(r.get("time/train_seconds"), (int, float))]
    logged = [r for r in rows if "loss/total" in r]
    curve = [[r["step"], r.get("time/train_seconds"), r["val/loss"]] for r in rows
             if isinstance(r.get("val/loss"), (int, float))]
    return {"train_seconds": timed[-1]["time/train_seconds"] if timed else None, "curve": curve,
            "metrics": model_metrics(logged[-1]) if logged else {}}


def _mean_spread(values: list):
    values = [v for v in values if v is not None]
    if not values:
        return None, None
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else None)


def summarize(sweep: Sweep, runs: list, state: dict) -> list:
    """One row per variant with at least one finished run: costs, and results averaged over its seeds."""
    by_variant = defaultdict(list)
    for run in runs:
        record = state["runs"].get(run.name)
        if record and record.get("status") == "finished":
            by_variant[run.variant].append((run, record["result"]))
    rows = []
    for variant in sweep.variants:
        done = by_variant.get(variant)
        if not done:
            continue
        cost = sweep.costs[variant]
        counts = [r["steps"] for _, r in done]
        steps = counts[0] if len(set(counts)) == 1 else statistics.fmean(counts)  # seeds of a variant: equal steps
        loss, loss_spread = _mean_spread([r["val_loss"] for _, r in done])
        bpb, bpb_spread = _mean_spread([r.get("val_bpb") for _, r in done])
        seconds, _ = _mean_spread([r.get("train_seconds") for _, r in done])
        keys = dict.fromkeys(k for _, r in done for k in r.get("metrics", {}))
        metrics = {k: statistics.fmean(r["metrics"][k] for _, r in done if k in r.get("metrics", {})) for k in keys}
        rows.append({
            "variant": variant, "overrides": sweep.variants[variant], "seeds": [run.seed for run, _ in done],
            "params": cost.params, "active_params": cost.active_params, "flops_per_token": cost.flops_per_token,
            "tokens_per_step": cost.tokens_per_step, "steps": steps, "tokens": steps * cost.tokens_per_step,
            "flops": steps * cost.tokens_per_step * cost.flops_per_token, "train_seconds": seconds,
            "val_loss": loss, "val_loss_std": loss_spread, "val_bpb": bpb, "val_bpb_std": bpb_spread,
            "eval_tokens": done[0][1].get("eval_tokens"), "metrics": metrics,
            "runs": [{"seed": run.seed, "run_dir": str(run.dir), **result} for run, result in done],
        })
    return rows


def _count(n) -> str:
    for size, suffix in ((1e9, "B"), (1e6, "M"), (1e3, "k")):
        if abs(n) >= size:
            return f"{n / size:.2f}{suffix}"
    return f"{n:g}"


def _with_spread(mean, spread, digits: int = 4) -> str:
    if mean is None:
        return "-"
    return f"{mean:.{digits}f}" + (f" ± {spread:.{digits}f}" if spread is not None else "")


def _metrics_text(metrics: dict) -> str:
    short = {"moc/drop_rate": "drop", "moc/router_entropy": "entropy", "moc/max_load_ratio": "max load"}
    parts = [f"{short.get(k, k)} {v:.3g}" for k, v in metrics.items()
             if k in short or k.startswith("irl/update_norm_step")]
    return ", ".join(parts).replace("irl/update_norm_step", "irl step ") or "-"


def format_table(sweep: Sweep, rows: list) -> str:
    seeds = max(len(r["seeds"]) for r in rows)
    eval_what = f"the first {sweep.eval_batches} held-out batches" if sweep.eval_batches else "the whole held-out split"
    lines = [f"Budget {sweep.budget_text()} per run; every variant scored on {eval_what} "
             f"({rows[0]['eval_tokens']:,} tokens, batch size {sweep.eval_batch_size})"
             + ("; mean ± standard deviation over seeds" if seeds > 1 else ""), "",
             "| variant | seeds | params | active params | steps | tokens | training FLOPs | train s | val loss "
             "| val bpb | MoC / IRL at the end |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        seconds = f"{r['train_seconds']:.3g}" if r["train_seconds"] is not None else "-"
        lines.append(f"| {r['variant']} | {len(r['seeds'])} | {_count(r['params'])} | {_count(r['active_params'])} | "
                     f"{r['steps']:g} | {_count(r['tokens'])} | {r['flops']:.3g} | {seconds} | "
                     f"{_with_spread(r['val_loss'], r['val_loss_std'])} | "
                     f"{_with_spread(r['val_bpb'], r['val_bpb_std'])} | {_metrics_text(r['metrics'])} |")
    return "\n".join(lines)


def write_report(sweep: Sweep, runs: list, state: dict, out: Path, echo) -> dict:
    """OUT/results.md, OUT/results.json and OUT/sweep.png from every finished run; returns the report."""
    from lunaris.fileio import atomic_write_json, atomic_write_text
    rows = summarize(sweep, runs, state)
    report = {"sweep": str(sweep.path), "budget": {sweep.budget_kind: sweep.budget}, "seeds": sweep.seeds,
              "eval": {"batches": sweep.eval_batches or "all", "batch_size": sweep.eval_batch_size},
              "world_size": sweep.world_size, "variants": rows, "table": format_table(sweep, rows) if rows else ""}
    if not rows:
        return report
    missing = [r.name for r in runs if state["runs"].get(r.name, {}).get("status") != "finished"]
    note = f"\n\nNot finished yet: {', '.join(missing)}.\n" if missing else "\n"
    atomic_write_text(out / "results.md", report["table"] + note)
    atomic_write_json(out / "results.json", report)
    try:
        plot = plot_sweep(rows, out / "sweep.png")
        echo(f"wrote {out / 'results.md'}, {out / 'results.json'} and {plot}")
    except ImportError:
        echo(f"wrote {out / 'results.md'} and {out / 'results.json'} (no plot: pip install matplotlib)")
    return report


def _mean_curve(row: dict) -> list:
    """[(flops, seconds or None, val loss)] averaged over the seeds at the steps they all evaluated."""
    per_step = defaultdict(list)
    for run in row["runs"]:
        for step, seconds, loss in run.get("curve", []):
            per_step[step].append((seconds, loss))
    points = []
    per_token = row["tokens_per_step"] * row["flops_per_token"]
    for step in sorted(per_step):
        values = per_step[step]
        if len(values) == len(row["runs"]):
            seconds = [s for s, _ in values if s is not None]
            points.append((step * per_token, statistics.fmean(seconds) if len(seconds) == len(values) else None,
                           statistics.fmean(loss for _, loss in values)))
    return points


def plot_sweep(rows: list, path: Path) -> Path:
    """Held-out loss of every variant against training FLOPs (left) and training seconds (right)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from lunaris.fileio import atomic_open
    fig, (by_flops, by_time) = plt.subplots(1, 2, figsize=(12, 4.5))
    for i, row in enumerate(rows):
        # 10 colours, then the same colours dashed, dotted, ...: every variant keeps its own line
        style = dict(color=f"C{i % 10}", linestyle=("-", "--", ":", "-.")[i // 10 % 4], marker="o", markersize=3,
                     label=row["variant"])
        curve = _mean_curve(row)
        by_flops.plot([c[0] for c in curve], [c[2] for c in curve], **style)
        timed = [c for c in curve if c[1] is not None]
        by_time.plot([c[1] for c in timed], [c[2] for c in timed], **style)
    for ax, label in ((by_flops, "training FLOPs"), (by_time, "training seconds")):
        ax.set_xlabel(label)
        ax.set_ylabel("held-out loss (nats/token)")
        ax.grid(alpha=0.3)
    by_flops.set_title("held-out loss vs training FLOPs")
    by_time.set_title("held-out loss vs training time")
    by_time.legend(fontsize=8)
    fig.tight_layout()
    with atomic_open(path, "wb") as f:
        fig.savefig(f, dpi=110, format="png")
    plt.close(fig)
    return path


def format_plan(sweep: Sweep, runs: list, state: dict, out: Path) -> str:
    variants = [v for v in sweep.variants if v in sweep.only]
    lines = [f"sweep {sweep.path}: {len(variants)} variant{'s' if len(variants) != 1 else ''} x {sweep.seeds} "
             f"seed{'s' if sweep.seeds != 1 else ''}, {sweep.budget_text()} each"
             + (f", {sweep.world_size} processes per run" if sweep.world_size > 1 else "") + f"; results in {out}", "",
             "| variant | params | active params | FLOPs/token | tokens/step | steps | tokens | training FLOPs "
             "| status |",
             "|---|---|---|---|---|---|---|---|---|"]
    notes = []
    for variant in variants:
        cost = sweep.costs[variant]
        mine = [r for r in runs if r.variant == variant]
        steps = mine[0].steps
        if steps is None:
            plan = "timed at start | - | -"
        else:
            plan = f"{steps} | {_count(steps * cost.tokens_per_step)} | " \
                   f"{steps * cost.tokens_per_step * cost.flops_per_token:.3g}"
        lines.append(f"| {variant} | {_count(cost.params)} | {_count(cost.active_params)} | "
                     f"{cost.flops_per_token:.3g} | {cost.tokens_per_step:,} | {plan} | {_status(mine, state)} |")
        notes += [f"{variant}: {note}" for note in mine[0].notes]
    skipped = [v for v in sweep.variants if v not in sweep.only]
    if skipped:
        notes.append(f"not trained now (--only): {', '.join(skipped)}")
    lengths = {r.config.model.max_seq_len for r in runs}
    if len(lengths) > 1:
        notes.append(f"the variants differ in max_seq_len ({', '.join(map(str, sorted(lengths)))}): their held-out "
                     f"losses are over different windows of the same tokens")
    return "\n".join(lines + [f"note: {n}" for n in notes])


def _status(runs: list, state: dict) -> str:
    records = [state.get("runs", {}).get(r.name) or {} for r in runs]
    finished = sum(r.get("status") == "finished" for r in records)
    started = [run for run, r in zip(runs, records) if r.get("status") == "started"]
    if finished == len(runs):
        return "done"
    parts = [f"{finished}/{len(runs)} done"] if finished else []
    from lunaris.errors import CheckpointError
    from lunaris.train.checkpoint import checkpoint_step, find_latest
    for run in started:
        try:
            latest = find_latest(run.dir)
            step = checkpoint_step(latest) if latest is not None else None
        except (CheckpointError, OSError, RuntimeError):
            step = None
        parts.append(f"seed {run.seed} resumes" + (f" from step {step}" if step is not None else ""))
    return ", ".join(parts) or "new"


if __name__ == "__main__":
    sys.exit(worker_main())
