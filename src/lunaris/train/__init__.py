"""Training: `lunaris train` (trainer.py), checkpoints, DDP/FSDP2 setup, LR schedule, logging."""

from lunaris.train.checkpoint import find_latest, load_checkpoint_file
from lunaris.train.trainer import Trainer, TrainResult, train

__all__ = ["TrainResult", "Trainer", "find_latest", "load_checkpoint_file", "train"]
