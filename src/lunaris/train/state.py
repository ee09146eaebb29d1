"""The trainer's own state in one object: everything a checkpoint holds besides the model and optimizer tensors.

`TrainState` holds the counters (step, bad_steps, tokens_seen, train_seconds) and the objects whose state is the
run's: the data loader (epoch and position in it), the GradScaler (fp16's loss scale) and, through capture/restore,
every rank's random generators. `state_dict()` builds the checkpoint's trainer part and `load_state_dict()` restores
it, each in one place; the keys are the checkpoint format the README documents ("Checkpoints and resume"):
scaler, step, epoch, data_state, rng, config, bad_steps, tokens_seen, train_seconds, world_size, lunaris_version.
"""

import random
from dataclasses import dataclass

import numpy as np
import torch

import lunaris
from lunaris.config import TrainConfig
from lunaris.train.checkpoint import capture_rng, restore_rng
from lunaris.train.distributed import gather_objects


@dataclass
class TrainState:
    config: TrainConfig
    loader: object                  # the TokenLoader: its position (epoch, batches consumed) is the data position
    scaler: torch.amp.GradScaler    # fp16's loss scale (a disabled scaler otherwise)
    rank: int = 0                   # this process, of world_size
    world_size: int = 1
    step: int = 0                   # optimizer steps completed
    bad_steps: int = 0              # consecutive steps with a non-finite loss or gradient (their update skipped)
    tokens_seen: int = 0            # training tokens over all processes
    train_seconds: float = 0.0      # time in steps only (no evaluation, no saving)

    def state_dict(self) -> dict:
        """The checkpoint's trainer part. Gathers every rank's generator states: a collective, call on every rank."""
        return {
            "scaler": self.scaler.state_dict(), "step": self.step, "epoch": int(self.loader.epoch),
            "data_state": self.loader.state_dict(), "rng": gather_objects(capture_rng()),
            "config": self.config.to_dict(), "bad_steps": self.bad_steps, "tokens_seen": self.tokens_seen,
            "train_seconds": self.train_seconds, "world_size": self.world_size, "lunaris_version": lunaris.__version__,
        }

    def load_state_dict(self, state: dict) -> None:
        """Continue where a checkpoint's trainer part left off: counters, loss scale, data position, generators.

        A key an older checkpoint lacks keeps its start value. A rank the saving run did not have (more processes
        now) gets fresh generators of its own. Restores the generators last: call it when nothing else will draw
        before training starts.
        """
        self.step = int(state.get("step", 0))
        self.bad_steps = int(state.get("bad_steps", 0))
        self.tokens_seen = int(state.get("tokens_seen", 0))
        self.train_seconds = float(state.get("train_seconds", 0.0))
        if state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        if state.get("data_state") is not None:
            self.loader.load_state_dict(state["data_state"])
        rng = state.get("rng") or []
        if self.rank < len(rng):
            restore_rng(rng[self.rank])
        else:
            torch.manual_seed(self.config.seed + self.rank + 1_000_003 * self.step)

    def seed(self) -> None:
        """A new run's generators: dropout differs across ranks (data order comes from the loader's own seed)."""
        seed = self.config.seed + self.rank
        random.seed(seed)
        np.random.seed(seed % 2**32)
        torch.manual_seed(seed)
