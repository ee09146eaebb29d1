"""Reading checkpoints: finding a run's newest, loading one without running pickled code, its config and weights.

Everything that reads a checkpoint (generation, evaluation, export, resuming a run) reads it here; writing them
(atomic saves, rotation, FSDP shards) is the trainer's business (lunaris.train.checkpoint). This module imports
only torch, the config and the errors, so the model package and every command can use it.

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

FSDP runs write `torch.distributed.checkpoint` (DCP) directories instead, since no single process
holds the full model: `ckpt_<step>/` with every rank's shards of {"model", "optimizer"} plus
`trainer_state.pt` (the keys above except model and optimizer), and `latest_checkpoint`, a symlink
to the newest directory. `load_checkpoint_file` reads either form into the plain dict above (for a DCP
directory it assembles the full model and optimizer state in memory; DCP's own `.metadata` file is
a pickle written by torch, so load only directories you made).
"""

import os
import re
from pathlib import Path
from typing import Optional

import torch

from lunaris.config import LunarisCodexConfig, model_config_from_dict
from lunaris.errors import CheckpointError

LATEST_FILE = "latest_checkpoint.pt"
LATEST_DIR = "latest_checkpoint"
TRAINER_STATE = "trainer_state.pt"
NUMBERED = re.compile(r"^ckpt_(\d+)(\.pt)?$")


def clean_state_dict(state_dict: dict) -> dict:
    """Drop the `module.` (DDP) and `_orig_mod.` (torch.compile) prefixes wrappers add to keys."""
    clean = {}
    for key, value in state_dict.items():
        key = key.replace("_orig_mod.", "")
        while key.startswith("module."):
            key = key[len("module."):]
        clean[key] = value
    return clean


# ---- finding ------------------------------------------------------------------------------------------

def is_dcp_dir(path: Path) -> bool:
    """A torch.distributed.checkpoint directory (an FSDP run's checkpoint), not a run directory."""
    return path.is_dir() and (path / ".metadata").is_file()


def numbered_checkpoints(out_dir) -> list:
    """[(step, path)] of `ckpt_<step>.pt` files and `ckpt_<step>/` DCP directories, oldest first."""
    out_dir = Path(out_dir)
    if not out_dir.is_dir():
        return []
    found = []
    for path in out_dir.iterdir():
        match = NUMBERED.match(path.name)
        if match and (path.is_file() if match.group(2) else is_dcp_dir(path)):
            found.append((int(match.group(1)), path))
    return sorted(found)


def checkpoint_step(path) -> int:
    """The step a checkpoint file or DCP directory was saved at (reads little: names, links, or an mmap)."""
    path = Path(path)
    if path.is_dir():
        match = NUMBERED.match(path.resolve().name)
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
        if latest.is_file() or is_dcp_dir(latest):
            try:
                candidates.append((checkpoint_step(latest), 1, latest))  # on a tie, prefer the latest link
            except CheckpointError:
                # unreadable: any numbered checkpoint wins; without one, loading it reports the damage
                # (rather than a silent restart from step 0 over the user's run)
                candidates.append((-1, 0, latest))
    return max(candidates)[2] if candidates else None


def resolve_checkpoint_path(path) -> Path:
    """A checkpoint file, DCP directory, or run directory (-> its newest checkpoint)."""
    path = Path(path)
    if path.is_dir() and not is_dcp_dir(path):
        latest = find_latest(path)
        if latest is None:
            raise CheckpointError(f"{path} is a directory without checkpoints (no latest_checkpoint.pt or "
                                  f"ckpt_<step>.pt). Pass a checkpoint file or the out_dir of a run that saved one.")
        return latest
    if not path.exists():
        raise CheckpointError(f"Checkpoint {path} does not exist. Pass the path of a ckpt_<step>.pt file, a "
                              f"latest_checkpoint.pt, or a run directory (out_dir) that contains one.")
    return path


def run_directory(checkpoint) -> Path:
    """The run directory (out_dir) a checkpoint path belongs to: the path itself if it is one, else its parent."""
    checkpoint = Path(checkpoint)
    return checkpoint if checkpoint.is_dir() and not is_dcp_dir(checkpoint) else checkpoint.parent


# ---- loading ------------------------------------------------------------------------------------------

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


def read_trainer_state(path) -> dict:
    """What a checkpoint holds besides its tensors (step, config, data position, ...), read without loading the
    weights: a file is memory-mapped, a DCP directory's trainer_state.pt read. `path` as for load_checkpoint_file."""
    path = resolve_checkpoint_path(path)
    return dict(_torch_load(path / TRAINER_STATE if path.is_dir() else path, mmap=True))


def _load_dcp_dir(path: Path, include_optimizer: bool = True) -> dict:
    """A DCP directory -> the plain checkpoint dict (full model, and optimizer state, in this process)."""
    # torch.distributed is imported only for an FSDP checkpoint: reading a file never pays for it
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


def read_model_checkpoint(path) -> tuple:
    """(checkpoint path, LunarisCodexConfig, model state dict) of a checkpoint, the optimizer state never read:
    what building the model it describes takes (`lunaris.model_from_checkpoint`)."""
    path = resolve_checkpoint_path(path)
    checkpoint = load_checkpoint_file(path, include_optimizer=False)
    model_dict = checkpoint["config"].get("model") if isinstance(checkpoint["config"], dict) else None
    if not isinstance(model_dict, dict):
        raise CheckpointError(f"checkpoint {path} has no model config (config['model']); pass a checkpoint "
                              f"written by `lunaris train`.")
    config: LunarisCodexConfig = model_config_from_dict(model_dict, source=f"model config in {path}")
    return path, config, checkpoint["model"]
