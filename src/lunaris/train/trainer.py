"""The training loop: one process on a CPU up to many GPU nodes under torchrun, resumable exactly.

`train(config)` runs a whole training job; `Trainer` builds its parts and runs `_loop`, which reads top to
bottom: a step, the counters, logging, evaluation, checkpoints, the stop check. Each concern lives in its own
file: the step's arithmetic in step.py, resuming and saving in checkpointer.py (single process, DDP and FSDP
behind one interface), held-out loss in evaluation.py, metric sinks in logging.py, SIGTERM/SIGINT in
signals.py, process groups and model wrapping in distributed.py.

Exact resume: the checkpoint holds the data loader position and every generator's state, and each step
consumes exactly `gradient_accumulation_steps` batches, so a resumed run sees the batches and computes the
losses the uninterrupted run would have.
"""

import math
import os
import random
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
import torch

import lunaris
from lunaris.config import TrainConfig
from lunaris.errors import ConfigError, LunarisError
from lunaris.model import LunarisCodex
from lunaris.runtime import autocast, enable_tf32, peak_flops_per_device, resolve_dtype
from lunaris.train import checkpoint as ckpt
from lunaris.train import step as steps
from lunaris.train.checkpointer import Checkpointer, check_out_dir_writable, describe_error
from lunaris.train.distributed import (
    PeerLostError,
    all_reduce_sum,
    apply_fsdp,
    full_norm,
    gather_objects,
    is_peer_lost,
    no_sync_context,
    params_without_grad,
    peer_lost,
    raise_together,
    release_ddp,
    setup_distributed,
    teardown_distributed,
    wrap_ddp,
)
from lunaris.train.evaluation import TaskEvaluator, held_out_sums, loss_and_perplexity, rank_batches, safe_exp
from lunaris.train.logging import RunLogger, banner, import_tensorboard, import_wandb, write_run_files
from lunaris.train.optim import apply_lr, build_optimizer, lr_at, restore_lr_scales
from lunaris.train.signals import StopSignals


@dataclass
class TrainResult:
    step: int                       # optimizer steps completed
    reason: str                     # "finished", "signal" (SIGTERM/SIGINT) or "already-finished"
    checkpoint: Optional[Path]      # the last checkpoint written (None if nothing was saved)
    last_metrics: dict = field(default_factory=dict)


class Trainer:
    """One training run. Construct (all setup, may raise LunarisError), then `run()`, then `close()`.

    `resume`: None resumes from out_dir's newest checkpoint if there is one; a path resumes from
    that checkpoint (file, DCP directory, or run directory); False starts from step 0.
    """

    def __init__(self, config: TrainConfig, resume=None):
        self.config = cfg = config.validate()
        self.logger = self.loader = None
        self.info = info = setup_distributed(cfg.device)
        self.signals = StopSignals(announce=info.is_main)
        try:
            self.out_dir = Path(cfg.out_dir)
            self.fsdp = cfg.parallelism == "fsdp" and info.is_distributed
            self.parallelism = "fsdp" if self.fsdp else ("ddp" if info.is_distributed else "single")
            self.dtype = resolve_dtype(cfg.dtype, info.device)
            enable_tf32(info.device)
            self.seq_len = cfg.model.max_seq_len
            self.tokens_per_step = cfg.batch_size * self.seq_len * cfg.gradient_accumulation_steps * info.world_size
            self.peak_flops = peak_flops_per_device(info.device, cfg.peak_flops)
            self.checkpointer = Checkpointer(cfg, info, self.fsdp)
            state = self._preflight(resume)
            self.resumed_from = self.checkpointer.resume_path if state is not None else None
            self._build_model_and_optimizer(state)
            self._build_data(state)
            self._wrap_model()
            self._restore_counters(state)
            self.stopping = False            # every rank agreed to stop after this step
            self.last_model_metrics: dict = {}
            self.logger = RunLogger(cfg, self.out_dir, info.is_main, self.step, resumed=state is not None)
            if info.is_main:
                write_run_files(self)
        except BaseException:
            self.close()
            raise

    # ---- setup ------------------------------------------------------------------------------------------

    def _preflight(self, resume) -> Optional[dict]:
        """Checks that must fail before any training, on all ranks together. Returns the resume state."""
        from lunaris.data import check_vocab, resolve_data_dirs
        cfg, info = self.config, self.info
        error, state = None, None
        try:
            self.train_dir, self.val_dir = resolve_data_dirs(cfg.data_dir, cfg.val_data_dir)
            self._fill_document_separator()  # before the resume check, which compares model configs
            for directory in (self.train_dir, self.val_dir):
                if directory is not None:
                    check_vocab(directory, cfg.model.vocab_size)
            if info.is_main or self.fsdp:  # FSDP: every rank writes its own shards
                check_out_dir_writable(self.out_dir)
            if info.is_main:
                if cfg.wandb_project:
                    import_wandb()
                if cfg.tensorboard:
                    import_tensorboard()
                ckpt.remove_stale_temporaries(self.out_dir)
            state = self.checkpointer.load_state(resume)
            self.tasks = TaskEvaluator.build(cfg, info, self.out_dir)  # eval_tasks, read and tokenized (or None)
        except LunarisError as exc:
            error = exc
        raise_together(error, info)
        self.checkpointer.agree_on_step(state)
        return state

    def _fill_document_separator(self) -> None:
        """attention_mask: document with document_separator_id null: the training data's end-of-text id, from its
        manifest, set in the model config (so the checkpoint and the run's resolved config record it)."""
        from lunaris.data import read_manifest
        model = self.config.model
        if model.attention_mask != "document" or model.document_separator_id is not None:
            return
        manifest = read_manifest(self.train_dir)
        if manifest is None or manifest.get("eot_id") is None:
            raise ConfigError(f"model.attention_mask: document needs document_separator_id (the end-of-text token id "
                              f"that ends each document), and data_dir {self.train_dir} has no manifest that gives "
                              f"it; set model.document_separator_id.")
        model.document_separator_id = int(manifest["eot_id"])

    def _build_model_and_optimizer(self, state: Optional[dict]) -> None:
        cfg, info = self.config, self.info
        torch.manual_seed(cfg.seed)  # identical initialization on every rank (FSDP shards assume it)
        model = LunarisCodex(cfg.model)
        self.flops_per_token = model.flops_per_token(self.seq_len)
        self.num_params = model.num_params()
        if state is not None:
            self.checkpointer.restore_model(model, state)
        if self.fsdp:
            apply_fsdp(model, info)
        else:
            model.to(info.device)
        self.raw_model = model
        self.hooks = model.training_hooks()
        self.optimizer = build_optimizer(model, cfg, info.device.type)
        if state is not None:
            self.checkpointer.restore_optimizer(model, self.optimizer, state)
            restore_lr_scales(self.optimizer, cfg)
        self.scaler = torch.amp.GradScaler(info.device.type, enabled=self.dtype == torch.float16)
        if state is not None and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])

    def _build_data(self, state: Optional[dict]) -> None:
        from lunaris.data import ShardDataset, TokenLoader
        cfg, info = self.config, self.info
        self.loader = TokenLoader(
            ShardDataset(self.train_dir, self.seq_len), cfg.batch_size, rank=info.rank, world_size=info.world_size,
            seed=cfg.seed, num_workers=cfg.num_workers, pin_memory=cfg.pin_memory and info.device.type == "cuda",
            persistent_workers=cfg.persistent_workers, prefetch_factor=cfg.prefetch_factor)
        if state is not None and state.get("data_state") is not None:
            self.loader.load_state_dict(state["data_state"])
        self.batches = iter(self.loader)
        self.val_batches = None  # read at the first evaluation

    def _wrap_model(self) -> None:
        """DDP (or FSDP, already applied), then torch.compile on top, keeping an eager fallback."""
        info = self.info
        self.ddp = None
        if info.is_distributed and not self.fsdp:
            self.ddp = wrap_ddp(self.raw_model, info, find_unused=self._has_unused_parameters())
        self.eager_model = self.ddp if self.ddp is not None else self.raw_model
        self.model = torch.compile(self.eager_model) if self.config.compile_model else self.eager_model
        self.compile_pending = self.config.compile_model  # compilation happens (and can fail) at the first step

    def _has_unused_parameters(self) -> bool:
        generator = torch.Generator().manual_seed(0)  # the same probe batch on every rank
        x = torch.randint(0, self.config.model.vocab_size, (1, self.seq_len + 1), generator=generator)
        x = x.to(self.info.device)
        with autocast(self.info.device, self.dtype):
            unused = params_without_grad(self.raw_model, x[:, :-1], x[:, 1:])
        flag = all_reduce_sum(torch.tensor([float(bool(unused))], device=self.info.device))
        if unused and self.info.is_main:
            print(f"note: {len(unused)} parameter(s) got no gradient in a probe step (e.g. {unused[0]}); DDP will "
                  f"look for unused parameters every step, which is slower.", file=sys.stderr)
        return bool(flag.item())

    def _restore_counters(self, state: Optional[dict]) -> None:
        cfg, info = self.config, self.info
        state = state or {}
        self.step = int(state.get("step", 0))
        self.start_step = self.step      # where this run's loop starts (its first step is logged)
        self.bad_steps = int(state.get("bad_steps", 0))
        self.tokens_seen = int(state.get("tokens_seen", 0))
        self.train_seconds = float(state.get("train_seconds", 0.0))  # in steps only (no eval, no saving)
        rng = state.get("rng") or []
        if not state:
            seed = cfg.seed + info.rank  # dropout differs across ranks; data order comes from the loader
            random.seed(seed)
            np.random.seed(seed % 2**32)
            torch.manual_seed(seed)
        elif info.rank < len(rng):
            ckpt.restore_rng(rng[info.rank])
        else:  # more processes than the run that saved: the new ranks get fresh seeds
            torch.manual_seed(cfg.seed + info.rank + 1_000_003 * self.step)

    # ---- one step ---------------------------------------------------------------------------------------

    def _next_batch(self):
        """The next training batch, read without touching the global torch generator.

        A DataLoader draws a base seed from it whenever an epoch's iterator starts, which happens at
        different steps in a resumed run than in an uninterrupted one; dropout must not see that.
        """
        with torch.random.fork_rng(devices=[]):
            return next(self.batches)

    def _accumulate(self, micro_batches: list, analyze: bool = False) -> steps.StepLosses:
        """Forward/backward of every micro-batch; the first compiled call compiles, and if that fails, the step
        is redone eagerly after one warning."""
        def run():
            steps.before_step(self.hooks)  # the model's hooks see this step's micro-batches only
            return steps.accumulate(self.model, micro_batches, self.info.device, self.dtype, self.scaler,
                                    sync_context=lambda last: no_sync_context(self.ddp, last),
                                    analysis=self.raw_model.analysis() if analyze else None)
        if not self.compile_pending:
            return run()
        try:
            return run()
        except Exception as exc:  # any compiler failure; a real model error reappears in eager mode
            warnings.warn(f"torch.compile failed ({describe_error(exc)}); training continues without "
                          f"compilation (compile_model: false hides this warning).", stacklevel=2)
            self.optimizer.zero_grad(set_to_none=True)
            if self.ddp is not None:  # a failed traced call may leave DDP's reducer mid-iteration
                self.ddp = wrap_ddp(self.raw_model, self.info, find_unused=self.ddp.find_unused_parameters)
                self.eager_model = self.ddp
            self.model = self.eager_model
            return run()
        finally:
            self.compile_pending = False

    def train_step(self, step: int, analyze: bool = None) -> dict:
        """One optimizer step at index `step` (0-based). Returns floats averaged over ranks.

        `analyze` adds the IRL analysis metrics (gradient hooks, update cosines); None: on log steps only.
        """
        cfg, device, world = self.config, self.info.device, self.info.world_size
        lr = lr_at(step, cfg)
        apply_lr(self.optimizer, lr)
        analyze = self._logs_after(step + 1) if analyze is None else analyze
        losses = self._accumulate([self._next_batch() for _ in range(cfg.gradient_accumulation_steps)], analyze)
        self.last_model_metrics = losses.metrics
        norm = full_norm(steps.clip_gradients(self.raw_model.parameters(), self.optimizer, cfg.grad_clip,
                                              self.scaler))
        # one collective: losses summed over ranks and "anyone asked to stop?"
        stop_vote = torch.full((), float(self.signals.requested), device=device)  # a fill kernel, no host copy
        shared = all_reduce_sum(torch.stack([losses.main.float(), losses.aux.float(), stop_vote]))
        main, aux, stop_votes, norm = torch.cat([shared, norm.reshape(1).float().to(device)]).tolist()  # host sync
        main, aux = main / world, aux / world
        loss_ok, norm_ok = math.isfinite(main + aux), math.isfinite(norm)
        steps.update(self.optimizer, loss_ok and norm_ok, self.scaler)
        steps.after_update(self.hooks, loss_ok and norm_ok, all_reduce_sum)  # the model's hooks (may be a collective)
        self.stopping = stop_votes > 0  # the same on every rank, unlike signals.requested
        bad = not loss_ok or (not norm_ok and not self.scaler.is_enabled())
        return {"loss/total": main + aux, "loss/main": main, "loss/aux": aux, "lr": lr, "grad_norm": norm, "bad": bad}

    def request_stop(self, reason: str = "request") -> None:
        """Finish the current step, save, and return from run() (what SIGTERM/SIGINT do)."""
        self.signals.request(reason)

    # ---- the loop ---------------------------------------------------------------------------------------

    def run(self) -> TrainResult:
        if self.step >= self.config.max_steps:
            self.logger.message(f"{self.out_dir}: already at step {self.step} of max_steps {self.config.max_steps}; "
                                f"nothing to do (raise --max_steps to train further).")
            return TrainResult(self.step, "already-finished", self.resumed_from)
        with self.signals:
            return self._loop()

    def _loop(self) -> TrainResult:
        cfg = self.config
        for line in banner(self):
            self.logger.message(line)
        start, saved_at, last_path = self.step, self.step if self.resumed_from else None, self.resumed_from
        self.start_step = start
        interval_time, interval_tokens, last_metrics = 0.0, 0, {}
        while self.step < cfg.max_steps:
            began = time.perf_counter()
            result = self.train_step(self.step)
            elapsed = time.perf_counter() - began  # train_step ends with a host sync: real time
            interval_time += elapsed
            self.train_seconds += elapsed
            self.step += 1
            self.tokens_seen += self.tokens_per_step
            interval_tokens += self.tokens_per_step
            self._count_bad_step(result)
            tokens_per_sec = interval_tokens / max(interval_time, 1e-9)
            self.logger.update_bar(result["loss/total"], result["lr"], tokens_per_sec)

            record = {}
            if self._logs_after(self.step):
                record = self._train_metrics(result, tokens_per_sec)
                interval_time, interval_tokens = 0.0, 0
            if (self.val_dir is not None or self.tasks) and cfg.eval_interval > 0 and (
                    self.step % cfg.eval_interval == 0 or self.step == cfg.max_steps):
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
            self.logger.message(f"stopped at step {self.step} on {self.signals.reason or 'request'}; resume with the "
                                f"same command (it continues from {last_path}).")
        else:
            self.logger.message(f"finished {self.step} steps; final checkpoint {last_path}")
        return TrainResult(self.step, reason, last_path, last_metrics)

    def _logs_after(self, step: int) -> bool:
        """Whether the loop logs metrics once `step` steps are done: this run's first, every log_interval, the last."""
        return step % self.config.log_interval == 0 or step in (self.start_step + 1, self.config.max_steps)

    def _train_metrics(self, result: dict, tokens_per_sec: float) -> dict:
        """What a log step records: the step's losses, throughput, MFU and the model's metrics (a collective)."""
        record = {k: v for k, v in result.items() if k != "bad"}
        record["perplexity"] = safe_exp(result["loss/main"])
        record["throughput/tokens_per_sec"] = tokens_per_sec
        if self.peak_flops:
            record["throughput/mfu"] = self.flops_per_token * tokens_per_sec / (self.peak_flops * self.info.world_size)
        metrics = self.last_model_metrics  # the model's metrics of the last micro-batch, averaged over ranks
        if metrics:
            keys = list(metrics)  # the same keys in the same order on every rank (set by the model config)
            values = all_reduce_sum(torch.stack([metrics[k].detach().float().reshape(()) for k in keys]))
            record.update(zip(keys, (values / self.info.world_size).tolist()))
        record["tokens_seen"] = self.tokens_seen
        record["time/train_seconds"] = self.train_seconds
        record["epoch"] = int(self.loader.epoch)
        return record

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

    # ---- evaluation and checkpoints --------------------------------------------------------------------

    def evaluate(self) -> dict:
        """Token-mean cross-entropy over the held-out batches of every rank (dropless, eval mode); eval_tasks."""
        from lunaris.data import ShardDataset
        tasks = self.tasks(self.raw_model, self.dtype) if self.tasks else {}
        if self.val_dir is None:
            return tasks
        if self.val_batches is None:
            self.val_batches = rank_batches(ShardDataset(self.val_dir, self.seq_len), self.config.batch_size,
                                            self.config.eval_batches, self.info.rank, self.info.world_size)
        # uncompiled: eval is rare, and a second compiled graph costs memory
        totals = all_reduce_sum(held_out_sums(self.raw_model, self.val_batches, self.info.device, self.dtype))
        loss, perplexity = loss_and_perplexity(*totals.tolist()[:2])
        return {"val/loss": loss, "val/perplexity": perplexity, **tasks}

    def save(self, final: bool) -> Path:
        """Save on the right ranks; returns the checkpoint path. Called on every rank."""
        state = {  # everything but the model and optimizer tensors (gathers every rank's RNG: a collective)
            "scaler": self.scaler.state_dict(), "step": self.step, "epoch": int(self.loader.epoch),
            "data_state": self.loader.state_dict(), "rng": gather_objects(ckpt.capture_rng()),
            "config": self.config.to_dict(), "bad_steps": self.bad_steps, "tokens_seen": self.tokens_seen,
            "train_seconds": self.train_seconds,
            "world_size": self.info.world_size, "lunaris_version": lunaris.__version__,
        }
        path = self.checkpointer.save(self.raw_model, self.optimizer, state, self.step, final)
        self.logger.message(f"saved {path}")
        return path

    def close(self, clean_exit: bool = False) -> None:
        """Leave the process group first (every rank is in step right after the run's last collective, the final
        save), then release what is local: W&B's upload, say, may take a while and needs no peer."""
        self.signals.restore()
        release_ddp(getattr(self, "ddp", None))
        try:
            teardown_distributed(clean_exit, self.info.rank)
        finally:
            if self.logger is not None:
                self.logger.close()
                self.logger = None
            if self.loader is not None and hasattr(self.loader, "close"):
                self.loader.close()


def train(config: TrainConfig, resume=None) -> TrainResult:
    """Run a training job to the end (or to a SIGTERM/SIGINT). See `Trainer` for `resume`.

    Under torchrun, a collective that fails because another process is gone becomes a PeerLostError (one line,
    no traceback) on every surviving rank, instead of a wait or a gloo/NCCL traceback.
    """
    try:
        trainer = Trainer(config, resume=resume)
        clean_exit = False
        try:
            result = trainer.run()
            clean_exit = True
            return result
        finally:
            trainer.close(clean_exit)
    except RuntimeError as exc:
        if int(os.environ.get("WORLD_SIZE", "1")) > 1 and is_peer_lost(exc):
            raise peer_lost(exc, int(os.environ.get("RANK", "0"))) from None
        raise


def run_cli(config_path, overrides=None, resume=None, no_resume: bool = False) -> int:
    """`lunaris train CONFIG [--key=value ...] [--resume PATH | --no-resume]`; returns the exit status.

    When another process of the run is gone, this one says so and exits at once (status 1): its process group may
    still hold a collective that will never complete, and the interpreter's own shutdown would wait for it.
    """
    from lunaris.config import load_config
    try:
        train(load_config(config_path, overrides), resume=False if no_resume else resume)
    except PeerLostError as exc:
        print(f"error: {exc}", file=sys.stderr, flush=True)
        sys.stdout.flush()
        os._exit(1)
    return 0
