"""The training loop in one process: exact resume, accumulation, checkpoints, metrics, faults, compile."""

import json
import math
import re
import sys
import types
import warnings

import pytest
import torch
import yaml

from lunaris import LunarisCodex, load_config
from lunaris.cli import main as cli_main
from lunaris.errors import LunarisError
from lunaris.train import Trainer, train
from lunaris.train.checkpoint import LATEST_FILE, find_latest, load_checkpoint_file
from lunaris.train.optim import apply_lr, build_optimizer, lr_at

DESIGN_TRAIN_KEYS = {"loss/total", "loss/main", "loss/aux", "perplexity", "lr", "grad_norm",
                     "throughput/tokens_per_sec"}
CHECKPOINT_KEYS = {"model", "optimizer", "scaler", "step", "epoch", "data_state", "rng", "config", "bad_steps",
                   "lunaris_version"}


def stop_after(trainer: Trainer, stop_step: int) -> None:
    """Make `trainer` behave as if SIGTERM arrived during step `stop_step`."""
    original = trainer.train_step

    def step(index):
        if index + 1 == stop_step:  # the request is seen by the step's vote, like a signal during the step
            trainer.request_stop("test")
        return original(index)

    trainer.train_step = step


def test_stop_and_resume_matches_uninterrupted_run(tmp_path, train_config, helpers):
    # dropout on: an exact match needs the generators restored, not just the weights and data position
    common = dict(model={"dropout": 0.1}, max_steps=20, warmup_steps=4, save_interval=5, keep_last=2,
                  eval_interval=5)
    straight = train(train_config(tmp_path / "straight", **common))
    assert straight.step == 20 and straight.reason == "finished"

    trainer = Trainer(train_config(tmp_path / "resumed", **common))
    stop_after(trainer, 7)
    try:
        stopped = trainer.run()
    finally:
        trainer.close()
    assert (stopped.step, stopped.reason) == (7, "signal")
    assert load_checkpoint_file(tmp_path / "resumed")["step"] == 7   # saved on stop, between save_intervals
    resumed = train(train_config(tmp_path / "resumed", **common))      # resumes automatically from out_dir
    assert resumed.step == 20

    a, b = helpers.read_metrics(tmp_path / "straight"), helpers.read_metrics(tmp_path / "resumed")
    assert [r["step"] for r in b] == list(range(1, 21))              # no step logged twice after the resume
    assert [r["loss/total"] for r in a] == [r["loss/total"] for r in b]
    assert [r.get("val/loss") for r in a] == [r.get("val/loss") for r in b]
    assert [r["step"] for r in a if "val/loss" in r] == [5, 10, 15, 20]
    helpers.assert_weights_close(helpers.final_weights(tmp_path / "straight"),
                                 helpers.final_weights(tmp_path / "resumed"))
    opt_a = load_checkpoint_file(tmp_path / "straight")["optimizer"]["state"]
    opt_b = load_checkpoint_file(tmp_path / "resumed")["optimizer"]["state"]
    assert all(torch.equal(opt_a[i]["exp_avg_sq"], opt_b[i]["exp_avg_sq"]) for i in opt_a)

    # the loss falls on the tiny repetitive corpus
    losses = [r["loss/total"] for r in a]
    assert sum(losses[-3:]) / 3 < losses[0] - 0.5, losses


def test_checkpoint_files_format_and_run_info(tmp_path, train_config):
    out = tmp_path / "run"
    config = train_config(out, max_steps=6, save_interval=2, keep_last=2)
    train(config)
    assert sorted(p.name for p in out.glob("ckpt_*")) == ["ckpt_4.pt", "ckpt_6.pt"]   # keep_last rotation
    assert find_latest(out) == out / LATEST_FILE

    state = torch.load(out / LATEST_FILE, map_location="cpu", weights_only=True)  # no pickled objects
    assert CHECKPOINT_KEYS <= state.keys()
    assert state["step"] == 6 and state["bad_steps"] == 0
    assert not [k for k in state["model"] if k.startswith(("module.", "_orig_mod.")) or "_orig_mod" in k]
    assert state["config"]["model"] == config.model.__dict__
    assert state["data_state"]["batch_in_epoch"] == 6 and len(state["rng"]) == 1
    assert {g["name"]: g["lr_scale"] for g in state["optimizer"]["param_groups"]} == {"decay": 1.0,
                                                                                       "no_decay": 1.0}
    model = LunarisCodex(config.model)
    model.load_state_dict(state["model"])                              # loads strictly into a fresh model
    light = load_checkpoint_file(out, include_optimizer=False)          # what generate/eval/export need
    assert "optimizer" not in light and all(torch.equal(light["model"][k], v) for k, v in state["model"].items())

    info = json.loads((out / "run_info.json").read_text())
    assert {"lunaris_version", "git_commit", "torch_version", "device", "world_size"} <= info.keys()
    assert info["torch_version"] == torch.__version__ and info["world_size"] == 1
    assert info["git_commit"] is None or re.fullmatch(r"[0-9a-f]{40}(\+dirty)?", info["git_commit"])
    assert info["device_type"] == "cpu" and info["dtype"] == "fp32" and info["parameters"] > 0
    assert load_config(out / "config.yaml") == config                   # the resolved config round-trips


def test_metrics_jsonl_keys_and_mfu(tmp_path, train_config, helpers):
    out = tmp_path / "run"
    train(train_config(out, max_steps=4, log_interval=2, eval_interval=4, peak_flops=1e12))
    records = helpers.read_metrics(out)
    assert [r["step"] for r in records] == [1, 2, 4]                   # first step, every log_interval, last
    for record in records:
        assert DESIGN_TRAIN_KEYS | {"throughput/mfu"} <= record.keys()
        assert math.isclose(record["perplexity"], math.exp(record["loss/main"]), rel_tol=1e-9)
    flops = LunarisCodex(train_config(out).model).flops_per_token(32)
    last = records[-1]
    assert math.isclose(last["throughput/mfu"], flops * last["throughput/tokens_per_sec"] / 1e12, rel_tol=1e-9)
    assert {"val/loss", "val/perplexity"} <= last.keys() and "val/loss" not in records[0]

    # without peak_flops on a CPU there is no peak to divide by: MFU is omitted, not guessed
    train(train_config(tmp_path / "no_peak", max_steps=2, warmup_steps=1))
    assert all("throughput/mfu" not in r for r in helpers.read_metrics(tmp_path / "no_peak"))


def test_accumulation_split_gives_the_same_training(tmp_path, train_config, helpers):
    one = train_config(tmp_path / "b8", batch_size=8, gradient_accumulation_steps=1, max_steps=4)
    two = train_config(tmp_path / "b4x2", batch_size=4, gradient_accumulation_steps=2, max_steps=4)
    train(one)
    train(two)
    a, b = helpers.losses_by_step(tmp_path / "b8"), helpers.losses_by_step(tmp_path / "b4x2")
    assert a.keys() == b.keys() == {1, 2, 3, 4}
    for step in a:
        assert math.isclose(a[step], b[step], rel_tol=1e-5), (step, a[step], b[step])
    helpers.assert_weights_close(helpers.final_weights(tmp_path / "b8"), helpers.final_weights(tmp_path / "b4x2"),
                                 atol=2e-5)


def test_schedule_keeps_router_lr_scale_through_warmup_and_decay(train_config, tmp_path):
    config = train_config(tmp_path, warmup_steps=10, max_steps=100, learning_rate=1e-3, min_lr=1e-4,
                          router_lr_scale=0.5)

    class WithRouter(torch.nn.Module):  # configure_optimizers puts any "router" parameter in the router group
        def __init__(self):
            super().__init__()
            self.proj = torch.nn.Linear(4, 4)
            self.router = torch.nn.Linear(4, 2, bias=False)

        configure_optimizers = LunarisCodex.configure_optimizers

    optimizer = build_optimizer(WithRouter(), config, "cpu")
    groups = {g["name"]: g for g in optimizer.param_groups}
    assert groups["router"]["lr_scale"] == 0.5
    for step in (0, 5, 9, 10, 50, 99, 150):
        lr = lr_at(step, config)
        apply_lr(optimizer, lr)
        assert groups["decay"]["lr"] == lr and groups["no_decay"]["lr"] == lr
        assert groups["router"]["lr"] == pytest.approx(0.5 * lr)
    assert lr_at(0, config) == pytest.approx(1e-3 / 11)           # warmup rises linearly
    assert lr_at(10, config) == pytest.approx(1e-3)               # peak after warmup
    assert lr_at(55, config) == pytest.approx(5.5e-4)             # halfway down the cosine
    assert lr_at(100, config) == lr_at(150, config) == pytest.approx(1e-4)


def test_non_finite_loss_skips_updates_and_stops_after_max_bad_steps(tmp_path, train_config, helpers):
    trainer = Trainer(train_config(tmp_path, max_steps=10, max_bad_steps=3, warmup_steps=1))
    poisoned_steps = {3, 4, 6, 7, 8}                   # 1-based: two bad, one good, then three bad
    real_model, step_of_call = trainer.wrapped.call, {"step": 0}

    def poisoned_model(x, y):
        out = real_model(x, y)
        if step_of_call["step"] in poisoned_steps:
            return out._replace(main_loss=out.main_loss * float("nan"))
        return out

    trainer.wrapped.call = poisoned_model
    snapshots, original_step = {}, trainer.train_step

    def step(index):
        step_of_call["step"] = index + 1
        result = original_step(index)
        snapshots[index + 1] = {k: v.clone() for k, v in trainer.model.state_dict().items()}
        return result

    trainer.train_step = step
    try:
        with pytest.raises(LunarisError, match=r"step 8.*3 consecutive steps \(6\.\.8\)"):
            trainer.run()
    finally:
        trainer.close()
    helpers.assert_weights_close(snapshots[2], snapshots[4])             # bad steps 3, 4: no update
    assert not torch.equal(snapshots[5]["wte.weight"], snapshots[4]["wte.weight"])  # good step 5 updates
    helpers.assert_weights_close(snapshots[5], snapshots[8])
    records = {r["step"]: r for r in helpers.read_metrics(tmp_path)}
    assert records[3]["loss/total"] is None and records[5]["loss/total"] is not None  # NaN logged as null


def test_vocab_mismatch_and_unwritable_out_dir_fail_before_training(tmp_path, train_config, helpers, capsys,
                                                                     token_data):
    import numpy as np
    bad_data = tmp_path / "bad_data"
    bad_data.mkdir()
    np.save(bad_data / "shard_000.npy", np.array([1, 2, 300, 4] * 200, dtype=np.uint16))
    config = helpers.write_yaml(train_config(tmp_path / "out1", data_dir=str(bad_data)), tmp_path / "a.yaml")
    assert cli_main(["train", str(config)]) == 2
    err = capsys.readouterr().err
    assert "300" in err and "vocab_size" in err and "Traceback" not in err
    assert not (tmp_path / "out1" / "metrics.jsonl").exists()

    # an out_dir that cannot be created (its parent is a file), and, when not root, a read-only one
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    cases = [blocker / "run"]
    if hasattr(__import__("os"), "geteuid") and __import__("os").geteuid() != 0:
        read_only = tmp_path / "read_only"
        read_only.mkdir()
        read_only.chmod(0o500)
        cases.append(read_only / "run")
    for out_dir in cases:
        config = helpers.write_yaml(train_config(out_dir), tmp_path / "b.yaml")
        assert cli_main(["train", str(config)]) == 2
        err = capsys.readouterr().err
        assert f"out_dir {out_dir} is not writable" in err and "Traceback" not in err


def test_wandb_and_tensorboard_receive_the_same_metrics(tmp_path, train_config, monkeypatch, helpers):
    logged, scalars = [], []
    fake_run = types.SimpleNamespace(log=lambda metrics, step: logged.append((step, dict(metrics))),
                                     finish=lambda: logged.append("finished"))
    init_args = {}
    fake_wandb = types.SimpleNamespace(init=lambda **kw: init_args.update(kw) or fake_run,
                                       util=types.SimpleNamespace(generate_id=lambda: "abc123"))
    monkeypatch.setitem(sys.modules, "wandb", fake_wandb)

    class FakeWriter:
        def __init__(self, log_dir, purge_step=None):
            self.log_dir = log_dir

        def add_scalar(self, key, value, step):
            scalars.append((key, step))

        def close(self):
            pass

    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", types.SimpleNamespace(SummaryWriter=FakeWriter))
    train(train_config(tmp_path, max_steps=3, warmup_steps=1, wandb_project="proj", wandb_run_name="r1",
                       tensorboard=True))
    assert init_args["project"] == "proj" and init_args["name"] == "r1" and init_args["id"] == "abc123"
    assert init_args["config"]["model"]["d_model"] == 32
    assert logged[-1] == "finished" and [s for s, _ in logged[:-1]] == [1, 2, 3]
    jsonl = helpers.read_metrics(tmp_path)
    for (step, metrics), record in zip(logged[:-1], jsonl):
        assert {"step": step, **metrics} == record
    assert ("loss/total", 3) in scalars and ("grad_norm", 1) in scalars
    assert (tmp_path / "wandb_run_id.txt").read_text() == "abc123"   # a resumed run continues the same W&B run

    # wandb_project set but the package missing: a clear error before any step
    monkeypatch.setitem(sys.modules, "wandb", None)
    with pytest.raises(LunarisError, match="wandb_project is set but the wandb package is not installed"):
        Trainer(train_config(tmp_path / "missing", wandb_project="proj"))


def test_compile_resume_and_fallback(tmp_path, train_config, monkeypatch, helpers):
    real_compile = torch.compile
    # aot_eager traces with dynamo and AOTAutograd like inductor does, without minutes of C++ codegen on CPU
    monkeypatch.setattr(torch, "compile", lambda model, **kw: real_compile(model, backend="aot_eager"))
    out = tmp_path / "compiled"
    train(train_config(out, compile_model=True, max_steps=3, warmup_steps=1))
    state = load_checkpoint_file(out)
    assert not [k for k in state["model"] if "_orig_mod" in k or k.startswith("module.")]
    resumed = train(train_config(out, compile_model=True, max_steps=5, warmup_steps=1))   # resume with compile on
    assert resumed.step == 5 and sorted(helpers.losses_by_step(out)) == [1, 2, 3, 4, 5]

    def broken_backend(graph_module, example_inputs):
        raise RuntimeError("simulated compiler crash")

    monkeypatch.setattr(torch, "compile", lambda model, **kw: real_compile(model, backend=broken_backend))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = train(train_config(tmp_path / "fallback", compile_model=True, max_steps=3, warmup_steps=1))
    messages = [str(w.message) for w in caught if "torch.compile failed" in str(w.message)]
    assert len(messages) == 1 and "simulated compiler crash" in messages[0]
    assert result.step == 3
    eager = train(train_config(tmp_path / "eager", max_steps=3, warmup_steps=1))
    assert helpers.losses_by_step(tmp_path / "fallback") == helpers.losses_by_step(tmp_path / "eager")
    assert eager.step == 3


def test_cli_overrides_and_no_resume(tmp_path, train_config, helpers, capsys):
    config = helpers.write_yaml(train_config(tmp_path / "run", max_steps=2, warmup_steps=1), tmp_path / "c.yaml")
    assert cli_main(["train", str(config)]) == 0
    assert cli_main(["train", str(config), "--max_steps=3"]) == 0          # resumes at 2, runs one step
    assert sorted(helpers.losses_by_step(tmp_path / "run")) == [1, 2, 3]
    assert cli_main(["train", str(config), "--max_steps", "3"]) == 0       # already done: nothing to do
    assert "already at step 3" in capsys.readouterr().out
    assert cli_main(["train", str(config), "--no-resume"]) == 0            # fresh run from step 0
    assert sorted(helpers.losses_by_step(tmp_path / "run")) == [1, 2]
    assert (tmp_path / "run" / "metrics.previous.jsonl").exists()
    assert cli_main(["train", str(config), "--resume", str(tmp_path / "nowhere.pt")]) == 2
    assert "nowhere.pt does not exist" in capsys.readouterr().err
    saved = yaml.safe_load(config.read_text())
    saved["model"]["d_model"] = 64
    config.write_text(yaml.safe_dump(saved))
    assert cli_main(["train", str(config)]) == 2                            # checkpoint of another model shape
    assert "model.d_model: checkpoint 32, config 64" in capsys.readouterr().err


def test_moc_training_keeps_router_lr_and_logs_expert_metrics(tmp_path, train_config, helpers):
    config = train_config(tmp_path, model={"n_experts": 4, "top_k": 2, "n_reasoning_steps": 2},
                          max_steps=4, warmup_steps=2, log_interval=2, min_lr=3e-4)
    trainer = Trainer(config)
    lrs, original = [], trainer.train_step

    def step(index):
        result = original(index)
        lrs.append({g["name"]: g["lr"] for g in trainer.optimizer.param_groups})
        return result

    trainer.train_step = step
    try:
        trainer.run()
    finally:
        trainer.close()
    for index, by_group in enumerate(lrs):                  # warmup (steps 0, 1) and cosine decay (2, 3)
        assert by_group["decay"] == pytest.approx(lr_at(index, config))
        assert by_group["router"] == pytest.approx(0.5 * by_group["decay"])
    records = helpers.read_metrics(tmp_path)
    assert [r["step"] for r in records] == [1, 2, 4]
    last = records[-1]
    assert last["loss/aux"] > 0 and last["loss/total"] == pytest.approx(last["loss/main"] + last["loss/aux"])
    for layer in (0, 1):
        utilization = [last[f"experts/util_layer{layer}/e{i}"] for i in range(4)]
        assert sum(utilization) == pytest.approx(1.0) and 0 <= last[f"experts/drop_rate_layer{layer}"] <= 1
    assert {"irl/update_norm_step1", "irl/update_norm_step2"} <= last.keys()


def test_fp16_grad_scaler_state_is_saved_and_resumed_exactly(tmp_path, train_config, monkeypatch, helpers):
    # fp16 is a CUDA feature for users; torch's CPU autocast runs the same GradScaler code path here
    import lunaris.train.trainer as trainer_module
    monkeypatch.setattr(trainer_module, "resolve_dtype", lambda name, device: torch.float16)
    common = dict(max_steps=4, warmup_steps=1, save_interval=2)
    train(train_config(tmp_path / "straight", **common))
    trainer = Trainer(train_config(tmp_path / "resumed", **common))
    stop_after(trainer, 2)
    try:
        trainer.run()
    finally:
        trainer.close()
    saved = load_checkpoint_file(tmp_path / "resumed")
    assert saved["step"] == 2 and saved["scaler"]["scale"] > 0 and saved["bad_steps"] == 0
    train(train_config(tmp_path / "resumed", **common))
    assert helpers.losses_by_step(tmp_path / "straight") == helpers.losses_by_step(tmp_path / "resumed")
    final = load_checkpoint_file(tmp_path / "straight")
    assert final["scaler"] == load_checkpoint_file(tmp_path / "resumed")["scaler"]
    assert all(math.isfinite(v) for v in helpers.losses_by_step(tmp_path / "straight").values())


def test_corrupt_latest_checkpoint_is_reported_not_silently_restarted(tmp_path, train_config, helpers, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / LATEST_FILE).write_bytes(b"PK\x03\x04 truncated by a full disk")
    config = helpers.write_yaml(train_config(out), tmp_path / "c.yaml")
    assert cli_main(["train", str(config)]) == 2
    err = capsys.readouterr().err
    assert f"Checkpoint {out / LATEST_FILE} cannot be read" in err and "--resume" in err
    assert not (out / "metrics.jsonl").exists()


def test_the_run_says_how_many_epochs_it_takes_and_warns_when_it_repeats_the_data_many_times(tmp_path, train_config):
    from lunaris.train.logging import banner
    for max_steps, warned in ((6, False), (2000, True)):
        trainer = Trainer(train_config(tmp_path / str(max_steps), max_steps=max_steps))
        try:
            lines = banner(trainer)
        finally:
            trainer.close()
        steps_per_epoch = trainer.loader.batches_per_epoch  # no accumulation
        assert f"{max_steps} steps = {max_steps / steps_per_epoch:.2f} epochs" in lines[1]
        assert any(line.startswith("warning: the run passes over its training data") for line in lines) == warned


def test_the_trainer_state_is_the_checkpoints_trainer_part(tmp_path, train_config):
    from lunaris.train.checkpoint import load_checkpoint_file
    documented = {"scaler", "step", "epoch", "data_state", "rng", "config", "bad_steps", "tokens_seen",
                  "train_seconds", "world_size", "lunaris_version"}          # README, "Checkpoints and resume"
    train(train_config(tmp_path, max_steps=3))
    saved = load_checkpoint_file(tmp_path)
    assert set(saved) == documented | {"model", "optimizer"}
    trainer = Trainer(train_config(tmp_path, max_steps=5))
    try:
        state = trainer.state
        assert (state.step, state.tokens_seen, state.bad_steps) == (3, saved["tokens_seen"], 0) and trainer.step == 3
        assert state.train_seconds == saved["train_seconds"] > 0
        again = state.state_dict()
        assert set(again) == documented
        assert again["data_state"] == saved["data_state"] and again["rng"][0]["python"] == saved["rng"][0]["python"]
        assert torch.equal(again["rng"][0]["torch"], saved["rng"][0]["torch"])
    finally:
        trainer.close()


def test_the_banner_estimates_memory_and_warns_before_step_1_when_the_run_will_not_fit(tmp_path, train_config,
                                                                                       monkeypatch):
    import lunaris.train.plan as plan
    from lunaris.train.logging import banner
    trainer = Trainer(train_config(tmp_path / "run", batch_size=8, model={"dropout": 0.1}))
    try:
        generator = torch.get_rng_state()
        lines = banner(trainer)
        assert torch.equal(torch.get_rng_state(), generator)   # the first step draws what it would without it
        assert any(line.startswith("memory: about ") and line.endswith("of RAM available: fits") for line in lines)
        assert not any("run out of memory" in line for line in lines)
        # a machine with 2 MiB available: too little for batch_size 8 of this model, enough for a smaller one
        monkeypatch.setattr(plan, "device_memory", lambda device: (2 << 20, 2 << 20))
        lines = banner(trainer)
    finally:
        trainer.close()
    assert any(line.startswith("memory: about ") and line.endswith(": does NOT fit") for line in lines)
    warning = next(line for line in lines if line.startswith("warning: this run will probably run out of memory"))
    largest = int(re.search(r"largest batch_size that fits is about (\d+)", warning).group(1))
    estimator = plan.Estimator(trainer.config, torch.device("cpu"), torch.float32)
    capacity = (2 << 20) + estimator.model.params + estimator.model.buffers
    layout = plan.Layout("single", 1, False)
    assert 0 < largest < 8
    assert plan.needed(estimator.rank(layout, largest).peak, False) <= capacity
    assert plan.needed(estimator.rank(layout, largest + 1).peak, False) > capacity
