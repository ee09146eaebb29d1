"""`lunaris demo`: the whole workflow on this machine in a few minutes, with no download.

1. corpus: the Python standard library's own source files (real code, present on every machine);
2. `lunaris prepare`: a byte-level BPE tokenizer and token shards with a validation split;
3. `lunaris train`: a small model (configs/demo-cpu.yaml; dense or MoC) for a few minutes;
4. `lunaris eval`: validation loss against the unigram baseline of the same tokens, and accuracy on the
   embedded task (python_next_line: pick a function's next line among four) against chance;
5. `lunaris generate`: a code sample from the prompt `def `;
6. `lunaris plot`: the loss curve.
Running it again resumes: the data is kept and training continues from the last checkpoint.
"""

import json
import sysconfig
import time
from pathlib import Path

import numpy as np

from lunaris.errors import LunarisError
from lunaris.fileio import atomic_write_json
from lunaris.tasks.embedded import HELD_OUT_GLOBS
from lunaris.train.calibrate import calibrate_steps  # importable as lunaris.demo.calibrate_steps too (its old home)

PRESET = Path(__file__).parent / "presets" / "demo-cpu.yaml"
# tests, vendored packages and generated tables (codec maps, pydoc topics) are not the code we want to model
EXCLUDE = ("test/*", "tests/*", "*/test/*", "*/tests/*", "idlelib/*", "lib2to3/*", "site-packages/*",
           "dist-packages/*", "turtledemo/*", "__pycache__/*", "encodings/*", "pydoc_data/*") + HELD_OUT_GLOBS
# (HELD_OUT_GLOBS: the packages the embedded task is built from, so that its functions are never trained on)
TASK_EXAMPLES = 400  # python_next_line examples scored after training (a standard error of about 0.02)


def stdlib_dir() -> Path:
    path = Path(sysconfig.get_paths()["stdlib"])
    if not path.is_dir():
        raise LunarisError(f"the Python standard library was not found at {path}; the demo builds its corpus "
                           f"from its source files. Run the demo with a regular CPython installation.")
    return path


def prepare_corpus(data_dir: Path, corpus_mb: float, vocab_size: int, seed: int, echo) -> dict:
    """Tokenizer + shards from the standard library (kept between runs: a finished data_dir is reused)."""
    from lunaris.data.prepare import PrepareOptions, prepare
    from lunaris.data.shards import read_manifest
    if (data_dir / "manifest.json").is_file():
        echo(f"[1/5] corpus: reusing {data_dir}")
        return read_manifest(data_dir)
    source = stdlib_dir()
    echo(f"[1/5] corpus: Python source files of {source} (about {corpus_mb:g} MB), tokenizer with {vocab_size} ids")
    tokens = int(corpus_mb * 1e6 / 3.2)  # ~3.2 bytes per token for code at this vocabulary size
    options = PrepareOptions(sources=[source], out=data_dir, vocab_size=vocab_size, include=("*.py",),
                             exclude=EXCLUDE, val_tokens=max(tokens // 40, 20_000), max_tokens=tokens,
                             shard_tokens=max(tokens // 4, 100_000), seed=seed,
                             tokenizer_sample_bytes=int(min(corpus_mb, 8) * 1e6), progress=False)
    return prepare(options, {"command": "lunaris demo"})


def unigram_baseline(data_dir: Path, vocab_size: int) -> float:
    """Cross-entropy (nats/token) on val/ of the best context-free model: train/ token frequencies (add-one)."""
    from lunaris.data.shards import list_shards, open_shard
    counts = np.ones(vocab_size, dtype=np.float64)
    for shard in list_shards(data_dir / "train"):
        counts += np.bincount(open_shard(shard), minlength=vocab_size)[:vocab_size]
    log_probs = np.log(counts / counts.sum())
    val = np.concatenate([np.asarray(open_shard(s)) for s in list_shards(data_dir / "val")])
    return float(-log_probs[val].mean())


def demo_config(data_dir: Path, run_dir: Path, arch: str, device: str, vocab_size: int):
    from lunaris.config import load_config
    overrides = {"data_dir": str(data_dir), "out_dir": str(run_dir), "device": device,
                 "model.vocab_size": vocab_size}
    if arch == "moc":  # top-2 of 4 experts, simple collaboration, 2 IRL steps: every MoC feature, still small
        overrides.update({"model.n_experts": 4, "model.top_k": 2, "model.collab_mode": "simple",
                          "model.n_reasoning_steps": 2, "model.ffn_hidden_size": 256})
    return load_config(PRESET, overrides)


def run_demo(out="runs/demo", minutes: float = None, max_steps: int = None, arch: str = "dense",
             device: str = "auto", corpus_mb: float = 6.0, echo=print, task_examples: int = TASK_EXAMPLES) -> dict:
    """Run every stage; returns the summary (also written to OUT/demo.json)."""
    if arch not in ("dense", "moc"):
        raise LunarisError(f"--arch must be dense or moc, got {arch!r}.")
    if minutes is not None and minutes <= 0 or max_steps is not None and max_steps <= 0 or corpus_mb <= 0:
        raise LunarisError("--minutes, --max-steps and --corpus-mb must be positive.")
    out = Path(out)
    data_dir, run_dir, state_path = out / "data", out / arch, out / f"demo-{arch}.json"
    out.mkdir(parents=True, exist_ok=True)
    started = time.time()
    manifest = prepare_corpus(data_dir, corpus_mb, 4096, 0, echo)
    vocab_size = manifest["model_vocab_size"]
    config = demo_config(data_dir, run_dir, arch, device, vocab_size)
    state = json.loads(state_path.read_text()) if state_path.is_file() else {}
    schedule(config, max_steps or state.get("max_steps") or calibrate_steps(config, minutes or 4.0))
    atomic_write_json(state_path, {**state, "max_steps": config.max_steps, "arch": arch})
    steps, trained = train_demo(config, arch, out, echo)

    from lunaris.evaluate import run_eval
    metrics = run_eval(run_dir, data=data_dir, device=device)
    baseline = unigram_baseline(data_dir, vocab_size)
    for line in evaluation_lines(metrics, baseline, config, trained, out, steps):
        echo(line)
    task = score_task(run_dir, device, task_examples, echo)
    echo("[4/5] sample from the prompt 'def ':")
    from lunaris.generate import run_generate
    sample = run_generate(run_dir, "def ", max_new_tokens=120, temperature=0.8, top_k=50, seed=0, device=device)
    echo("")
    plot = plot_demo(run_dir, echo)

    summary = {"arch": arch, "steps": steps, "val_loss": metrics["loss"], "unigram_baseline": baseline,
               "bits_per_byte": metrics["bits_per_byte"], "beats_unigram": metrics["loss"] < baseline,
               "task_accuracy": task["acc"], "task_accuracy_stderr": task["acc_stderr"],
               "task_accuracy_norm": task["acc_norm"], "task_chance": task["chance"],
               "sample": sample, "plot": plot, "run_dir": str(run_dir), "data_dir": str(data_dir),
               "seconds": round(time.time() - started, 1)}
    atomic_write_json(state_path, {**summary, "max_steps": config.max_steps})
    echo(next_steps(run_dir, data_dir, out))
    return summary


def schedule(config, max_steps: int) -> None:
    """The demo's schedule for a run of `max_steps`: a short warmup, four evaluations and checkpoints (the trainer
    also evaluates and saves at the last step), about twenty log lines."""
    config.max_steps = max_steps
    config.warmup_steps = min(config.warmup_steps, max(1, max_steps // 10))
    config.eval_interval = max(25, max_steps // 4)
    config.save_interval = max(25, max_steps // 4)
    config.log_interval = max(1, min(config.log_interval, max_steps // 20 or 1))
    config.validate()


def train_demo(config, arch: str, out: Path, echo) -> tuple:
    """Train to config.max_steps, resuming the run's checkpoint; (the run's step, whether this call trained)."""
    from lunaris.train.checkpoint import checkpoint_step, find_latest
    run_dir = Path(config.out_dir)
    latest = find_latest(run_dir) if run_dir.is_dir() else None
    done = checkpoint_step(latest) if latest is not None else 0
    if done >= config.max_steps:
        echo(f"[2/5] train: {run_dir} is already trained to step {done} (to continue it: lunaris demo --out {out} "
             f"--max-steps {2 * done})")
        return done, False
    tokens = config.max_steps * config.batch_size * config.gradient_accumulation_steps * config.model.max_seq_len
    echo(f"[2/5] train: {arch} model, {config.max_steps} steps of "
         f"{config.batch_size} x {config.model.max_seq_len} tokens ({tokens:,} tokens) into {run_dir}")
    from lunaris.train.trainer import train
    return train(config).step, True


def evaluation_lines(metrics: dict, baseline: float, config, trained: bool, out: Path, steps: int) -> list:
    """The [3/5] lines: validation loss on the whole split against the unigram baseline. When this call trained
    (and so printed the trainer's val_loss), what that val_loss read: the first eval_batches batches of the split,
    or the whole split once when it is smaller than that."""
    heading = f"[3/5] evaluate on the whole validation split: {metrics['tokens']:,} tokens"
    if trained:
        batch_tokens = config.batch_size * config.model.max_seq_len
        if config.eval_batches * batch_tokens < metrics["tokens"]:
            heading += (f" (the trainer's val_loss above used its first {config.eval_batches} batches, "
                        f"{config.eval_batches * batch_tokens:,} tokens)")
        else:
            heading += " (the trainer's val_loss above read the same tokens: the split is smaller than its " \
                       f"{config.eval_batches} batches of {config.batch_size} x {config.model.max_seq_len})"
    lines = [heading, f"      validation loss {metrics['loss']:.3f} nats/token (perplexity "
                      f"{metrics['perplexity']:.1f}, {metrics['bits_per_byte']:.3f} bits/byte); unigram baseline "
                      f"{baseline:.3f} nats/token"]
    if metrics["loss"] < baseline:
        lines.append(f"      the model beats the best context-free predictor by {baseline - metrics['loss']:.3f} "
                     f"nats/token")
    else:
        lines.append(f"      not below the unigram baseline yet: train longer (lunaris demo --out {out} --max-steps "
                     f"{2 * steps})")
    return lines


def score_task(run_dir: Path, device: str, examples: int, echo) -> dict:
    """python_next_line (the embedded task) against chance."""
    from lunaris.evaluate import run_task_eval
    task = run_task_eval(run_dir, ["embedded"], limit=examples, device=device)["tasks"]["python_next_line"]
    above = task["acc"] - task["chance"]
    echo(f"      python_next_line (a function's next line among 4, {task['examples']} held-out functions): accuracy "
         f"{task['acc']:.3f} ± {task['acc_stderr']:.3f} (normalized {task['acc_norm']:.3f}), chance "
         f"{task['chance']:.2f}"
         + (f", {above / task['acc_stderr']:.1f} standard errors above" if above > 0 and task["acc_stderr"] else ""))
    return task


def plot_demo(run_dir: Path, echo):
    """The loss-curve plot's path, or None without matplotlib (the rest of the demo stands)."""
    from lunaris.plot import plot_run
    try:
        plot = str(plot_run(run_dir))
        echo(f"[5/5] loss curve: {plot}")
        return plot
    except LunarisError as exc:
        echo(f"[5/5] no plot: {exc}")
        return None


def next_steps(run_dir: Path, data_dir: Path, out: Path) -> str:
    return "\n".join([
        "",
        "Go further:",
        f"  lunaris generate --checkpoint {run_dir} --prompt 'import ' --max-new-tokens 200",
        f"  lunaris eval --checkpoint {run_dir} --data {data_dir}",
        f"  lunaris eval --checkpoint {run_dir} --tasks embedded",
        f"  lunaris export --checkpoint {run_dir} --out {out / 'hf'}",
        f"  lunaris demo --out {out} --max-steps N   (continue training this run to step N)",
    ])


