"""bench/bench_attention.py runs, prints its markdown table and measures peak memory in a fresh process (tiny sizes;
the numbers are not checked, only that every variant is there and the figures are sane)."""

import importlib.util
import json
from pathlib import Path

import torch

from lunaris.bench.attention import AttentionBenchOptions, measure_memory, packed_rows
from lunaris.model.masking import FLEX_ATTENTION

BENCH = Path(__file__).resolve().parents[2] / "bench" / "bench_attention.py"


def load_bench():
    spec = importlib.util.spec_from_file_location("bench_attention", BENCH)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    return bench


def test_bench_prints_every_variant_and_writes_json(tmp_path, capsys):
    out_file = tmp_path / "attention.json"
    load_bench().main(["--quick", "--seq-lens", "64", "--window", "16", "--rounds", "1", "--threads", "1",
                       "--json", str(out_file)])
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if line.startswith("| 64 |")]
    names = [row.split(" | ")[1] for row in rows]
    assert names == ["causal", "document, mask", "document, flex", "document, varlen", "window 16, mask",
                     "window 16, flex", "window 16, varlen"]
    flex_rows = [row for row in rows if ", flex" in row]
    # training on the CPU: FlexAttention has no backward pass there, which the table says instead of a time
    assert all("n/a: " in row for row in flex_rows) and "attention_backend auto here: varlen" in out
    result = json.loads(out_file.read_text())
    timed = [row for row in result["rows"] if "error" not in row]
    assert len(timed) == 5 and all(row["step_s"] > 0 and row["vs_causal"] > 0 for row in timed)
    assert result["command"] and result["options"]["seq_lens"] == [64]


def test_inference_times_flex_on_the_cpu_where_torch_has_it(capsys):
    load_bench().main(["--quick", "--seq-lens", "64", "--rounds", "1", "--threads", "1", "--inference",
                       "--backends", "flex"])
    row = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("| 64 | document, flex"))
    assert ("n/a" in row) != FLEX_ATTENTION


def test_peak_memory_is_measured_in_a_fresh_process():
    options = AttentionBenchOptions(n_layers=1, d_model=32, n_heads=2, vocab_size=64, doc_len=16, threads=1)
    memory = measure_memory(options, 64, "document, varlen")
    assert "error" not in memory, memory
    assert memory["measure"] == "VmHWM" and memory["peak_mib"] > memory["delta_mib"] >= 0


def test_packed_rows_hold_documents_of_random_lengths_ended_by_the_separator():
    options = AttentionBenchOptions(doc_len=32, batch=2)
    rows = packed_rows(options, 512)
    assert rows.shape == (2, 513) and torch.equal(rows, packed_rows(options, 512))    # the same rows every time
    ends = (rows == 0).nonzero()[:, 1]
    assert 4 <= len(ends) and len(set(torch.diff(ends).tolist())) > 2                  # several, of varied lengths
