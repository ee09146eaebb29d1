"""`lunaris sweep SWEEP.yaml`: train variants of one config at an equal budget, score them on the same held-out
batches, and report.

A sweep file (YAML)::

    base: ../configs/small.yaml     # a config file relative to this file, or a preset's name (or `config:` inline)
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
steps once per variant, and the sweep state keeps the step count); `eval_interval` for about 8 held-out evaluations
(the curves) and the end; `save_interval` for about 4 checkpoints and the end, `keep_last: 1`; and `warmup_steps`
shortened to max_steps/20 only if it is not shorter than the run. `--eval_interval`, `--save_interval`,
`--keep_last` or `--log_interval` in `overrides` (or a variant's) set those instead. Paths inside configs are
relative to the working directory, as for `lunaris train`.

Runs train one after another, each in a fresh process (`python -m lunaris.sweep --worker ...`, under the launcher
if one is set), which also scores the finished model on the first `eval_batches` batches of the held-out split, in
order, with the base config's batch_size: every variant sees the same tokens (`lunaris eval`'s `run_eval`).
OUT/sweep_state.json records each run's resolved config and result: a rerun skips finished runs, resumes an
interrupted one from its checkpoint, and refuses to mix in results of a config the sweep file no longer describes.
Ctrl-C or SIGTERM stops the training run after its current step with a checkpoint, and the sweep exits with status
130 (143 for SIGTERM); rerun to continue. A run that fails stops the sweep, quoting the end of OUT/<run>/sweep.log.
The report: OUT/results.md, OUT/results.json and OUT/sweep.png (held-out loss against training FLOPs and seconds).

The parts: spec.py reads and checks the sweep file; plan.py turns budgets into steps and runs; state.py keeps
sweep_state.json; runner.py runs the processes (and is the worker); report.py writes the results.
"""

from lunaris.sweep.plan import (
    EVALUATIONS,
    KEEP_LAST,
    SAVES,
    Cost,
    Run,
    apply_schedule,
    budget_steps,
    format_plan,
    plan_runs,
    variant_cost,
)
from lunaris.sweep.report import format_table, model_metrics, plot_sweep, read_run_metrics, summarize, write_report
from lunaris.sweep.runner import check_data, run_sweep, worker_main
from lunaris.sweep.spec import BUDGET_KINDS, KEYS, SET_BY_SWEEP, Sweep, read_sweep
from lunaris.sweep.state import (
    COMPARED,
    NOT_COMPARED,
    SCHEDULE,
    STATE_FILE,
    _differences,
    calibration_config,
    calibration_key,
    check_state,
    fingerprint,
    load_state,
    save_state,
)

SWEEP_KEYS = tuple(KEYS)  # the name this tuple had before the sweep became a package

__all__ = ["BUDGET_KINDS", "COMPARED", "EVALUATIONS", "KEEP_LAST", "NOT_COMPARED", "SAVES", "SCHEDULE",
           "SET_BY_SWEEP", "STATE_FILE", "SWEEP_KEYS", "Cost", "Run", "Sweep", "_differences", "apply_schedule",
           "budget_steps", "calibration_config", "calibration_key", "check_data", "check_state", "fingerprint",
           "format_plan", "format_table", "load_state", "model_metrics", "plan_runs", "plot_sweep",
           "read_run_metrics", "read_sweep", "run_sweep", "save_state", "summarize", "variant_cost", "worker_main",
           "write_report"]
