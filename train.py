#!/usr/bin/env python
"""The classic entry point, kept working unchanged:

    torchrun --standalone --nproc_per_node=auto train.py train_config.yaml

It is `lunaris train train_config.yaml` (dense and MoC models alike; --key=value overrides and
--resume PATH / --no-resume work here too). Runs from a clone without installing the package.
"""

import sys
from pathlib import Path

try:
    import lunaris  # noqa: F401
except ImportError:  # a clone that was not pip-installed: use its src/ directly
    sys.path.insert(0, str(Path(__file__).resolve().parent / "src"))

from lunaris.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
