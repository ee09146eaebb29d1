#!/usr/bin/env python
"""The MoC entry point, kept working unchanged: the same trainer as train.py serves MoC and dense models.

    torchrun --standalone --nproc_per_node=auto train_moc.py train.yaml

It is `lunaris train train.yaml` (--key=value overrides and --resume PATH / --no-resume work here too),
and it runs train.py, so the two can never differ.
"""

import runpy
from pathlib import Path

if __name__ == "__main__":
    runpy.run_path(str(Path(__file__).resolve().with_name("train.py")), run_name="__main__")
