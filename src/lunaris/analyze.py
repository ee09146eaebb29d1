"""`lunaris analyze --checkpoint CKPT`: what the iterative reasoning (IRL) steps of a trained model do on held-out data.

Two measurements, on the batches `lunaris eval` reads (the same loader, the same loss):
- per layer and reasoning step t, the mean relative update norm |h_t - h_{t-1}| / |x| (and the cosine between
  successive updates), from the model's own IRL statistics over the evaluated batches; with irl_halting, the mean
  number of steps a token took in each layer (evaluation skips the steps of halted tokens);
- the validation loss if every IRL FFN (dense ReasoningFeedForward and MoC experts) stopped after s steps, for
  s = 1..S: the steps count of every IRL module is lowered for one evaluation and restored afterwards (the step
  scale alpha stays the trained one). s = S is the model as trained, so its loss is `lunaris eval`'s.
"""

import math
from contextlib import contextmanager
from pathlib import Path

import torch

from lunaris.errors import LunarisError
from lunaris.evaluate import evaluate, load_held_out
from lunaris.fileio import atomic_write_json
from lunaris.metrics import IRL_STEPS_TAKEN, IRL_UPDATE_COSINE, IRL_UPDATE_NORM, match, template_of
from lunaris.model.layers import ReasoningFeedForward
from lunaris.model.moc import MoCLayer


def irl_layers(model) -> list:
    """[(layer index, "dense" | "moc", the block's FFN, the module whose `steps` count the IRL steps)]."""
    found = []
    for index, block in enumerate(model.blocks):
        ffn = block.ffn
        if isinstance(ffn, ReasoningFeedForward):
            found.append((index, "dense", ffn, ffn))
        elif isinstance(ffn, MoCLayer):
            found.append((index, "moc", ffn, ffn.experts))
    return found


@contextmanager
def reasoning_steps(layers: list, steps: int):
    """Every IRL module (MoC shared experts included) runs at most `steps` reasoning steps; restored on exit."""
    modules = [module for _, _, _, module in layers]
    modules += [ffn.shared for _, _, ffn, _ in layers if getattr(ffn, "shared", None) is not None]
    saved = [(module, module.steps) for module in modules]
    try:
        for module, original in saved:
            module.steps = min(steps, original)
        yield
    finally:
        for module, original in saved:
            module.steps = original


@contextmanager
def recorded_irl_stats(layers: list):
    """{layer index: {metric: [() tensor per forward]}}: the IRL update norms, cosines and steps taken (halting) every
    block FFN returns."""
    recorded = {index: {} for index, _, _, _ in layers}
    handles = []

    def hook_for(index):
        def hook(module, inputs, output):
            for key, value in output[2].items():
                if template_of(key, (IRL_UPDATE_NORM, IRL_UPDATE_COSINE, IRL_STEPS_TAKEN)) is not None:
                    recorded[index].setdefault(key, []).append(value.detach().float())
        return hook

    for index, _, ffn, _ in layers:
        handles.append(ffn.register_forward_hook(hook_for(index)))
    try:
        yield recorded
    finally:
        for handle in handles:
            handle.remove()


def _by_step(metrics: dict, template: str, steps: int) -> list:
    """[mean value of step 1, ..., step S] (None where a step has no value) from {metric: [tensors]}, for the
    metrics named by `template` (lunaris.metrics, a name with {step})."""
    values = [None] * steps
    for key, tensors in metrics.items():
        numbers = match(template, key)
        if numbers is not None and 1 <= numbers["step"] <= steps:
            values[numbers["step"] - 1] = torch.stack(tensors).mean().item()
    return values


def analyze(model, dataset, batch_size: int, max_batches: int = None) -> dict:
    """The analysis of an eval-mode model on the first `max_batches` batches of a ShardDataset (JSON-ready)."""
    layers = irl_layers(model)
    steps = max((module.steps for _, _, _, module in layers), default=1)
    with recorded_irl_stats(layers) as recorded, model.analysis():   # the model as trained: S steps
        full = evaluate(model, dataset, batch_size, max_batches)
    losses = {steps: full}
    for s in range(1, steps):
        with reasoning_steps(layers, s):
            losses[s] = evaluate(model, dataset, batch_size, max_batches)
    per_layer = []
    if steps > 1:
        for index, kind, _, module in layers:
            taken = recorded[index].get(IRL_STEPS_TAKEN)
            per_layer.append({"layer": index, "kind": kind, "steps": module.steps,
                              "update_norm": _by_step(recorded[index], IRL_UPDATE_NORM, module.steps),
                              "update_cosine": _by_step(recorded[index], IRL_UPDATE_COSINE, module.steps),
                              "steps_taken": torch.stack(taken).mean().item() if taken else None})
    return {
        "reasoning_steps": steps,
        "layers": per_layer,
        "loss_by_steps": [{"steps": s, "loss": losses[s]["loss"], "perplexity": losses[s]["perplexity"]}
                          for s in range(1, steps + 1)],
        "loss": full["loss"], "tokens": full["tokens"], "batches": full["batches"],
    }


def run_analyze(checkpoint, data=None, max_batches: int = 20, batch_size: int = None, device: str = "auto",
                dtype: str = "auto", threads: int = None, json_path=None) -> dict:
    """Analyze a checkpoint (see the module docstring); returns (and optionally writes to `json_path`) the numbers."""
    if max_batches is not None and max_batches < 1:
        raise LunarisError(f"--batches must be a positive integer, got {max_batches}.")
    model, meta, data_dir, dataset, batch_size = load_held_out(checkpoint, data, batch_size, device, dtype, threads)
    result = {"checkpoint": meta["path"], "step": meta["step"], "data": str(data_dir),
              "seq_len": model.config.max_seq_len, "batch_size": batch_size,
              **analyze(model, dataset, batch_size, max_batches)}
    if json_path is not None:
        atomic_write_json(Path(json_path), result)
    return result


def _number(value, width: int = 9) -> str:
    return f"{value:>{width}.4f}" if value is not None and math.isfinite(value) else f"{'-':>{width}}"


def format_report(result: dict) -> str:
    """The tables `lunaris analyze` prints."""
    S = result["reasoning_steps"]
    lines = [f"{result['checkpoint']} (step {result['step']}) on {result['data']}: {result['batches']} batches, "
             f"{result['tokens']:,} target tokens"]
    if S == 1:
        lines.append("nothing to analyze: every FFN runs one reasoning step (model.n_reasoning_steps 1), so there "
                     "are no IRL steps to compare; the validation loss is below.")
    else:
        header = "layer  kind " + "".join(f"{f'step {t}':>9}" for t in range(1, S + 1))
        for title, key in (("relative update norm |h_t - h_t-1| / |x| (mean over batches)", "update_norm"),
                           ("cosine between successive updates h_t - h_t-1 and h_t-1 - h_t-2", "update_cosine")):
            lines += ["", title, header]
            for row in result["layers"]:
                values = row[key] + [None] * (S - len(row[key]))
                lines.append(f"{row['layer']:>5}  {row['kind']:<5}" + "".join(_number(v) for v in values))
        halting = [row for row in result["layers"] if row.get("steps_taken") is not None]
        if halting:
            lines += ["", f"mean reasoning steps a token took (irl_halting; at most {S})", "layer  kind     steps"]
            lines += [f"{row['layer']:>5}  {row['kind']:<5}{_number(row['steps_taken'])}" for row in halting]
    lines += ["", "validation loss if every IRL FFN stops after s steps", "    s      loss  perplexity  vs s=S"]
    final = result["loss"]
    for entry in result["loss_by_steps"]:
        s = entry["steps"]
        note = "  (as trained)" if s == S else ""
        lines.append(f"{s:>5}{_number(entry['loss'], 10)}{_number(entry['perplexity'], 12)}"
                     f"{entry['loss'] - final:>+8.4f}{note}")
    return "\n".join(lines)
