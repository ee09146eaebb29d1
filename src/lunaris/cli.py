"""`lunaris <command>`: argument parsing only; each command's logic lives in its module.

A user error (`LunarisError`: bad config, missing file, corrupt data) is printed as one paragraph
without a traceback and the command exits with status 2.
"""

import argparse
import sys

from lunaris.errors import LunarisError


# ---- lunaris config -----------------------------------------------------------------------------

def add_config_parser(sub):
    p = sub.add_parser("config", help="validate a config, print it resolved with parameter count and FLOPs",
                       description="Validate CONFIG (plus --key=value overrides) and print the resolved config, "
                                   "the model's parameter count and training FLOPs per token.")
    p.add_argument("config", nargs="?", help="YAML config file (omit with --reference)")
    p.add_argument("--reference", action="store_true", help="print the reference table of every config key (markdown)")
    p.set_defaults(func=cmd_config, accepts_overrides=True)


def cmd_config(args, overrides):
    from lunaris.inspect_config import describe_config, reference_table
    if args.reference:
        print(reference_table())
        return 0
    if not args.config:
        raise LunarisError("lunaris config needs a CONFIG file (or --reference for the key table).")
    print(describe_config(args.config, overrides))
    return 0


# ---- lunaris plot -------------------------------------------------------------------------------

def add_plot_parser(sub):
    p = sub.add_parser("plot", help="plot loss, lr, grad norm, throughput (and MoC expert utilization) of a run",
                       description="Read RUN_DIR/metrics.jsonl and write a PNG of the training curves.")
    p.add_argument("run_dir", help="the out_dir of a training run (or its metrics.jsonl)")
    p.add_argument("--out", help="output PNG (default RUN_DIR/training.png)")
    p.set_defaults(func=cmd_plot)


def cmd_plot(args, overrides):
    from lunaris.plot import plot_run
    print(f"wrote {plot_run(args.run_dir, args.out)}")
    return 0


# ---- entry point ----------------------------------------------------------------------------------

PARSERS = [add_config_parser, add_plot_parser]


def build_parser() -> argparse.ArgumentParser:
    from lunaris import __version__
    parser = argparse.ArgumentParser(
        prog="lunaris", description="Pre-train dense and MoC language models: prepare, train, evaluate, generate, export.")
    parser.add_argument("--version", action="version", version=f"lunaris {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for add in PARSERS:
        add(sub)
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    if extra and not getattr(args, "accepts_overrides", False):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        return args.func(args, extra) or 0
    except LunarisError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
