"""The training loop: one process on a CPU up to many GPU nodes under torchrun, resumable exactly.

`train(config)` runs a whole training job; `Trainer` holds its parts:

1. setup: process group and device, pre-flight checks (data vocabulary, writable out_dir, optional
   loggers, the checkpoint to resume from) that fail on every rank together before any step;
   the model (fp32 master weights), DDP or FSDP2, optional torch.compile, AdamW, the data loader;
   and, when resuming, every piece of state a checkpoint holds.
2. each step: `gradient_accumulation_steps` micro-batches (forward under autocast, backward,
   DDP gradient sync on the last one only), loss mean over ranks, gradient norm (logged before
   clipping), the update unless the loss or gradient is not finite, the LR schedule.
3. around the steps: logging, evaluation on fixed held-out batches, checkpoints, and a clean stop
   on SIGTERM/SIGINT (finish the step, save, exit 0; a second Ctrl-C aborts).

Exact resume: the checkpoint holds the data loader position and every generator's state, and each
step consumes exactly `gradient_accumulation_steps` batches, so a resumed run sees the batches and
computes the losses the uninterrupted run would have.
"""

import json
import math
import os
import platform
import random
import signal
import subprocess
import sys
import threading
import time
import warnings
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import yaml

import lunaris
from lunaris.config import TrainConfig
from lunaris.errors import CheckpointError, ConfigError, LunarisError
from lunaris.fileio import atomic_write_text
from lunaris.model import LunarisCodex
from lunaris.train import checkpoint as ckpt
from lunaris.train.distributed import (
    DistInfo,
    all_reduce_sum,
    apply_fsdp,
    full_norm,
    gather_objects,
    no_sync_context,
    params_without_grad,
    raise_together,
    setup_distributed,
    teardown_distributed,
    wrap_ddp,
)
from lunaris.train.logging import RunLogger, import_tensorboard, import_wandb, peak_flops_per_device
from lunaris.train.optim import apply_lr, build_optimizer, lr_at, restore_lr_scales

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}


@dataclass
class TrainResult:
    step: int                       # optimizer steps completed
    reason: str                     # "finished", "signal" (SIGTERM/SIGINT) or "already-finished"
    checkpoint: Optional[Path]      # the last checkpoint written (None if nothing was saved)
    last_metrics: dict = field(default_factory=dict)


# ---- precision ------------------------------------------------------------------------------------

def resolve_dtype(name: str, device: torch.device) -> Optional[torch.dtype]:
    """Autocast dtype for `dtype` on `device`; None means plain fp32."""
    if name == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return None  # CPU bf16 matmuls are slow without AVX-512 BF16; MPS autocast is young
    if device.type == "cuda" and name == "bf16" and not torch.cuda.is_bf16_supported():
        raise ConfigError(f"dtype is 'bf16' but {torch.cuda.get_device_name(device)} does not support bfloat16; "
                          f"use dtype: fp16 (with loss scaling) or auto.")
    if device.type != "cuda" and name == "fp16":
        raise ConfigError(f"dtype 'fp16' needs a CUDA GPU (it trains with a GradScaler); on {device.type} use "
                          f"dtype: bf16 or fp32.")
    if device.type == "mps" and name == "bf16":
        raise ConfigError("dtype 'bf16' is not supported on mps by Lunaris; use dtype: fp32 (or auto).")
    return DTYPES[name]


def enable_tf32(device: torch.device) -> None:
    """TF32 tensor cores for fp32 matmuls/convolutions on CUDA (weights stay fp32)."""
    if device.type == "cuda":
        torch.set_float32_matmul_precision("high")
        torch.backends.cudnn.allow_tf32 = True


# ---- pre-flight checks ------------------------------------------------------------------------------

def check_out_dir_writable(out_dir: Path) -> None:
    """Create `out_dir` and write a probe file, so a bad path fails now rather than at the first save."""
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        probe = out_dir / f".write-test-{os.getpid()}"
        with open(probe, "wb") as f:
            f.write(b"ok")
            f.flush()
            os.fsync(f.fileno())
        probe.unlink()
    except OSError as exc:
        raise LunarisError(f"out_dir {out_dir} is not writable ({exc.strerror or exc}): checkpoints and "
                           f"metrics could not be saved. Choose another out_dir (e.g. --out_dir=runs/my-run) or "
                           f"fix the directory's permissions and free space.") from None


def git_commit() -> Optional[str]:
    """The commit of the Lunaris source tree ("+dirty" if modified), or None if it is not a git checkout.

    The package's own files must be tracked: an installed copy inside some other repository (a
    virtualenv in a project directory) must not report that project's commit.
    """
    source = Path(lunaris.__file__).resolve().parent

    def git(*args) -> subprocess.CompletedProcess:
        return subprocess.run(["git", "-C", str(source), *args], capture_output=True, text=True, check=False,
                              timeout=10)

    try:
        if git("ls-files", "--error-unmatch", "__init__.py").returncode != 0:
            return None
        commit = git("rev-parse", "HEAD").stdout.strip()
        dirty = git("status", "--porcelain", "--untracked-files=no").stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return (commit + ("+dirty" if dirty else "")) if commit else None


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return platform.processor() or platform.machine() or device.type


def model_config_differences(saved: dict, current: dict) -> list:
    return [f"model.{key}: checkpoint {saved.get(key)!r}, config {current[key]!r}"
            for key in current if saved.get(key, current[key]) != current[key]]


class Trainer:
    """One training run. Construct (all setup, may raise LunarisError), then `run()`, then `close()`.

    `resume`: None resumes from out_dir's newest checkpoint if there is one; a path resumes from
    that checkpoint (file, DCP directory, or run directory); False starts from step 0.
    """

    def __init__(self, config: TrainConfig, resume=None):
        self.config = config.validate()
        self.logger = None
        self._old_handlers: dict = {}
        self.info: DistInfo = setup_distributed(config.device)
        try:
            self._setup(resume)
        except BaseException:
            self.close()
            raise

    # =========================================================================================
    # setup
    # =========================================================================================

    def _setup(self, resume) -> None:
        cfg, info = self.config, self.info
        self.out_dir = Path(cfg.out_dir)
        self.fsdp = cfg.parallelism == "fsdp" and info.is_distributed
        self.dtype = resolve_dtype(cfg.dtype, info.device)
        enable_tf32(info.device)
        self.seq_len = cfg.model.max_seq_len
        # stop_requested: this process got SIGTERM/SIGINT; stopping: every rank agreed to stop after this step
        self.stop_requested, self.stopping, self.stop_signal = False, False, None

        state = self._preflight(resume)
        self.resumed_from = self.resume_path if state is not None else None
        self._build_model_and_optimizer(state)
        self._build_data(state)
        self._wrap_model()
        self._restore_counters(state)
        self.logger = RunLogger(cfg, self.out_dir, info.is_main, self.step, resumed=state is not None)
        if info.is_main:
            self._write_run_info()
        self.peak_flops = peak_flops_per_device(info.device, cfg.peak_flops)
        self.tokens_per_step = cfg.batch_size * self.seq_len * cfg.gradient_accumulation_steps * info.world_size

    def _preflight(self, resume) -> Optional[dict]:
        """Checks that must fail before any training, on all ranks together. Returns the resume state."""
        from lunaris.data import check_vocab, resolve_data_dirs
        cfg, info = self.config, self.info
        error, state = None, None
        try:
            self.train_dir, self.val_dir = resolve_data_dirs(cfg.data_dir, cfg.val_data_dir)
            check_vocab(self.train_dir, cfg.model.vocab_size)
            if self.val_dir is not None:
                check_vocab(self.val_dir, cfg.model.vocab_size)
            if info.is_main or self.fsdp:  # FSDP: every rank writes its own shards
                check_out_dir_writable(self.out_dir)
            if info.is_main:
                if cfg.wandb_project:
                    import_wandb()
                if cfg.tensorboard:
                    import_tensorboard()
                ckpt.remove_stale_temporaries(self.out_dir)
            self.resume_path = self._choose_checkpoint(resume)
            if self.resume_path is not None:
                state = self._load_resume_state(self.resume_path)
        except LunarisError as exc:
            error = exc
        raise_together(error, info)
        self._agree_on_resume_step(state)
        return state

    def _choose_checkpoint(self, resume) -> Optional[Path]:
        if resume is False:
            latest = ckpt.find_latest(self.out_dir)
            if latest is not None and self.info.is_main:
                print(f"--no-resume: starting at step 0 although {self.out_dir} holds checkpoints "
                      f"(newest: {latest.name}); they will be replaced as this run saves.", file=sys.stderr)
            return None
        if resume is None or resume is True:
            return ckpt.find_latest(self.out_dir)
        return ckpt.resolve_checkpoint_path(resume)

    def _load_resume_state(self, path: Path) -> dict:
        """Everything but the sharded tensors of an FSDP checkpoint, checked against this config."""
        is_dcp = path.is_dir()
        if is_dcp != self.fsdp:
            written = "an FSDP run (a torch.distributed.checkpoint directory)" if is_dcp else "a DDP/single-process run"
            running = "parallelism: fsdp with several processes" if self.fsdp else "DDP or a single process"
            raise CheckpointError(f"Checkpoint {path} was written by {written}, but this run uses {running}. "
                                  f"Resume it with the same parallelism (and torchrun) it was trained with, or "
                                  f"start a new out_dir with --no-resume.")
        state = ckpt._torch_load(path / ckpt.TRAINER_STATE) if is_dcp else ckpt.load_checkpoint_file(path)
        saved_model = (state.get("config") or {}).get("model") or {}
        differences = model_config_differences(saved_model, self.config.model.__dict__)
        if differences:
            raise CheckpointError(f"Checkpoint {path} was trained with a different model than the config describes "
                                  f"({'; '.join(differences)}). Use the checkpoint's settings, or start a new run "
                                  f"with --no-resume or another out_dir.")
        return state

    def _agree_on_resume_step(self, state) -> None:
        """Every rank must resume from the same step (multi-node runs need out_dir on a shared filesystem)."""
        mine = -1 if state is None else int(state["step"])
        steps = gather_objects(mine)
        if len(set(steps)) > 1:
            raise CheckpointError(f"Ranks found different checkpoints to resume from (steps by rank: {steps}). "
                                  f"out_dir {self.out_dir} must be on a filesystem every node sees, with the same "
                                  f"contents; or pass the same --resume PATH to every node.")

    def _build_model_and_optimizer(self, state: Optional[dict]) -> None:
        cfg, info = self.config, self.info
        torch.manual_seed(cfg.seed)  # identical initialization on every rank (FSDP shards assume it)
        model = LunarisCodex(cfg.model)
        self.flops_per_token = model.flops_per_token(self.seq_len)
        self.num_params = model.num_params()
        if state is not None and not self.fsdp:
            self._load_into(model.load_state_dict, ckpt.clean_state_dict(state["model"]), "model weights")
        if self.fsdp:
            apply_fsdp(model, info)
        else:
            model.to(info.device)
        self.raw_model = model
        self.optimizer = build_optimizer(model, cfg, info.device.type)
        if state is not None:
            if self.fsdp:
                self._load_fsdp_tensors()
            else:
                self._load_into(self.optimizer.load_state_dict, state["optimizer"], "optimizer state")
            restore_lr_scales(self.optimizer, cfg)
        self.scaler = torch.amp.GradScaler(info.device.type, enabled=self.dtype == torch.float16)
        if state is not None and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])

    def _load_into(self, load, saved, what: str) -> None:
        try:
            load(saved)
        except (RuntimeError, ValueError, KeyError) as exc:
            raise CheckpointError(f"The {what} in {self.resume_path} do not fit this model ({_describe_error(exc)}). "
                                  f"The checkpoint was written by another version of Lunaris or for another "
                                  f"architecture; start a new run with --no-resume or another out_dir.") from None

    def _load_fsdp_tensors(self) -> None:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
        model_state, optim_state = get_state_dict(self.raw_model, self.optimizer)
        tensors = {"model": model_state, "optimizer": optim_state}
        dcp.load(tensors, checkpoint_id=str(self.resume_path))
        set_state_dict(self.raw_model, self.optimizer, model_state_dict=tensors["model"],
                       optim_state_dict=tensors["optimizer"])

    def _build_data(self, state: Optional[dict]) -> None:
        from lunaris.data import ShardDataset, TokenLoader
        cfg, info = self.config, self.info
        self.train_data = ShardDataset(self.train_dir, self.seq_len)
        self.loader = TokenLoader(
            self.train_data, cfg.batch_size, rank=info.rank, world_size=info.world_size, seed=cfg.seed,
            num_workers=cfg.num_workers, pin_memory=cfg.pin_memory and info.device.type == "cuda",
            persistent_workers=cfg.persistent_workers, prefetch_factor=cfg.prefetch_factor)
        if state is not None and state.get("data_state") is not None:
            self.loader.load_state_dict(state["data_state"])
        self.batches = iter(self.loader)
        self.val_batches = None  # materialized at the first evaluation

    def _wrap_model(self) -> None:
        """DDP (or FSDP, already applied), then torch.compile on top, keeping an eager fallback."""
        cfg, info = self.config, self.info
        self.ddp = None
        if info.is_distributed and not self.fsdp:
            self.ddp = wrap_ddp(self.raw_model, info, find_unused=self._has_unused_parameters())
        self.eager_model = self.ddp if self.ddp is not None else self.raw_model
        self.model = self.eager_model
        self.compile_pending = False
        if cfg.compile_model:
            self.model = torch.compile(self.eager_model)
            self.compile_pending = True  # compilation happens (and can fail) at the first forward

    def _has_unused_parameters(self) -> bool:
        generator = torch.Generator().manual_seed(0)  # the same probe batch on every rank
        x = torch.randint(0, self.config.model.vocab_size, (1, self.seq_len + 1), generator=generator)
        x = x.to(self.info.device)
        with self.autocast():
            unused = params_without_grad(self.raw_model, x[:, :-1], x[:, 1:])
        flag = all_reduce_sum(torch.tensor([float(bool(unused))], device=self.info.device))
        if unused and self.info.is_main:
            print(f"note: {len(unused)} parameter(s) got no gradient in a probe step (e.g. {unused[0]}); DDP will "
                  f"look for unused parameters every step, which is slower.", file=sys.stderr)
        return bool(flag.item())

    def _restore_counters(self, state: Optional[dict]) -> None:
        cfg, info = self.config, self.info
        if state is None:
            self.step, self.bad_steps, self.tokens_seen = 0, 0, 0
            seed = cfg.seed + info.rank  # dropout differs across ranks; data order comes from the loader
            random.seed(seed)
            np.random.seed(seed % 2**32)
            torch.manual_seed(seed)
            return
        self.step = int(state["step"])
        self.bad_steps = int(state.get("bad_steps", 0))
        self.tokens_seen = int(state.get("tokens_seen", 0))
        rng = state.get("rng") or []
        if info.rank < len(rng):
            ckpt.restore_rng(rng[info.rank])
        else:  # more processes than the run that saved: the new ranks get fresh seeds
            torch.manual_seed(cfg.seed + info.rank + 1_000_003 * self.step)

    def _write_run_info(self) -> None:
        from lunaris.data import tokenizer_path
        cfg, info = self.config, self.info
        text = yaml.safe_dump(cfg.to_dict(), sort_keys=False)
        atomic_write_text(self.out_dir / "config.yaml", text)
        run_info = {
            "lunaris_version": lunaris.__version__,
            "git_commit": git_commit(),
            "torch_version": torch.__version__,
            "python_version": platform.python_version(),
            "device": device_name(info.device),
            "device_type": info.device.type,
            "world_size": info.world_size,
            "parallelism": "fsdp" if self.fsdp else ("ddp" if info.is_distributed else "single"),
            "dtype": {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[self.dtype],
            "compile_model": cfg.compile_model,
            "parameters": self.num_params,
            "flops_per_token": self.flops_per_token,
            "tokens_per_step": cfg.batch_size * self.seq_len * cfg.gradient_accumulation_steps * info.world_size,
            "train_data": str(self.train_dir),
            "val_data": str(self.val_dir) if self.val_dir else None,
            "resumed_from": str(self.resumed_from) if self.resumed_from else None,
            "start_step": self.step,
            "hostname": platform.node(),
            "command": sys.argv,
            "started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        atomic_write_text(self.out_dir / "run_info.json", json.dumps(run_info, indent=2) + "\n")
        tokenizer = tokenizer_path(cfg.data_dir)
        if tokenizer is not None and not (self.out_dir / "tokenizer.json").exists():
            atomic_write_text(self.out_dir / "tokenizer.json", Path(tokenizer).read_text(encoding="utf-8"))

    # =========================================================================================
    # one step
    # =========================================================================================

    def autocast(self):
        if self.dtype is None:
            return nullcontext()
        return torch.autocast(device_type=self.info.device.type, dtype=self.dtype)

    def _micro_step(self, x, y, weight: float, sync: bool):
        """Forward under autocast and backward of one micro-batch; returns its detached (main, aux) losses.

        The loss is scaled by this micro-batch's share of the step's target tokens (main) and by
        1/accumulation (aux), so the gradient is the same whatever the batch/accumulation split.
        """
        with no_sync_context(self.ddp, sync):
            with self.autocast():
                out = self.model(x, y)
            loss = out.main_loss * weight + out.aux_loss / self.config.gradient_accumulation_steps
            self.scaler.scale(loss).backward()
        self.last_model_metrics = out.metrics
        return out.main_loss.detach() * weight, out.aux_loss.detach() / self.config.gradient_accumulation_steps

    def _first_micro_step_with_fallback(self, x, y, weight: float, sync: bool):
        """The first compiled call compiles; if that fails, warn once and continue eagerly."""
        try:
            result = self._micro_step(x, y, weight, sync)
        except Exception as exc:  # any compiler failure; a real model error reappears in eager mode
            warnings.warn(f"torch.compile failed ({_describe_error(exc)}); training continues "
                          f"without compilation (compile_model: false hides this warning).", stacklevel=2)
            self.optimizer.zero_grad(set_to_none=True)
            if self.ddp is not None:  # a failed traced call may leave DDP's reducer mid-iteration
                self.ddp = wrap_ddp(self.raw_model, self.info, find_unused=self.ddp.find_unused_parameters)
                self.eager_model = self.ddp
            self.model = self.eager_model
            result = self._micro_step(x, y, weight, sync)
        self.compile_pending = False
        return result

    def _next_batch(self):
        """The next training batch, read without touching the global torch generator.

        A DataLoader draws a base seed from it whenever an epoch's iterator starts, which happens at
        different steps in a resumed run than in an uninterrupted one; dropout must not see that.
        """
        with torch.random.fork_rng(devices=[]):
            return next(self.batches)

    def train_step(self, step: int) -> dict:
        """One optimizer step at index `step` (0-based). Returns floats averaged over ranks."""
        cfg, device = self.config, self.info.device
        accum = cfg.gradient_accumulation_steps
        lr = lr_at(step, cfg)
        apply_lr(self.optimizer, lr)
        micro_batches = [self._next_batch() for _ in range(accum)]          # each (x, y): (B, T) int64
        counts = [int((y != -1).sum()) for _, y in micro_batches]          # target tokens (CPU, no sync)
        total = max(sum(counts), 1)
        main = torch.zeros((), device=device)
        aux = torch.zeros((), device=device)
        for i, (x, y) in enumerate(micro_batches):
            x = x.to(device, non_blocking=True)
            y = y.to(device, non_blocking=True)
            sync, weight = i == accum - 1, counts[i] / total
            step_fn = self._first_micro_step_with_fallback if self.compile_pending else self._micro_step
            main_part, aux_part = step_fn(x, y, weight, sync)
            main += main_part
            aux += aux_part

        self.scaler.unscale_(self.optimizer)
        max_norm = cfg.grad_clip if cfg.grad_clip > 0 else float("inf")
        grad_norm = full_norm(torch.nn.utils.clip_grad_norm_(self.raw_model.parameters(), max_norm))
        # one collective: losses summed over ranks and "anyone asked to stop?"
        stop_vote = torch.full((), float(self.stop_requested), device=device)  # a fill kernel, no host copy
        shared = torch.stack([main.float(), aux.float(), stop_vote])
        all_reduce_sum(shared)
        values = torch.cat([shared, grad_norm.reshape(1).float().to(device)]).tolist()  # the one host sync
        world = self.info.world_size
        main_loss, aux_loss, stop_votes, norm = values[0] / world, values[1] / world, values[2], values[3]
        loss = main_loss + aux_loss
        loss_ok, norm_ok = math.isfinite(loss), math.isfinite(norm)

        if self.scaler.is_enabled():  # fp16: the scaler skips updates with inf/NaN gradients itself
            self.scaler.step(self.optimizer)
            self.scaler.update()
        elif loss_ok and norm_ok:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.stopping = stop_votes > 0  # the same on every rank, unlike stop_requested
        bad = not loss_ok or (not norm_ok and not self.scaler.is_enabled())
        return {"loss/total": loss, "loss/main": main_loss, "loss/aux": aux_loss, "lr": lr, "grad_norm": norm,
                "bad": bad}

    # =========================================================================================
    # evaluation
    # =========================================================================================

    def _held_out_batches(self) -> list:
        """This rank's held-out batches, read once: the first samples of the split in order, so every
        evaluation (and a resumed run's) sees the same ones. Every rank gets the same number of
        batches (FSDP runs a collective per forward)."""
        from lunaris.data import ShardDataset, sequential_batches
        cfg, info = self.config, self.info
        data = ShardDataset(self.val_dir, self.seq_len)
        B, W = cfg.batch_size, info.world_size
        # batches j = 0, 1, ... that the last rank also has (its j-th batch starts at (W-1)*B + j*B*W)
        common = max(0, math.ceil((len(data) - (W - 1) * B) / (B * W)))
        count = min(cfg.eval_batches, common)
        if count == 0:  # held-out split smaller than one global batch: every rank evaluates the same samples
            return [data.get_batch(range(min(B, len(data))))]
        return list(sequential_batches(data, B, rank=info.rank, world_size=W, max_batches=count))

    @torch.no_grad()
    def evaluate(self) -> dict:
        """Token-mean cross-entropy over the held-out batches of every rank (dropless, eval mode)."""
        if self.val_batches is None:
            self.val_batches = self._held_out_batches()
        model = self.raw_model  # uncompiled: eval is rare, and a second compiled graph costs memory
        model.eval()
        totals = torch.zeros(2, device=self.info.device, dtype=torch.float64)  # [CE sum, target tokens]
        for x, y in self.val_batches:
            x, y = x.to(self.info.device), y.to(self.info.device)
            with self.autocast():
                out = model(x, y)
            n = (y != -1).sum()
            totals += torch.stack([out.main_loss.double() * n, n.double()])
        model.train()
        all_reduce_sum(totals)
        ce_sum, tokens = totals.tolist()
        loss = ce_sum / max(tokens, 1.0)
        return {"val/loss": loss, "val/perplexity": _safe_exp(loss)}

    # =========================================================================================
    # checkpoints
    # =========================================================================================

    def _trainer_state(self) -> dict:
        """Everything except the model and optimizer tensors (collective: gathers every rank's RNG)."""
        rng = gather_objects(ckpt.capture_rng())
        return {
            "scaler": self.scaler.state_dict(),
            "step": self.step,
            "epoch": int(getattr(self.loader, "epoch", 0)),
            "data_state": self.loader.state_dict(),
            "rng": rng,
            "config": self.config.to_dict(),
            "bad_steps": self.bad_steps,
            "tokens_seen": self.tokens_seen,
            "world_size": self.info.world_size,
            "lunaris_version": lunaris.__version__,
        }

    def save(self, final: bool) -> Path:
        """Save on the right ranks; returns the checkpoint path. Called on every rank."""
        cfg = self.config
        update_latest = cfg.save_latest_always or final
        state = self._trainer_state()
        if self.fsdp:
            path = ckpt.save_distributed_checkpoint(self.raw_model, self.optimizer, state, self.out_dir, self.step,
                                                    cfg.keep_last, update_latest, self.info.rank)
        else:
            path = self.out_dir / f"ckpt_{self.step}.pt"
            error = None
            if self.info.is_main:
                state["model"] = ckpt.clean_state_dict(self.raw_model.state_dict())
                state["optimizer"] = self.optimizer.state_dict()
                try:
                    ckpt.save_checkpoint(state, self.out_dir, self.step, cfg.keep_last, update_latest)
                except OSError as exc:
                    error = CheckpointError(
                        f"could not write checkpoint {path} ({exc.strerror or exc}); the previous checkpoint in "
                        f"{self.out_dir} is intact. Free disk space (lower keep_last) or choose another out_dir, "
                        f"then restart the same command to resume.")
            raise_together(error, self.info)  # also the barrier: no rank runs ahead of a failed save
        self.logger.message(f"saved {path}")
        return path

    # =========================================================================================
    # signals
    # =========================================================================================

    def request_stop(self, reason: str = "request") -> None:
        """Finish the current step, save, and return from run() (what SIGTERM/SIGINT do)."""
        self.stop_requested, self.stop_signal = True, reason

    def _on_signal(self, signum, frame) -> None:
        name = signal.Signals(signum).name
        if signum == signal.SIGINT and self.stop_requested:
            raise KeyboardInterrupt  # second Ctrl-C: abort now (the last complete checkpoint stays)
        if not self.stop_requested and self.info.is_main:
            print(f"\n{name}: finishing the current step, saving a checkpoint, then exiting "
                  f"(Ctrl-C again to abort without saving).", file=sys.stderr, flush=True)
        self.request_stop(name)

    def _install_signal_handlers(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        for sig in (signal.SIGTERM, signal.SIGINT):
            self._old_handlers[sig] = signal.getsignal(sig)
            signal.signal(sig, self._on_signal)

    def _restore_signal_handlers(self) -> None:
        for sig, handler in self._old_handlers.items():
            signal.signal(sig, handler)
        self._old_handlers = {}

    # =========================================================================================
    # the loop
    # =========================================================================================

    def _should_log(self, step: int, start: int) -> bool:
        return step % self.config.log_interval == 0 or step == start + 1 or step == self.config.max_steps

    def _should_eval(self, step: int) -> bool:
        interval = self.config.eval_interval
        return self.val_dir is not None and interval > 0 and (step % interval == 0 or step == self.config.max_steps)

    def _model_metrics(self) -> dict:
        """The model's metrics of the last micro-batch, averaged over ranks (a collective on log steps)."""
        metrics = getattr(self, "last_model_metrics", None) or {}
        if not metrics:
            return {}
        keys = list(metrics)  # the same keys in the same order on every rank (set by the model config)
        values = torch.stack([metrics[k].detach().float().reshape(()) for k in keys])
        all_reduce_sum(values)
        return dict(zip(keys, (values / self.info.world_size).tolist()))

    def _banner(self) -> str:
        cfg, info = self.config, self.info
        where = f"{info.world_size} x {device_name(info.device)}" if info.is_distributed else device_name(info.device)
        dtype = {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[self.dtype]
        mode = "fsdp" if self.fsdp else ("ddp" if info.is_distributed else "single process")
        start = f"resuming from {self.resumed_from} at step {self.step}" if self.resumed_from else "starting at step 0"
        return (f"lunaris train: {self.num_params / 1e6:.2f}M parameters, {self.tokens_per_step:,} tokens/step "
                f"({cfg.batch_size} x {self.seq_len} x accum {cfg.gradient_accumulation_steps} x {info.world_size} "
                f"proc), {where}, {dtype}, {mode}; {start} of {cfg.max_steps}; writing to {self.out_dir}")

    def run(self) -> TrainResult:
        cfg = self.config
        if self.step >= cfg.max_steps:
            self.logger.message(f"{self.out_dir}: already at step {self.step} of max_steps {cfg.max_steps}; nothing "
                                f"to do (raise --max_steps to train further).")
            return TrainResult(self.step, "already-finished", self.resumed_from)
        self._install_signal_handlers()
        try:
            return self._loop()
        finally:
            self._restore_signal_handlers()

    def _loop(self) -> TrainResult:
        cfg = self.config
        self.logger.message(self._banner())
        start, saved_at, last_path = self.step, self.step if self.resumed_from else None, self.resumed_from
        interval_time, interval_tokens, last_metrics = 0.0, 0, {}
        while self.step < cfg.max_steps:
            began = time.perf_counter()
            result = self.train_step(self.step)
            elapsed = time.perf_counter() - began  # train_step ends with a host sync, so this is real time
            self.step += 1
            self.tokens_seen += self.tokens_per_step
            interval_time += elapsed
            interval_tokens += self.tokens_per_step
            self._count_bad_step(result)
            tokens_per_sec = interval_tokens / max(interval_time, 1e-9)
            self.logger.update_bar(result["loss/total"], result["lr"], tokens_per_sec)

            record = {}
            if self._should_log(self.step, start):
                record = {k: v for k, v in result.items() if k != "bad"}
                record["perplexity"] = _safe_exp(result["loss/main"])
                record["throughput/tokens_per_sec"] = tokens_per_sec
                if self.peak_flops:
                    record["throughput/mfu"] = (self.flops_per_token * tokens_per_sec
                                                / (self.peak_flops * self.info.world_size))
                record.update(self._model_metrics())
                record["tokens_seen"] = self.tokens_seen
                record["epoch"] = int(getattr(self.loader, "epoch", 0))
                interval_time, interval_tokens = 0.0, 0
            if self._should_eval(self.step):
                record.update(self.evaluate())
            if record:
                self.logger.log(self.step, record)
                last_metrics = record
            if self.step % cfg.save_interval == 0:
                last_path, saved_at = self.save(final=self.step == cfg.max_steps or self.stopping), self.step
            if self.stopping:
                break
        reason = "signal" if self.stopping and self.step < cfg.max_steps else "finished"
        if saved_at != self.step:
            last_path = self.save(final=True)
        if reason == "signal":
            self.logger.message(f"stopped at step {self.step} on {self.stop_signal or 'request'}; resume with the "
                                f"same command (it continues from {last_path}).")
        else:
            self.logger.message(f"finished {self.step} steps; final checkpoint {last_path}")
        return TrainResult(self.step, reason, last_path, last_metrics)

    def _count_bad_step(self, result: dict) -> None:
        if not result["bad"]:
            self.bad_steps = 0
            return
        self.bad_steps += 1
        self.logger.message(f"step {self.step}: non-finite loss or gradient (loss {result['loss/total']}, grad_norm "
                            f"{result['grad_norm']}); update skipped ({self.bad_steps} in a row, limit "
                            f"{self.config.max_bad_steps}).")
        if self.bad_steps >= self.config.max_bad_steps:
            first = self.step - self.bad_steps + 1
            raise LunarisError(
                f"training stopped at step {self.step}: the loss or gradient was not finite for {self.bad_steps} "
                f"consecutive steps ({first}..{self.step}), so no update was applied since step {first - 1} (the "
                f"weights of the checkpoints in {self.out_dir} predate the problem). Try a lower learning_rate or "
                f"longer warmup_steps, grad_clip: 1.0, dtype: bf16 instead of fp16, and check the data "
                f"(`lunaris prepare` output, token ids below model.vocab_size); raise max_bad_steps to tolerate "
                f"more.")

    # =========================================================================================
    # teardown
    # =========================================================================================

    def close(self, clean_exit: bool = False) -> None:
        self._restore_signal_handlers()
        if self.logger is not None:
            self.logger.close()
            self.logger = None
        loader = getattr(self, "loader", None)
        if loader is not None and hasattr(loader, "close"):
            loader.close()
        teardown_distributed(clean_exit)


def _describe_error(exc: BaseException) -> str:
    """`Outer: Root: first line of the root cause` (compiler errors wrap the real one)."""
    root = exc
    while (inner := getattr(root, "inner_exception", None) or root.__cause__) is not None and inner is not root:
        root = inner
    text = (str(root).strip().split("\n") or [""])[0][:300]
    names = type(exc).__name__ if root is exc else f"{type(exc).__name__}: {type(root).__name__}"
    return f"{names}: {text}"


def _safe_exp(value: float) -> float:
    try:
        return math.exp(value)
    except OverflowError:
        return float("inf")



def train(config: TrainConfig, resume=None) -> TrainResult:
    """Run a training job to the end (or to a SIGTERM/SIGINT). See `Trainer` for `resume`."""
    trainer = Trainer(config, resume=resume)
    clean_exit = False
    try:
        result = trainer.run()
        clean_exit = True
        return result
    finally:
        trainer.close(clean_exit)


def run_cli(config_path, overrides=None, resume=None, no_resume: bool = False) -> int:
    """`lunaris train CONFIG [--key=value ...] [--resume PATH | --no-resume]`; returns the exit status."""
    from lunaris.config import load_config
    config = load_config(config_path, overrides)
    train(config, resume=False if no_resume else resume)
    return 0
