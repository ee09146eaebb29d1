"""Checkpoints: atomic writes, rotation, finding the newest, loading without running pickled code.

Layout of a run directory (`out_dir`)::

    ckpt_<step>.pt            numbered checkpoints, the last `keep_last` kept
    latest_checkpoint.pt      the newest one (a hard link to the numbered file when the filesystem allows)

A checkpoint file is a plain dict that `torch.load(path, weights_only=True)` loads (no pickled
classes, so loading one never runs code)::

    {"model":           state_dict of LunarisCodex, clean keys (never `module.` or `_orig_mod.`), fp32,
     "optimizer":       AdamW state_dict (param groups keep `name` and `lr_scale`),
     "scaler":          GradScaler state_dict ({} unless dtype fp16),
     "step":            optimizer steps completed (training resumes at this step),
     "epoch":           data epoch of the training loader,
     "data_state":      the training loader's state_dict (exact position in the token stream),
     "rng":             list indexed by rank of {"python", "numpy", "torch", "cuda"} generator states,
     "config":          TrainConfig as a plain dict; config["model"] is the model's dict,
     "bad_steps":       consecutive non-finite steps at save time,
     "tokens_seen":     training tokens consumed so far (all ranks),
     "train_seconds":   wall-clock seconds spent in training steps so far,
     "world_size":      processes of the run that wrote it,
     "lunaris_version": package version string}

Every file is written to a hidden temporary name in `out_dir`, flushed to disk, then renamed
over its final name (`os.replace` is atomic), so a process killed at any moment leaves the previous
`latest_checkpoint.pt` intact and loadable.

FSDP runs write `torch.distributed.checkpoint` (DCP) directories instead, since no single process
holds the full model: `ckpt_<step>/` with every rank's shards of {"model", "optimizer"} plus
`trainer_state.pt` (the keys above except model and optimizer), and `latest_checkpoint`, a symlink
to the newest directory. A directory is written under a temporary name and renamed when every rank
has finished. `load_checkpoint_file` reads either form into the plain dict above (for a DCP
directory it assembles the full model and optimizer state in memory; DCP's own `.metadata` file is
a pickle written by torch, so load only directories you made).
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

from lunaris.config import model_config_from_dict
from lunaris.errors import CheckpointError
from lunaris.fileio import atomic_link, atomic_open, atomic_symlink, replace_dir
from lunaris.model import LunarisCodex

LATEST_FILE = "latest_checkpoint.pt"
LATEST_DIR = "latest_checkpoint"
TRAINER_STATE = "trainer_state.pt"
_NUMBERED = re.compile(r"^ckpt_(\d+)(\.pt)?$")
# Test hook: `LUNARIS_TEST_PAUSE_IN_SAVE=<step>:<seconds>` sleeps after the temporary file of that
# step's checkpoint is written and before it is renamed, so a test can kill the process mid-save.
_PAUSE_ENV = "LUNARIS_TEST_PAUSE_IN_SAVE"


# ---- state dict keys --------------------------------------------------------------------------------

def clean_state_dict(state_dict: dict) -> dict:
    """Drop the `module.` (DDP) and `_orig_mod.` (torch.compile) prefixes wrappers add to keys."""
    clean = {}
    for key, value in state_dict.items():
        key = key.replace("_orig_mod.", "")
        while key.startswith("module."):
            key = key[len("module."):]
        clean[key] = value
    return clean


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


# ---- listing, rotation ------------------------------------------------------------------------------

def numbered_checkpoints(out_dir) -> list:
    """[(step, path)] of `ckpt_<step>.pt` files and `ckpt_<step>/` DCP directories, oldest first."""
    out_dir = Path(out_dir)
    if not out_dir.is_dir():
        return []
    found = []
    for path in out_dir.iterdir():
        match = _NUMBERED.match(path.name)
        if match and (path.is_file() if match.group(2) else _is_dcp_dir(path)):
            found.append((int(match.group(1)), path))
    return sorted(found)


def _is_dcp_dir(path: Path) -> bool:
    return path.is_dir() and (path / ".metadata").is_file()


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


def remove_stale_temporaries(out_dir) -> list:
    """Delete temporary files and directories left by a save that was killed; returns their names."""
    out_dir = Path(out_dir)
    removed = []
    if out_dir.is_dir():
        for path in out_dir.iterdir():
            if path.name.startswith((".ckpt_", f".{LATEST_FILE}.tmp", f".{LATEST_DIR}.tmp")) and ".tmp" in path.name:
                if path.is_dir() and not path.is_symlink():
                    shutil.rmtree(path, ignore_errors=True)
                else:
                    path.unlink(missing_ok=True)
                removed.append(path.name)
    return removed


def _latest_dir_target(out_dir: Path) -> Optional[Path]:
    link = out_dir / LATEST_DIR
    return link.resolve() if link.is_symlink() and _is_dcp_dir(link.resolve()) else None


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
                                update_latest: bool, rank: int) -> Path:
    """FSDP: every rank writes its shards into `.ckpt_<step>.tmp/`; rank 0 renames it to `ckpt_<step>/`.

    Must be called on every rank (it contains collectives).
    """
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    out_dir = Path(out_dir)
    final, temp = out_dir / f"ckpt_{step}", out_dir / f".ckpt_{step}.tmp"
    if rank == 0 and temp.exists():
        shutil.rmtree(temp)
    dist.barrier()
    model_state, optim_state = get_state_dict(model, optimizer)
    dcp.save({"model": model_state, "optimizer": optim_state}, checkpoint_id=str(temp))
    if rank == 0:
        atomic_save(trainer_state, temp / TRAINER_STATE, step)
    dist.barrier()  # every rank's shards are on disk
    if rank == 0:
        replace_dir(temp, final)  # the same step saved again (a stop right after resuming) replaces it
        if update_latest:
            atomic_symlink(final.name, out_dir / LATEST_DIR)
        prune_checkpoints(out_dir, keep_last)
    dist.barrier()
    return final


# ---- finding and loading --------------------------------------------------------------------------------

def checkpoint_step(path) -> int:
    """The step a checkpoint file or DCP directory was saved at (reads little: names, links, or an mmap)."""
    path = Path(path)
    if path.is_dir():
        match = _NUMBERED.match(path.resolve().name)
        if match:
            return int(match.group(1))
        return int(_torch_load(path / TRAINER_STATE, mmap=True)["step"])
    for step, numbered in numbered_checkpoints(path.parent):
        if numbered.is_file() and os.path.samefile(numbered, path):
            return step
    return int(_torch_load(path, mmap=True)["step"])


def find_latest(out_dir) -> Optional[Path]:
    """The newest checkpoint in `out_dir`: `latest_checkpoint.pt`/`latest_checkpoint` or a newer
    `ckpt_<step>` (when `save_latest_always` is off); None if there is none."""
    out_dir = Path(out_dir)
    candidates = [(step, 0, path) for step, path in numbered_checkpoints(out_dir)]
    for name in (LATEST_FILE, LATEST_DIR):
        latest = out_dir / name
        if latest.is_file() or _is_dcp_dir(latest):
            try:
                candidates.append((checkpoint_step(latest), 1, latest))  # on a tie, prefer the latest link
            except CheckpointError:
                # unreadable: any numbered checkpoint wins; without one, loading it reports the damage
                # (rather than a silent restart from step 0 over the user's run)
                candidates.append((-1, 0, latest))
    return max(candidates)[2] if candidates else None


def _torch_load(path: Path, mmap: bool = False) -> dict:
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"Checkpoint {path} does not exist. Pass the path of a ckpt_<step>.pt file, a "
                              f"latest_checkpoint.pt, or a run directory (out_dir) that contains one.")
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as exc:  # torch raises UnpicklingError, RuntimeError or EOFError depending on the damage
        text = str(exc).split("\n")[0]
        if "weights_only" in str(exc) or "Unsupported global" in str(exc):
            raise CheckpointError(
                f"Checkpoint {path} contains pickled Python objects, so it cannot be loaded safely with "
                f"weights_only=True ({text}). It was probably written by another trainer (e.g. the original "
                f"train.py). Lunaris only reads checkpoints that hold tensors and plain values.") from None
        raise CheckpointError(
            f"Checkpoint {path} cannot be read ({type(exc).__name__}: {text}). The file is truncated or "
            f"corrupt; use an older ckpt_<step>.pt from the same directory (pass it with --resume).") from None


def _load_dcp_dir(path: Path, include_optimizer: bool = True) -> dict:
    """A DCP directory -> the plain checkpoint dict (full model, and optimizer state, in this process)."""
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.default_planner import _EmptyStateDictLoadPlanner
    from torch.distributed.checkpoint.state_dict_loader import _load_state_dict

    state = dict(_torch_load(path / TRAINER_STATE))
    tensors: dict = {}
    try:  # `keys` (read only the model) is newer than torch 2.4's planner; without it everything is read
        planner = _EmptyStateDictLoadPlanner(keys=None if include_optimizer else {"model"})
    except TypeError:
        planner = _EmptyStateDictLoadPlanner()
    try:
        _load_state_dict(tensors, storage_reader=FileSystemReader(str(path)), planner=planner, no_dist=True)
    except Exception as exc:
        raise CheckpointError(f"Checkpoint directory {path} cannot be read ({type(exc).__name__}: {exc}). "
                              f"It is incomplete or corrupt; use an older ckpt_<step>/ directory.") from None
    state["model"] = clean_state_dict(tensors["model"])
    if include_optimizer:
        state["optimizer"] = tensors.get("optimizer", {})
    return state


def resolve_checkpoint_path(path) -> Path:
    """A checkpoint file, DCP directory, or run directory (-> its newest checkpoint)."""
    path = Path(path)
    if path.is_dir() and not _is_dcp_dir(path):
        latest = find_latest(path)
        if latest is None:
            raise CheckpointError(f"{path} is a directory without checkpoints (no latest_checkpoint.pt or "
                                  f"ckpt_<step>.pt). Pass a checkpoint file or the out_dir of a run that saved one.")
        return latest
    if not path.exists():
        raise CheckpointError(f"Checkpoint {path} does not exist. Pass the path of a ckpt_<step>.pt file, a "
                              f"latest_checkpoint.pt, or a run directory (out_dir) that contains one.")
    return path


def load_checkpoint_file(path, include_optimizer: bool = True) -> dict:
    """Load a checkpoint (file, DCP directory, or a run directory's newest) as the plain dict above, on CPU.

    `include_optimizer=False` (generation, evaluation, export) skips the optimizer state, which is
    twice the size of the model: a file is memory-mapped and its optimizer tensors never read, and
    a DCP directory's are not assembled; the dict then has no "optimizer" key.
    """
    path = resolve_checkpoint_path(path)
    if path.is_dir():
        state = _load_dcp_dir(path, include_optimizer)
    else:
        state = dict(_torch_load(path, mmap=not include_optimizer))
    if not include_optimizer:
        state.pop("optimizer", None)
    missing = [key for key in ("model", "step", "config") if key not in state]
    if missing:
        raise CheckpointError(f"{path} is not a Lunaris checkpoint: it lacks {', '.join(missing)}. "
                              f"Pass a file written by `lunaris train` (ckpt_<step>.pt or latest_checkpoint.pt).")
    state["model"] = clean_state_dict(state["model"])
    return state


def model_from_checkpoint(path, device="cpu") -> LunarisCodex:
    """Build the model a checkpoint describes and load its weights, in eval mode, on `device`.

    `path` is a checkpoint file (ckpt_<step>.pt, latest_checkpoint.pt), an FSDP checkpoint directory, or a run
    directory (its newest checkpoint). The optimizer state is never read. Raises CheckpointError for a missing or
    unreadable file, or weights that do not fit the config.
    """
    path = resolve_checkpoint_path(path)
    checkpoint = load_checkpoint_file(path, include_optimizer=False)
    model_dict = checkpoint["config"].get("model") if isinstance(checkpoint["config"], dict) else None
    if not isinstance(model_dict, dict):
        raise CheckpointError(f"checkpoint {path} has no model config (config['model']); pass a checkpoint "
                              f"written by `lunaris train`.")
    model = LunarisCodex(model_config_from_dict(model_dict, source=f"model config in {path}"))
    try:
        model.load_state_dict(checkpoint["model"])
    except RuntimeError as exc:
        detail = " ".join(str(exc).split())[:800]  # torch lists every missing/unexpected/mis-sized key
        raise CheckpointError(
            f"the weights in {path} do not fit the model config stored with them ({detail}). The file was "
            f"edited or written by another program; use a checkpoint saved by `lunaris train`.") from None
    return model.to(device).eval()
