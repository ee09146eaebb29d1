"""`lunaris selftest`: a sanity run for a new machine (the original `python model_moc.py`).

Builds three tiny models with iterative reasoning (IRL, S = 2): dense, MoC with `mha` collaboration
and MoC with `simple` collaboration. Each trains a few steps on synthetic data whose next token is a
fixed function of the current one (the loss must fall), then generates a few tokens with the KV
cache. Also reports the device, torch version, and whether torch.compile and torch.distributed work.
Exit status 0 only if every model check passes (compile and distributed are reported, not required:
training falls back to eager and to one process without them).
"""

import contextlib
import dataclasses
import math
import os
import platform
import tempfile
import time
import traceback

import torch

from lunaris.config import LunarisCodexConfig
from lunaris.runtime import cpu_name, device_name, resolve_device
from lunaris.train.step import train_step

VOCAB, SEQ_LEN, BATCH = 64, 32, 8

MODELS = {
    "dense": dict(),
    "moc-mha": dict(n_experts=4, top_k=2, collab_mode="mha"),
    "moc-simple": dict(n_experts=4, top_k=2, collab_mode="simple"),
}


@dataclasses.dataclass
class CheckResult:
    name: str
    ok: bool
    detail: str


def tiny_config(**overrides) -> LunarisCodexConfig:
    base = dict(vocab_size=VOCAB, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=SEQ_LEN + 16,
                multiple_of=16, n_reasoning_steps=2, capacity_factor=1.25, simple_collab_dropout=0.0)
    base.update(overrides)
    return LunarisCodexConfig(**base)


def synthetic_batch(successor: torch.Tensor, generator: torch.Generator, device) -> tuple:
    """Sequences where token t+1 = successor[token t], from random starts: (x, y) of shape (BATCH, SEQ_LEN)."""
    tokens = torch.empty(BATCH, SEQ_LEN + 1, dtype=torch.long)
    tokens[:, 0] = torch.randint(0, VOCAB, (BATCH,), generator=generator)
    for t in range(SEQ_LEN):
        tokens[:, t + 1] = successor[tokens[:, t]]
    return tokens[:, :-1].to(device), tokens[:, 1:].to(device)


@contextlib.contextmanager
def one_cpu_thread(device: torch.device):
    """Tiny models on CPU run fastest on one thread (and far faster than many threads on a busy machine)."""
    threads = torch.get_num_threads()
    if device.type == "cpu":
        torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def check_model(name: str, overrides: dict, device: torch.device, steps: int) -> CheckResult:
    """Train `steps` AdamW steps with the trainer's step (loss must fall by 20%), then generate 8 tokens with the
    KV cache."""
    from lunaris.model import LunarisCodex
    try:
        torch.manual_seed(0)
        generator = torch.Generator().manual_seed(0)
        successor = torch.randperm(VOCAB, generator=generator)
        model = LunarisCodex(tiny_config(**overrides)).to(device)
        optimizer = model.configure_optimizers(weight_decay=0.0, learning_rate=3e-3, device_type=device.type)
        model.train()
        losses = []
        for _ in range(steps):
            losses.append(train_step(model, optimizer, [synthetic_batch(successor, generator, device)])["loss/main"])
        if not all(math.isfinite(v) for v in losses):
            return CheckResult(name, False, f"non-finite loss during training: {losses}")
        first, last = sum(losses[:2]) / 2, sum(losses[-2:]) / 2
        if not last < 0.8 * first:
            return CheckResult(name, False, f"loss did not fall: {first:.3f} -> {last:.3f} in {steps} steps")
        prompt = synthetic_batch(successor, generator, device)[0][:2, :4]
        sample = model.generate(prompt, max_new_tokens=8, temperature=0.0)
        if sample.shape != (2, 12) or not bool(((sample >= 0) & (sample < VOCAB)).all()):
            return CheckResult(name, False, f"generation returned {tuple(sample.shape)} tokens out of range")
        return CheckResult(name, True, f"loss {first:.2f} -> {last:.2f} in {steps} steps, generated 8 tokens, "
                                       f"{model.num_params() / 1e3:.0f}k params")
    except Exception as exc:  # a broken install shows up here: report it, keep checking the rest
        return CheckResult(name, False, f"{type(exc).__name__}: {exc}\n{traceback.format_exc(limit=3)}")


def check_compile(device: torch.device) -> str:
    """Compile a tiny function with the default (inductor) backend: available, or why not."""
    if not hasattr(torch, "compile"):
        return "unavailable (torch.compile needs torch >= 2.0)"
    start = time.perf_counter()
    try:
        fn = torch.compile(lambda a: torch.nn.functional.silu(a) * 2.0 + 1.0)
        a = torch.randn(16, device=device)
        if not torch.allclose(fn(a), torch.nn.functional.silu(a) * 2.0 + 1.0, atol=1e-5):
            return "BROKEN: compiled result differs from eager (training with compile_model: false is safe)"
    except Exception as exc:
        first_line = (str(exc).strip().splitlines() or [""])[0][:200]
        return f"unavailable ({type(exc).__name__}: {first_line}); compile_model: true falls back to eager"
    return f"available (inductor, first compile {time.perf_counter() - start:.1f} s)"


def check_distributed() -> str:
    """Which backends torch.distributed has, and whether a one-process gloo group can all-reduce."""
    import torch.distributed as dist
    if not dist.is_available():
        return "unavailable (this torch build has no torch.distributed): one process only"
    backends = [name for name, present in (("nccl", dist.is_nccl_available()), ("gloo", dist.is_gloo_available()))
                if present]
    detail = f"backends: {', '.join(backends) or 'none'}"
    if not dist.is_gloo_available() or dist.is_initialized():
        return detail
    with tempfile.TemporaryDirectory() as tmp:
        try:
            store = dist.FileStore(os.path.join(tmp, "store"), 1)
            dist.init_process_group("gloo", store=store, rank=0, world_size=1)
            value = torch.ones(2)
            dist.all_reduce(value)
            return f"{detail}; gloo all-reduce ok"
        except Exception as exc:
            return f"{detail}; gloo all-reduce FAILED ({type(exc).__name__}: {exc})"
        finally:
            if dist.is_initialized():
                dist.destroy_process_group()


def describe_device(device: torch.device) -> str:
    if device.type == "cuda":
        return f"cuda ({device_name(device)}, {torch.cuda.device_count()} visible)"
    if device.type == "cpu":
        return f"cpu ({cpu_name()}, {torch.get_num_threads()} threads)"
    return device.type


def run_selftest(device: str = "auto", steps: int = 30, compile_check: bool = True, out=print) -> int:
    """Run every check, print one line each; 0 when every model check passes, else 1."""
    start = time.perf_counter()
    resolved = resolve_device(device)
    out(f"lunaris selftest: torch {torch.__version__}, python {platform.python_version()}, "
        f"device {describe_device(resolved)}")
    results = []
    for name, overrides in MODELS.items():
        with one_cpu_thread(resolved):
            result = check_model(name, overrides, resolved, steps)
        results.append(result)
        out(f"  {'ok  ' if result.ok else 'FAIL'} {name:<11} {result.detail}")
    out(f"  compile      {check_compile(resolved) if compile_check else 'not checked (--no-compile)'}")
    out(f"  distributed  {check_distributed()}")
    failed = [r.name for r in results if not r.ok]
    elapsed = time.perf_counter() - start
    if failed:
        out(f"selftest FAILED ({', '.join(failed)}) in {elapsed:.1f} s")
        return 1
    out(f"selftest passed in {elapsed:.1f} s")
    return 0
