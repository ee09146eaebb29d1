"""Writing checkpoints: atomic saves, rotation, FSDP directories; and the generator states they carry.

What a checkpoint holds and how it is read (finding a run's newest, loading without running pickled code, the model
it describes) is `lunaris.checkpoints`; its names are re-exported here, where they used to live.

Every file is written to a hidden temporary name in `out_dir`, flushed to disk, then renamed
over its final name (`os.replace` is atomic), so a process killed at any moment leaves the previous
`latest_checkpoint.pt` intact and loadable. FSDP runs write `torch.distributed.checkpoint` directories
(`ckpt_<step>/`, every rank its shards, plus `trainer_state.pt`), under a temporary name renamed when every rank
has finished, and point the `latest_checkpoint` symlink at the newest. A save that fails (a full disk, on any rank)
deletes what it had written and raises on every rank; `resume_note` then says what the run resumes from.
"""

import os
import random
import re
import shutil
import time
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from lunaris.checkpoints import (
    LATEST_DIR,
    LATEST_FILE,
    TRAINER_STATE,
    _torch_load,
    checkpoint_step,
    clean_state_dict,
    find_latest,
    is_dcp_dir,
    load_checkpoint_file,
    numbered_checkpoints,
    read_trainer_state,
    resolve_checkpoint_path,
)
from lunaris.errors import CheckpointError
from lunaris.fileio import atomic_link, atomic_open, atomic_symlink, disk_problem, replace_dir
from lunaris.model import model_from_checkpoint
from lunaris.train.distributed import DistInfo, raise_together
from lunaris.train.optim import LAYOUT_KEYS

# Names that moved to lunaris.checkpoints (reading) and lunaris.model (model_from_checkpoint), importable from here
# as before; `_torch_load` is what the trainer's checkpointer reads an FSDP run's trainer_state.pt with.
__all__ = ["LATEST_DIR", "LATEST_FILE", "TRAINER_STATE", "_torch_load", "atomic_save", "capture_rng",
           "checkpoint_step", "clean_state_dict", "find_latest", "load_checkpoint_file", "model_from_checkpoint",
           "numbered_checkpoints", "prune_checkpoints", "read_trainer_state", "remove_stale_temporaries",
           "resolve_checkpoint_path", "restore_rng", "resume_note", "save_checkpoint", "save_distributed_checkpoint",
           "load_distributed_checkpoint", "optimizer_list", "optimizer_state_by_name", "with_layout_of"]

# Test hook: `LUNARIS_TEST_PAUSE_IN_SAVE=<step>:<seconds>` sleeps after the temporary file of that
# step's checkpoint is written and before it is renamed, so a test can kill the process mid-save.
_PAUSE_ENV = "LUNARIS_TEST_PAUSE_IN_SAVE"


# ---- random number generators -----------------------------------------------------------------------

def capture_rng() -> dict:
    """This process's generator states, in types `weights_only` loading accepts (tensors, ints, tuples)."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "gauss": float(gauss)},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def restore_rng(state: dict) -> None:
    random.setstate(_as_tuple(state["python"]))
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def _as_tuple(value):
    """random.setstate needs tuples; a round trip through some loaders can turn them into lists."""
    return tuple(_as_tuple(v) for v in value) if isinstance(value, (list, tuple)) else value


# ---- atomic file writes -------------------------------------------------------------------------------

def _maybe_pause(step: int) -> None:
    spec = os.environ.get(_PAUSE_ENV, "")
    if spec:
        at, seconds = spec.split(":")
        if int(at) == step:
            time.sleep(float(seconds))


def atomic_save(obj, path: Path, step: int = -1) -> None:
    """torch.save to a temporary file in the same directory, fsync, then rename over `path`."""
    with atomic_open(path, "wb", before_rename=lambda: _maybe_pause(step)) as f:
        torch.save(obj, f)


# ---- rotation ----------------------------------------------------------------------------------------

def prune_checkpoints(out_dir, keep_last: int) -> None:
    """Delete all but the newest `keep_last` numbered checkpoints (0 keeps all).

    `latest_checkpoint.pt` is a separate hard link, so it stays valid when its numbered twin goes.
    A DCP directory that `latest_checkpoint` points to is kept.
    """
    if keep_last <= 0:
        return
    protected = _latest_dir_target(Path(out_dir))
    for _, path in numbered_checkpoints(out_dir)[:-keep_last]:
        if path.is_dir():
            if protected is None or path.resolve() != protected:
                shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)


# What a write into a run directory leaves when it is killed, or cannot delete itself (a disk turned read-only):
# fileio's temporary names (`.NAME.tmp-<pid>`, `.NAME.tmp-old-<pid>`) and an FSDP save's `.ckpt_<step>.tmp/`
TEMPORARY = re.compile(r"^\.(.+\.tmp(-old)?-\d+|ckpt_\d+\.tmp)$")


def remove_stale_temporaries(out_dir) -> list:
    """Delete the temporary files and directories that writes into `out_dir` left behind; returns their names.
    Where that is not possible (a read-only directory), the run's write probe reports the directory."""
    out_dir = Path(out_dir)
    removed = []
    try:
        for path in out_dir.iterdir() if out_dir.is_dir() else ():
            if TEMPORARY.match(path.name):
                if path.is_dir() and not path.is_symlink():
                    shutil.rmtree(path)
                else:
                    path.unlink(missing_ok=True)
                removed.append(path.name)
    except OSError:
        pass
    return sorted(removed)


def _latest_dir_target(out_dir: Path) -> Optional[Path]:
    link = out_dir / LATEST_DIR
    return link.resolve() if link.is_symlink() and is_dcp_dir(link.resolve()) else None


# ---- saving -------------------------------------------------------------------------------------------

def save_checkpoint(state: dict, out_dir, step: int, keep_last: int, update_latest: bool = True) -> Path:
    """Write `ckpt_<step>.pt` atomically, point `latest_checkpoint.pt` at it, and rotate old ones."""
    out_dir = Path(out_dir)
    path = out_dir / f"ckpt_{step}.pt"
    atomic_save(state, path, step)
    if update_latest:
        atomic_link(path, out_dir / LATEST_FILE)
    prune_checkpoints(out_dir, keep_last)
    return path


def save_distributed_checkpoint(model, optimizer, trainer_state: dict, out_dir, step: int, keep_last: int,
                                update_latest: bool, info: DistInfo) -> Path:
    """FSDP: every rank writes its shards into `.ckpt_<step>.tmp/`; rank 0 renames it to `ckpt_<step>/`.

    Must be called on every rank (it contains collectives). When a write fails on any rank, rank 0 deletes the
    temporary directory and every rank raises: the failing ones their error, the others a LunarisError.
    """
    import torch.distributed as dist
    from torch.distributed.checkpoint import save as dcp_save
    from torch.distributed.checkpoint.state_dict import get_state_dict

    out_dir = Path(out_dir)
    final, temp = out_dir / f"ckpt_{step}", out_dir / f".ckpt_{step}.tmp"
    if info.is_main and temp.exists():
        shutil.rmtree(temp)
    dist.barrier()
    model_state, optim_state = get_state_dict(model, optimizer_list(optimizer))
    failure = None
    try:
        dcp_save({"model": model_state, "optimizer": optim_state}, checkpoint_id=str(temp),
                 storage_writer=_shard_writer(temp))
        if info.is_main:
            atomic_save(trainer_state, temp / TRAINER_STATE, step)
    except BaseException as exc:  # DCP's CheckpointException is a BaseException; it is raised on every rank
        failure = exc
    try:
        raise_together(failure, info)  # every rank's shards are on disk, or every rank raises
    except BaseException:
        if info.is_main:
            shutil.rmtree(temp, ignore_errors=True)
        raise
    failure = None
    if info.is_main:
        try:
            replace_dir(temp, final)  # the same step saved again (a stop right after resuming) replaces it
            if update_latest:
                atomic_symlink(final.name, out_dir / LATEST_DIR)
            prune_checkpoints(out_dir, keep_last)
        except BaseException as exc:
            failure = exc
    raise_together(failure, info)
    return final


def _shard_writer(path: Path):
    """DCP's file writer, except that a write failing for lack of space raises the disk's OSError itself.

    DCP hands a rank's failure to every rank pickled, which drops an exception's context, and torch.save (which
    writes DCP's tensors) turns the disk's OSError into a RuntimeError that keeps it only as context.
    """
    from torch.distributed.checkpoint import FileSystemWriter

    def raising_the_disk_error(method):
        def write(*args, **kwargs):
            try:
                return method(*args, **kwargs)
            except Exception as exc:
                problem = disk_problem(exc)
                if problem is None or problem is exc:
                    raise
                raise problem from None
        return write

    writer = FileSystemWriter(str(path))
    writer.write_data = raising_the_disk_error(writer.write_data)
    writer.finish = raising_the_disk_error(writer.finish)
    return writer


def resume_note(out_dir) -> tuple:
    """(what is safe in `out_dir`, what running the same command again does), in words for an error message."""
    out_dir = Path(out_dir)
    latest = find_latest(out_dir)
    if latest is None:
        return "No checkpoint was written yet.", "run the same command again: training starts from step 0"
    try:
        step = checkpoint_step(latest)
    except CheckpointError:
        return f"The newest checkpoint is {latest}.", "run the same command again: it resumes from there"
    name = next((path.name for at, path in numbered_checkpoints(out_dir) if at == step), latest.name)
    return (f"The newest complete checkpoint, {name} (step {step}), is intact.",
            f"run the same command again: it resumes from step {step}")


# ---- reading an FSDP directory into a sharded run; optimizer state between the two layouts -------------------

def optimizer_list(optimizer) -> list:
    """The torch optimizers behind the trainer's optimizer (a CombinedOptimizer's, in order, or itself): what
    torch.distributed.checkpoint's state-dict functions take."""
    return list(optimizer.optimizers.values()) if hasattr(optimizer, "optimizers") else [optimizer]


def load_distributed_checkpoint(model, optimizer, path) -> None:
    """Read an FSDP directory's model and optimizer shards into the sharded `model` and `optimizer`, resharded to
    this run's number of processes. Must be called on every rank (it contains collectives)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    optimizers = optimizer_list(optimizer)
    model_state, optim_state = get_state_dict(model, optimizers)
    tensors = {"model": model_state, "optimizer": optim_state}
    dcp.load(tensors, checkpoint_id=str(path))
    set_state_dict(model, optimizers, model_state_dict=tensors["model"], optim_state_dict=tensors["optimizer"])


def optimizer_state_by_name(model, optimizer, saved: dict) -> dict:
    """A whole-model file's optimizer state (torch's numbering: parameters counted 0, 1, ... through the groups of
    each optimizer; a CombinedOptimizer's under each optimizer's name) keyed by parameter name instead, the groups
    of every optimizer in one list: the layout of an FSDP directory's optimizer state. The numbers are this run's
    parameters in this run's group order (the same config builds the same groups)."""
    names = {id(p): name for name, p in model.named_parameters()}
    parts = [saved[name] for name in optimizer.optimizers] if hasattr(optimizer, "optimizers") else [saved]
    state, groups = {}, []
    for part, own in zip(parts, optimizer_list(optimizer)):
        number = {}
        for saved_group, own_group in zip(part["param_groups"], own.param_groups):
            number.update(zip(saved_group["params"], (names[id(p)] for p in own_group["params"])))
            groups.append({**saved_group, "params": [number[i] for i in saved_group["params"]]})
        state.update({number[i]: values for i, values in part["state"].items()})
    return {"state": state, "param_groups": groups}


def with_layout_of(optimizers: list, saved: dict) -> dict:
    """`saved` (name-keyed optimizer state) with each group's layout keys taken from this run's optimizers: a
    checkpoint of fused AdamW on whole tensors resumes FSDP's unfused AdamW on shards, and the other way round."""
    layout = [k for k in LAYOUT_KEYS if k != "params"]
    own = [group for optimizer in optimizers for group in optimizer.param_groups]
    groups = [{**group, **{k: mine[k] for k in layout if k in mine}} for group, mine in
              zip(saved["param_groups"], own)]
    return {**saved, "param_groups": groups + saved["param_groups"][len(groups):]}

