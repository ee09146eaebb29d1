"""The plan: what a step of each variant costs, the budget as `max_steps`, and every run (variant x seed) with its
config and schedule.

The schedule a sweep sets (unless the sweep file's overrides set it: `--save_interval=N`, `--eval_interval=N`,
`--keep_last=N`, `--log_interval=N` win): `max_steps` from the budget; `eval_interval` for about EVALUATIONS held-out
evaluations (the curves; the trainer also evaluates at the end), on logged steps; `save_interval` for about SAVES
checkpoints (the trainer also saves at the end, and on SIGTERM/Ctrl-C), enough to resume an interrupted run;
`keep_last` 1 (resuming needs the newest only); and `warmup_steps` shortened to max_steps/20 only if it is not
shorter than the run.
"""

import copy
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from lunaris.sweep.state import calibrated_steps

EVALUATIONS = 8  # held-out evaluations per run during training, for the curves
SAVES = 4        # checkpoints per run, the last at the end
KEEP_LAST = 1    # numbered checkpoints each run keeps
SCHEDULE_KEYS = ("eval_interval", "save_interval", "keep_last", "log_interval")  # overrides of these win


@dataclass
class Cost:
    """What one optimizer step of a variant costs (from the model built on the meta device)."""
    params: int
    active_params: int          # parameters a token uses: the total less the experts it is not routed to
    flops_per_token: float      # training FLOPs per token (LunarisCodex.flops_per_token)
    tokens_per_step: int


def variant_cost(config, world_size: int = 1) -> Cost:
    """Parameters and training FLOPs per token of the config's model (built on the meta device), tokens per step."""
    from lunaris.model import build_on_meta
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


def budget_steps(budget_kind: str, budget: float, cost: Cost) -> int:
    """Optimizer steps of a FLOPs or tokens budget (whole steps, never over the budget)."""
    per_step = cost.tokens_per_step * (cost.flops_per_token if budget_kind == "flops" else 1.0)
    return math.floor(budget / per_step + 1e-9)  # the epsilon: an exact multiple is not rounded down


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


def apply_schedule(config, steps: int, eval_interval: Optional[int] = None, fixed=()) -> list:
    """Set max_steps and the intervals that follow from it, except the keys in `fixed` (set by the sweep file's
    overrides: they win); `eval_interval` is the sweep file's own key. Returns notes on what changed the user's
    config."""
    notes = []
    config.max_steps = steps
    if config.warmup_steps >= steps:
        new = max(1, steps // 20)
        notes.append(f"warmup_steps {config.warmup_steps} -> {new} (not shorter than the {steps}-step run)")
        config.warmup_steps = new
    if "eval_interval" not in fixed:
        if eval_interval is None:  # about EVALUATIONS evaluations, each on a logged step (the curve's time axis)
            every = max(1, math.ceil(steps / EVALUATIONS))
            if "log_interval" not in fixed:
                config.log_interval = min(config.log_interval, every)
            config.eval_interval = max(config.log_interval, every - every % config.log_interval)
        else:
            config.eval_interval = eval_interval
    every = config.eval_interval
    if every and every % config.log_interval and "log_interval" not in fixed:
        config.log_interval = math.gcd(config.log_interval, every)
    if "save_interval" not in fixed:
        config.save_interval = max(1, math.ceil(steps / SAVES))
    if "keep_last" not in fixed:
        config.keep_last = KEEP_LAST
    return notes


def plan_runs(sweep, out: Path, state: dict) -> list:
    """Every run of every variant (file order, then seed), with its config resolved as far as known."""
    runs = []
    for variant, base_config in sweep.configs.items():
        steps = variant_steps(sweep, variant, state)
        for seed in range(sweep.seeds):
            config = copy.deepcopy(base_config)
            config.seed, config.out_dir = seed, str(out / f"{variant}-seed{seed}")
            notes = apply_schedule(config, steps, sweep.eval_interval, sweep.fixed.get(variant, ())) if steps else []
            runs.append(Run(variant, seed, config, steps, notes))
    return runs


def schedule_variant(sweep, runs: list, variant: str, steps: int) -> None:
    """Every run of `variant` gets `steps` (a seconds budget, once calibrated) and the schedule that follows."""
    for run in runs:
        if run.variant == variant:
            run.steps = steps
            run.notes = apply_schedule(run.config, steps, sweep.eval_interval, sweep.fixed.get(variant, ()))
            run.config.validate()


def variant_steps(sweep, variant: str, state: dict) -> Optional[int]:
    if sweep.budget_kind != "seconds":
        return budget_steps(sweep.budget_kind, sweep.budget, sweep.costs[variant])
    return calibrated_steps(sweep, variant, state)


def count(n) -> str:
    """1234567 -> '1.23M'."""
    for size, suffix in ((1e9, "B"), (1e6, "M"), (1e3, "k")):
        if abs(n) >= size:
            return f"{n / size:.2f}{suffix}"
    return f"{n:g}"


def format_plan(sweep, runs: list, state: dict, out: Path) -> str:
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
            plan = f"{steps} | {count(steps * cost.tokens_per_step)} | " \
                   f"{steps * cost.tokens_per_step * cost.flops_per_token:.3g}"
        lines.append(f"| {variant} | {count(cost.params)} | {count(cost.active_params)} | "
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
