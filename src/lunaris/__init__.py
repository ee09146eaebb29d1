"""Lunaris: pre-train dense and mixture-of-collaborating-experts language models from scratch.

The public API below is imported on first use (`from lunaris import LunarisCodex` works as usual): importing
`lunaris` itself, as every `lunaris` command line does first, then costs nothing, and `lunaris --help` never loads
torch.
"""

import importlib
from typing import TYPE_CHECKING

__version__ = "0.1.0"

if TYPE_CHECKING:  # what editors and type checkers see; at run time, __getattr__ below imports on first use
    from lunaris.config import LunarisCodexConfig, TrainConfig, load_config
    from lunaris.errors import CheckpointError, ConfigError, DataError, LunarisError
    from lunaris.model import LunarisCodex, model_from_checkpoint

# public name -> the module that defines it
_API = {
    "LunarisCodex": "lunaris.model",
    "model_from_checkpoint": "lunaris.model",
    "LunarisCodexConfig": "lunaris.config",
    "TrainConfig": "lunaris.config",
    "load_config": "lunaris.config",
    "ConfigError": "lunaris.errors",
    "DataError": "lunaris.errors",
    "CheckpointError": "lunaris.errors",
    "LunarisError": "lunaris.errors",
}

__all__ = ["LunarisCodex", "LunarisCodexConfig", "model_from_checkpoint", "TrainConfig", "load_config", "ConfigError",
           "DataError", "CheckpointError", "LunarisError", "__version__"]


def __getattr__(name: str):
    if name in _API:
        value = getattr(importlib.import_module(_API[name]), name)
        globals()[name] = value  # the next access is a plain attribute
        return value
    raise AttributeError(f"module 'lunaris' has no attribute {name!r}")


def __dir__() -> list:
    return sorted(set(globals()) | set(_API))
