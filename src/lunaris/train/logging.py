"""Where training metrics go: a tqdm bar, console lines, `metrics.jsonl`, W&B and TensorBoard.

Metric names are the same everywhere: `loss/total`, `loss/main`, `loss/aux`,
`perplexity`, `lr`, `grad_norm` (before clipping), `throughput/tokens_per_sec`, `throughput/mfu`,
`val/loss`, `val/perplexity`, `eval/<task>/acc`, `eval/<task>/acc_norm`, `eval/tasks_seconds` (eval_tasks),
plus whatever the model reports (`experts/util_layer{l}/e{i}`,
`experts/drop_rate_layer{l}`, `irl/update_norm_step{t}`, `moc/bias_spread`; on log steps only
`irl/step{t}_update_cosine` and `irl/step{t}_grad_norm`). Only rank 0 writes anything.

`metrics.jsonl` holds one JSON object per logged step, e.g.
`{"step": 20, "loss/total": 5.91, "loss/main": 5.90, ..., "tokens_seen": 327680, "epoch": 0}`;
a value that is not finite is written as null. When a run resumes from step s, lines with
step > s (logged after that checkpoint by the interrupted run) are dropped first, so the file
reads as one uninterrupted run.

A write into the run directory that fails because the disk is full (or over quota, or read-only) ends the run with
one message naming the file and the checkpoint the same command resumes from (lunaris.fileio.on_full_disk).
"""

import json
import math
import os
import platform
import sys
import time
from pathlib import Path
from typing import Optional

import torch
import yaml

import lunaris
from lunaris import metrics
from lunaris.errors import LunarisError
from lunaris.fileio import atomic_write_json, atomic_write_text, on_full_disk
from lunaris.runtime import DTYPE_NAMES, device_name, git_commit
from lunaris.train.checkpoint import resume_note
from lunaris.train.plan import run_memory_lines

METRICS_FILE = "metrics.jsonl"
WANDB_ID_FILE = "wandb_run_id.txt"


def run_file(path: Path):
    """`with run_file(path): write...`: a write of `path` in a run directory that fails for lack of space stops the
    run with the message that also says which checkpoint the same command resumes from."""
    return on_full_disk(path, lambda: resume_note(Path(path).parent))


def _finite_or_none(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def format_console_line(step: int, max_steps: int, values: dict) -> str:
    parts = [f"step {step}/{max_steps}"]
    if metrics.LOSS_TOTAL in values:
        parts.append(f"loss {values[metrics.LOSS_TOTAL]:.4f}")
    if values.get(metrics.LOSS_AUX):
        parts.append(f"aux {values[metrics.LOSS_AUX]:.4f}")
    if metrics.LR in values:
        parts.append(f"lr {values[metrics.LR]:.2e}")
    if metrics.GRAD_NORM in values:
        parts.append(f"grad_norm {values[metrics.GRAD_NORM]:.3f}")
    if metrics.TOKENS_PER_SEC in values:
        parts.append(f"{values[metrics.TOKENS_PER_SEC]:,.0f} tok/s")
    if metrics.MFU in values:
        parts.append(f"mfu {100 * values[metrics.MFU]:.1f}%")
    if metrics.VAL_LOSS in values:
        parts.append(f"val_loss {values[metrics.VAL_LOSS]:.4f}")
    prefix, suffix = metrics.TASK_ACC.split("{task}")      # eval/<task>/acc
    accuracies = [f"{key[len(prefix):-len(suffix)]} {value:.3f}" for key, value in values.items()
                  if key.startswith(prefix) and key.endswith(suffix) and isinstance(value, float)]
    if accuracies:  # eval_tasks, and what scoring them cost
        parts.append(f"acc {', '.join(accuracies)} ({values.get('eval/tasks_seconds', 0.0):.1f} s)")
    return " | ".join(parts)


class RunLogger:
    """All metric sinks of one run. Constructed on every rank; only rank 0's does anything."""

    def __init__(self, config, out_dir: Path, is_main: bool, start_step: int, resumed: bool):
        self.config, self.out_dir, self.is_main = config, Path(out_dir), is_main
        self.bar = self.jsonl = self.wandb_run = self.tensorboard = None
        if not is_main:
            return
        with run_file(self.out_dir / METRICS_FILE):
            self._prepare_jsonl(start_step, resumed)
            self.jsonl = open(self.out_dir / METRICS_FILE, "a", encoding="utf-8")
        if config.wandb_project:
            self.wandb_run = self._start_wandb(resumed)
        if config.tensorboard:
            self.tensorboard = self._start_tensorboard(start_step)
        from tqdm.auto import tqdm
        # disable=None turns the bar off when stderr is not a terminal (cluster log files); the
        # console lines below still appear there.
        self.bar = tqdm(total=config.max_steps, initial=start_step, desc="train", dynamic_ncols=True,
                        disable=None, file=sys.stderr)

    # ---- setup ----
    def _prepare_jsonl(self, start_step: int, resumed: bool) -> None:
        path = self.out_dir / METRICS_FILE
        if not path.exists():
            return
        if not resumed:  # a fresh run in a used directory: keep the old log beside it
            os.replace(path, self.out_dir / "metrics.previous.jsonl")  # a rename of a whole file: nothing half-written
            return
        kept = []
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                if json.loads(line).get("step", 0) <= start_step:
                    kept.append(line)
            except json.JSONDecodeError:
                continue  # a line cut short by a kill
        atomic_write_text(path, "".join(f"{line}\n" for line in kept))

    def _start_wandb(self, resumed: bool):
        wandb = import_wandb()
        id_file = self.out_dir / WANDB_ID_FILE
        run_id = id_file.read_text().strip() if resumed and id_file.exists() else wandb.util.generate_id()
        with run_file(id_file):
            atomic_write_text(id_file, run_id)
        cfg = self.config
        return wandb.init(project=cfg.wandb_project, name=cfg.wandb_run_name, entity=cfg.wandb_entity,
                          config=cfg.to_dict(), dir=str(self.out_dir), id=run_id, resume="allow")

    def _start_tensorboard(self, start_step: int):
        SummaryWriter = import_tensorboard()
        # purge_step drops events after the resumed step, like metrics.jsonl
        return SummaryWriter(log_dir=str(self.out_dir / "tensorboard"), purge_step=start_step or None)

    # ---- per step ----
    def update_bar(self, loss: float, lr: float, tokens_per_sec: Optional[float]) -> None:
        if self.bar is None:
            return
        postfix = {"loss": f"{loss:.4f}", "lr": f"{lr:.2e}"}
        if tokens_per_sec:
            postfix["tok/s"] = f"{tokens_per_sec:,.0f}"
        self.bar.set_postfix(postfix, refresh=False)
        self.bar.update(1)

    def log(self, step: int, metrics: dict, console: bool = True) -> None:
        if not self.is_main:
            return
        record = {"step": step, **{k: _finite_or_none(v) for k, v in metrics.items()}}
        with run_file(self.out_dir / METRICS_FILE):
            try:
                self.jsonl.write(json.dumps(record) + "\n")
                self.jsonl.flush()
            except OSError:
                self._drop_jsonl()
                raise
        if self.wandb_run is not None:
            self.wandb_run.log(metrics, step=step)
        if self.tensorboard is not None:
            for key, value in metrics.items():
                if isinstance(value, (int, float)):
                    self.tensorboard.add_scalar(key, value, step)
        if console:
            self.message(format_console_line(step, self.config.max_steps, metrics))

    def _drop_jsonl(self) -> None:
        """Close metrics.jsonl after a failed write without writing again: what the buffer still holds is lost
        (a resumed run drops the lines after its checkpoint anyway)."""
        try:
            self.jsonl.close()
        except OSError:
            pass
        self.jsonl = None

    def message(self, text: str) -> None:
        """A line on the console that does not break the progress bar."""
        if not self.is_main:
            return
        if self.bar is not None and not self.bar.disable:
            self.bar.write(text, file=sys.stderr)
        else:
            print(text, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.jsonl is not None:
            self.jsonl.close()
        if self.tensorboard is not None:
            self.tensorboard.close()
        if self.wandb_run is not None:
            self.wandb_run.finish()
        self.bar = self.jsonl = self.tensorboard = self.wandb_run = None


def import_wandb():
    try:
        import wandb
    except ImportError:
        raise LunarisError("wandb_project is set but the wandb package is not installed. Install it with "
                           "`pip install 'lunaris[wandb]'` (and `wandb login`, or WANDB_MODE=offline), or set "
                           "wandb_project: null to log to metrics.jsonl only.") from None
    return wandb


def import_tensorboard():
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise LunarisError("tensorboard: true but the tensorboard package is not installed. Install it with "
                           "`pip install 'lunaris[tensorboard]'`, or set tensorboard: false.") from None
    return SummaryWriter


def write_run_files(trainer) -> None:
    """config.yaml (the resolved config), run_info.json (versions, machine, layout) and the tokenizer, in out_dir."""
    cfg, info, out_dir = trainer.config, trainer.info, trainer.out_dir
    run_info = {
        "lunaris_version": lunaris.__version__,
        "git_commit": git_commit(),
        "torch_version": torch.__version__,
        "python_version": platform.python_version(),
        "device": device_name(info.device),
        "device_type": info.device.type,
        "world_size": info.world_size,
        "parallelism": trainer.parallelism,
        "dtype": DTYPE_NAMES[trainer.dtype],
        "compile_model": cfg.compile_model,
        "parameters": trainer.num_params,
        "flops_per_token": trainer.flops_per_token,
        "tokens_per_step": trainer.tokens_per_step,
        "train_data": str(trainer.train_dir),
        "val_data": str(trainer.val_dir) if trainer.val_dir else None,
        "resumed_from": str(trainer.resumed_from) if trainer.resumed_from else None,
        "start_step": trainer.step,
        "hostname": platform.node(),
        "command": sys.argv,
        "started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    with run_file(out_dir / "config.yaml"):
        atomic_write_text(out_dir / "config.yaml", yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    with run_file(out_dir / "run_info.json"):
        atomic_write_json(out_dir / "run_info.json", run_info)
    from lunaris.data import tokenizer_path
    from lunaris.data.chat_template import CONFIG_NAME
    tokenizer = tokenizer_path(cfg.data_dir)
    if tokenizer is not None and not (out_dir / "tokenizer.json").exists():
        with run_file(out_dir / "tokenizer.json"):
            atomic_write_text(out_dir / "tokenizer.json", Path(tokenizer).read_text(encoding="utf-8"))
        template = Path(tokenizer).parent / CONFIG_NAME  # the chat template belongs to the tokenizer
        if template.is_file():
            with run_file(out_dir / CONFIG_NAME):
                atomic_write_text(out_dir / CONFIG_NAME, template.read_text(encoding="utf-8"))


# Passes over the training data above which a run is warned: small corpora overfit (the validation loss rises while
# the training loss keeps falling); a few epochs are common and harmless.
MANY_EPOCHS = 4.0


def banner(trainer) -> list:
    """The lines a run starts with: model, batch, machine, precision, parallelism, where it starts, how many times
    it will see its data (and a warning when that is many), the memory a step needs (and a warning when it will
    not fit the device)."""
    cfg, info = trainer.config, trainer.info
    where = f"{info.world_size} x {device_name(info.device)}" if info.is_distributed else device_name(info.device)
    mode = {"single": "single process"}.get(trainer.parallelism, trainer.parallelism)
    start = (f"resuming from {trainer.resumed_from} at step {trainer.step}" if trainer.resumed_from
             else "starting at step 0")
    budget = f" or {cfg.max_train_seconds:g} s of training" if cfg.max_train_seconds else ""  # whichever comes first
    if getattr(trainer, "initialized_from", None):
        start += f" from {trainer.initialized_from}"
    lines = [f"lunaris train: {trainer.num_params / 1e6:.2f}M parameters, {trainer.tokens_per_step:,} tokens/step "
             f"({cfg.batch_size} x {trainer.seq_len} x accum {cfg.gradient_accumulation_steps} x {info.world_size} "
             f"proc), {where}, {DTYPE_NAMES[trainer.dtype]}, {mode}; {start} of {cfg.max_steps}{budget}; writing to "
             f"{trainer.out_dir}"]
    steps_per_epoch = trainer.loader.batches_per_epoch / cfg.gradient_accumulation_steps
    epochs = cfg.max_steps / steps_per_epoch
    data_tokens = trainer.loader.batches_per_epoch * cfg.batch_size * trainer.seq_len * info.world_size
    lines.append(f"data: {data_tokens:,} training tokens per epoch; {cfg.max_steps} steps = {epochs:.2f} epochs")
    if info.is_main:  # the estimate traces the step on fake tensors: once, where it is printed
        lines += run_memory_lines(cfg, info.device, trainer.dtype, trainer.parallelism, info.world_size)
    if epochs > MANY_EPOCHS and not budget:  # a time budget usually stops long before max_steps
        lines.append(f"warning: the run passes over its training data {epochs:.1f} times; with this little data the "
                     f"model will memorize it and the validation loss will rise. Prepare more text, or lower "
                     f"max_steps to about {int(MANY_EPOCHS * steps_per_epoch)} (watch val/loss, eval_interval).")
    return lines
