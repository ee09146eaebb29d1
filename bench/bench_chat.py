"""Base model against fine-tuned: the loss on held-out conversations' assistant tokens, and python_docstring accuracy.

    python bench/bench_chat.py                                    # the demo (600 steps), then 100 fine-tuning steps
    python bench/bench_chat.py --base runs/demo/dense             # fine-tune a base run that exists (the demo's)
    python bench/bench_chat.py --demo-steps 6 --sft-steps 6 --limit 16 --out runs/bench-chat-smoke   # a smoke run

Runs the commands of the README's "From base model to assistant" (through lunaris.cli.main, as typed there) in
--out: `lunaris demo` for the base model unless --base is given, `lunaris prepare --example-chat` with the base
run's tokenizer, `lunaris train demo-cpu --init_from=BASE` on the conversations, then scores both models: the loss
in nats per assistant token on the held-out conversations (`lunaris eval --data`, the loss mask applied; the base
model as fine-tuning starts from it) and the accuracy on the built-in task `python_docstring` (`lunaris eval
--tasks`, every example or the first --limit, whole groups of four). Prints a markdown table and writes
OUT/results.json.

The difference of the two accuracies is given in standard errors of the difference, sqrt(se_base² + se_sft²): the
two models answer the same examples, so this treats them as independent, which overstates the error when their
answers are positively correlated (the test is conservative then). Target: the fine-tuned model more than two
standard errors above the base model.
"""

import argparse
import json
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from lunaris.cli import main  # noqa: E402
from lunaris.data import read_manifest  # noqa: E402
from lunaris.evaluate import run_eval, run_task_eval  # noqa: E402

TASK = "python_docstring"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=Path("runs/bench-chat"), help="working directory (reused)")
    p.add_argument("--base", type=Path, help="a base run to fine-tune (default: train the demo's in OUT/demo)")
    p.add_argument("--demo-steps", type=int, default=600, help="the demo's training steps (default 600)")
    p.add_argument("--sft-steps", type=int, default=100, help="fine-tuning steps (default 100, about 3 epochs)")
    p.add_argument("--limit", type=int, help=f"{TASK} examples scored (default: all, 292 with CPython 3.11's library)")
    p.add_argument("--device", default="auto")
    return p.parse_args(argv)


def lunaris(*args) -> None:
    print("$ lunaris " + " ".join(str(a) for a in args), flush=True)
    status = main([str(a) for a in args])
    if status != 0:
        raise SystemExit(f"lunaris {args[0]} failed (exit status {status})")


def fine_tune(opts, base: Path) -> tuple:
    """(data directory, fine-tuned run): the README's commands, from the base run `base`."""
    data, run = opts.out / "data-chat", opts.out / "chat"
    lunaris("prepare", "--example-chat", opts.out / "chat.jsonl", "--tokenizer", base / "tokenizer.json",
            "--seq-len", 256, "--out", data, "--overwrite", "--no-progress")
    vocab = read_manifest(data)["model_vocab_size"]
    lunaris("train", "demo-cpu", f"--data_dir={data}", f"--out_dir={run}", f"--init_from={base}",
            f"--model.vocab_size={vocab}", "--model.attention_mask=document", f"--max_steps={opts.sft_steps}",
            f"--warmup_steps={max(opts.sft_steps // 10, 1)}", f"--device={opts.device}")
    return data, run


def scores(run: Path, data: Path, opts) -> dict:
    loss = run_eval(run, data=data, device=opts.device)
    task = run_task_eval(run, [TASK], limit=opts.limit, device=opts.device)["tasks"][TASK]
    return {"run": str(run), "loss": loss["loss"], "bits_per_byte": loss.get("bits_per_byte"),
            "loss_tokens": loss["tokens"], "acc": task["acc"], "acc_stderr": task["acc_stderr"],
            "examples": task["examples"]}


def report(base: dict, sft: dict) -> dict:
    se = math.sqrt(base["acc_stderr"] ** 2 + sft["acc_stderr"] ** 2)
    gain = sft["acc"] - base["acc"]
    lines = ["| model | loss (nats per assistant token) | bits per byte | python_docstring acc |",
             "| --- | ---: | ---: | --- |"]
    for name, row in (("base", base), ("fine-tuned", sft)):
        lines.append(f"| {name} ({row['run']}) | {row['loss']:.4f} | {row['bits_per_byte'] or float('nan'):.4f} | "
                     f"{row['acc']:.4f} ± {row['acc_stderr']:.4f} ({row['examples']} examples) |")
    z = gain / se if se > 0 else float("nan")
    lines.append(f"\naccuracy gain {gain:+.4f} = {z:+.2f} standard errors of the difference (target: above +2); "
                 f"loss {sft['loss'] - base['loss']:+.4f} nats per assistant token "
                 f"({base['loss_tokens']:,} held-out tokens)")
    print("\n".join(lines))
    return {"base": base, "fine_tuned": sft, "acc_gain": gain, "acc_gain_in_se": z, "target_met": z > 2}


def run(opts) -> dict:
    opts.out.mkdir(parents=True, exist_ok=True)
    base = opts.base
    if base is None:
        lunaris("demo", "--out", opts.out / "demo", "--max-steps", opts.demo_steps, "--device", opts.device)
        base = opts.out / "demo" / "dense"
    data, sft = fine_tune(opts, base)
    result = report(scores(base, data, opts), scores(sft, data, opts))
    (opts.out / "results.json").write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    run(parse_args())
