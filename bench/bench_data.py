"""Data pipeline benchmark: `lunaris prepare` overhead over pure tokenization, and loader tokens/s.

    python bench/bench_data.py [--corpus-mb 40] [--loader-tokens 100000000] [--repeats 3]

A command line over lunaris.bench.data (whose docstring says what is measured and how); `lunaris bench` runs the
same measurement. Prints a markdown table.
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from lunaris.bench.data import DataBenchOptions, bench_data  # noqa: E402
from lunaris.bench.report import data_markdown  # noqa: E402


def parse_args(argv=None) -> DataBenchOptions:
    d = DataBenchOptions  # the class attributes are the defaults
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--corpus-mb", type=float, default=d.corpus_mb, help="text to prepare, in MB")
    parser.add_argument("--text-dir", default=d.text_dir,
                        help="directory of text files to use instead of the Python stdlib sources")
    parser.add_argument("--vocab-size", type=int, default=d.vocab_size)
    parser.add_argument("--repeats", type=int, default=d.repeats)
    parser.add_argument("--loader-tokens", type=int, default=d.loader_tokens)
    parser.add_argument("--seq-len", type=int, default=d.seq_len)
    parser.add_argument("--batch-size", type=int, default=d.batch_size)
    parser.add_argument("--loader-seconds", type=float, default=d.loader_seconds,
                        help="approximate loader measuring time")
    parser.add_argument("--skip-prepare", dest="prepare", action="store_false")
    parser.add_argument("--skip-loader", dest="loader", action="store_false")
    return DataBenchOptions(**vars(parser.parse_args(argv)))


def main(argv=None) -> int:
    result = bench_data(parse_args(argv))
    print(f"command: python bench/bench_data.py {' '.join(argv if argv is not None else sys.argv[1:])}")
    print(data_markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
