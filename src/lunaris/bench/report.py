"""The report of `lunaris bench`: the machine, the targets, and markdown tables made from the measurements' dicts
(the training steps, the data pipeline, decoding, the MoC layer). The bench/ scripts print the same tables."""

import os
import platform
import statistics
from typing import Optional

import torch

from lunaris.bench.settings import MOC_NAME, BenchSettings
from lunaris.bench.step import has_transformers
from lunaris.runtime import cpu_name, device_name, git_commit

# The project's performance targets (a --quick run's tiny model is not checked against them).
TARGETS = {
    "cpu": {"vs_llama": 1.10, "mfu_measured": 0.75, "moc_vs_dense": 0.75},
    "cuda": {"mfu_peak": 0.50, "moc_mfu_peak": 0.40},
}


def git_state() -> Optional[dict]:
    """{"commit", "dirty"} of the Lunaris source tree (lunaris.runtime.git_commit); None for an installed copy."""
    commit = git_commit()
    if commit is None:
        return None
    sha, _, dirty = commit.partition("+")
    return {"commit": sha, "dirty": bool(dirty)}


def machine_info(settings: BenchSettings) -> dict:
    info = {"platform": platform.platform(), "cpu": cpu_name(), "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(), "device": settings.device, "python": platform.python_version(),
            "torch": torch.__version__, "transformers": None}
    if has_transformers():
        import transformers
        info["transformers"] = transformers.__version__
    if settings.device == "cuda":
        info["gpu"] = device_name(torch.device("cuda"))
        info["cuda"] = torch.version.cuda
    return info


def check_targets(rows: list, settings: BenchSettings) -> list:
    """The TARGETS of this device, each with the measured value and whether it is met."""
    wanted = TARGETS[settings.device]
    checks = []
    for row in rows:
        if "error" in row:
            continue
        if row["comparison"].startswith("dense") and "vs_baseline" in row:
            if "vs_llama" in wanted:
                checks.append({"target": f"{row['comparison']}: {row['name']} tokens/s vs Llama",
                               "value": row["vs_baseline"], "at_least": wanted["vs_llama"]})
        if row["comparison"].startswith("dense") and row["name"].startswith("lunaris"):
            if "mfu_measured" in wanted:
                checks.append({"target": f"{row['comparison']}: {row['name']} MFU vs measured matmul rate",
                               "value": row["mfu_measured"], "at_least": wanted["mfu_measured"]})
            if "mfu_peak" in wanted and row["mfu_peak"] is not None:
                checks.append({"target": f"{row['comparison']}: {row['name']} MFU vs datasheet peak",
                               "value": row["mfu_peak"], "at_least": wanted["mfu_peak"]})
        if row["name"].startswith(MOC_NAME):
            if "moc_vs_dense" in wanted and "vs_baseline" in row:
                checks.append({"target": f"{row['comparison']}: {row['name']} tokens/s vs dense (equal active params)",
                               "value": row["vs_baseline"], "at_least": wanted["moc_vs_dense"]})
            if "moc_mfu_peak" in wanted and row["mfu_peak"] is not None:
                checks.append({"target": f"{row['comparison']}: {row['name']} MFU (active FLOPs) vs peak",
                               "value": row["mfu_peak"], "at_least": wanted["moc_mfu_peak"]})
    for check in checks:
        check["met"] = check["value"] >= check["at_least"]
    return checks


def _fmt(value, spec: str, missing: str = "") -> str:
    return missing if value is None else format(value, spec)


def _table(header: list, align: str, rows: list) -> list:
    """Markdown table lines; `align` is one character per column: l(eft) or r(ight)."""
    return (["| " + " | ".join(header) + " |", "|" + "|".join("---:" if a == "r" else "---" for a in align) + "|"]
            + ["| " + " | ".join(map(str, row)) + " |" for row in rows])


# ---- the training steps ---------------------------------------------------------------------------------------

def versus(row: dict, baselines: set) -> str:
    """The 'x baseline' cell: '1.043 vs Llama', 'baseline', or empty."""
    if "vs_baseline" in row:
        short = "Llama" if row["baseline"].startswith("transformers") else row["baseline"].replace("lunaris ", "dense ")
        return f"{row['vs_baseline']:.3f} vs {short}"
    return "baseline" if (row["comparison"], row["name"]) in baselines else ""


def training_rows(results: list) -> list:
    """The cells of the training table, one row per timed (or failed) configuration."""
    baselines = {(row["comparison"], row["baseline"]) for row in results if "baseline" in row}
    rows = []
    for row in results:
        first = [row["comparison"], row["name"], f"{row['params'] / 1e6:.1f}M"]
        if "error" in row:
            rows.append(first + [row["error"]] + [""] * 7)
            continue
        memory = row.get("memory", {})
        rows.append(first + [f"{row['tokens_per_s']:,.0f}", versus(row, baselines),
                             _fmt(row.get("vs_baseline_best"), ".3f"), _fmt(row.get("vs_baseline_cpu"), ".3f"),
                             f"{row['mfu_measured']:.3f}", _fmt(row["mfu_peak"], ".3f", "n/a"),
                             _fmt(memory.get("peak_mib"), ",.0f"), _fmt(memory.get("delta_mib"), ",.0f")])
    return rows


def training_markdown(report: dict) -> list:
    s = report["settings"]
    lines = _table(["comparison", "model", "params", "tokens/s", "x baseline", "x best rounds", "x CPU time",
                    "MFU (measured matmul)", "MFU (peak)", "peak MiB", "+MiB"], "llrrrrrrrrr",
                   training_rows(report["results"]))
    if report["machine"]["transformers"] is None:
        lines.append("\ntransformers is not installed: no Llama baseline (pip install 'lunaris[hf]' for it).")
    rates = [row["matmul_flops_per_s"] for row in report["results"] if "matmul_flops_per_s" in row]
    if rates:
        lines.append(f"\nmeasured {s['dtype']} matmul rate (median over rounds): {statistics.median(rates) / 1e9:,.1f} "
                     f"GFLOP/s" + (f"; datasheet peak {report['peak_flops'] / 1e12:,.0f} TFLOP/s"
                                   if report.get("peak_flops") else ""))
    if report["targets"]:
        lines.append("")
        lines += _table(["target", "measured", "needed", "met"], "lrrl",
                        [[t["target"], f"{t['value']:.3f}", f">= {t['at_least']:.2f}", "yes" if t["met"] else "NO"]
                         for t in report["targets"]])
    return lines


# ---- the data pipeline, decoding, the MoC layer -------------------------------------------------------------

def data_markdown(result: dict) -> str:
    """The table of lunaris.bench.data.bench_data's result."""
    rows = []
    if "prepare" in result:
        p = result["prepare"]
        rows += [("prepare corpus", f"{p['corpus_bytes'] / 1e6:.1f} MB, {p['documents']:,} documents, "
                                    f"vocab {p['vocab_size']}", ""),
                 ("tokenizer encode_batch alone (best)",
                  f"{p['pure_mb_per_s']:.2f} MB/s wall, {p['pure_mb_per_cpu_s']:.2f} MB per CPU-s",
                  f"{min(p['pure_wall_s']):.2f} s wall, {min(p['pure_cpu_s']):.2f} CPU-s"),
                 ("lunaris prepare pipeline (best)",
                  f"{p['pipeline_mb_per_s']:.2f} MB/s wall, {p['pipeline_mb_per_cpu_s']:.2f} MB per CPU-s",
                  f"{min(p['pipeline_wall_s']):.2f} s wall, {min(p['pipeline_cpu_s']):.2f} CPU-s"),
                 (f"pipeline / pure tokenization (median of {len(p['pure_wall_s'])} adjacent pairs)",
                  f"{p['ratio_wall']:.3f} wall, {p['ratio_cpu']:.3f} CPU",
                  f"target <= {p['target_ratio_at_most']:.2f}")]
    if "loader" in result:
        t = result["loader"]
        rows += [("loader shards", f"{t['shard_tokens'] / 1e6:.0f}M uint16 tokens in {t['shards']} shards, "
                                   f"page-cached", ""),
                 (f"TokenLoader, num_workers={t['num_workers']}, batch {t['batch_size']} x {t['seq_len']}",
                  f"{t['tokens_per_s'] / 1e6:.1f} M tokens/s",
                  f"target >= {t['target_tokens_per_s_at_least'] / 1e6:.0f}")]
    header = f"cpu cores: {result['cpu_count']}, python {result['python']}\n"
    return "\n".join([header] + _table(["measurement", "result", "note"], "lll", rows))


def _decode_cell(row: dict, name: str) -> str:
    if name not in row["tps"]:
        return row["errors"].get(name, "not run")
    return f"{row['tps'][name]:.1f} ({row['fraction'][name]:.0%})"


def _decode_ratios(row: dict) -> list:
    p, v, c, vs = row["probe"], row.get("vs_hf", {}), row["compile_s"], row.get("vs_static", {})
    break_even = "-" if "break_even" not in row else ("never" if row["break_even"] is None
                                                       else f"{row['break_even']:.0f}")
    return [row["size"], f"{p['linear']:.1f}", f"{p['compiled']:.1f}" if "compiled" in p else "-", f"{p['read']:.1f}",
            f"{v['eager']:.2f}x" if "eager" in v else "-", f"{v['compiled']:.2f}x" if "compiled" in v else "-",
            f"{vs['compiled']:.2f}x" if "compiled" in vs else "-", f"{c['compiled']:.1f}" if "compiled" in c else "-",
            break_even, f"{c['transformers static']:.1f}" if "transformers static" in c else "-"]


def _same_tokens(row: dict) -> str:
    return "yes" if all(row["same"].values()) else "NO: " + ", ".join(k for k, v in row["same"].items() if not v)


def generate_markdown(result: dict) -> str:
    """The tables of lunaris.bench.generate.bench_generate's result."""
    o, rows = result["options"], result["sizes"]
    lines = [f"Decode, batch 1, greedy, fp32, prompt {o['prompt_tokens']} + {o['new_tokens']} new tokens, "
             f"{result['threads']} thread(s), torch {result['torch']}, transformers {result['transformers']}, "
             f"{o['clock']} clock, median of {o['rounds']} rounds", ""]
    lines += _table(["model", "parameters", "weights MB", "limit tokens/s", "lunaris eager", "lunaris compiled",
                     "lunaris compiled, BLAS products", "transformers", "transformers static+compile", "same tokens"],
                    "lrrrrrrrrl",
                    [[r["shape"], f"{r['params'] / 1e6:.1f}M", f"{r['bytes'] / 1e6:.0f}", f"{r['limit']:.1f}"]
                     + [_decode_cell(r, name) for name in result["implementations"]] + [_same_tokens(r)]
                     for r in rows])
    diffs = ", ".join(f"{r['size']} {r['logits_diff']:.1e}" for r in rows if "logits_diff" in r)
    lines += ["", "tokens/s (fraction of the limit). Limit = best matrix-vector GB/s of the round / weight bytes."
              + (f" Largest difference between compiled and eager logits over all steps: {diffs}." if diffs else ""),
              ""]
    lines += _table(["model", "probe F.linear GB/s", "probe compiled GB/s", "plain read GB/s", "eager vs transformers",
                     "compiled vs transformers", "compiled vs transformers static", "lunaris compile s",
                     "break-even tokens", "transformers static first call s"], "lrrrrrrrrr",
                    [_decode_ratios(r) for r in rows])
    lines += ["", "lunaris compile s: the first compiled step, compilation included; break-even tokens: new tokens "
              "after which that has paid for itself against eager decoding; transformers static first call: a whole "
              "first generate, compilation included."]
    if result["targets"]:
        shown = {"speedup": "{:.2f}x", "fraction": "{:.0%}"}
        lines += [""] + _table(["target (sizes small, 124m)", "measured", "met"], "lll",
                               [[t["target"], ", ".join(shown[t["kind"]].format(v) for v in t["values"]),
                                 "yes" if t["met"] else "no"] for t in result["targets"]])
    return "\n".join(lines)


def moc_layer_markdown(result: dict) -> str:
    """The table of lunaris.bench.moc.bench_moc_layer's result."""
    o = result["options"]
    header = (f"torch {result['torch']}, {result['threads']} threads; D={o['d_model']}, H={result['hidden']}, "
              f"E={o['experts']}, top-{o['top_k']}, capacity_factor={o['capacity_factor']} (C={result['capacity']}), "
              f"N={o['tokens']} tokens, fp32, {o['rounds']} rounds, {o['clock']} clock; auto backend = "
              f"{result['backend']}\n")
    table = _table(["variant (forward + backward)", "median ms", "tokens/s", "x dense", "x MoC none S=1"], "lrrrr",
                   [[v["name"], f"{v['median_ms']:.1f}", f"{v['tokens_per_s']:,.0f}", f"{v['vs_dense']:.2f}",
                     f"{v['vs_baseline']:.2f}"] for v in result["variants"]])
    share = result["dispatch_share"]
    lines = [header] + table + [f"\ndispatch share of the baseline MoC layer (experts = identity / full layer): "
                                f"{share:.0%}"]
    if "parts" in result:
        total = sum(part["median_ms"] for part in result["parts"] if not part["part"].startswith(" "))
        lines += ["", "the baseline MoC layer, part by part (forward + backward)", ""]
        lines += _table(["part", "median ms", "share"], "lrr",
                        [[part["part"], f"{part['median_ms']:.2f}", f"{part['median_ms'] / total:.0%}"]
                         for part in result["parts"]])
    return "\n".join(lines)


SECTION_TABLES = {  # report key: (title, the markdown of its result)
    "data": ("data: `lunaris prepare` against the tokenizer alone, and the loader", data_markdown),
    "generate": ("generate: decoding against the memory-bandwidth limit and transformers", generate_markdown),
    "moc_layer": ("moc_layer: one MoC layer against a dense SwiGLU, and its dispatch", moc_layer_markdown),
}


def markdown_report(report: dict) -> str:
    """The whole report as printed by `lunaris bench` (see lunaris.bench.run.run_bench for its fields)."""
    m, s, git = report["machine"], report["settings"], report["git"] or {}
    lines = [f"lunaris bench — {report['date']}, commit {git.get('commit', 'unknown')[:12]}"
             f"{' (uncommitted changes)' if git.get('dirty') else ''}",
             f"{m['cpu']}, {m['cpu_count']} CPUs, {m['torch_threads']} torch threads"
             f"{', ' + m['gpu'] if m.get('gpu') else ''}; torch {m['torch']}, "
             f"transformers {m['transformers'] or 'not installed'}; "
             f"{s['dtype']}, seq {s['seq_len']}, batch {s['batch']}, {s['warmup']} warm-up + {s['repeats']} rounds",
             f"command: {report['command']}", ""]
    lines += training_markdown(report)
    for name, (title, markdown) in SECTION_TABLES.items():
        if name in report:
            section = report[name]
            done = "error" not in section and "skipped" not in section
            lines += [f"\n### {title}", markdown(section) if done else section.get("error") or section["skipped"]]
    return "\n".join(lines)
