"""Where training metrics go: a tqdm bar, console lines, `metrics.jsonl`, W&B and TensorBoard.

Metric names are the same everywhere (DESIGN.md): `loss/total`, `loss/main`, `loss/aux`,
`perplexity`, `lr`, `grad_norm` (before clipping), `throughput/tokens_per_sec`, `throughput/mfu`,
`val/loss`, `val/perplexity`, plus whatever the model reports (`experts/util_layer{l}/e{i}`,
`experts/drop_rate_layer{l}`, `irl/update_norm_step{t}`). Only rank 0 writes anything.

`metrics.jsonl` holds one JSON object per logged step, e.g.
`{"step": 20, "loss/total": 5.91, "loss/main": 5.90, ..., "tokens_seen": 327680, "epoch": 0}`;
a value that is not finite is written as null. When a run resumes from step s, lines with
step > s (logged after that checkpoint by the interrupted run) are dropped first, so the file
reads as one uninterrupted run.
"""

import json
import math
import os
import sys
from pathlib import Path
from typing import Optional

import torch

from lunaris.errors import LunarisError

METRICS_FILE = "metrics.jsonl"
WANDB_ID_FILE = "wandb_run_id.txt"

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


def peak_flops_per_device(device: torch.device, configured: Optional[float]) -> Optional[float]:
    """`peak_flops` from the config, else the table entry for this GPU's name; None if unknown (e.g. CPU)."""
    if configured:
        return float(configured)
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return peak_flops_for_name(name)


def peak_flops_for_name(name: str) -> Optional[float]:
    for key, flops in GPU_PEAK_FLOPS:
        if key.lower() in name.lower():
            return flops
    return None


def _finite_or_none(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def format_console_line(step: int, max_steps: int, metrics: dict) -> str:
    parts = [f"step {step}/{max_steps}"]
    if "loss/total" in metrics:
        parts.append(f"loss {metrics['loss/total']:.4f}")
    if metrics.get("loss/aux"):
        parts.append(f"aux {metrics['loss/aux']:.4f}")
    if "lr" in metrics:
        parts.append(f"lr {metrics['lr']:.2e}")
    if "grad_norm" in metrics:
        parts.append(f"grad_norm {metrics['grad_norm']:.3f}")
    if "throughput/tokens_per_sec" in metrics:
        parts.append(f"{metrics['throughput/tokens_per_sec']:,.0f} tok/s")
    if "throughput/mfu" in metrics:
        parts.append(f"mfu {100 * metrics['throughput/mfu']:.1f}%")
    if "val/loss" in metrics:
        parts.append(f"val_loss {metrics['val/loss']:.4f}")
    return " | ".join(parts)


class RunLogger:
    """All metric sinks of one run. Constructed on every rank; only rank 0's does anything."""

    def __init__(self, config, out_dir: Path, is_main: bool, start_step: int, resumed: bool):
        self.config, self.out_dir, self.is_main = config, Path(out_dir), is_main
        self.bar = self.jsonl = self.wandb_run = self.tensorboard = None
        if not is_main:
            return
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
            os.replace(path, self.out_dir / "metrics.previous.jsonl")
            return
        kept = []
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                if json.loads(line).get("step", 0) <= start_step:
                    kept.append(line)
            except json.JSONDecodeError:
                continue  # a line cut short by a kill
        temp = path.with_name(f".{path.name}.tmp")
        temp.write_text("".join(f"{line}\n" for line in kept), encoding="utf-8")
        os.replace(temp, path)

    def _start_wandb(self, resumed: bool):
        wandb = import_wandb()
        id_file = self.out_dir / WANDB_ID_FILE
        run_id = id_file.read_text().strip() if resumed and id_file.exists() else wandb.util.generate_id()
        id_file.write_text(run_id)
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
        self.jsonl.write(json.dumps(record) + "\n")
        self.jsonl.flush()
        if self.wandb_run is not None:
            self.wandb_run.log(metrics, step=step)
        if self.tensorboard is not None:
            for key, value in metrics.items():
                if isinstance(value, (int, float)):
                    self.tensorboard.add_scalar(key, value, step)
        if console:
            self.message(format_console_line(step, self.config.max_steps, metrics))

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
