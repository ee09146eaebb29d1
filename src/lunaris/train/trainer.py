"""The training loop: one process on a CPU up to many GPU nodes under torchrun, resumable exactly.

`train(config)` runs a whole training job; `Trainer` builds its parts and runs `_loop`, which reads top to
bottom: a step, the counters, logging, evaluation, checkpoints, the stop check. Each concern lives in its own
file: the step's arithmetic in step.py, the optimizers and schedule in optim.py, the trainer's own state (counters,
data position, loss scale, generators) in state.py, resuming and saving in checkpointer.py (single process, DDP
and FSDP behind one interface), held-out loss in evaluation.py, metric sinks in logging.py, SIGTERM/SIGINT in
signals.py, process groups and model wrapping in distributed.py. What a model needs around a step (MoC balancing,
IRL analysis) is the model's own hooks: nothing here names a layer type.

Exact resume: the checkpoint holds the data loader position and every generator's state, and each step
consumes exactly `gradient_accumulation_steps` batches, so a resumed run sees the batches and computes the
losses the uninterrupted run would have.
"""

import math
import os
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch

from lunaris import metrics
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
    is_peer_lost,
    no_sync_context,
    params_without_grad,
    peer_lost,
    raise_together,
    setup_distributed,
    stop_together,
    teardown_distributed,
    wrap_ddp,
)
from lunaris.train.evaluation import TaskEvaluator, held_out_sums, loss_and_perplexity, rank_batches, safe_exp
from lunaris.train.init_from import load_initial_weights
from lunaris.train.logging import RunLogger, banner, import_tensorboard, import_wandb, write_run_files
from lunaris.train.optim import apply_lr, build_optimizer, load_state_only, lr_at
from lunaris.train.signals import StopSignals
from lunaris.train.state import TrainState


@dataclass
class TrainResult:
    step: int                       # optimizer steps completed
    reason: str                     # "finished", "signal" (SIGTERM/SIGINT) or "already-finished"
    checkpoint: Optional[Path]      # the last checkpoint written (None if nothing was saved)
    last_metrics: dict = field(default_factory=dict)


class WrappedModel:
    """The model as the training step calls it: under DDP when several processes run it (FSDP is applied to the
    model itself, in place), then compiled (compile_model). Compilation happens, and can fail, at the first call;
    `eager` is the same model uncompiled, and `ddp` the DDP wrapper (None without DDP) for its no_sync and to be
    released before the process group is left."""

    def __init__(self, model: torch.nn.Module, ddp=None, compile_model: bool = False):
        self.ddp = ddp
        self.eager = ddp if ddp is not None else model
        self.call = torch.compile(self.eager) if compile_model else self.eager
        self.compile_pending = compile_model    # until the first step has run


class Trainer:
    """One training run. Construct (all setup, may raise LunarisError), then `run()`, then `close()`.

    `resume`: None resumes from out_dir's newest checkpoint if there is one; a path resumes from
    that checkpoint (file, DCP directory, or run directory); False starts from step 0.

    The model has two handles: `model`, the LunarisCodex itself (saved, evaluated, stepped by the optimizer), and
    `wrapped`, what the training step calls (DDP, torch.compile). The counters, data position, loss scale and
    generators are `state` (state.py), which is also the checkpoint's trainer part.
    """

    def __init__(self, config: TrainConfig, resume=None):
        self.config = cfg = config.validate()
        self.logger = self.loader = self.wrapped = None  # what close() releases, once they exist
        self.info = info = setup_distributed(cfg.device)
        self.signals = StopSignals(announce=info.is_main)
        try:
            self.out_dir = Path(cfg.out_dir)
            self.fsdp = cfg.parallelism == "fsdp" and info.is_distributed
            self.parallelism = "fsdp" if self.fsdp else ("ddp" if info.is_distributed else "single")
            self.dtype = resolve_dtype(cfg.dtype, info.device)
            enable_tf32(info.device)
            self.seq_len = cfg.model.max_seq_len
            self.peak_flops = peak_flops_per_device(info.device, cfg.peak_flops)
            self.checkpointer = Checkpointer(cfg, info, self.fsdp)
            self.train_dir, self.val_dir, self.tasks, saved = self._preflight(resume)
            # after the checkpoint is read: resumed on another number of processes, the accumulation may change
            self.tokens_per_step = cfg.batch_size * self.seq_len * cfg.gradient_accumulation_steps * info.world_size
            self.resumed_from = self.checkpointer.resume_path if saved is not None else None
            self.initialized_from = None  # init_from: what the weights came from (a line of the banner)
            torch.manual_seed(cfg.seed)  # identical initialization on every rank (FSDP shards assume it)
            model = LunarisCodex(cfg.model)
            self.flops_per_token, self.num_params = model.flops_per_token(self.seq_len), model.num_params()
            self.model = self._place(model, saved)
            self.hooks = self.model.training_hooks()  # model-specific work around each step (MoC balancing)
            self.optimizer = self._build_optimizer(saved)
            self.scaler = torch.amp.GradScaler(info.device.type, enabled=self.dtype == torch.float16)
            self.loader = self._build_loader()
            self.wrapped = self._wrap_model()
            self.state = TrainState(cfg, self.loader, self.scaler, info.rank, info.world_size)
            if saved is None:
                self.state.seed()
            else:
                self.state.load_state_dict(saved)  # generators last: nothing draws from here to the first step
            self.batches = iter(self.loader)       # from the restored data position
            self.val_batches = None                # read at the first evaluation
            self.start_step = self.state.step      # where this run's loop starts (its first step is logged)
            self.stopping = False                  # every rank agreed to stop after this step
            self.last_model_metrics: dict = {}
            with stop_together(info):  # rank 0 writes: a full disk stops every rank
                self.logger = RunLogger(cfg, self.out_dir, info.is_main, self.state.step, resumed=saved is not None)
                if info.is_main:
                    write_run_files(self)
        except BaseException:
            self.close()
            raise

    @property
    def step(self) -> int:
        """Optimizer steps completed (state.step)."""
        return self.state.step

    # ---- setup ------------------------------------------------------------------------------------------

    def _preflight(self, resume) -> tuple:
        """Checks that must fail before any training, on all ranks together.

        Returns (train_dir, val_dir, tasks, the checkpoint state to resume from or None).
        """
        from lunaris.data import check_vocab, resolve_data_dirs
        from lunaris.data.packing import check_windows
        cfg, info = self.config, self.info
        error, found = None, (None, None, None, None)
        try:
            train_dir, val_dir = resolve_data_dirs(cfg.data_dir, cfg.val_data_dir)
            self._fill_document_separator(train_dir)  # before the resume check, which compares model configs
            check_windows(train_dir, cfg.model)       # conversations: never cut, never seen together
            for directory in (train_dir, val_dir):
                if directory is not None:
                    check_vocab(directory, cfg.model.vocab_size)
            if info.is_main:  # first: what a killed or failed save left takes space the probe below may need
                ckpt.remove_stale_temporaries(self.out_dir)
            if info.is_main or self.fsdp:  # FSDP: every rank writes its own shards
                check_out_dir_writable(self.out_dir)
            if info.is_main:
                if cfg.wandb_project:
                    import_wandb()
                if cfg.tensorboard:
                    import_tensorboard()
            saved = self.checkpointer.load_state(resume)
            tasks = TaskEvaluator.build(cfg, info, self.out_dir)  # eval_tasks, read and tokenized (or None)
            found = (train_dir, val_dir, tasks, saved)
        except LunarisError as exc:
            error = exc
        raise_together(error, info)
        self.checkpointer.agree_on_step(found[3])
        return found

    def _fill_document_separator(self, train_dir: Path) -> None:
        """attention_mask: document with document_separator_id null: the training data's end-of-text id, from its
        manifest, set in the model config (so the checkpoint and the run's resolved config record it)."""
        from lunaris.data import read_manifest
        model = self.config.model
        if model.attention_mask != "document" or model.document_separator_id is not None:
            return
        manifest = read_manifest(train_dir)
        if manifest is None or manifest.get("eot_id") is None:
            raise ConfigError(f"model.attention_mask: document needs document_separator_id (the end-of-text token id "
                              f"that ends each document), and data_dir {train_dir} has no manifest that gives "
                              f"it; set model.document_separator_id.")
        model.document_separator_id = int(manifest["eot_id"])

    def _place(self, model: LunarisCodex, saved: Optional[dict]) -> LunarisCodex:
        """The checkpoint's weights (if resuming; else init_from's), then FSDP sharding or the move to this
        process's device."""
        if saved is not None:
            self.checkpointer.restore_model(model, saved)
        elif self.config.init_from:
            from lunaris.data import tokenizer_path
            self.initialized_from = load_initial_weights(model, self.config.init_from, tokenizer_path(self.train_dir))
        if self.fsdp:
            apply_fsdp(model, self.info)
        else:
            model.to(self.info.device)
        return model

    def _build_optimizer(self, saved: Optional[dict]):
        """The config's optimizer; resuming, the checkpoint's state with this config's hyperparameters."""
        optimizer = build_optimizer(self.model, self.config, self.info.device.type)
        if saved is not None:
            load_state_only(optimizer, lambda: self.checkpointer.restore_optimizer(self.model, optimizer, saved),
                            saved.get("optimizer"))
        return optimizer

    def _build_loader(self):
        from lunaris.data import ShardDataset, TokenLoader
        cfg, info = self.config, self.info
        return TokenLoader(
            ShardDataset(self.train_dir, self.seq_len), cfg.batch_size, rank=info.rank, world_size=info.world_size,
            seed=cfg.seed, num_workers=cfg.num_workers, pin_memory=cfg.pin_memory and info.device.type == "cuda",
            persistent_workers=cfg.persistent_workers, prefetch_factor=cfg.prefetch_factor)

    def _wrap_model(self) -> WrappedModel:
        """DDP (or FSDP, already applied), then torch.compile on top, keeping an eager fallback."""
        ddp = None
        if self.info.is_distributed and not self.fsdp:
            ddp = wrap_ddp(self.model, self.info, find_unused=self._has_unused_parameters())
        return WrappedModel(self.model, ddp, self.config.compile_model)

    def _has_unused_parameters(self) -> bool:
        generator = torch.Generator().manual_seed(0)  # the same probe batch on every rank
        x = torch.randint(0, self.config.model.vocab_size, (1, self.seq_len + 1), generator=generator)
        x = x.to(self.info.device)
        with autocast(self.info.device, self.dtype):
            unused = params_without_grad(self.model, x[:, :-1], x[:, 1:])
        flag = all_reduce_sum(torch.tensor([float(bool(unused))], device=self.info.device))
        if unused and self.info.is_main:
            print(f"note: {len(unused)} parameter(s) got no gradient in a probe step (e.g. {unused[0]}); DDP will "
                  f"look for unused parameters every step, which is slower.", file=sys.stderr)
        return bool(flag.item())

    # ---- one step ---------------------------------------------------------------------------------------

    def _next_batch(self):
        """The next training batch, read without touching the global torch generator.

        A DataLoader draws a base seed from it whenever an epoch's iterator starts, which happens at
        different steps in a resumed run than in an uninterrupted one; dropout must not see that.
        """
        with torch.random.fork_rng(devices=[]):
            return next(self.batches)

    def _accumulate(self, micro_batches: list, analyze: bool = False, progress: float = None) -> steps.StepLosses:
        """Forward/backward of every micro-batch; the first compiled call compiles, and if that fails, the step
        is redone eagerly after one warning. `progress` (the step over max_steps) goes to the model's hooks."""
        def run():
            steps.before_step(self.hooks, progress, all_reduce_sum)  # the model's hooks see this step's micro-batches
            wrapped = self.wrapped
            return steps.accumulate(wrapped.call, micro_batches, self.info.device, self.dtype, self.scaler,
                                    sync_context=lambda last: no_sync_context(wrapped.ddp, last),
                                    analysis=self.model.analysis() if analyze else None)
        if not self.wrapped.compile_pending:
            return run()
        try:
            return run()
        except Exception as exc:  # any compiler failure; a real model error reappears in eager mode
            warnings.warn(f"torch.compile failed ({describe_error(exc)}); training continues without "
                          f"compilation (compile_model: false hides this warning).", stacklevel=2)
            self.optimizer.zero_grad(set_to_none=True)
            ddp = self.wrapped.ddp
            if ddp is not None:  # a failed traced call may leave DDP's reducer mid-iteration
                ddp = wrap_ddp(self.model, self.info, find_unused=ddp.find_unused_parameters)
            self.wrapped = WrappedModel(self.model, ddp)
            return run()
        finally:
            self.wrapped.compile_pending = False

    def train_step(self, step: int, analyze: bool = None) -> dict:
        """One optimizer step at index `step` (0-based). Returns floats averaged over ranks.

        `analyze` adds the model's analysis metrics (`model.analysis()`: IRL state gradient norms and update
        cosines); None: on log steps only.
        """
        cfg, device, world = self.config, self.info.device, self.info.world_size
        lr = lr_at(step, cfg, self.state.train_seconds)
        apply_lr(self.optimizer, lr)
        analyze = self._logs_after(step + 1) if analyze is None else analyze
        losses = self._accumulate([self._next_batch() for _ in range(cfg.gradient_accumulation_steps)], analyze,
                                  step / cfg.max_steps)
        self.last_model_metrics = losses.metrics
        norm = full_norm(steps.clip_gradients(self.model.parameters(), self.optimizer, cfg.grad_clip,
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
        return {metrics.LOSS_TOTAL: main + aux, metrics.LOSS_MAIN: main, metrics.LOSS_AUX: aux, metrics.LR: lr,
                metrics.GRAD_NORM: norm, "bad": bad}

    def request_stop(self, reason: str = "request") -> None:
        """Finish the current step, save, and return from run() (what SIGTERM/SIGINT do)."""
        self.signals.request(reason)

    # ---- the loop ---------------------------------------------------------------------------------------

    def run(self) -> TrainResult:
        if self.state.step >= self.config.max_steps:
            self.logger.message(f"{self.out_dir}: already at step {self.state.step} of max_steps "
                                f"{self.config.max_steps}; nothing to do (raise --max_steps to train further).")
            return TrainResult(self.state.step, "already-finished", self.resumed_from)
        if self._out_of_time():
            self.logger.message(f"{self.out_dir}: already {self.state.train_seconds:.1f} s of training, "
                                f"max_train_seconds is {self.config.max_train_seconds:g}; nothing to do (raise "
                                f"--max_train_seconds to train further).")
            return TrainResult(self.state.step, "already-finished", self.resumed_from)
        with self.signals:
            return self._loop()

    def _loop(self) -> TrainResult:
        cfg, state = self.config, self.state
        for line in banner(self):
            self.logger.message(line)
        saved_at, last_path = state.step if self.resumed_from else None, self.resumed_from
        interval_time, interval_tokens, last_metrics = 0.0, 0, {}
        done = False
        while not done:
            began = time.perf_counter()
            result = self.train_step(state.step)
            elapsed = self._agreed_seconds(time.perf_counter() - began)  # train_step ends with a host sync
            interval_time += elapsed
            state.train_seconds += elapsed
            state.step += 1
            state.tokens_seen += self.tokens_per_step
            interval_tokens += self.tokens_per_step
            self._count_bad_step(result)
            tokens_per_sec = interval_tokens / max(interval_time, 1e-9)
            self.logger.update_bar(result[metrics.LOSS_TOTAL], result[metrics.LR], tokens_per_sec)
            done = state.step >= cfg.max_steps or self._out_of_time()

            record = {}
            if self._logs_after(state.step) or done:
                record = self._train_metrics(result, tokens_per_sec)
                interval_time, interval_tokens = 0.0, 0
            if (self.val_dir is not None or self.tasks) and cfg.eval_interval > 0 and (
                    state.step % cfg.eval_interval == 0 or done):
                record.update(self.evaluate())
            if record:
                with stop_together(self.info):  # rank 0 writes: a full disk stops every rank
                    self.logger.log(state.step, record)
                last_metrics = record
            if state.step % cfg.save_interval == 0:
                last_path, saved_at = self.save(final=done or self.stopping), state.step
            if self.stopping:
                break
        reason = "signal" if self.stopping and not done else "finished"
        if saved_at != state.step:
            last_path = self.save(final=True)
        if reason == "signal":
            self.logger.message(f"stopped at step {state.step} on {self.signals.reason or 'request'}; resume with "
                                f"the same command (it continues from {last_path}).")
        else:
            self.logger.message(f"finished {state.step} steps; final checkpoint {last_path}")
        return TrainResult(state.step, reason, last_path, last_metrics)

    def _out_of_time(self) -> bool:
        """Whether the training-time budget (max_train_seconds) is spent."""
        budget = self.config.max_train_seconds
        return budget is not None and self.state.train_seconds >= budget

    def _agreed_seconds(self, elapsed: float) -> float:
        """A step's time as every process counts it: with a time budget and several processes, the mean over them
        (one small collective), so that all take the same learning rates and stop after the same step."""
        if self.config.max_train_seconds is None or self.info.world_size == 1:
            return elapsed
        total = all_reduce_sum(torch.tensor([elapsed], dtype=torch.float64, device=self.info.device))
        return total.item() / self.info.world_size

    def _logs_after(self, step: int) -> bool:
        """Whether the loop logs metrics once `step` steps are done: this run's first, every log_interval, the last."""
        return step % self.config.log_interval == 0 or step in (self.start_step + 1, self.config.max_steps)

    def _train_metrics(self, result: dict, tokens_per_sec: float) -> dict:
        """What a log step records: the step's losses, throughput, MFU and the model's metrics (a collective)."""
        record = {k: v for k, v in result.items() if k != "bad"}
        record[metrics.PERPLEXITY] = safe_exp(result[metrics.LOSS_MAIN])
        record[metrics.TOKENS_PER_SEC] = tokens_per_sec
        if self.peak_flops:
            record[metrics.MFU] = self.flops_per_token * tokens_per_sec / (self.peak_flops * self.info.world_size)
        reported = self.last_model_metrics  # the model's metrics of the last micro-batch, averaged over ranks
        if reported:
            keys = list(reported)  # the same keys in the same order on every rank (set by the model config)
            values = all_reduce_sum(torch.stack([reported[k].detach().float().reshape(()) for k in keys]))
            record.update(zip(keys, (values / self.info.world_size).tolist()))
        record[metrics.TOKENS_SEEN] = self.state.tokens_seen
        record[metrics.TRAIN_SECONDS] = self.state.train_seconds
        record[metrics.EPOCH] = int(self.loader.epoch)
        return record

    def _count_bad_step(self, result: dict) -> None:
        state = self.state
        if not result["bad"]:
            state.bad_steps = 0
            return
        state.bad_steps += 1
        self.logger.message(f"step {state.step}: non-finite loss or gradient (loss {result[metrics.LOSS_TOTAL]}, "
                            f"grad_norm {result[metrics.GRAD_NORM]}); update skipped ({state.bad_steps} in a row, "
                            f"limit {self.config.max_bad_steps}).")
        if state.bad_steps >= self.config.max_bad_steps:
            first = state.step - state.bad_steps + 1
            raise LunarisError(
                f"training stopped at step {state.step}: the loss or gradient was not finite for {state.bad_steps} "
                f"consecutive steps ({first}..{state.step}), so no update was applied since step {first - 1} (the "
                f"weights of the checkpoints in {self.out_dir} predate the problem). Try a lower learning_rate or "
                f"longer warmup_steps, grad_clip: 1.0, dtype: bf16 instead of fp16, and check the data "
                f"(`lunaris prepare` output, token ids below model.vocab_size); raise max_bad_steps to tolerate "
                f"more.")

    # ---- evaluation and checkpoints --------------------------------------------------------------------

    def evaluate(self) -> dict:
        """Token-mean cross-entropy over the held-out batches of every rank (dropless, eval mode); eval_tasks."""
        from lunaris.data import ShardDataset
        tasks = self.tasks(self.model, self.dtype) if self.tasks else {}
        if self.val_dir is None:
            return tasks
        if self.val_batches is None:
            self.val_batches = rank_batches(ShardDataset(self.val_dir, self.seq_len), self.config.batch_size,
                                            self.config.eval_batches, self.info.rank, self.info.world_size)
        # uncompiled: eval is rare, and a second compiled graph costs memory
        totals = all_reduce_sum(held_out_sums(self.model, self.val_batches, self.info.device, self.dtype))
        loss, perplexity = loss_and_perplexity(*totals.tolist()[:2])
        return {metrics.VAL_LOSS: loss, metrics.VAL_PERPLEXITY: perplexity, **tasks}

    def save(self, final: bool) -> Path:
        """Save on the right ranks; returns the checkpoint path. Called on every rank (the trainer state gathers
        every rank's generators: a collective)."""
        path = self.checkpointer.save(self.model, self.optimizer, self.state.state_dict(), self.state.step, final)
        self.logger.message(f"saved {path}")
        return path

    def close(self, clean_exit: bool = False) -> None:
        """Leave the process group first (every rank is in step right after the run's last collective, the final
        save), then release what is local: W&B's upload, say, may take a while and needs no peer."""
        self.signals.restore()
        try:
            teardown_distributed(clean_exit, self.info.rank,
                                 ddp=self.wrapped.ddp if getattr(self, "wrapped", None) is not None else None)
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
