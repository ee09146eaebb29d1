"""Measure one training step's memory on this CPU, for tests/test_plan.py: run in a fresh process as
`python tests/measure_step_memory.py CONFIG [--key=value ...]`, prints JSON (bytes).

CPU tensors come from malloc; with MALLOC_MMAP_THRESHOLD_ set small (the test sets it) every tensor of more than a
few KiB is its own mapping, returned to the system when freed, so the resident set size follows the live tensors.
Linux's peak resident size (VmHWM) is reset before the step by writing 5 to /proc/self/clear_refs:

- total: VmHWM during a step after the first (the optimizer state exists) minus VmRSS before the model was built;
- activations: VmRSS when the backward pass starts (a hook on the loss) minus VmRSS before the forward pass.
"""

import gc
import json
import sys
from pathlib import Path

import torch

from lunaris import LunarisCodex, load_config
from lunaris.runtime import resolve_dtype
from lunaris.train import step as steps
from lunaris.train.optim import build_optimizer


def status(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(field)


def main(argv: list) -> None:
    config = load_config(argv[0], argv[1:])
    torch.manual_seed(0)
    dtype = resolve_dtype(config.dtype, torch.device("cpu"))
    gc.collect()
    before_model = status("VmRSS")
    model = LunarisCodex(config.model.sized())
    model.train()
    optimizer = build_optimizer(model, config, "cpu")
    T = config.model.max_seq_len
    x = torch.randint(0, config.model.vocab_size, (config.batch_size, T + 1))
    at_backward = []

    def forward(idx, targets):
        out = model(idx, targets)
        out.main_loss.register_hook(lambda grad: at_backward.append(status("VmRSS")))
        return out

    def step():
        steps.forward_backward(forward, x[:, :-1], x[:, 1:], 1.0, 1, dtype)
        steps.clip_gradients(model.parameters(), optimizer, config.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step()      # creates the optimizer state (and warms up the kernels' workspaces)
    gc.collect()
    before_step = status("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")   # VmHWM := VmRSS
    step()
    print(json.dumps({"total": status("VmHWM") - before_model, "activations": at_backward[-1] - before_step,
                      "before_step": before_step - before_model}))


if __name__ == "__main__":
    main(sys.argv[1:])
