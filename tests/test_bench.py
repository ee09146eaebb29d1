"""`lunaris bench`: a tiny --quick run end to end (fields and consistency, never timings), every measurement as a
function of the package returning a dict (data pipeline, decoding, MoC layer), a run from outside a checkout, the
peak-memory worker, defaults taken from BenchSettings, and clear errors for bad arguments."""

import dataclasses
import json
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import lunaris.bench.run as bench_run
from lunaris import cli, load_config
from lunaris.bench import (
    DEVICE_DEFAULTS,
    QUICK_DEFAULTS,
    SECTIONS,
    BenchSettings,
    DataBenchOptions,
    GenerateBenchOptions,
    MocLayerBenchOptions,
    bench_data,
    bench_generate,
    bench_moc_layer,
    llama_config,
    lunaris_config,
    measure_memory,
)
from lunaris.bench.generate import model_config
from lunaris.bench.report import data_markdown, generate_markdown, markdown_report, moc_layer_markdown
from lunaris.errors import LunarisError

ROOT = Path(__file__).resolve().parent.parent
NO_SECTIONS = ["--no-data", "--no-generate", "--no-moc-layer"]
TINY = {  # each measurement at a size that runs in seconds
    "data": dict(corpus_mb=0.8, vocab_size=300, repeats=2, loader_tokens=200_000, seq_len=32, batch_size=4,
                 loader_seconds=0.01),
    "generate": dict(sizes=["micro"], prompt_tokens=8, new_tokens=4, rounds=2, probe_mb=8, blas_variant=False),
    "moc_layer": dict(d_model=32, hidden=32, tokens=64, rounds=2, quick=True),
}


def test_quick_bench_prints_a_table_and_writes_json_with_the_documented_fields(tmp_path, capsys):
    out = tmp_path / "bench.json"
    assert cli.main(["bench", "--quick", "--repeats", "2", "--threads", "1", "--no-memory", *NO_SECTIONS,
                     "--no-compile", "--json", str(out)]) == 0
    stdout = capsys.readouterr().out
    assert "| comparison | model | params | tokens/s | x baseline |" in stdout
    report = json.loads(out.read_text())
    assert report["command"] == (f"lunaris bench --quick --json {out} --device cpu --repeats 2 --threads 1 "
                                 f"--no-compile --no-memory --no-data --no-generate --no-moc-layer")
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
    assert report["targets"] == [] and not any(name in report for name in SECTIONS)


def test_without_transformers_the_llama_baseline_is_left_out(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "transformers", None)  # `import transformers` now raises ImportError
    settings = BenchSettings(quick=True, repeats=1, threads=1, memory=False, moc=False, data=False, generate=False,
                             moc_layer=False)
    report = bench_run.run_bench(settings, "lunaris bench", log=lambda message: None)
    assert [row["name"] for row in report["results"]] == ["lunaris eager"]
    assert "vs_baseline" not in report["results"][0] and report["machine"]["transformers"] is None
    assert "transformers is not installed: no Llama baseline" in markdown_report(report)


def test_the_data_pipeline_is_measured_by_the_package(tmp_path):
    texts = tmp_path / "texts"
    texts.mkdir()
    for i in range(5):
        (texts / f"doc{i}.txt").write_text(f"document {i}: " + "the quick brown fox jumps over the lazy dog " * 200)
    result = bench_data(DataBenchOptions(text_dir=str(texts), **TINY["data"]))
    prepare, loader = result["prepare"], result["loader"]
    assert prepare["corpus_bytes"] >= 0.8e6 and prepare["documents"] >= 5 and len(prepare["pure_wall_s"]) == 2
    ratios = [p / q for p, q in zip(prepare["pipeline_wall_s"], prepare["pure_wall_s"])]
    assert prepare["ratio_wall"] == pytest.approx(statistics.median(ratios))
    best = min(prepare["pipeline_wall_s"])
    assert prepare["pipeline_mb_per_s"] == pytest.approx(prepare["corpus_bytes"] / 1e6 / best)
    assert loader["tokens_per_s"] == pytest.approx(loader["batches"] * 4 * 32 / loader["seconds"])
    table = data_markdown(result)
    assert "| pipeline / pure tokenization (median of 2 adjacent pairs) |" in table and "target >= 20" in table
    (tmp_path / "empty").mkdir()
    with pytest.raises(LunarisError, match="no non-empty text files under .*empty"):
        bench_data(DataBenchOptions(text_dir=str(tmp_path / "empty"), **TINY["data"]))


def test_the_moc_layer_is_measured_by_the_package():
    result = bench_moc_layer(MocLayerBenchOptions(**TINY["moc_layer"]))
    rows = {row["name"]: row for row in result["variants"]}
    assert list(rows) == ["dense SwiGLU (hidden = K·H)", "MoC none, S=1 (auto backend)",
                          "MoC none, S=1, padded bmm [E, C, D]",
                          "  routing + dispatch + combine only (experts = identity)"]
    assert rows["dense SwiGLU (hidden = K·H)"]["vs_dense"] == 1
    assert rows["MoC none, S=1 (auto backend)"]["vs_baseline"] == 1
    assert all(len(row["times_s"]) == 2 and row["median_ms"] > 0 for row in rows.values())
    assert result["capacity"] == 20 and result["hidden"] == 32 and 0 < result["dispatch_share"]
    assert "dispatch share of the baseline MoC layer" in moc_layer_markdown(result)


def test_the_moc_layer_benchmark_adds_fine_grained_rows_and_the_parts_of_a_step():
    options = MocLayerBenchOptions(**{**TINY["moc_layer"], "expert_counts": (16, 32), "profile": True})
    result = bench_moc_layer(options)
    rows = {row["name"]: row for row in result["variants"]}
    assert {"MoC none, S=1, E=16 top-4 H=16", "MoC none, S=1, E=32 top-8 H=8"} <= set(rows)   # K·H = 2·32 kept
    assert all(row["tokens_per_s"] == pytest.approx(64 / (row["median_ms"] / 1e3)) for row in rows.values())
    parts = [part["part"] for part in result["parts"]]
    assert parts[0].startswith("router") and parts[-2:] == ["backward (every part)",
                                                            "  of which experts backward (alone)"]
    assert all(part["median_ms"] > 0 for part in result["parts"])
    assert "part by part" in moc_layer_markdown(result)
    with pytest.raises(ValueError, match="12 experts do not split top-2 of 8 experts"):
        bench_moc_layer(MocLayerBenchOptions(**{**TINY["moc_layer"], "expert_counts": (12,)}))


def test_decoding_is_measured_by_the_package_against_transformers_on_the_same_weights():
    result = bench_generate(GenerateBenchOptions(compile=False, hf_compile=False, **TINY["generate"]))
    (row,) = result["sizes"]
    assert row["size"] == "micro" and row["shape"] == "micro (d128 L4 H4/2kv V4096)"
    assert set(row["tps"]) == {"eager", "transformers"} and row["same"] == {"eager": True, "transformers": True}
    assert row["tps"]["eager"] == pytest.approx(statistics.median(4 / t for t in row["times_s"]["eager"]))
    assert row["bytes"] > 4e6 and row["limit"] > 0 and 0 < row["fraction"]["eager"]
    assert row["vs_hf"]["transformers"] == 1 and "break_even" not in row and result["targets"] == []
    table = generate_markdown(result)
    assert "| micro (d128 L4 H4/2kv V4096) | 1.3M |" in table and "| yes |" in table


def test_decoding_without_transformers_times_lunaris_alone(monkeypatch):
    monkeypatch.setitem(sys.modules, "transformers", None)
    result = bench_generate(GenerateBenchOptions(compile=False, hf_compile=False, **{**TINY["generate"], "rounds": 1}))
    (row,) = result["sizes"]
    assert set(row["tps"]) == {"eager"} and row["errors"]["transformers"] == "not installed"
    assert "vs_hf" not in row and result["transformers"] is None
    assert "| not installed |" in generate_markdown(result)


def test_the_124m_decode_size_is_the_shipped_preset():
    preset = dataclasses.replace(load_config(ROOT / "configs" / "dense-124m.yaml").model, max_seq_len=160)
    assert model_config("124m", 160) == preset


def test_quick_bench_runs_every_measurement_outside_a_checkout(tmp_path, monkeypatch, capsys):
    """From a directory that is no checkout: every section measured by the package, in the report and the JSON."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(bench_run, "MEASURE", {name: (cls, TINY[name], fn)
                                               for name, (cls, _, fn) in bench_run.MEASURE.items()})
    out = tmp_path / "bench.json"
    assert cli.main(["bench", "--quick", "--repeats", "1", "--threads", "1", "--no-memory", "--no-moc",
                     "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    report = json.loads(out.read_text())
    for name in SECTIONS:
        assert "error" not in report[name] and report[name]["seconds"] >= 0, report[name]
        assert f"### {name}: " in printed
    assert report["data"]["loader"]["tokens_per_s"] > 0 and report["moc_layer"]["dispatch_share"] > 0
    assert report["generate"]["options"]["compile"] is False  # --quick: no compile, for decoding too
    assert "| variant (forward + backward) | median ms |" in printed and "| measurement | result | note |" in printed


def test_a_failing_measurement_is_reported_and_the_others_still_run(monkeypatch):
    def broken(options, log):
        raise RuntimeError("no such kernel\nsecond line")
    monkeypatch.setattr(bench_run, "MEASURE", {**bench_run.MEASURE, "data": (DataBenchOptions, {}, broken),
                                               "moc_layer": (MocLayerBenchOptions, TINY["moc_layer"],
                                                             bench_moc_layer)})
    settings = BenchSettings(quick=True, repeats=1, threads=1, memory=False, moc=False, generate=False)
    report = bench_run.run_bench(settings, "lunaris bench", log=lambda message: None)
    assert report["data"]["error"] == "RuntimeError: no such kernel" and "variants" in report["moc_layer"]
    assert "RuntimeError: no such kernel" in markdown_report(report)


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


def test_settings_left_at_none_take_the_device_and_quick_defaults():
    settings = BenchSettings()
    assert {name: getattr(settings, name) for name in DEVICE_DEFAULTS["cpu"]} == DEVICE_DEFAULTS["cpu"]
    quick = BenchSettings(quick=True, batch=3)
    assert quick.batch == 3 and quick.seq_len == QUICK_DEFAULTS["seq_len"] and quick.compile is False
    assert (settings.memory, settings.moc, settings.data, settings.generate, settings.moc_layer) == (True,) * 5
    # the parser's defaults are the dataclass's: no options given, the same settings
    args = cli.build_parser().parse_args(["bench"])
    assert BenchSettings.from_args(args) == settings


def test_old_flags_keep_working():
    """--no-scripts is the old name of the three section switches; --repo (a checkout) is accepted and ignored."""
    old = cli.build_parser().parse_args(["bench", "--no-scripts", "--repo", "/anywhere"])
    new = cli.build_parser().parse_args(["bench", *NO_SECTIONS])
    assert BenchSettings.from_args(old) == BenchSettings.from_args(new)
    assert (new.data, new.generate, new.moc_layer) == (False, False, False)


def test_importing_the_package_for_the_parser_loads_no_measurement():
    code = ("import sys, argparse, lunaris.bench as b; b.add_arguments(argparse.ArgumentParser()); "
            "print(sorted(m for m in sys.modules if m.startswith('lunaris.bench')))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                          env={"PYTHONPATH": str(ROOT / "src"), "PATH": "/usr/bin:/bin"})
    assert done.stdout.strip() == "['lunaris.bench', 'lunaris.bench.settings']"


BAD_ARGUMENTS = [
    (["--sizes", "7b"], "unknown size(s) 7b"),
    (["--batch", "0"], "--batch must be at least 1"),
    (["--json", "/nonexistent-dir/b.json"], "does not exist"),
]
if not torch.cuda.is_available():  # on a GPU machine --device cuda is valid
    BAD_ARGUMENTS.append((["--device", "cuda"], "no CUDA GPU is visible"))


@pytest.mark.parametrize("argv, message", BAD_ARGUMENTS)
def test_bad_arguments_fail_before_measuring_with_a_clear_error(argv, message, capsys):
    assert cli.main(["bench", "--quick", *argv]) == 2
    assert message in capsys.readouterr().err
