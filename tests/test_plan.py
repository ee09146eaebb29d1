"""`lunaris plan` and the memory estimate of `lunaris train`: traced on fake tensors, checked against a real step's
memory on this CPU (tests/measure_step_memory.py), laid out for DDP and FSDP, and the command's output and errors."""

import json
import os
import sys
from pathlib import Path

import processes
import pytest
import torch

from lunaris import load_config
from lunaris.cli import main
from lunaris.train import plan
from lunaris.train.memory import optimizer_memory

ROOT = Path(__file__).resolve().parent.parent
MIB = 1 << 20

# demo-cpu (1.3M parameters, batch 16 x 256, vocabulary 4096), fp32: the CPU's precision; seconds per step here
SMALL = ["--batch_size=8", "--dtype=fp32"]
MEASURED = {
    "dense": ["--dtype=fp32"],
    "dense, gradient checkpointing": ["--dtype=fp32", "--model.use_gradient_checkpointing=true"],
    "MoC": SMALL + ["--model.n_experts=4", "--model.top_k=2", "--model.n_layers=3"],
}


def measure(overrides: list) -> dict:
    """One step's measured memory (bytes) in a fresh process: see tests/measure_step_memory.py."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")]),
           "MALLOC_MMAP_THRESHOLD_": "16384", "OMP_NUM_THREADS": "1"}
    result = processes.run([sys.executable, str(ROOT / "tests" / "measure_step_memory.py"), "demo-cpu", *overrides],
                           timeout=600, env=env)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.splitlines()[-1])


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="measures Linux's peak resident size")
@pytest.mark.parametrize("name", list(MEASURED))
def test_the_estimate_is_within_15_percent_of_a_measured_cpu_step(name):
    overrides = MEASURED[name]
    config = load_config("demo-cpu", overrides)
    memory = plan.Estimator(config, torch.device("cpu"), torch.float32).rank(
        plan.Layout("single", 1, config.model.use_gradient_checkpointing), config.batch_size)
    measured = measure(overrides)
    assert memory.rows["activations"] == pytest.approx(measured["activations"], rel=0.15), (memory.rows, measured)
    assert memory.peak == pytest.approx(measured["total"], rel=0.15), (memory.peak, measured)
    # what the step adds to the parameters and optimizer state is traced tensor by tensor: closer still (the rest of
    # the difference is the process's own memory beyond tensors, some 30 MB: threads, kernel caches)
    persistent = memory.rows["parameters"] + memory.rows["optimizer state"] + memory.rows["buffers"]
    assert memory.peak - persistent == pytest.approx(measured["total"] - measured["before_step"], rel=0.05)


def test_extrapolating_from_one_and_two_periods_of_blocks_is_the_whole_models_trace():
    # MoC in every second block of 7 (the last one dense): traced at 3 and 5 blocks, against the whole model
    config = load_config("demo-cpu", SMALL + ["--model.n_experts=4", "--model.top_k=2", "--model.moc_every=2",
                                              "--model.n_layers=7", "--model.max_seq_len=64"])
    shallow = plan.Estimator(config, torch.device("cpu"), torch.float32)
    whole = plan.Estimator(config, torch.device("cpu"), torch.float32)
    whole.depths, whole.periods = (7,), 1
    assert shallow.depths == (3, 5)
    for layout in (plan.Layout("single", 1, False), plan.Layout("fsdp", 4, True)):
        a, b = shallow.rank(layout, 8), whole.rank(layout, 8)
        assert a.rows == b.rows and a.peak == b.peak


def test_optimizer_state_is_what_the_configs_optimizer_keeps():
    config = load_config("demo-cpu", ["--optimizer=adamw"])
    model = plan.Estimator(config, torch.device("cpu"), torch.float32).model
    adamw = optimizer_memory(config)
    # two fp32 moments per trainable parameter, plus a step counter per parameter tensor
    assert 2 * model.trainable <= adamw.state <= 2 * model.trainable + 4 * MIB
    muon = optimizer_memory(load_config("demo-cpu", ["--optimizer=muon"]))
    # Muon keeps one momentum for the blocks' matrices, AdamW's two moments for the rest
    assert model.trainable < muon.state < adamw.state


def test_ddp_replicates_fsdp_shards_and_checkpointing_saves_activations(capsys):
    assert main(["plan", "demo-cpu", "--gpus", "4", "--gpu", "h100", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    rows = {row["layout"]: row for row in report["layouts"]}
    assert list(rows) == ["DDP", "DDP + ckpt", "FSDP", "FSDP + ckpt"]   # the config's own (ddp, no ckpt) first
    ddp, fsdp = rows["DDP"]["memory"], rows["FSDP"]["memory"]
    assert report["device_memory"] == 80 << 30 and report["dtype"] == "bf16" and report["peak_flops"] == 989e12
    assert ddp["DDP gradient buckets"] == ddp["gradients"]
    for part in ("parameters", "gradients", "optimizer state"):
        assert fsdp[part] == pytest.approx(ddp[part] / 4, rel=0.05)
    assert rows["DDP + ckpt"]["memory"]["activations"] < 0.7 * ddp["activations"]
    assert rows["DDP + ckpt"]["memory"]["of which logits"] == ddp["of which logits"]
    assert ddp["of which logits"] >= 16 * 256 * 4096 * 4            # B x T x vocab in fp32 for the loss
    assert all(row["fits"] and row["largest_batch_size"] > 16 for row in rows.values())
    tokens = 16 * 256 * 4
    assert rows["DDP"]["tokens_per_sec"] == pytest.approx(0.4 * 989e12 * 4 / report["flops_per_token"])
    assert rows["DDP"]["step_seconds"] == pytest.approx(tokens / rows["DDP"]["tokens_per_sec"])
    assert rows["DDP + ckpt"]["step_seconds"] > rows["DDP"]["step_seconds"]


def test_the_largest_batch_that_fits_is_where_memory_runs_out():
    config = load_config("demo-cpu", SMALL)
    estimator = plan.Estimator(config, torch.device("cpu"), torch.float32)
    layout = plan.Layout("single", 1, False)
    capacity = plan.needed(estimator.rank(layout, 20).peak, on_gpu=True) + MIB
    assert estimator.largest_batch(layout, capacity, on_gpu=True) == 20
    assert estimator.largest_batch(layout, 1 << 30, on_gpu=True) == 0   # the CUDA reserve alone fills 1 GiB


def test_plan_text_for_this_machine_and_a_gpu_with_no_peak(capsys):
    assert main(["plan", "demo-cpu", "--batch_size=4"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("lunaris plan: 1.31M parameters, batch_size 4 x 256 tokens")
    assert "1 process (config)" in out and "1 process + ckpt" in out and "of which logits" in out
    assert "largest batch_size that fits" in out and "step time: n/a" in out
    assert main(["plan", "demo-cpu", "--gpus", "2", "--gpu-memory", "0.25"]) == 0
    out = capsys.readouterr().out
    assert "on 2 x a GPU with 0.25 GiB" in out and "NO" in out and "FSDP unsharded in flight" in out


@pytest.mark.parametrize("argv, message", [
    (["plan", "demo-cpu", "--gpu", "z9000"], "--gpu 'z9000' is not a GPU lunaris plan knows"),
    (["plan", "demo-cpu", "--model.d_model=-1"], "d_model"),
    (["plan", "no-such-preset"], "no-such-preset"),
])
def test_bad_input_is_a_message_and_exit_status_2(argv, message, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_gpu_names_are_found_however_they_are_written():
    from lunaris.runtime import find_gpu
    assert find_gpu("h100") == "H100" and find_gpu("NVIDIA H100 80GB HBM3") == "H100"
    assert find_gpu("a100-40gb") == "A100 40GB" and find_gpu("A100") == "A100"
    assert find_gpu("NVIDIA GeForce RTX 4090") == "4090" and find_gpu("l40s") == "L40S"
    assert find_gpu("NVIDIA GH200 480GB") == "GH200" and find_gpu("H200") == "H200"
    assert find_gpu("z9000") is None


def test_a_failing_trace_is_a_message_not_a_traceback(monkeypatch, capsys):
    from lunaris.train import memory

    def unsupported(*args, **kwargs):
        raise NotImplementedError("no fake kernel for aten::something")
    monkeypatch.setattr(memory.steps, "forward_backward", unsupported)
    assert main(["plan", "demo-cpu"]) == 2
    err = capsys.readouterr().err
    assert "could not trace the training step on fake tensors: NotImplementedError" in err
    config = load_config("demo-cpu")
    lines = plan.run_memory_lines(config, torch.device("cpu"), torch.float32, "single", 1)
    assert lines[0].startswith("memory: no estimate (torch ") and len(lines) == 1


def test_blocks_that_do_not_repeat_are_traced_whole(monkeypatch):
    # a part that only the last block has (as a feature tied to a block's place would): no period to extrapolate
    config = load_config("demo-cpu", SMALL)
    build = plan.build_on_meta

    def last_block_differs(model_config):
        model = build(model_config)
        with torch.device("meta"):
            model.blocks[-1].extra = torch.nn.Linear(4, 4)
        return model
    monkeypatch.setattr(plan, "build_on_meta", last_block_differs)
    assert plan.Estimator(config, torch.device("cpu"), torch.float32).depths == (4,)
    monkeypatch.undo()
    assert plan.Estimator(config, torch.device("cpu"), torch.float32).depths == (1, 2)
