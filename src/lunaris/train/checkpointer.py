"""The trainer's checkpointing: which checkpoint to resume from, restoring it, and saving, with single-process,
DDP and FSDP runs behind one interface.

The file formats and atomic writes are in checkpoint.py; this module decides what goes into them and who writes:
rank 0 alone writes a whole-model file (single process, DDP), every rank writes its shards (FSDP).

Any checkpoint resumes under any parallelism and number of processes: an FSDP run reads a torch.distributed
checkpoint directory resharded to its own world size (DCP does that), or a whole-model file, sharding it; a single
process or DDP reads a directory whole in every process (DCP's no-process-group load) or a file. The run then
writes what its own parallelism writes. A run resumed on another number of processes keeps the checkpoint's
global batch (`keep_global_batch`).
"""

import os
import sys
from contextlib import suppress
from pathlib import Path
from typing import Optional

from lunaris.errors import CheckpointError, LunarisError
from lunaris.fileio import disk_full_error, disk_problem
from lunaris.train import checkpoint as ckpt
from lunaris.train.distributed import DistInfo, gather_objects, raise_together


def check_out_dir_writable(out_dir: Path) -> None:
    """Create `out_dir` and write a probe file, so a bad path fails now rather than at the first save."""
    probe = out_dir / f".write-test-{os.getpid()}"
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        with open(probe, "wb") as f:
            f.write(b"ok")
            f.flush()
            os.fsync(f.fileno())
    except OSError as exc:
        raise LunarisError(f"out_dir {out_dir} is not writable ({exc.strerror or exc}): checkpoints and "
                           f"metrics could not be saved. Choose another out_dir (e.g. --out_dir=runs/my-run) or "
                           f"fix the directory's permissions and free space.") from None
    finally:
        with suppress(OSError):  # a full disk leaves no empty probe behind either
            probe.unlink(missing_ok=True)


def describe_error(exc: BaseException) -> str:
    """`Outer: Root: first line of the root cause` (compiler errors wrap the real one)."""
    root = exc
    while (inner := getattr(root, "inner_exception", None) or root.__cause__) is not None and inner is not root:
        root = inner
    text = (str(root).strip().split("\n") or [""])[0][:300]
    names = type(exc).__name__ if root is exc else f"{type(exc).__name__}: {type(root).__name__}"
    return f"{names}: {text}"


def keep_global_batch(config, state: dict, info: DistInfo, path: Path) -> None:
    """A run resumed on another number of processes than the checkpoint's keeps its global batch (batch_size x
    processes x gradient_accumulation_steps): a config whose global batch differs gets gradient_accumulation_steps
    = global / (batch_size x processes) (a note says so), or, when that does not divide, a CheckpointError naming
    the settings that do. Each step then trains on the samples the saving run's step would have (the loader's
    position is counted in samples). Resumed on the same number of processes, the config's batch stands."""
    saved, saved_world = state.get("config") or {}, int(state.get("world_size", info.world_size))
    if saved_world == info.world_size or "batch_size" not in saved:
        return
    target = int(saved["batch_size"]) * saved_world * int(saved.get("gradient_accumulation_steps", 1))
    per_micro_batch = config.batch_size * info.world_size
    if per_micro_batch * config.gradient_accumulation_steps != target:
        if target % per_micro_batch:
            raise global_batch_error(path, saved_world, target, config.batch_size, info.world_size)
        steps = target // per_micro_batch
        if info.is_main:
            print(f"note: resuming {saved_world}-process checkpoint {path.name} on {info.world_size} process(es): "
                  f"gradient_accumulation_steps {config.gradient_accumulation_steps} -> {steps}, keeping its global "
                  f"batch of {target} sequences ({config.batch_size} x {info.world_size} x {steps}).",
                  file=sys.stderr)
        config.gradient_accumulation_steps = steps
    # the loader's position in this run's micro-batches (when they divide the samples consumed: always, unless the
    # saving run stopped in a step that crossed an epoch's end; then the loader rounds down and says so)
    data = state.get("data_state") or {}
    consumed = int(data.get("batch_in_epoch", 0)) * int(data.get("batch_size", 0)) * int(data.get("world_size", 0))
    if data and consumed % per_micro_batch == 0:
        state["data_state"] = {**data, "batch_in_epoch": consumed // per_micro_batch,
                               "batch_size": config.batch_size, "world_size": info.world_size}


def global_batch_error(path: Path, saved_world: int, target: int, batch_size: int, world: int) -> CheckpointError:
    """Why a global batch of `target` sequences cannot be kept with `batch_size` on `world` processes, and which
    batch sizes and process counts would keep it."""
    batch_sizes = [b for b in range(1, target + 1) if target % (b * world) == 0]
    processes = [w for w in range(1, target + 1) if target % (batch_size * w) == 0]
    ways = [f"batch_size {' or '.join(map(str, batch_sizes))} on {world} process(es)"] if batch_sizes else []
    if processes:
        ways.append(f"batch_size {batch_size} on {' or '.join(map(str, processes))} process(es)")
    ways.append(f"the {saved_world} process(es) it was trained on")
    return CheckpointError(
        f"Checkpoint {path} was trained with a global batch of {target} sequences (batch_size x processes x "
        f"gradient_accumulation_steps), which batch_size {batch_size} x {world} process(es) does not divide, so "
        f"this run cannot continue it with the same batch. Resume it with {'; or '.join(ways)} "
        f"(gradient_accumulation_steps is set to match); or start a new run with --no-resume.")


class Checkpointer:
    """Resume and save for one run in `out_dir`. Every method with collectives is called on every rank."""

    def __init__(self, config, info: DistInfo, fsdp: bool):
        self.config, self.info, self.fsdp = config, info, fsdp
        self.out_dir = Path(config.out_dir)
        self.resume_path: Optional[Path] = None

    # ---- resuming ----
    def choose(self, resume) -> Optional[Path]:
        """None/True: out_dir's newest checkpoint, if any; False: none (start at step 0); else that path."""
        if resume is False:
            latest = ckpt.find_latest(self.out_dir)
            if latest is not None and self.info.is_main:
                print(f"--no-resume: starting at step 0 although {self.out_dir} holds checkpoints "
                      f"(newest: {latest.name}); they will be replaced as this run saves.", file=sys.stderr)
            return None
        if resume is None or resume is True:
            return ckpt.find_latest(self.out_dir)
        return ckpt.resolve_checkpoint_path(resume)

    def load_state(self, resume) -> Optional[dict]:
        """The state to resume from (everything but an FSDP checkpoint's sharded tensors), checked against the
        config; None to start fresh. Raises CheckpointError for a checkpoint this run cannot continue."""
        self.resume_path = path = self.choose(resume)
        if path is None:
            return None
        if path.is_dir() and self.fsdp:  # the sharded tensors are read into the sharded model (restore_optimizer)
            state = ckpt._torch_load(path / ckpt.TRAINER_STATE)
        else:  # whole model and optimizer state in this process (a DCP directory assembled without a process group)
            state = ckpt.load_checkpoint_file(path)
        saved_model = (state.get("config") or {}).get("model") or {}
        current = self.config.model.__dict__
        differences = [f"model.{key}: checkpoint {saved_model.get(key)!r}, config {current[key]!r}"
                       for key in current if saved_model.get(key, current[key]) != current[key]]
        if differences:
            raise CheckpointError(f"Checkpoint {path} was trained with a different model than the config describes "
                                  f"({'; '.join(differences)}). Use the checkpoint's settings, or start a new run "
                                  f"with --no-resume or another out_dir.")
        keep_global_batch(self.config, state, self.info, path)
        return state

    def agree_on_step(self, state: Optional[dict]) -> None:
        """Every rank must resume from the same step (multi-node runs need out_dir on a shared filesystem)."""
        steps = gather_objects(-1 if state is None else int(state["step"]))
        if len(set(steps)) > 1:
            raise CheckpointError(f"Ranks found different checkpoints to resume from (steps by rank: {steps}). "
                                  f"out_dir {self.out_dir} must be on a filesystem every node sees, with the same "
                                  f"contents; or pass the same --resume PATH to every node.")

    def restore_model(self, model, state: dict) -> None:
        """Whole-model weights (a file, or a directory read whole), before any FSDP sharding; a directory's shards
        come with the optimizer in restore_optimizer."""
        if "model" in state:
            self._load_into(model.load_state_dict, ckpt.clean_state_dict(state["model"]), "model weights")

    def restore_optimizer(self, model, optimizer, state: dict) -> None:
        """The optimizer state (the model's too, for an FSDP run reading a directory), in whichever of the four
        (file or directory) x (sharded or whole) combinations this run and the checkpoint make."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict
        optimizers = ckpt.optimizer_list(optimizer)
        if self.resume_path.is_dir() and self.fsdp:
            self._load_into(lambda _: ckpt.load_distributed_checkpoint(model, optimizer, self.resume_path), None,
                            "model weights and optimizer state")
        elif self.resume_path.is_dir():   # name-keyed, whole: what DCP's state-dict functions take
            saved = ckpt.with_layout_of(optimizers, state["optimizer"])
            self._load_into(lambda s: set_optimizer_state_dict(model, optimizers, s), saved, "optimizer state")
        elif self.fsdp:                   # a whole-model file into a sharded model: keyed by name, then sharded
            saved = ckpt.with_layout_of(optimizers, ckpt.optimizer_state_by_name(model, optimizer, state["optimizer"]))
            options = StateDictOptions(full_state_dict=True)
            self._load_into(lambda s: set_optimizer_state_dict(model, optimizers, s, options=options), saved,
                            "optimizer state")
        else:
            self._load_into(optimizer.load_state_dict, state["optimizer"], "optimizer state")

    def _load_into(self, load, saved, what: str) -> None:
        try:
            load(saved)
        except (RuntimeError, ValueError, KeyError) as exc:
            raise CheckpointError(f"The {what} in {self.resume_path} do not fit this model ({describe_error(exc)}). "
                                  f"The checkpoint was written by another version of Lunaris or for another "
                                  f"architecture; start a new run with --no-resume or another out_dir.") from None

    # ---- saving ----
    def save(self, model, optimizer, trainer_state: dict, step: int, final: bool) -> Path:
        """Write the checkpoint of `step` (model, optimizer and `trainer_state`); returns its path.

        A write that fails (a full disk, on any rank) raises a LunarisError on every rank, after the partly written
        checkpoint is deleted; the newest complete one stays as it was."""
        cfg = self.config
        update_latest = cfg.save_latest_always or final
        path, error = self.out_dir / (f"ckpt_{step}" if self.fsdp else f"ckpt_{step}.pt"), None
        try:
            if self.fsdp:
                ckpt.save_distributed_checkpoint(model, optimizer, trainer_state, self.out_dir, step,
                                                 cfg.keep_last, update_latest, self.info)
            elif self.info.is_main:
                state = {**trainer_state, "model": ckpt.clean_state_dict(model.state_dict()),
                         "optimizer": optimizer.state_dict()}
                ckpt.save_checkpoint(state, self.out_dir, step, cfg.keep_last, update_latest)
        except BaseException as exc:  # whatever the writer raised (torch's zip writer: a RuntimeError)
            error = self.save_failure(exc, path)
            if error is None:
                raise
        raise_together(error, self.info)  # also the barrier: no rank runs ahead of a failed save
        return path

    def save_failure(self, exc: BaseException, path: Path) -> Optional[LunarisError]:
        """The message for a checkpoint write that failed: a full disk, quota or read-only directory (any other
        OSError too); None for other errors (a bug, Ctrl-C), which keep their traceback."""
        if isinstance(exc, LunarisError) and disk_problem(exc) is None:
            return exc  # FSDP: another rank's write failed (its message is on that rank)
        kept, then = ckpt.resume_note(self.out_dir)
        if path.exists():  # the checkpoint is whole: what failed is the `latest_checkpoint` link to it
            path = self.out_dir / (ckpt.LATEST_DIR if self.fsdp else ckpt.LATEST_FILE)
        else:
            kept = f"What it had written was deleted. {kept}"
        error = disk_full_error(exc, f"checkpoint {path}", kept, then)
        if error is None and isinstance(exc, OSError):
            error = CheckpointError(f"could not write checkpoint {path} ({exc.strerror or exc}). {kept} Check "
                                    f"out_dir {self.out_dir} (or choose another), then {then}.")
        return error
