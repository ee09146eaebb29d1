"""`lunaris bench`: a tiny --quick run end to end (fields and consistency, never timings), the peak-memory
worker, the bench/ script adapter, defaults taken from BenchSettings, and clear errors for bad arguments."""

import json
import statistics

import pytest
import torch

from lunaris import cli
from lunaris.bench import (
    DEVICE_DEFAULTS,
    QUICK_DEFAULTS,
    BenchSettings,
    llama_config,
    lunaris_config,
    markdown_tables,
    measure_memory,
)


def test_quick_bench_prints_a_table_and_writes_json_with_the_documented_fields(tmp_path, capsys):
    out = tmp_path / "bench.json"
    assert cli.main(["bench", "--quick", "--repeats", "2", "--threads", "1", "--no-memory", "--no-scripts",
                     "--no-compile", "--json", str(out)]) == 0
    stdout = capsys.readouterr().out
    assert "| comparison | model | params | tokens/s | x baseline |" in stdout
    report = json.loads(out.read_text())
    assert report["command"] == (f"lunaris bench --quick --json {out} --device cpu --repeats 2 --threads 1 "
                                 f"--no-compile --no-memory --no-scripts")
    assert report["machine"]["torch_threads"] == 1 and report["machine"]["torch"]
    assert report["machine"]["transformers"] and report["machine"]["cpu"]
    assert report["git"] is None or len(report["git"]["commit"]) == 40
    assert report["settings"]["quick"] and report["settings"]["dtype"] == "fp32"
    rows = {(r["comparison"], r["name"]): r for r in report["results"]}
    assert set(rows) == {("dense tiny", "lunaris eager"), ("dense tiny", "transformers LlamaForCausalLM"),
                         ("MoC vs dense tiny", "lunaris eager"), ("MoC vs dense tiny", "lunaris MoC top-2/8 eager")}
    ours, llama = rows["dense tiny", "lunaris eager"], rows["dense tiny", "transformers LlamaForCausalLM"]
    assert ours["params"] == llama["params"]  # identical shapes, identical parameter count
    assert ours["baseline"] == "transformers LlamaForCausalLM" and "baseline" not in llama
    for row in rows.values():
        assert len(row["step_s"]) == 2 and row["seq_len"] == 32 and row["batch"] == 2
        assert row["tokens_per_s"] == pytest.approx(2 * 32 / statistics.median(row["step_s"]))
        assert row["tokens_per_s_best"] == pytest.approx(2 * 32 / min(row["step_s"]))
        assert len(row["cpu_s"]) == 2 and all(t > 0 for t in row["cpu_s"])
        assert row["mfu_measured"] > 0 and row["matmul_flops_per_s"] > 0 and row["mfu_peak"] is None
    assert ours["vs_baseline"] > 0 and ours["vs_baseline_best"] > 0 and ours["vs_baseline_cpu"] > 0
    moc = rows["MoC vs dense tiny", "lunaris MoC top-2/8 eager"]
    assert moc["params"] > ours["params"] and moc["baseline"] == "lunaris eager" and moc["vs_baseline"] > 0
    # MoC top-2 of experts half as wide: the same active FFN FLOPs, plus the router's
    assert moc["flops_per_token"] > ours["flops_per_token"]
    assert moc["flops_per_token"] - ours["flops_per_token"] == 6 * 2 * 64 * 8
    assert report["targets"] == [] and report["scripts"] == {}


def test_memory_worker_reports_the_peak_of_a_fresh_process():
    settings = BenchSettings(seq_len=16, batch=2)
    memory = measure_memory("lunaris", "tiny", False, settings)
    assert "error" not in memory, memory
    assert memory["measure"] in ("VmHWM", "ru_maxrss") and memory["peak_mib"] > 50
    assert 0 <= memory["delta_mib"] < memory["peak_mib"]


def test_llama_twin_has_the_same_shapes():
    ours = lunaris_config("30m", 256)
    hf = llama_config(ours)
    assert (hf.vocab_size, hf.hidden_size, hf.intermediate_size, hf.num_hidden_layers, hf.num_attention_heads,
            hf.num_key_value_heads, hf.tie_word_embeddings) == (16384, 512, 1376, 8, 8, 4, True)
    moc = lunaris_config("30m", 256, moc=True)
    assert moc.n_experts == 8 and moc.top_k == 2 and moc.ffn_hidden * moc.top_k == ours.ffn_hidden


def test_markdown_tables_are_parsed_into_rows():
    text = "title\n\n| a | b |\n|---|--:|\n| x | 1.5 |\n\nnote\n| c |\n|---|\n| y |\n"
    assert markdown_tables(text) == [[["a", "b"], ["x", "1.5"]], [["c"], ["y"]]]


def test_settings_left_at_none_take_the_device_and_quick_defaults():
    settings = BenchSettings()
    assert {name: getattr(settings, name) for name in DEVICE_DEFAULTS["cpu"]} == DEVICE_DEFAULTS["cpu"]
    quick = BenchSettings(quick=True, batch=3)
    assert quick.batch == 3 and quick.seq_len == QUICK_DEFAULTS["seq_len"] and quick.compile is False
    assert (settings.memory, settings.moc, settings.scripts, settings.repo) == (True, True, True, None)
    # the parser's defaults are the dataclass's: no options given, the same settings
    args = cli.build_parser().parse_args(["bench"])
    assert BenchSettings.from_args(args) == settings


BAD_ARGUMENTS = [
    (["--sizes", "7b"], "unknown size(s) 7b"),
    (["--batch", "0"], "--batch must be at least 1"),
    (["--json", "/nonexistent-dir/b.json"], "does not exist"),
    # no bench/ scripts there: a clear error before measuring, not a run without them
    (["--repo", "/nonexistent-checkout"], "pass --no-scripts"),
]
if not torch.cuda.is_available():  # on a GPU machine --device cuda is valid
    BAD_ARGUMENTS.append((["--device", "cuda"], "no CUDA GPU is visible"))


@pytest.mark.parametrize("argv, message", BAD_ARGUMENTS)
def test_bad_arguments_fail_before_measuring_with_a_clear_error(argv, message, capsys):
    assert cli.main(["bench", "--quick", *argv]) == 2
    assert message in capsys.readouterr().err
