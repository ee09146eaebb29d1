"""bench/bench_moc.py runs and prints its markdown table (tiny sizes; the numbers are not checked)."""

import importlib.util
from pathlib import Path

BENCH = Path(__file__).resolve().parents[2] / "bench" / "bench_moc.py"


def test_bench_prints_a_markdown_table(capsys):
    spec = importlib.util.spec_from_file_location("bench_moc", BENCH)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    bench.main(["--d-model", "32", "--hidden", "32", "--tokens", "64", "--rounds", "1", "--threads", "1"])
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if line.startswith("| ")]
    assert rows[0].startswith("| variant (forward + backward) | median ms | tokens/s | x dense")
    names = [row.split(" | ")[0].strip("| ").strip() for row in rows[1:]]
    assert names == ["dense SwiGLU (hidden = K·H)", "MoC none, S=1 (auto backend)",
                     "MoC none, S=1, padded bmm [E, C, D]", "routing + dispatch + combine only (experts = identity)",
                     "MoC simple, S=1", "MoC mha, S=1", "MoC none, S=2", "MoC none, S=3"]
    assert "dispatch share of the baseline MoC layer" in out
