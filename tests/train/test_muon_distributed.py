"""Muon under torchrun on CPU (gloo): FSDP2 and DDP on 2 and 3 processes train like one process, and a Muon + FSDP
run stopped and resumed trains exactly like an uninterrupted one.

Every run has the same global batch (GLOBAL sequences per step: one process with all of them, or W processes with
GLOBAL / W each; the loader gives rank r the r-th part of each global batch) and a constant learning rate, so a run
extended with --max_steps follows the schedule of one planned that long. 3 processes split unevenly: FSDP's dim-0
shards of a 32-row weight are 11, 11 and 10 rows, the 4 stacked experts 2, 2 and 0 per rank. The MoC model is
dropless with bias balancing and no auxiliary losses, whose values depend on how a batch is split across processes.
"""

import pytest
import torch

from lunaris import LunarisCodex
from lunaris.bench.settings import SIZES
from lunaris.config import LunarisCodexConfig
from lunaris.train import train
from lunaris.train.muon import MatrixPlan, muon_parameters

STEPS = 10
GLOBAL = 12
TOLERANCE = 1e-5
MODELS = {"dense": {}, "moc": dict(n_experts=4, top_k=2, capacity_factor=None, load_balance="bias",
                                   router_z_loss_weight=0.0)}


def muon_keys(model: str, **overrides) -> dict:
    keys = dict(model=MODELS[model], optimizer="muon", warmup_steps=0, learning_rate=3e-3, min_lr=3e-3, muon_lr=0.02,
                max_steps=STEPS, save_interval=5, keep_last=0, batch_size=GLOBAL)
    keys.update(overrides)
    return keys


@pytest.fixture(scope="module")
def one_process(tmp_path_factory, train_config, helpers):
    """model -> (metrics records, final weights) of the single-process reference, run once per model."""
    runs = {}

    def run(model: str):
        if model not in runs:
            out = tmp_path_factory.mktemp(f"one-{model}")
            train(train_config(out, **muon_keys(model)))
            runs[model] = helpers.read_metrics(out), helpers.final_weights(out)
        return runs[model]
    return run


@pytest.fixture(scope="module")
def launched(tmp_path_factory, train_config, helpers):
    """(model, parallelism, processes) -> out_dir of a torchrun run of STEPS steps, launched once."""
    runs = {}

    def launch(model: str, parallelism: str, processes: int):
        key = (model, parallelism, processes)
        if key not in runs:
            out = tmp_path_factory.mktemp("-".join(map(str, key)))
            keys = muon_keys(model, parallelism=parallelism, batch_size=GLOBAL // processes)
            config = helpers.write_yaml(train_config(out / "run", **keys), out / "config.yaml")
            done = helpers.torchrun(["-m", "lunaris", "train", str(config)], timeout=420,
                                    processes_per_node=processes)
            assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
            assert f"{processes} proc" in done.stdout and parallelism in done.stdout
            runs[key] = out / "run"
        return runs[key]
    return launch


@pytest.mark.slow
@pytest.mark.parametrize("processes", [2, 3])
@pytest.mark.parametrize("parallelism", ["fsdp", "ddp"])
@pytest.mark.parametrize("model", sorted(MODELS))
def test_muon_on_several_processes_trains_like_one_process(model, parallelism, processes, one_process, launched,
                                                          helpers):
    reference_records, reference_weights = one_process(model)
    out = launched(model, parallelism, processes)
    records = helpers.read_metrics(out)
    assert [r["step"] for r in records] == [r["step"] for r in reference_records] == list(range(1, STEPS + 1))
    for mine, ref in zip(records, reference_records):
        assert abs(mine["loss/total"] - ref["loss/total"]) <= TOLERANCE, (mine["step"], mine, ref)
    assert records[-1]["loss/total"] < records[0]["loss/total"] - 0.5           # it learns
    helpers.assert_weights_close(helpers.final_weights(out), reference_weights, atol=TOLERANCE)


@pytest.mark.slow
def test_muon_fsdp_run_stopped_and_resumed_matches_the_uninterrupted_run(tmp_path, train_config, helpers, launched):
    keys = muon_keys("moc", parallelism="fsdp", batch_size=GLOBAL // 2)
    config = helpers.write_yaml(train_config(tmp_path / "run", **{**keys, "max_steps": 5}), tmp_path / "config.yaml")
    first = helpers.torchrun(["-m", "lunaris", "train", str(config)], timeout=420)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    # the momentum is sharded like its parameter: every rank wrote its own rows of it
    from torch.distributed.checkpoint import FileSystemReader
    metadata = FileSystemReader(str(tmp_path / "run" / "ckpt_5")).read_metadata().state_dict_metadata
    momentum = metadata["optimizer.state.blocks.0.attn.qkv.weight.momentum_buffer"]
    assert [tuple(chunk.sizes) for chunk in momentum.chunks] == [(32, 32), (32, 32)]           # 64 rows, 2 ranks

    second = helpers.torchrun(["-m", "lunaris", "train", str(config), f"--max_steps={STEPS}"], timeout=420)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    assert "resuming from" in second.stdout and "at step 5" in second.stdout
    uninterrupted = launched("moc", "fsdp", 2)
    assert [(r["step"], r["loss/total"]) for r in helpers.read_metrics(tmp_path / "run")] == \
        [(r["step"], r["loss/total"]) for r in helpers.read_metrics(uninterrupted)]
    helpers.assert_weights_close(helpers.final_weights(tmp_path / "run"), helpers.final_weights(uninterrupted))


def matrix_work(plan: MatrixPlan) -> list:
    """Newton-Schulz work per rank of a plan."""
    load = [0] * plan.world
    for m in plan.matrices:
        load[m.owner] += m.shape[0] * m.shape[1] * min(m.shape)
    return load


@pytest.mark.parametrize("world", [2, 3, 8])
@pytest.mark.parametrize("n_experts", [0, 8], ids=["dense", "moc"])
def test_each_rank_orthogonalizes_about_its_share_of_the_matrices(world, n_experts):
    size = {**SIZES["30m"], "max_seq_len": 64}
    if n_experts:
        size.update(n_experts=n_experts, top_k=2)
    with torch.device("meta"):                       # shapes only
        model = LunarisCodex(LunarisCodexConfig(**size))
    params = muon_parameters(model)
    plan = MatrixPlan(params, world, rank=0)
    stacked = [p for p in params if p.dim() == 3]
    assert len(plan.matrices) == len(params) - len(stacked) + sum(p.shape[0] for p in stacked)  # experts one by one
    assert {m.owner for m in plan.matrices} == set(range(world))
    load = matrix_work(plan)
    assert max(load) <= 1.1 * sum(load) / world, load
    same = MatrixPlan(params, world, rank=world - 1)                       # every rank computes the same plan
    assert [m.owner for m in same.matrices] == [m.owner for m in plan.matrices]


@pytest.mark.slow
def test_the_muon_benchmark_command_times_one_process_against_the_split(tmp_path, capsys):
    import importlib.util
    import json
    from pathlib import Path

    script = Path(__file__).resolve().parents[2] / "bench" / "bench_muon.py"
    spec = importlib.util.spec_from_file_location("bench_muon", script)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    bench.main(["--quick", "--parallelism", "fsdp", "--json", str(tmp_path / "muon.json")])
    result = json.loads((tmp_path / "muon.json").read_text())
    assert result["options"]["size"] == "tiny" and result["matrices"] == 8          # 2 layers x 4 matrices
    assert set(result["seconds"]) == {"1", "fsdp 2"} and all(s > 0 for s in result["seconds"].values())
    assert result["ratio"]["fsdp 2"] == pytest.approx(result["seconds"]["fsdp 2"] / result["seconds"]["1"])
    table = capsys.readouterr().out
    assert "| processes | seconds per step | x one process |" in table and "| fsdp 2 |" in table
