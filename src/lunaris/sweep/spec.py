"""Reading and checking a sweep file: its own keys (declared once, in KEYS), then the base config with every
variant's overrides through `load_config`; every problem of the file and of every variant in one ConfigError."""

import math
import re
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import yaml

from lunaris.config import load_config, parse_overrides, raise_problems, read_yaml
from lunaris.config_sources import PRESETS, preset_names
from lunaris.errors import ConfigError, suggest
from lunaris.sweep.plan import budget_steps, variant_cost

KEYS = {  # the sweep file's keys: what each value must be
    "base": "a config file, relative to the sweep file, or a preset's name (demo-cpu)",
    "config": "the config inline, as in a config file",
    "overrides": "--key=value strings applied to every variant",
    "budget": "exactly one of flops (training FLOPs per run), tokens, seconds (training time)",
    "seeds": "runs per variant, --seed=0..N-1 (default 1)",
    "eval_batches": "held-out batches every run is scored on (default: the whole split)",
    "eval_interval": "steps between held-out evaluations during training (default: about 8 per run)",
    "launcher": "prefix of the training command, e.g. [torchrun, --standalone, --nproc_per_node=2]",
    "world_size": "processes per run, where the launcher's --nproc_per_node is not a number",
    "variants": "name: its overrides",
}
MINIMUM = {"seeds": 1, "eval_batches": 1, "eval_interval": 0, "world_size": 1}  # the integer keys
BUDGET_KINDS = ("flops", "tokens", "seconds")
SET_BY_SWEEP = {"max_steps": "the budget", "seed": "seeds", "out_dir": "--out"}
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+=-]*$")
EXAMPLE_BUDGET = "budget: {flops: 2.0e13}"


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
    fixed: dict = field(default_factory=dict)     # name -> the training keys its overrides set (they win)
    eval_batch_size: int = 8

    def budget_text(self) -> str:
        return {"flops": f"{self.budget:.3g} training FLOPs", "tokens": f"{self.budget:,.0f} tokens",
                "seconds": f"{self.budget:g} s of training"}[self.budget_kind]


def _number(value):
    """A YAML number, or a string like '2e13' (YAML 1.1 reads an exponent without a dot as text); None if neither."""
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


def _integer(data: dict, key: str, problems: list):
    value = data.get(key)
    if value is None:
        return None
    number, minimum = _number(value), MINIMUM[key]
    if number is None or not math.isfinite(number) or not float(number).is_integer() or number < minimum:
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


def override_keys(overrides: list) -> dict:
    """{flat key: the override's value} of a list of --key=value words (malformed ones are load_config's to
    report)."""
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


def _read_base(data: dict, path: Path, problems: list) -> tuple:
    """(base config file or None, inline config or None); a base file that does not exist is one problem."""
    base, config = data.get("base"), data.get("config")
    if base is not None and config is not None:
        problems.append("set base (a config file) or config (the config inline), not both.")
    elif base is not None:
        if not isinstance(base, str):
            problems.append(f"base must be the path of a config file, got {base!r}.")
        elif (path.parent / base).is_file():
            return path.parent / base, None
        elif base in preset_names():
            return PRESETS / f"{base}.yaml", None
        else:
            problems.append(f"base config {base} does not exist (paths are relative to the sweep file: "
                            f"{path.parent / base}); give a config file or a preset's name "
                            f"({', '.join(preset_names())}).")
    elif config is not None:
        if isinstance(config, dict):
            return None, config
        problems.append(f"config must be a mapping (the config inline, as in a config file), got {config!r}.")
    else:
        problems.append("base is missing: set base to a config file (relative to the sweep file) or a preset's "
                        "name, or config to the config inline.")
    return None, None


def _read_budget(raw, problems: list) -> tuple:
    """(kind, amount), or (None, None) with the problems recorded."""
    kinds_text = ", ".join(BUDGET_KINDS)
    if raw is None:
        problems.append(f"budget is missing: set exactly one of {kinds_text} (e.g. {EXAMPLE_BUDGET}).")
        return None, None
    if not isinstance(raw, dict):
        problems.append(f"budget must be a mapping with exactly one of {kinds_text} (e.g. {EXAMPLE_BUDGET}), got "
                        f"{raw!r}.")
        return None, None
    for key in raw:
        if key not in BUDGET_KINDS:
            problems.append(f"unknown budget kind '{key}'{suggest(str(key), BUDGET_KINDS)}; choose one of "
                            f"{kinds_text}.")
    kinds = [k for k in BUDGET_KINDS if k in raw]
    if len(kinds) != 1:
        problems.append(f"budget must set exactly one of {kinds_text}, got {', '.join(kinds) if kinds else 'none'}.")
    found = None, None
    for kind in kinds:
        number = _number(raw[kind])
        if number is None or not math.isfinite(number) or number <= 0:
            problems.append(f"budget {kind} must be a positive number, got {raw[kind]!r}.")
        elif len(kinds) == 1:
            found = kind, float(number)
    return found


def _read_world_size(data: dict, launcher: list, problems: list) -> int:
    world_size = _integer(data, "world_size", problems)
    if world_size is not None:
        return world_size
    world_size = _launcher_world_size(launcher) if launcher else 1
    if world_size is None:
        problems.append(f"the number of processes of launcher {launcher} is not an integer; set world_size "
                        f"(processes per run, for tokens per step).")
        return 1
    return world_size


def _read_variants(raw, problems: list) -> dict:
    if not isinstance(raw, dict) or not raw:
        problems.append("variants must be a mapping of at least one name to its overrides (e.g. variants: "
                        "{dense: [], moc: [--model.n_experts=4]}), got " + repr(raw) + ".")
        return {}
    variants = {}
    for name, value in raw.items():
        if not isinstance(name, str) or not NAME.match(name):
            problems.append(f"variant name {name!r} must be letters, digits and . _ + = - (it names a directory).")
            continue
        variants[name] = _string_list(value, f"variant '{name}'", problems)
    return variants


def _read_only(only, variants: dict, problems: list) -> list:
    """The variants to train now, in file order (all of them without --only)."""
    only = list(only or [])
    unknown = [name for name in only if name not in variants]
    if unknown and variants:
        problems.append(f"--only names unknown variant{'s' if len(unknown) > 1 else ''} {', '.join(unknown)}; the "
                        f"variants are {', '.join(variants)}.")
    return [name for name in variants if not only or name in only]


def read_sweep(path, seeds: int = None, only=None, extra_overrides=()) -> Sweep:
    """Read and check a sweep file; every problem (the file's and every variant's config) in one ConfigError."""
    path = Path(path)
    data = read_yaml(path, "sweep file", "with base, budget and variants; bench/sweeps/ of a source checkout has "
                                         "examples")
    if not isinstance(data, dict):
        raise ConfigError(f"sweep file {path} must be a YAML mapping with base, budget and variants, got "
                          f"{type(data).__name__}.")
    problems = [f"unknown key '{key}'{suggest(str(key), KEYS)}; a sweep file has {', '.join(KEYS)}."
                for key in data if key not in KEYS]
    base, inline = _read_base(data, path, problems)
    overrides = _string_list(data.get("overrides"), "overrides", problems) + [str(o) for o in extra_overrides]
    budget_kind, budget = _read_budget(data.get("budget"), problems)
    if seeds is not None and seeds < 1:
        problems.append(f"--seeds must be a positive integer, got {seeds}.")
    elif seeds is None:
        seeds = _integer(data, "seeds", problems) or 1
    launcher = _string_list(data.get("launcher"), "launcher", problems)
    variants = _read_variants(data.get("variants"), problems)
    sweep = Sweep(path, base, inline, overrides, budget_kind, budget, seeds, _integer(data, "eval_batches", problems),
                  _integer(data, "eval_interval", problems), launcher, _read_world_size(data, launcher, problems),
                  variants, _read_only(only, variants, problems))
    if base is not None or inline is not None:
        _check_configs(sweep, problems)
    raise_problems(problems, f"sweep file {path}")
    return sweep


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


def _set_by_sweep(overrides: list, who: str, problems: list) -> set:
    """The training keys `overrides` set; a key the sweep sets itself is a problem."""
    keys = override_keys(overrides)
    for key, value in keys.items():
        if key in SET_BY_SWEEP:
            problems.append(f"{who} set{'s' if who.startswith('variant') else ''} {key} (to {value!r}); the sweep "
                            f"sets it from {SET_BY_SWEEP[key]}.")
    return set(keys)


def _check_configs(sweep: Sweep, problems: list) -> None:
    """load_config for the base and every variant; their problems (each once), and what a step costs."""
    common = _set_by_sweep(sweep.overrides, "overrides", problems)
    with _base_file(sweep) as base_path:
        base_problems = []
        try:
            sweep.eval_batch_size = load_config(base_path, sweep.overrides).batch_size
        except ConfigError as exc:
            base_problems = exc.problems
            problems.extend(f"base config: {p}" for p in base_problems)
        for name, overrides in sweep.variants.items():
            sweep.fixed[name] = common | _set_by_sweep(overrides, f"variant '{name}'", problems)
            try:
                sweep.configs[name] = load_config(base_path, sweep.overrides + overrides)
            except ConfigError as exc:
                problems.extend(f"variant '{name}': {p}" for p in exc.problems if p not in base_problems)
    if base_problems and sweep.configs:  # the base alone is invalid, but some variants fix it
        sweep.eval_batch_size = min(c.batch_size for c in sweep.configs.values())
    for name, config in sweep.configs.items():
        cost = sweep.costs[name] = variant_cost(config, sweep.world_size)
        if sweep.budget_kind in ("flops", "tokens") and budget_steps(sweep.budget_kind, sweep.budget, cost) < 1:
            one = cost.flops_per_token * cost.tokens_per_step if sweep.budget_kind == "flops" else cost.tokens_per_step
            problems.append(f"variant '{name}': the budget of {sweep.budget_text()} is less than one optimizer step "
                            f"({one:.3g} {'FLOPs' if sweep.budget_kind == 'flops' else 'tokens'}).")
