"""`lunaris sweep`: variants at an equal budget, fresh processes, the same held-out batches, resume, clear errors."""

import json
import math
import os
import signal
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
import yaml
from conftest import prepared_words

from lunaris.cli import main
from lunaris.config import TrainConfig, load_config
from lunaris.sweep import _differences, apply_schedule, read_sweep, summarize, variant_cost

ROOT = Path(__file__).resolve().parents[1]
MOC = ["--model.n_experts=4", "--model.top_k=2", "--model.collab_mode=simple"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """A prepared directory (train/ and val/ splits, a manifest with byte counts for bits per byte)."""
    return prepared_words(tmp_path_factory.mktemp("sweep-data"),
                          "the quick brown fox jumps over the lazy dog while the cat sleeps",
                          n_docs=60, doc_words=80, val_tokens=600, shard_tokens=2000)


@pytest.fixture(autouse=True)
def _one_thread_children(monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # the runs' processes: tiny models are fastest on one thread


def write_sweep(root: Path, data, budget: dict, variants: dict, **keys) -> Path:
    """configs/base.yaml (a tiny CPU model) and sweeps/s.yaml naming it by a relative path."""
    (root / "configs").mkdir(parents=True, exist_ok=True)
    (root / "sweeps").mkdir(exist_ok=True)
    base = {"model": {"vocab_size": 320, "d_model": 32, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2,
                      "max_seq_len": 32, "multiple_of": 16},
            "data_dir": str(data), "batch_size": 4, "learning_rate": 3e-3, "warmup_steps": 100, "log_interval": 5,
            "eval_batches": 2, "num_workers": 0, "pin_memory": False, "device": "cpu", "dtype": "fp32"}
    (root / "configs" / "base.yaml").write_text(yaml.safe_dump(base))
    sweep = {"base": "../configs/base.yaml", "budget": budget, "variants": variants, **keys}
    path = root / "sweeps" / "s.yaml"
    path.write_text(yaml.safe_dump(sweep, sort_keys=False))
    return path


def results(out: Path) -> dict:
    return {row["variant"]: row for row in json.loads((out / "results.json").read_text())["variants"]}


def state(out: Path) -> dict:
    return json.loads((out / "sweep_state.json").read_text())["runs"]


def checkpoint_step(run_dir: Path) -> int:
    return torch.load(run_dir / "latest_checkpoint.pt", map_location="cpu", weights_only=True)["step"]


def test_equal_flops_two_variants_end_to_end(tmp_path, data, capsys):
    dense = variant_cost(load_config(None, {"model.vocab_size": 320, "model.d_model": 32, "model.n_layers": 2,
                                            "model.n_heads": 4, "model.n_kv_heads": 2, "model.max_seq_len": 32,
                                            "model.multiple_of": 16, "batch_size": 4}))
    budget = 16.5 * dense.flops_per_token * dense.tokens_per_step
    sweep = write_sweep(tmp_path, data, {"flops": budget}, {"dense": [], "moc": MOC}, eval_batches=3)
    out = tmp_path / "out"
    assert main(["sweep", str(sweep), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "warmup_steps 100 -> 1" in printed and "| dense |" in printed and "| moc |" in printed

    rows = results(out)
    assert set(rows) == {"dense", "moc"}
    for row in rows.values():
        one_step = row["tokens_per_step"] * row["flops_per_token"]
        trained = row["steps"] * one_step
        assert budget - one_step < trained <= budget                    # the budget, to within one step
        assert row["flops"] == pytest.approx(trained)
        assert checkpoint_step(Path(row["runs"][0]["run_dir"])) == row["steps"]
        assert 0 < row["val_loss"] < 10 and 0 < row["val_bpb"] < 10 and row["train_seconds"] > 0
        assert len(row["runs"][0]["curve"]) >= 4                       # held-out loss during training
    assert rows["dense"]["steps"] == 16
    assert rows["moc"]["flops_per_token"] > rows["dense"]["flops_per_token"]
    assert rows["moc"]["steps"] < rows["dense"]["steps"]
    assert rows["moc"]["params"] > rows["moc"]["active_params"]                  # 2 of 4 experts per token
    assert rows["dense"]["params"] == rows["dense"]["active_params"]
    assert rows["dense"]["eval_tokens"] == rows["moc"]["eval_tokens"] == 3 * 4 * 32   # the same 3 batches each
    assert {"moc/drop_rate", "moc/router_entropy"} <= set(rows["moc"]["metrics"]) and not rows["dense"]["metrics"]
    assert (out / "results.md").read_text().startswith("Budget ") and (out / "sweep.png").stat().st_size > 0
    assert all(run["status"] == "finished" for run in state(out).values())

    # a changed variant is refused, naming it and what changed; --only keeps the others' results in the report
    text = sweep.read_text().replace("--model.top_k=2", "--model.top_k=1")
    sweep.write_text(text)
    assert main(["sweep", str(sweep), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "variant 'moc' (seed 0) was trained with another config" in err and "model.top_k 2 -> 1" in err
    assert "delete" in err and "variant 'dense'" not in err


def test_rerun_skips_finished_runs_and_resumes_an_interrupted_one_at_equal_tokens(tmp_path, data, capsys,
                                                                                   monkeypatch):
    sweep = write_sweep(tmp_path, data, {"tokens": 40 * 4 * 32},
                        {"first": [], "second": ["--model.n_reasoning_steps=2", "--batch_size=8"]})
    out = tmp_path / "out"
    assert main(["sweep", str(sweep), "--out", str(out), "--only", "first"]) == 0
    assert set(results(out)) == {"first"} and "second" not in state(out)
    first_checkpoint = out / "first-seed0" / "latest_checkpoint.pt"
    first_mtime = first_checkpoint.stat().st_mtime_ns
    capsys.readouterr()

    # SIGTERM to the sweep (this process) while `second` trains, paused inside its step-10 save: the sweep passes it
    # on, the run saves and stops, and the sweep stops
    def terminate_when_saving():
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if list((out / "second-seed0").glob(".ckpt_10.pt.tmp-*")):
                os.kill(os.getpid(), signal.SIGTERM)  # caught by the sweep's handler while the run trains
                return
            time.sleep(0.02)

    monkeypatch.setenv("LUNARIS_TEST_PAUSE_IN_SAVE", "10:1")
    killer = threading.Thread(target=terminate_when_saving, daemon=True)
    killer.start()
    assert main(["sweep", str(sweep), "--out", str(out)]) == 143
    killer.join()
    monkeypatch.delenv("LUNARIS_TEST_PAUSE_IN_SAVE")
    printed = capsys.readouterr().out
    assert "SIGTERM: finishing the current step" in printed
    assert "sweep interrupted (second-seed0 stopped with a checkpoint)" in printed
    stopped = checkpoint_step(out / "second-seed0")
    assert 10 <= stopped < 20 and state(out)["second-seed0"]["status"] == "started"

    assert main(["sweep", str(sweep), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert f"seed 0 resumes from step {stopped}" in printed                         # the plan's status column
    assert "resuming from" in printed and f"at step {stopped}" in printed            # not from step 0
    assert first_checkpoint.stat().st_mtime_ns == first_mtime                      # not trained again
    rows = results(out)
    assert (rows["first"]["steps"], rows["second"]["steps"]) == (40, 20)            # batch 4 and batch 8
    assert rows["first"]["tokens"] == rows["second"]["tokens"] == 40 * 4 * 32       # the same tokens
    assert rows["first"]["eval_tokens"] == rows["second"]["eval_tokens"]            # scored on the same batches
    metrics = [json.loads(line) for line in (out / "second-seed0" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in metrics] == sorted({r["step"] for r in metrics})    # one run, no restart


def test_a_tokens_budget_gives_every_variant_the_same_tokens_to_within_a_step(tmp_path, data, capsys):
    sweep = read_sweep(write_sweep(tmp_path, data, {"tokens": 5000},
                                   {"b4": [], "b8": ["--batch_size=8"], "seq16": ["--model.max_seq_len=16"],
                                    "accum3": ["--gradient_accumulation_steps=3"]}))
    from lunaris.sweep import plan_runs
    runs = {run.variant: run for run in plan_runs(sweep, tmp_path / "out", {})}
    for variant, per_step in (("b4", 128), ("b8", 256), ("seq16", 64), ("accum3", 384)):
        assert sweep.costs[variant].tokens_per_step == per_step
        assert runs[variant].config.max_steps == 5000 // per_step
    assert main(["sweep", str(sweep.path), "--out", str(tmp_path / "out"), "--dry-run"]) == 0
    assert "differ in max_seq_len" in capsys.readouterr().out


def test_a_launcher_runs_each_variant_on_two_processes(tmp_path, data, capsys):
    # torchrun as the launcher: the budget counts both processes' tokens, rank 0 writes the result
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    sweep = write_sweep(tmp_path, data, {"tokens": 2560}, {"moc": [*MOC, "--model.n_shared_experts=1"]},
                        launcher=launcher, eval_batches=1)
    out = tmp_path / "out"
    assert main(["sweep", str(sweep), "--out", str(out)]) == 0, capsys.readouterr().err
    row = results(out)["moc"]
    assert row["steps"] == 2560 // (4 * 32 * 2) == 10 and row["tokens"] == 2560
    assert math.isfinite(row["val_loss"]) and checkpoint_step(out / "moc-seed0") == 10
    log = (out / "moc-seed0" / "sweep.log").read_text()
    assert "256 tokens/step (4 x 32 x accum 1 x 2 proc)" in log and "ddp" in log


def test_a_seconds_budget_is_calibrated_once_and_kept(tmp_path, data, capsys):
    sweep = write_sweep(tmp_path, data, {"seconds": 0.2}, {"dense": []}, eval_batches=1)
    out = tmp_path / "out"
    assert main(["sweep", str(sweep), "--out", str(out), "--dry-run"]) == 0
    assert "timed at start" in capsys.readouterr().out and not out.exists()
    assert main(["sweep", str(sweep), "--out", str(out)]) == 0
    steps = json.loads((out / "sweep_state.json").read_text())["calibrated"]["dense"]["steps"]
    assert steps >= 20 and results(out)["dense"]["steps"] == steps
    capsys.readouterr()
    assert main(["sweep", str(sweep), "--out", str(out), "--dry-run"]) == 0
    assert f"| {steps} |" in capsys.readouterr().out                                # not timed again

    # A state written before a config key existed (here n_shared_experts): at its default it is the same run.
    state_path = out / "sweep_state.json"
    state = json.loads(state_path.read_text())
    del state["calibrated"]["dense"]["config"]["model.n_shared_experts"]
    del state["runs"]["dense-seed0"]["config"]["model.n_shared_experts"]
    state_path.write_text(json.dumps(state))
    assert main(["sweep", str(sweep), "--out", str(out), "--dry-run"]) == 0
    assert f"| {steps} |" in capsys.readouterr().out and results(out)["dense"]["steps"] == steps
    assert _differences({}, {"model.n_shared_experts": 1}) == ["model.n_shared_experts None -> 1"]
    assert _differences({}, {"model.n_shared_experts": 0}) == []


def test_a_missing_unreadable_or_invalid_sweep_file_is_one_clear_error(tmp_path, capsys):
    binary, broken = tmp_path / "binary.yaml", tmp_path / "broken.yaml"
    binary.write_bytes(b"\xff\xfe\x00")
    broken.write_text("variants: [unclosed\n")
    for path, expected in ((tmp_path / "nope.yaml", "does not exist; pass the path of a YAML file (with base"),
                           (binary, "cannot be read"), (broken, "is not valid YAML")):
        assert main(["sweep", str(path)]) == 2
        err = capsys.readouterr().err
        assert f"error: sweep file {path} {expected}" in err and "Traceback" not in err, err


def test_a_bad_sweep_file_reports_every_problem_at_once(tmp_path, data, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"variant": {"a": []}, "budget": {"flops": -1, "tokens": 10}, "variants": {},
                                   "seeds": 0}))
    assert main(["sweep", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "traceback" not in err.lower() and "has 6 problems" in err, err
    for expected in ("unknown key 'variant' (did you mean 'variants'?)", "base is missing",
                     "exactly one of flops, tokens, seconds, got flops, tokens", "budget flops must be a positive",
                     "seeds must be a positive integer", "variants must be a mapping of at least one name"):
        assert expected in err, expected

    sweep = write_sweep(tmp_path, data, {"tokens": 0.5}, {"ok": [], "heads": ["--model.n_heads=5"],
                                                          "fixed": ["--max_steps=3"], "typo": ["--model.n_expert=4"]})
    assert main(["sweep", str(sweep), "--only", "ok,nope"]) == 2
    err = capsys.readouterr().err
    for expected in ("variant 'heads': model.d_model (32) must be divisible by model.n_heads (5, from "
                     "--model.n_heads=5)", "variant 'fixed' sets max_steps (to 3); the sweep sets it from the budget",
                     "variant 'typo': unknown key 'model.n_expert'", "--only names unknown variant nope",
                     "variant 'ok': the budget of 0 tokens is less than one optimizer step (128 tokens)"):
        assert expected in err, (expected, err)

    missing = write_sweep(tmp_path / "missing", tmp_path / "no-data", {"tokens": 1280}, {"dense": []})
    assert main(["sweep", str(missing), "--out", str(tmp_path / "out")]) == 2       # before anything trains
    assert "the sweep's data has 1 problem" in capsys.readouterr().err and not (tmp_path / "out").exists()


def test_dry_run_prints_the_plan_and_trains_nothing(tmp_path, data, capsys):
    sweep = write_sweep(tmp_path, data, {"tokens": 1280}, {"dense": [], "moc": MOC}, seeds=2)
    out = tmp_path / "out"
    assert main(["sweep", str(sweep), "--out", str(out), "--dry-run", "--seeds", "3"]) == 0
    printed = capsys.readouterr().out
    assert "2 variants x 3 seeds" in printed and "| dense |" in printed and "| 10 | 1.28k |" in printed
    assert "nothing was trained" in printed and not out.exists()


@pytest.mark.parametrize("name", ["moc-study-flops.yaml", "moc-study-time.yaml"])
def test_the_study_sweeps_plan(name, tmp_path, capsys):
    path = ROOT / "bench" / "sweeps" / name
    assert main(["sweep", str(path), "--out", str(tmp_path / "out"), "--dry-run"]) == 0
    printed = capsys.readouterr().out
    sweep = read_sweep(path)
    assert len(sweep.variants) == 11 and all(f"| {v} |" in printed for v in sweep.variants)
    assert sweep.seeds == 2
    kinds = {v: (c.model.resolved_collab_mode if c.model.is_moc else "dense", c.model.n_reasoning_steps)
             for v, c in sweep.configs.items()}
    assert kinds["topk"] == ("none", 1) and kinds["moc-mha-irl2"] == ("mha", 2) and kinds["dense-irl3"] == ("dense", 3)
    shared = sweep.configs["topk-shared"].model
    assert (shared.top_k, shared.n_shared_experts) == (1, 1)
    assert sweep.costs["topk-shared"].active_params == sweep.costs["topk"].active_params   # same active weights
    assert not (tmp_path / "out").exists()


def test_seeds_are_averaged_with_their_spread(tmp_path, data):
    sweep = read_sweep(write_sweep(tmp_path, data, {"tokens": 1280}, {"dense": []}, seeds=2))
    from lunaris.sweep import format_table, plan_runs
    runs = plan_runs(sweep, tmp_path / "out", {})
    fake = {"runs": {run.name: {"status": "finished", "result": {
        "steps": 10, "val_loss": 2.0 + run.seed, "val_bpb": 1.0 + run.seed, "eval_tokens": 256, "train_seconds": 3.0,
        "curve": [], "metrics": {}}} for run in runs}}
    rows = summarize(sweep, runs, fake)
    assert rows[0]["val_loss"] == 2.5 and rows[0]["seeds"] == [0, 1]
    assert "2.5000 ± 0.7071" in format_table(sweep, rows)


def test_the_readme_sweep_file_plans(tmp_path, capsys):
    import re
    readme = (ROOT / "README.md").read_text()
    block = next(b for b in re.findall(r"```yaml file=sweep.yaml\n(.*?)```", readme, re.S) if "variants:" in b)
    (tmp_path / "sweep.yaml").write_text(block)   # in a directory of its own: its base is a preset, by name
    assert main(["sweep", str(tmp_path / "sweep.yaml"), "--out", str(tmp_path / "out"), "--dry-run"]) == 0
    printed = capsys.readouterr().out
    assert "| dense |" in printed and "| topk |" in printed and not (tmp_path / "out").exists()
    assert printed.count("| 40 | 163.84k |") == 2                        # the 40 steps the README says


def test_one_missing_base_file_is_one_problem(tmp_path, capsys):
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump({"base": "../configs/nope.yaml", "budget": {"tokens": 1000},
                                    "variants": {"dense": []}}))
    assert main(["sweep", str(path)]) == 2
    err = capsys.readouterr().err
    assert "has 1 problem:" in err and err.count("nope.yaml") == 2, err   # the path as written, and as resolved
    assert f"base config ../configs/nope.yaml does not exist (paths are relative to the sweep file: " \
           f"{tmp_path / '../configs/nope.yaml'}); give a config file or a preset's name (demo-cpu, " in err


def test_every_training_key_is_compared_or_listed_as_not_compared():
    """A new TrainConfig key must be classified: does a changed value invalidate a recorded run (COMPARED) or not
    (NOT_COMPARED: logging, paths, speed)? Every model key is compared."""
    from lunaris.config import field_docs
    from lunaris.sweep import COMPARED, NOT_COMPARED
    keys = {name for name, _, _ in field_docs(TrainConfig)}
    assert not COMPARED & NOT_COMPARED
    unclassified, gone = sorted(keys - COMPARED - NOT_COMPARED), sorted((COMPARED | NOT_COMPARED) - keys)
    assert not unclassified and not gone, f"classify in src/lunaris/sweep/state.py: {unclassified}; gone: {gone}"


def test_the_schedule_a_sweep_sets_and_the_overrides_that_win():
    config = load_config(None, {"log_interval": 10, "save_interval": 1000, "eval_interval": 1000, "keep_last": 3,
                                "warmup_steps": 2})
    assert apply_schedule(config, 40) == []
    assert (config.max_steps, config.eval_interval, config.log_interval) == (40, 5, 5)     # 8 evaluations
    assert (config.save_interval, config.keep_last) == (10, 1)                             # 4 saves, the newest kept
    apply_schedule(config, 10)
    assert (config.eval_interval, config.save_interval) == (2, 3)      # 5 evaluations, not one after every step
    fixed = {"save_interval", "keep_last", "eval_interval", "log_interval"}
    config = load_config(None, {"log_interval": 4, "save_interval": 7, "eval_interval": 12, "keep_last": 0})
    apply_schedule(config, 40, fixed=fixed)
    assert (config.log_interval, config.save_interval, config.eval_interval, config.keep_last) == (4, 7, 12, 0)
    config = load_config(None, {"log_interval": 4})
    apply_schedule(config, 40, eval_interval=10)                       # the sweep file's eval_interval key
    assert (config.eval_interval, config.log_interval) == (10, 2)      # evaluations on logged steps


def disk_bytes(directory: Path) -> int:
    """Bytes the files under `directory` take, a hard-linked file once (latest_checkpoint.pt is a link)."""
    inodes = {p.stat().st_ino: p.stat().st_size for p in directory.rglob("*") if p.is_file()}
    return sum(inodes.values())


def test_a_sweep_keeps_one_checkpoint_per_run_and_overrides_win(tmp_path, data, capsys):
    """Disk use of a 40-step run: one checkpoint (the defaults of a training config would keep 3, and the sweep's old
    defaults saved and evaluated every 5 steps); a variant's --keep_last/--save_interval/--eval_interval win."""
    sweep = write_sweep(tmp_path, data, {"tokens": 40 * 4 * 32},
                        {"cheap": [], "kept": ["--keep_last=0", "--save_interval=5", "--eval_interval=20"]})
    out = tmp_path / "out"
    assert main(["sweep", str(sweep), "--out", str(out)]) == 0, capsys.readouterr().err
    cheap, kept = out / "cheap-seed0", out / "kept-seed0"
    one = (cheap / "ckpt_40.pt").stat().st_size
    assert sorted(p.name for p in cheap.glob("ckpt_*.pt")) == ["ckpt_40.pt"]
    assert (cheap / "latest_checkpoint.pt").stat().st_ino == (cheap / "ckpt_40.pt").stat().st_ino
    assert disk_bytes(cheap) < one + 100_000, (disk_bytes(cheap), one)      # one checkpoint and the logs
    saves = [line for line in (cheap / "sweep.log").read_text().splitlines() if line.startswith("saved ")]
    assert len(saves) == 4                                                   # steps 10, 20, 30, 40
    evaluations = [json.loads(line)["step"] for line in (cheap / "metrics.jsonl").read_text().splitlines()
                   if "val/loss" in line]
    assert evaluations == list(range(5, 41, 5))                              # 8, the last at the end

    assert sorted(int(p.stem.split("_")[1]) for p in kept.glob("ckpt_*.pt")) == list(range(5, 41, 5))
    assert [json.loads(line)["step"] for line in (kept / "metrics.jsonl").read_text().splitlines()
            if "val/loss" in line] == [20, 40]
