"""Lunaris: pre-train dense and mixture-of-collaborating-experts language models from scratch."""

__version__ = "0.1.0"

from lunaris.config import LunarisCodexConfig, TrainConfig, load_config  # noqa: E402
from lunaris.errors import CheckpointError, ConfigError, DataError, LunarisError  # noqa: E402
from lunaris.model import LunarisCodex  # noqa: E402
from lunaris.train.checkpoint import model_from_checkpoint  # noqa: E402

__all__ = ["LunarisCodex", "LunarisCodexConfig", "model_from_checkpoint", "TrainConfig", "load_config", "ConfigError",
           "DataError", "CheckpointError", "LunarisError", "__version__"]
