"""Two processes on CPU (gloo) under torchrun: DDP and FSDP2 train exactly like one process.

Same global batch everywhere: one process with batch 8, or two with batch 4 each (the loader gives
rank r the r-th part of each global batch, so the samples are the same). The LR is constant, so a
run extended with --max_steps follows the schedule of a run planned that long from the start.
"""

import math

import pytest

pytestmark = pytest.mark.slow
STEPS = 5
TOLERANCE = 2e-5  # fp32; gradients averaged in a different order than one process sums them


def constant_lr_config(train_config, out_dir, **overrides):
    keys = dict(warmup_steps=0, learning_rate=3e-3, min_lr=3e-3, max_steps=STEPS, eval_interval=STEPS,
                save_interval=2, batch_size=4)
    keys.update(overrides)
    return train_config(out_dir, **keys)


@pytest.fixture(scope="module")
def one_process(tmp_path_factory, train_config, helpers):
    """The reference: one process, batch 8, STEPS steps."""
    from lunaris.train import train
    out = tmp_path_factory.mktemp("one_process")
    train(constant_lr_config(train_config, out, batch_size=8))
    return helpers.read_metrics(out), helpers.final_weights(out)


def assert_same_training(records, reference_records):
    assert [r["step"] for r in records] == [r["step"] for r in reference_records] == list(range(1, STEPS + 1))
    for mine, ref in zip(records, reference_records):
        for key in ("loss/total", "grad_norm"):
            assert math.isclose(mine[key], ref[key], rel_tol=TOLERANCE), (mine["step"], key, mine[key], ref[key])
    assert math.isclose(records[-1]["val/loss"], reference_records[-1]["val/loss"], rel_tol=TOLERANCE)


def test_ddp_two_processes_match_one_process(tmp_path, train_config, helpers, one_process):
    out = tmp_path / "ddp"
    config = helpers.write_yaml(constant_lr_config(train_config, out), tmp_path / "ddp.yaml")
    # the original command line: torchrun ... train.py CONFIG
    done = helpers.torchrun(["train.py", str(config)])
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "2 proc" in done.stdout and "ddp" in done.stdout
    reference_records, reference_weights = one_process
    assert_same_training(helpers.read_metrics(out), reference_records)  # rank 0 alone writes metrics
    helpers.assert_weights_close(helpers.final_weights(out), reference_weights, atol=TOLERANCE)
    from lunaris.train import load_checkpoint_file
    state = load_checkpoint_file(out)
    assert len(state["rng"]) == 2 and state["world_size"] == 2       # every rank's generators are saved
    assert not (state["rng"][0]["torch"] == state["rng"][1]["torch"]).all()


def test_fsdp_two_processes_train_save_and_resume(tmp_path, train_config, helpers, one_process):
    out = tmp_path / "fsdp"
    config = helpers.write_yaml(constant_lr_config(train_config, out, parallelism="fsdp", max_steps=3),
                                tmp_path / "fsdp.yaml")
    first = helpers.torchrun(["-m", "lunaris", "train", str(config)])
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    assert sorted(p.name for p in out.glob("ckpt_*")) == ["ckpt_2", "ckpt_3"]   # DCP directories
    assert (out / "latest_checkpoint").resolve() == (out / "ckpt_3").resolve()
    assert {p.name for p in (out / "ckpt_3").iterdir()} >= {".metadata", "trainer_state.pt"}

    second = helpers.torchrun(["-m", "lunaris", "train", str(config), f"--max_steps={STEPS}"])
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    assert "resuming from" in second.stdout and "at step 3" in second.stdout

    reference_records, reference_weights = one_process
    assert_same_training(helpers.read_metrics(out), reference_records)
    # load_checkpoint_file assembles the sharded checkpoint into the plain dict other commands read
    helpers.assert_weights_close(helpers.final_weights(out), reference_weights, atol=TOLERANCE)
    from lunaris.train import load_checkpoint_file
    light = load_checkpoint_file(out, include_optimizer=False)
    assert light["step"] == STEPS and "optimizer" not in light
    helpers.assert_weights_close(light["model"], reference_weights, atol=TOLERANCE)


def test_train_moc_entry_point_is_train_py(tmp_path, train_config, helpers):
    import sys

    import processes
    config = helpers.write_yaml(train_config(tmp_path / "run", model={"n_experts": 4, "top_k": 2}, max_steps=2),
                                tmp_path / "moc.yaml")
    done = processes.run([sys.executable, "train_moc.py", str(config)], 240, cwd=helpers.REPO,
                         env=helpers.subprocess_env())
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "finished 2 steps" in done.stdout
    assert [r["step"] for r in helpers.read_metrics(tmp_path / "run")] == [1, 2]


def test_ddp_global_batch_balance_counts_the_load_of_both_processes(tmp_path, train_config, helpers):
    """balance_scope: global_batch sums f_i over the processes, and each rank's P_i is over an equal share of the
    tokens, so two processes of batch 4 train like one of batch 8 (dropless: capacity would depend on the
    process's own batch). With f_i of each process alone the loss would differ by far more than the tolerance."""
    from lunaris.train import train
    moc = {"n_experts": 4, "top_k": 2, "capacity_factor": None, "collab_mode": "none", "aux_loss_weight": 0.1,
           "balance_scope": "global_batch"}
    reference = tmp_path / "one"
    train(constant_lr_config(train_config, reference, batch_size=8, model=moc))
    out = tmp_path / "ddp"
    config = helpers.write_yaml(constant_lr_config(train_config, out, model=moc), tmp_path / "ddp.yaml")
    done = helpers.torchrun(["-m", "lunaris", "train", str(config)])
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert_same_training(helpers.read_metrics(out), helpers.read_metrics(reference))
    helpers.assert_weights_close(helpers.final_weights(out), helpers.final_weights(reference), atol=TOLERANCE)
