"""How many optimizer steps fill a wall-clock budget: time real training steps of the model, here.

`lunaris demo --minutes M` and a sweep's `budget: {seconds: S}` both turn a time into `max_steps` with
`calibrate_steps`. The steps are the trainer's own (`train_step`, with the config's optimizer, precision and
gradient accumulation) on random tokens of the run's shapes; the first ones are not timed (allocator, caches,
lazy initialisation), and the mean of the timed ones counts the occasional slow step the run will also have.
"""

import time

import torch

WARMUP_STEPS = 2     # not timed
MIN_TIMED_STEPS = 5  # timed, and until MIN_SECONDS have passed (more steps: a steadier mean on a busy machine)
MAX_TIMED_STEPS = 30
MIN_SECONDS = 1.0
MIN_STEPS = 20       # never fewer steps than this, however slow the step


def calibrate_steps(config, minutes: float, share: float = 0.85) -> int:
    """Optimizer steps that fill `share` of `minutes` (the rest: evaluation and checkpoints), from timing real
    training steps of this model, with this config's optimizer, here."""
    from lunaris.model import LunarisCodex
    from lunaris.runtime import resolve_device, resolve_dtype
    from lunaris.train.optim import build_optimizer
    from lunaris.train.step import train_step
    device = resolve_device(config.device)
    dtype = resolve_dtype(config.dtype, device)
    model = LunarisCodex(config.model.sized()).to(device)
    optimizer = build_optimizer(model, config, device.type)
    scaler = torch.amp.GradScaler(device.type) if dtype == torch.float16 else None  # as the trainer runs fp16
    x = torch.randint(0, config.model.vocab_size, (config.batch_size, config.model.max_seq_len), device=device)
    micro_batches = [(x, x)] * config.gradient_accumulation_steps

    def step():  # train_step returns floats: the device is synchronized when it returns
        train_step(model, optimizer, micro_batches, dtype, config.grad_clip, scaler)

    for _ in range(WARMUP_STEPS):
        step()
    timed, start = 0, time.perf_counter()
    while timed < MIN_TIMED_STEPS or (timed < MAX_TIMED_STEPS and time.perf_counter() - start < MIN_SECONDS):
        step()
        timed += 1
    per_step = (time.perf_counter() - start) / timed
    return max(MIN_STEPS, int(minutes * 60 * share / per_step))
