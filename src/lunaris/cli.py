"""`lunaris <command>`: argument parsing only; each command's logic lives in its module.

A user error (`LunarisError`: bad config, missing file, corrupt data) is printed as one paragraph
without a traceback and the command exits with status 2. An argument error is reported by the command's own
parser, with the command's usage line. Each command's module is imported only when the command runs, so
`lunaris --help` and `lunaris COMMAND --help` start in a fraction of a second (no torch).
"""

import argparse
import json
import sys
from pathlib import Path

from lunaris import __version__
from lunaris.config import choices
from lunaris.errors import LunarisError, exit_status


class CommandParser(argparse.ArgumentParser):
    """The parser of one command (`lunaris COMMAND ...`).

    It reports every argument error itself, under its own usage line: an unknown option is an error here unless the
    command takes `--key=value` config overrides (the default `accepts_overrides=True`), which are then handed to the
    command. `add_later(parser)` adds options that are defined in the command's module (`lunaris bench`) when the
    command is parsed or its help printed, so building the whole CLI imports no command module. `checks` run on the
    parsed arguments and return an error message (or None).
    """

    def __init__(self, *args, add_later=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.add_later = add_later
        self.checks = []

    def _complete(self) -> None:
        if self.add_later is not None:
            add, self.add_later = self.add_later, None
            add(self)

    def format_help(self) -> str:
        self._complete()
        return super().format_help()

    def format_usage(self) -> str:
        self._complete()
        return super().format_usage()

    def parse_known_args(self, args=None, namespace=None):
        self._complete()
        namespace, extra = super().parse_known_args(args, namespace)
        if extra and not self.get_default("accepts_overrides"):
            self.error(f"unrecognized arguments: {' '.join(extra)}")
        for check in self.checks:
            problem = check(namespace)
            if problem:
                self.error(problem)
        return namespace, extra


# ---- lunaris config -----------------------------------------------------------------------------

def add_config_parser(sub):
    p = sub.add_parser("config", help="validate a config, print it resolved with parameter count and FLOPs",
                       description="Validate CONFIG (plus --key=value overrides) and print the resolved config, "
                                   "the model's parameter count and training FLOPs per token.")
    p.add_argument("config", nargs="?", help="YAML config file or preset name, e.g. dense-124m (omit with --reference)")
    p.add_argument("--reference", action="store_true", help="print the reference table of every config key (markdown)")
    p.set_defaults(func=cmd_config, accepts_overrides=True)


def cmd_config(args, overrides):
    from lunaris.inspect_config import describe_config, reference_table
    if args.reference:
        print(reference_table())
        return 0
    if not args.config:
        from lunaris.config_sources import preset_names
        raise LunarisError(f"lunaris config needs a CONFIG: a YAML file or a preset ({', '.join(preset_names())}); "
                           f"or --reference for the table of keys.")
    print(describe_config(args.config, overrides))
    return 0


# ---- lunaris plan --------------------------------------------------------------------------------

def add_plan_parser(sub):
    p = sub.add_parser(
        "plan", help="will a config fit my GPUs, and how fast will it train: memory per process, largest batch",
        description="Trace one training step of CONFIG (plus --key=value overrides) on fake tensors, nothing "
                    "allocated, and print the memory each process needs (parameters, gradients, optimizer state, "
                    "activations with the logits) for one process, or DDP and FSDP on --gpus N, each with and "
                    "without gradient checkpointing; whether it fits the device, the largest batch_size that does, "
                    "and the step time and tokens/s at a stated MFU of the GPU's datasheet peak.")
    p.add_argument("config", help="YAML config file or preset name, e.g. dense-124m")
    p.add_argument("--gpus", type=_positive(int), default=1, metavar="N", help="processes (GPUs) in all (default 1)")
    device = p.add_mutually_exclusive_group()
    device.add_argument("--gpu", metavar="NAME", help="plan for this GPU (h100, a100, a100-40gb, 4090, l40s, ...) "
                                                     "instead of this machine's device")
    device.add_argument("--gpu-memory", type=_positive(float), metavar="GiB",
                        help="plan for a GPU with this much memory (GiB; set --peak_flops=... for a step time)")
    p.add_argument("--mfu", type=_positive(float), default=0.4,
                   help="model FLOPs utilization the step time assumes (default 0.4 of the bf16 datasheet peak)")
    p.add_argument("--json", action="store_true", help="print the plan as JSON (bytes)")
    p.set_defaults(func=cmd_plan, accepts_overrides=True)
    p.checks.append(lambda args: "--mfu must be at most 1" if args.mfu > 1 else None)


def _positive(kind):
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
        if value <= 0:
            raise argparse.ArgumentTypeError(f"must be positive (got {text})")
        return value
    return parse


def cmd_plan(args, overrides):
    from lunaris.train.plan import run_plan
    return run_plan(args.config, overrides, gpus=args.gpus, gpu=args.gpu, gpu_memory=args.gpu_memory, mfu=args.mfu,
                    as_json=args.json)


# ---- lunaris plot -------------------------------------------------------------------------------

def add_plot_parser(sub):
    p = sub.add_parser("plot", help="plot loss, lr, grad norm, throughput (and MoC expert utilization) of a run",
                       description="Read RUN_DIR/metrics.jsonl and write a PNG of the training curves.")
    _add_model_source(p, positional="RUN_DIR", what="the out_dir of a training run, a checkpoint in it, or its "
                                                    "metrics.jsonl")
    p.add_argument("--out", help="output PNG (default RUN_DIR/training.png)")
    p.set_defaults(func=cmd_plot)


def cmd_plot(args, overrides):
    from lunaris.checkpoints import run_directory
    from lunaris.plot import plot_run
    path = Path(args.checkpoint)
    run_dir = path if path.suffix == ".jsonl" or not path.exists() else run_directory(path)
    print(f"wrote {plot_run(run_dir, args.out)}")
    return 0


# ---- lunaris prepare ------------------------------------------------------------------------------

def add_prepare_parser(sub):
    p = sub.add_parser(
        "prepare", help="raw text -> tokenizer -> token shards + manifest (a data_dir for training)",
        description="Read SOURCE files/directories (text, JSONL, Parquet, gzip/bz2/xz variants, Hugging Face "
                    "save_to_disk datasets), mix them, train or load a tokenizer, and write OUT/tokenizer.json, "
                    "OUT/train/shard_*.npy, OUT/val/shard_*.npy and OUT/manifest.json. Chat files (OpenAI messages, "
                    "ShareGPT or Alpaca records, recognized per file) become fine-tuning data: the tokenizer gets "
                    "the chat template's tokens, each conversation a loss mask (train/loss_mask/ beside the shards) "
                    "and a whole place in a window of --seq-len tokens.")
    p.add_argument("sources", nargs="*", metavar="SOURCE",
                   help="text/JSONL/Parquet file, directory, or HF dataset dir; or chat files")
    p.add_argument("--out", required=True, type=Path, help="output directory (must be new or empty, see --overwrite)")
    tok = p.add_mutually_exclusive_group(required=True)
    tok.add_argument("--vocab-size", type=int, help="train a byte-level BPE tokenizer with this many ids")
    tok.add_argument("--tokenizer", type=Path, help="use this existing Hugging Face tokenizer.json")
    p.add_argument("--weights", type=float, nargs="+", metavar="W",
                   help="one mixing weight per SOURCE (share of the output bytes); the mix stops when a source "
                        "runs out. Default: every document once, interleaved by source size")
    p.add_argument("--shard-tokens", type=int, default=100_000_000, help="tokens per shard (default 100M)")
    p.add_argument("--val-tokens", type=int, default=None,
                   help="tokens of whole documents held out for validation, taken from the start of the mix "
                        "(default: 5%% of the corpus, at most 1M; 0 for none)")
    p.add_argument("--max-tokens", type=int, help="stop after this many training tokens")
    p.add_argument("--seed", type=int, default=0, help="shuffles the order of files inside directory sources")
    p.add_argument("--text-field", default="text",
                   help="JSONL field / Parquet or HF column holding the text (default text)")
    # one value per flag (repeat it, or separate globs with commas), so a SOURCE after it is never taken for a glob
    p.add_argument("--include", action="extend", type=_globs, metavar="GLOB[,GLOB]",
                   help="file globs to take from directories; repeatable (default: common text, JSONL and Parquet "
                        "extensions, plain or compressed)")
    p.add_argument("--exclude", action="extend", type=_globs, default=[], metavar="GLOB[,GLOB]",
                   help="file globs to skip in directories; repeatable")
    p.add_argument("--hf-split", default="train", help="split of a Hugging Face DatasetDict source")
    p.add_argument("--eot-token", default="<|endoftext|>", help="end-of-text token of an existing --tokenizer")
    p.add_argument("--tokenizer-sample-bytes", type=float, default=5e8,
                   help="bytes of text from the start of the mix used to train the tokenizer (default 500 MB)")
    p.add_argument("--batch-docs", type=int, default=1024, help="documents per encoding batch (default 1024)")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --out once the new data is complete")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    chat = p.add_argument_group("conversations (chat files)")
    chat.add_argument("--seq-len", type=int, help="the model.max_seq_len you will fine-tune with: conversations are "
                                                  "packed whole into windows of this many tokens (needed for chat "
                                                  "files; a longer conversation is left out and reported)")
    chat.add_argument("--chat-layout", choices=["packed", "padded"], default="packed",
                      help="packed (default): several conversations per window, trained with model.attention_mask: "
                           "document; padded: one per window, for a model that keeps causal attention")
    chat.add_argument("--example-chat", type=Path, metavar="FILE",
                      help="write the example conversations (docstring -> function, from the Python standard "
                           "library's packages the demo does not train on) to FILE and prepare them")
    p.set_defaults(func=cmd_prepare)


def _globs(text: str) -> list:
    return [glob.strip() for glob in text.split(",") if glob.strip()]


def cmd_prepare(args, overrides):
    from lunaris.data.prepare import DEFAULT_INCLUDE, PrepareOptions, format_report, prepare
    patterns = [source for source in args.sources if any(c in source for c in "*?[") and not Path(source).exists()]
    if patterns:
        raise LunarisError(f"SOURCE {patterns[0]!r} does not exist and looks like a file glob. --include and "
                           f"--exclude take one glob each: repeat the flag (--include '*.py' --include '*.txt') or "
                           f"separate globs with commas (--include '*.py,*.txt').")
    options = PrepareOptions(
        sources=args.sources, out=args.out, vocab_size=args.vocab_size, tokenizer=args.tokenizer,
        weights=args.weights, shard_tokens=args.shard_tokens, val_tokens=args.val_tokens, max_tokens=args.max_tokens,
        seed=args.seed, text_field=args.text_field, include=tuple(args.include or DEFAULT_INCLUDE),
        exclude=tuple(args.exclude), hf_split=args.hf_split, eot_token=args.eot_token,
        tokenizer_sample_bytes=int(args.tokenizer_sample_bytes), batch_docs=args.batch_docs,
        overwrite=args.overwrite, progress=not args.no_progress, seq_len=args.seq_len, chat_layout=args.chat_layout,
        example_chat=args.example_chat)
    recorded = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k != "func"}
    manifest = prepare(options, args_for_manifest=recorded)
    print(format_report(manifest, args.out))
    return 0


# ---- lunaris train --------------------------------------------------------------------------------

def add_train_parser(sub):
    p = sub.add_parser(
        "train", help="train a dense or MoC model from a YAML config (one process, or under torchrun)",
        description="Train the model CONFIG describes; --key=value or --model.key=value override config keys. "
                    "A run restarted with the same out_dir resumes from its newest checkpoint. Several processes: "
                    "torchrun --standalone --nproc_per_node=N -m lunaris train CONFIG.")
    p.add_argument("config", help="YAML config file, in the format shown in the README (model keys under "
                                  "model:; `lunaris config --reference` lists every key), or a preset's name "
                                  "(dense-124m, demo-cpu, ...)")
    resume = p.add_mutually_exclusive_group()
    resume.add_argument("--resume", metavar="PATH", help="resume from this checkpoint file, FSDP checkpoint "
                        "directory, or run directory (default: out_dir's newest checkpoint, if any)")
    resume.add_argument("--no-resume", action="store_true",
                        help="start at step 0 even if out_dir holds checkpoints (they are replaced as the run saves)")
    p.set_defaults(func=cmd_train, accepts_overrides=True)


def cmd_train(args, overrides):
    from lunaris.train.trainer import run_cli
    return run_cli(args.config, overrides, resume=args.resume, no_resume=args.no_resume)


# ---- lunaris generate / eval / export -------------------------------------------------------------

CHECKPOINT_HELP = "checkpoint file (ckpt_<step>.pt, latest_checkpoint.pt) or run directory (its newest)"


def _add_model_source(p, positional: str = None, what: str = CHECKPOINT_HELP):
    """--checkpoint PATH, which every command that reads a run takes; with `positional` (the older form of analyze
    and plot), the path may be given as a positional argument instead."""
    if positional is None:
        p.add_argument("--checkpoint", required=True, metavar="PATH", help=what)
        return
    p.add_argument("path", nargs="?", metavar=positional, help=f"{what} (the same as --checkpoint)")
    p.add_argument("--checkpoint", metavar="PATH", help=what)
    p.checks.append(lambda args: _one_model_source(args, positional))


def _one_model_source(args, positional: str):
    """Puts the positional path into args.checkpoint; a message if neither or two different paths were given."""
    if args.path is not None and args.checkpoint is not None and args.path != args.checkpoint:
        return f"{positional} {args.path} and --checkpoint {args.checkpoint} differ; give the path once."
    args.checkpoint = args.checkpoint if args.checkpoint is not None else args.path
    if args.checkpoint is None:
        return f"the following arguments are required: --checkpoint PATH (or {positional})"
    return None


def _add_held_out_args(p):
    """--data and --batch-size of the commands that read held-out batches as `lunaris eval` does."""
    p.add_argument("--data", metavar="DIR", help="prepared data directory (its val/ split) or a directory of "
                                                 ".npy shards (default: the run's held-out data)")
    p.add_argument("--batch-size", type=int, help="sequences per batch (default: the run's batch_size)")


def _add_device_args(p):
    p.add_argument("--device", default="auto", help="auto (CUDA, then MPS, then CPU), cpu, cuda, cuda:1, mps")
    p.add_argument("--dtype", default="auto", choices=choices("dtype"),
                   help="weights and compute precision (auto: bf16 on GPUs that support it, else fp32)")
    p.add_argument("--threads", type=int, help="CPU threads for torch (default: 1 for models under 50M parameters on "
                                               "a CPU, whose ops are too small for several threads; else torch's "
                                               "choice, one per core)")


def add_generate_parser(sub):
    p = sub.add_parser("generate", help="sample text from a checkpoint, streamed to the terminal",
                       description="Continue --prompt with the model of a checkpoint, printing text as it is "
                                   "produced. Uses the tokenizer.json the trainer copied into the run directory.")
    _add_model_source(p)
    prompts = p.add_mutually_exclusive_group()
    prompts.add_argument("--prompt", default="", help="text to continue (empty: start a new document)")
    prompts.add_argument("--prompt-file", metavar="FILE",
                         help="continue every prompt of FILE (one per line; in a .jsonl file one JSON string per "
                              "line) in batches, printing one JSON line {\"prompt\", \"completion\"} per prompt")
    p.add_argument("--batch-size", type=int, default=8,
                   help="prompts decoded together with --prompt-file (default 8)")
    _add_sampling_args(p)
    _add_device_args(p)
    p.set_defaults(func=cmd_generate)


def _add_sampling_args(p):
    """How `generate` and `chat` sample, and the tokenizer and compilation of their decoding."""
    p.add_argument("--max-new-tokens", type=int, default=200, help="tokens to generate at most (default 200)")
    p.add_argument("--temperature", type=float, default=0.8, help="sampling temperature; 0 is greedy (default 0.8)")
    p.add_argument("--top-k", type=int, help="sample among the k most likely tokens only")
    p.add_argument("--top-p", type=float, help="sample among the most likely tokens holding this probability mass")
    p.add_argument("--seed", type=int, help="random seed, for reproducible samples")
    p.add_argument("--tokenizer", metavar="FILE", help="tokenizer.json to use instead of the run directory's")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="torch.compile the decode step (compilation takes seconds to minutes, reported on stderr; "
                        "default: only on CUDA, once enough tokens were decoded for it to pay off)")


def _sampling_options(args) -> dict:
    return dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                top_p=args.top_p, seed=args.seed, tokenizer_path=args.tokenizer, device=args.device,
                dtype=args.dtype, threads=args.threads, compile=args.compile)


def cmd_generate(args, overrides):
    from lunaris.generate import read_prompts, run_generate, run_generate_batch
    options = _sampling_options(args)
    if args.prompt_file is not None:
        run_generate_batch(args.checkpoint, read_prompts(args.prompt_file), batch_size=args.batch_size, **options)
    else:
        run_generate(args.checkpoint, args.prompt, **options)
    return 0


def add_chat_parser(sub):
    p = sub.add_parser("chat", help="talk to a fine-tuned model in the terminal (or through stdin)",
                       description="Chat with the model of a checkpoint fine-tuned on conversations, rendered with "
                                   "the chat template beside its tokenizer. Replies stream as they are produced; "
                                   "the turns so far stay in the prompt while they fit the context (the oldest are "
                                   "dropped, with a note). Commands: /reset, /system TEXT, /quit. One message per "
                                   "line (a line ending with \\ continues on the next); when stdin is not a "
                                   "terminal its lines are read without prompts and each reply is printed on "
                                   "stdout, so `printf 'Hello\\n' | lunaris chat --checkpoint RUN` scripts it.")
    _add_model_source(p)
    p.add_argument("--system", metavar="TEXT", help="the system message the conversation starts with")
    _add_sampling_args(p)
    _add_device_args(p)
    p.set_defaults(func=cmd_chat)


def cmd_chat(args, overrides):
    from lunaris.chat import run_chat
    run_chat(args.checkpoint, system=args.system, **_sampling_options(args))
    return 0


def add_eval_parser(sub):
    p = sub.add_parser("eval", help="loss/bits-per-byte on held-out shards, or accuracy on downstream tasks",
                       description="Evaluate a checkpoint on held-out token shards (default: the run's val split) "
                                   "and print one JSON object: loss (nats/token), perplexity, bits_per_byte, "
                                   "tokens evaluated. With --tasks, score downstream tasks instead and print a "
                                   "table of accuracy, normalized accuracy and chance per task.")
    _add_model_source(p)
    _add_held_out_args(p)
    p.add_argument("--max-batches", type=int, help="evaluate only the first N batches (default: all)")
    p.add_argument("--json", metavar="FILE", help="also write the result to FILE")
    p.add_argument("--tasks", nargs="+", metavar="TASK",
                   help="score these tasks: python_next_line (built into Lunaris from the standard library; "
                        "`embedded` names it too), NAME=FILE.jsonl (the simple, HellaSwag, ARC, PIQA or LAMBADA "
                        "layout) or a task YAML")
    p.add_argument("--limit", type=int, help="with --tasks: the first N examples of each task (default: all)")
    p.add_argument("--tokenizer", metavar="FILE", help="with --tasks: tokenizer.json to use instead of the run "
                                                       "directory's")
    _add_device_args(p)
    p.set_defaults(func=cmd_eval)


def cmd_eval(args, overrides):
    from lunaris.evaluate import run_eval, run_task_eval
    from lunaris.tasks import format_table
    if args.tasks:
        if args.data is not None or args.max_batches is not None:
            raise LunarisError("--tasks scores tasks, not the loss: leave out --data and --max-batches (or run "
                               "lunaris eval twice).")
        result = run_task_eval(args.checkpoint, args.tasks, limit=args.limit, batch_size=args.batch_size,
                               device=args.device, dtype=args.dtype, threads=args.threads, tokenizer=args.tokenizer,
                               json_path=args.json)
        print(format_table(result["tasks"]))
        print(f"{result['checkpoint']} (step {result['step']}), {result['seconds']:.1f} s")
        return 0
    if args.limit is not None or args.tokenizer is not None:
        raise LunarisError("--limit and --tokenizer apply to --tasks only.")
    result = run_eval(args.checkpoint, data=args.data, max_batches=args.max_batches, batch_size=args.batch_size,
                      device=args.device, dtype=args.dtype, threads=args.threads, json_path=args.json)
    print(json.dumps(result))
    return 0


def add_analyze_parser(sub):
    p = sub.add_parser("analyze", help="what the iterative reasoning (IRL) steps of a checkpoint do on held-out data",
                       description="For a checkpoint of a model with n_reasoning_steps > 1, print per layer and per "
                                   "IRL step the mean relative update norm |h_t - h_t-1| / |x| (and the cosine of "
                                   "successive updates), and the validation loss if every IRL FFN stopped after s "
                                   "steps, s = 1..S, on the batches `lunaris eval` reads (s = S is its loss).")
    _add_model_source(p, positional="CKPT")
    _add_held_out_args(p)
    p.add_argument("--batches", type=int, default=20, help="held-out batches to evaluate (default 20)")
    p.add_argument("--json", metavar="FILE", help="also write the numbers to FILE")
    _add_device_args(p)
    p.set_defaults(func=cmd_analyze)


def cmd_analyze(args, overrides):
    from lunaris.analyze import format_report, run_analyze
    result = run_analyze(args.checkpoint, data=args.data, max_batches=args.batches, batch_size=args.batch_size,
                         device=args.device, dtype=args.dtype, threads=args.threads, json_path=args.json)
    print(format_report(result))
    return 0


def add_export_parser(sub):
    p = sub.add_parser("export", help="write a Hugging Face model directory (Llama, Qwen3, or Lunaris remote code) "
                                      "or a GGUF file for llama.cpp",
                       description="Export a checkpoint as a Hugging Face model directory: model.safetensors, "
                                   "config.json, generation_config.json and tokenizer files. A dense model with "
                                   "n_reasoning_steps 1 becomes LlamaForCausalLM (with qk_norm: Qwen3ForCausalLM); "
                                   "other models (MoC, IRL, logit_softcap, attention_mask: document) carry their "
                                   "modeling code (load with trust_remote_code=True). --format gguf writes the "
                                   "Llama or Qwen3 model as one GGUF file for llama.cpp, Ollama and LM Studio.")
    _add_model_source(p)
    p.add_argument("--out", required=True, metavar="PATH",
                   help="output directory (new or empty, see --force); with --format gguf the .gguf file")
    p.add_argument("--format", default="auto", choices=["auto", "llama", "qwen3", "lunaris", "gguf"],
                   help="auto: llama (or qwen3) when the model allows it, else lunaris (remote code); gguf: one "
                        "GGUF file (dense models that export as llama or qwen3)")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp16", "q8_0"],
                   help="dtype of the saved weights (q8_0, 8-bit blocks: GGUF only)")
    p.add_argument("--gguf", nargs="?", const="", metavar="TYPE",
                   help="also write model.gguf into the Hugging Face directory, in TYPE (fp32, fp16, bf16 or q8_0; "
                        "default: --dtype)")
    p.add_argument("--tokenizer", metavar="FILE", help="tokenizer.json to use instead of the run directory's")
    p.add_argument("--force", action="store_true", help="replace the exported files of a non-empty --out")
    p.set_defaults(func=cmd_export)


def cmd_export(args, overrides):
    from lunaris.export import export_checkpoint
    gguf = None if args.gguf is None else args.gguf or args.dtype
    summary = export_checkpoint(args.checkpoint, args.out, tokenizer=args.tokenizer, fmt=args.format,
                                dtype=args.dtype, force=args.force, gguf=gguf)
    loader = {"llama": "LlamaForCausalLM.from_pretrained(DIR)", "qwen3": "Qwen3ForCausalLM.from_pretrained(DIR)"}.get(
        summary["format"], "AutoModelForCausalLM.from_pretrained(DIR, trust_remote_code=True)")
    where = args.out if summary["format"] == "gguf" else f"{summary['out_dir']}: {', '.join(summary['files'])}"
    print(f"exported {summary['parameters']:,} parameters ({summary['dtype']}) as {summary['format']} to {where}")
    if summary["format"] != "gguf":
        print(f"load it with transformers: {loader}")
    if summary["format"] == "gguf" or gguf is not None:
        path = args.out if summary["format"] == "gguf" else f"{summary['out_dir']}/model.gguf"
        print(f"run it with llama.cpp: llama-completion -m {path} -no-cnv -p PROMPT (or llama-server -m {path})")
    return 0


# ---- lunaris selftest -----------------------------------------------------------------------------

def add_selftest_parser(sub):
    p = sub.add_parser("selftest", help="sanity-check this machine: train and sample tiny dense and MoC models",
                       description="Train tiny dense, MoC-mha and MoC-simple models with iterative reasoning for a "
                                   "few steps on synthetic data (the loss must fall), generate a few tokens, and "
                                   "report the device, torch version, torch.compile and torch.distributed. Exit "
                                   "status 0 only if every model check passes.")
    p.add_argument("--device", default="auto", help="auto (CUDA, then MPS, then CPU), cpu, cuda, mps")
    p.add_argument("--steps", type=int, default=30, help="training steps per model (default 30)")
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile check (it takes seconds)")
    p.set_defaults(func=cmd_selftest)


def cmd_selftest(args, overrides):
    from lunaris.selftest import run_selftest
    if args.steps < 4:
        raise LunarisError(f"--steps must be at least 4 (got {args.steps}): the check compares the first and "
                           f"last two losses.")
    return run_selftest(device=args.device, steps=args.steps, compile_check=not args.no_compile)


# ---- lunaris bench --------------------------------------------------------------------------------

def add_bench_parser(sub):
    p = sub.add_parser(
        "bench", help="training-step speed and MFU against transformers' Llama, MoC vs dense, memory",
        description="Time training steps (forward, backward, AdamW) of Lunaris (eager and compiled) and "
                    "transformers' LlamaForCausalLM at identical shapes, in turns on this machine; report tokens/s, "
                    "ratios, MFU against the measured matmul rate (and the GPU's datasheet peak), MoC top-2/8 "
                    "against the dense model of equal active parameters, peak memory of each configuration, the data "
                    "pipeline, decoding tokens/s and one MoC layer's dispatch. Prints markdown tables.",
        add_later=_bench_arguments)
    p.set_defaults(func=cmd_bench)


def _bench_arguments(p):
    from lunaris.bench import add_arguments  # only once `lunaris bench` is parsed
    add_arguments(p)  # every option and default is lunaris.bench's (BenchSettings)


def cmd_bench(args, overrides):
    from lunaris.bench import BenchSettings, command_line, main_bench
    main_bench(BenchSettings.from_args(args), json_path=args.json, command=command_line(args))
    return 0


# ---- lunaris sweep ------------------------------------------------------------------------------

def add_sweep_parser(sub):
    p = sub.add_parser(
        "sweep", help="train variants of a config at an equal FLOPs, token or time budget; compare them",
        description="Train every variant of SWEEP (a base config plus each variant's overrides) at the same budget "
                    "(training FLOPs, tokens or seconds, which set max_steps), one after another, each in a fresh "
                    "process; score all on the same held-out batches (loss, bits per byte) and write "
                    "OUT/results.md, OUT/results.json and OUT/sweep.png. Running it again skips finished runs and "
                    "resumes an interrupted one from its checkpoint. --key=value overrides apply to every variant. "
                    "The file format: `python -m pydoc lunaris.sweep`, and the examples in bench/sweeps/ "
                    "of a source checkout.")
    p.add_argument("sweep", help="sweep YAML file: base (config file) or config (inline), overrides, budget "
                                 "(flops | tokens | seconds), seeds, eval_batches, variants (name: [overrides])")
    p.add_argument("--out", help="output directory (default runs/sweeps/<SWEEP file name>)")
    p.add_argument("--seeds", type=int, help="runs per variant, seeds 0..N-1 (default: the file's seeds, else 1)")
    p.add_argument("--only", action="extend", type=_globs, metavar="NAME[,NAME]",
                   help="train only these variants (the report still lists every finished one); repeatable")
    p.add_argument("--dry-run", action="store_true",
                   help="print the plan (steps, tokens, FLOPs of every variant) and train nothing")
    p.set_defaults(func=cmd_sweep, accepts_overrides=True)


def cmd_sweep(args, overrides):
    from lunaris.sweep import run_sweep
    return run_sweep(args.sweep, out=args.out, seeds=args.seeds, only=args.only, dry_run=args.dry_run,
                     overrides=overrides)


# ---- lunaris demo -------------------------------------------------------------------------------

def add_demo_parser(sub):
    p = sub.add_parser("demo", help="the whole workflow in minutes on this machine: data, train, eval, sample, plot",
                       description="Build a corpus from the Python standard library's source files, prepare it, "
                                   "train a small model (a few minutes on a CPU), evaluate it against the unigram "
                                   "baseline, sample code from 'def ', and plot the loss curve. Running it again "
                                   "resumes the same run.")
    p.add_argument("--out", default="runs/demo", help="output directory (default runs/demo)")
    budget = p.add_mutually_exclusive_group()
    budget.add_argument("--minutes", type=float, help="training time budget of a new run (default 4)")
    budget.add_argument("--max-steps", type=int, help="train to exactly this many optimizer steps")
    p.add_argument("--arch", choices=["dense", "moc"], default="dense", help="model architecture (default dense)")
    p.add_argument("--device", default="auto", choices=choices("device"), help="default auto")
    p.add_argument("--corpus-mb", type=float, default=6.0, help="MB of standard-library source to use (default 6)")
    p.set_defaults(func=cmd_demo)


def cmd_demo(args, overrides):
    from lunaris.demo import run_demo
    run_demo(args.out, args.minutes, args.max_steps, args.arch, args.device, args.corpus_mb)
    return 0


# ---- entry point ----------------------------------------------------------------------------------

PARSERS = [add_demo_parser, add_prepare_parser, add_train_parser, add_eval_parser, add_analyze_parser,
           add_generate_parser, add_chat_parser, add_export_parser, add_plot_parser, add_config_parser, add_plan_parser,
           add_selftest_parser, add_bench_parser, add_sweep_parser]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lunaris",
        description="Pre-train dense and MoC language models: prepare, train, evaluate, generate, export.")
    parser.add_argument("--version", action="version", version=f"lunaris {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=CommandParser)
    for add in PARSERS:
        add(sub)
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    # a command's own parser reports its argument errors; what it leaves over are the config overrides of the
    # commands that take them (config, train, sweep)
    args, overrides = parser.parse_known_args(argv)
    if args.command is None:  # like any missing argument: usage on stderr, exit status 2
        parser.print_help(sys.stderr)
        return 2
    if overrides and not getattr(args, "accepts_overrides", False):  # unknown options before the command
        parser.error(f"unrecognized arguments: {' '.join(overrides)}")
    return exit_status(lambda: args.func(args, overrides))


if __name__ == "__main__":
    sys.exit(main())
