"""OUT/sweep_state.json: what the sweep has done, so that a rerun skips finished runs, resumes an interrupted one, and
refuses to mix in results of a config the sweep file no longer describes.

{"version": 1, "out": OUT, "sweep": FILE,
 "runs": {"<variant>-seed<k>": {"variant", "seed", "status": "started" | "finished", "config": its fingerprint,
                                 "max_steps", "started", "finished", "result": {...}}},
 "calibrated": {"<variant>": {"config": what its step time depends on, "steps", "seconds"}}}
"""

import functools
import hashlib
import json
from pathlib import Path
from typing import Optional

from lunaris.errors import LunarisError

STATE_FILE = "sweep_state.json"
# Every training key is in exactly one of the two sets below (tests/test_sweep.py checks it, so a new key is never
# forgotten); every model key is compared.
# Keys that change what is logged, where, or how fast, not what is trained: a finished run stays valid when they change.
NOT_COMPARED = {"out_dir", "log_interval", "eval_interval", "eval_batches", "eval_tasks", "save_interval",
                "save_latest_always", "keep_last", "wandb_project", "wandb_run_name", "wandb_entity", "tensorboard",
                "num_workers", "pin_memory", "persistent_workers", "prefetch_factor"}
# Keys that change the trained model or its score: a recorded run made with another value is refused.
COMPARED = {"data_dir", "val_data_dir", "optimizer", "learning_rate", "muon_lr", "muon_momentum", "lr_schedule",
            "decay_fraction", "min_lr", "weight_decay", "beta1", "beta2", "router_lr_scale", "warmup_steps",
            "max_steps", "batch_size", "gradient_accumulation_steps", "grad_clip", "compile_model", "device", "dtype",
            "parallelism", "seed", "max_bad_steps", "peak_flops", "muon_ns_coefficients", "muon_lr_scaling",
            "embedding_lr", "lm_head_lr", "scalar_lr", "max_train_seconds", "init_from"}
SCHEDULE = {"max_steps", "warmup_steps"}  # unknown before a seconds budget is calibrated


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


def _flat(config) -> dict:
    data = config.to_dict()
    flat = {f"model.{k}": v for k, v in data.pop("model").items()}
    flat.update(data)
    return flat


def _jsonable(value):
    return json.loads(json.dumps(value, default=str))


def fingerprint(sweep, run) -> dict:
    """What a run's result depends on: its resolved config (less logging and paths), the budget and the scoring."""
    flat = {k: v for k, v in _flat(run.config).items() if k not in NOT_COMPARED}
    flat.update({"sweep.budget": f"{sweep.budget_kind}={sweep.budget:g}", "sweep.world_size": sweep.world_size,
                 "sweep.eval_batches": sweep.eval_batches or "all", "sweep.eval_batch_size": sweep.eval_batch_size})
    return _jsonable(flat)


def calibration_config(sweep, variant: str) -> dict:
    """What a variant's step time depends on: its config less seed, schedule, logging and paths, and the budget."""
    flat = {k: v for k, v in _flat(sweep.configs[variant]).items() if k not in NOT_COMPARED | SCHEDULE | {"seed"}}
    flat.update({"seconds": sweep.budget, "world_size": sweep.world_size})
    return _jsonable(flat)


def calibration_key(sweep, variant: str) -> str:
    return hashlib.sha256(json.dumps(calibration_config(sweep, variant), sort_keys=True).encode()).hexdigest()[:16]


def calibrated_steps(sweep, variant: str, state: dict) -> Optional[int]:
    """The step count a seconds budget was calibrated to for this variant, if the state holds one for its config."""
    record = state.get("calibrated", {}).get(variant)
    if not record:
        return None
    if "config" in record:
        same = not _differences(record["config"], calibration_config(sweep, variant))
    else:  # recorded by the first version of the state, which kept only a hash
        same = record.get("key") == calibration_key(sweep, variant)
    return record["steps"] if same else None


def record_calibration(sweep, variant: str, steps: int, state: dict) -> None:
    state["calibrated"][variant] = {"config": calibration_config(sweep, variant), "steps": steps,
                                    "seconds": sweep.budget}


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


def check_state(sweep, runs: list, state: dict, echo) -> None:
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
