"""A checkpoint resumes on another number of processes and under another parallelism (CPU, gloo).

The reference is an FSDP2 run of 2 processes (Muon, batch_size 2, gradient_accumulation_steps 2: a global batch of
8 sequences) that saves at step 5 and goes on to step 10. Its step-5 directory resumes on 1 process (which then
writes what a single-process run writes, a .pt file), on 4 processes (FSDP, resharded by DCP) and on 2 DDP
processes; the 1-process file resumes on 2 FSDP processes again. What is exact and what is not (README,
"Multi-GPU and multi-node"):

* the model and optimizer state: exact, whatever the world size (checked tensor for tensor);
* the data: gradient_accumulation_steps is set so the global batch stays 8, and each step trains on the same samples
  as the reference's step, up to the end of the epoch; later epochs keep the order when each epoch uses the same
  samples (the loader drops the N mod (batch_size x processes) left over at an epoch's end);
* the losses: equal up to float summation order (the same samples, added up in another grouping); bit for bit when
  the run comes back to the world size and parallelism of the reference. Dropout masks are drawn per process, so a
  model with dropout continues with other masks on another world size.
"""

import warnings

import pytest
import torch

from lunaris import LunarisCodex, TrainConfig
from lunaris.cli import main
from lunaris.data import TokenLoader
from lunaris.errors import CheckpointError
from lunaris.train import Trainer
from lunaris.train.checkpoint import load_checkpoint_file, optimizer_state_by_name
from lunaris.train.optim import build_optimizer

STEPS, SAVED = 10, 5
TOLERANCE = 1e-5
WORKER = """
import sys
from lunaris import load_config
from lunaris.train import Trainer
trainer = Trainer(load_config(sys.argv[1]), resume=sys.argv[2])
clean = False
try:
    trainer.save(final=False)   # the state as this run loaded it, written by its own processes
    trainer.run()
    clean = True
finally:
    trainer.close(clean)
"""


def reshard_config(train_config, out_dir, **overrides) -> TrainConfig:
    keys = dict(model={"vocab_size": 320}, optimizer="muon", parallelism="fsdp", batch_size=2,
                gradient_accumulation_steps=2, warmup_steps=0, learning_rate=3e-3, min_lr=3e-3, max_steps=STEPS,
                save_interval=SAVED, keep_last=0)
    keys.update(overrides)
    return train_config(out_dir, **keys)


@pytest.fixture(scope="module")
def reference(tmp_path_factory, train_config, helpers):
    """The 2-process FSDP run: its out_dir (ckpt_5/ and ckpt_10/ directories, metrics of steps 1-10)."""
    root = tmp_path_factory.mktemp("reference")
    config = helpers.write_yaml(reshard_config(train_config, root / "run"), root / "config.yaml")
    done = helpers.torchrun(["-m", "lunaris", "train", str(config)], timeout=420)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert (root / "run" / f"ckpt_{SAVED}" / ".metadata").is_file()
    return root / "run"


@pytest.fixture(scope="module")
def one_process(tmp_path_factory, train_config, reference):
    """The reference's step-5 directory resumed by one process: (out_dir, note printed, state check results)."""
    out = tmp_path_factory.mktemp("one") / "run"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer = Trainer(reshard_config(train_config, out), resume=reference / f"ckpt_{SAVED}")
    assert not [w for w in caught if "data loader" in str(w.message)]  # the position, in this run's micro-batches
    try:
        assert not trainer.fsdp and trainer.config.gradient_accumulation_steps == 4     # 2 x 1 x 4 = 8
        saved = load_checkpoint_file(reference / f"ckpt_{SAVED}")
        assert_same_tensors(trainer.model.state_dict(), saved["model"])
        mine = optimizer_state_by_name(trainer.model, trainer.optimizer, trainer.optimizer.state_dict())
        assert_same_tensors(mine["state"], saved["optimizer"]["state"])
        trainer.save(final=False)
        trainer.run()
    finally:
        trainer.close()
    return out


def assert_same_tensors(a: dict, b: dict, where: str = "") -> None:
    """Nested dicts of tensors and numbers, equal bit for bit."""
    assert a.keys() == b.keys(), where
    for key in a:
        if isinstance(a[key], dict):
            assert_same_tensors(a[key], b[key], f"{where}.{key}")
        elif isinstance(a[key], torch.Tensor):
            assert torch.equal(a[key], torch.as_tensor(b[key])), f"{where}.{key}"
        else:
            assert a[key] == b[key], f"{where}.{key}"


def resume_in_processes(tmp_path, train_config, helpers, checkpoint, processes: int, parallelism: str = "fsdp"):
    """torchrun WORKER: resume `checkpoint` on `processes` processes, save at once, train to STEPS."""
    worker = tmp_path / "worker.py"
    worker.write_text(WORKER)
    config = helpers.write_yaml(reshard_config(train_config, tmp_path / "run", parallelism=parallelism),
                                tmp_path / "config.yaml")
    done = helpers.torchrun([str(worker), str(config), str(checkpoint)], timeout=420, processes_per_node=processes)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return tmp_path / "run", done.stderr


def losses_after_resume(helpers, out_dir) -> list:
    return [helpers.losses_by_step(out_dir)[step] for step in range(SAVED + 1, STEPS + 1)]


def assert_close_losses(got: list, expected: list) -> None:
    assert len(got) == len(expected) == STEPS - SAVED
    for step, (a, b) in enumerate(zip(got, expected), start=SAVED + 1):
        assert abs(a - b) <= TOLERANCE, (step, a, b)


@pytest.mark.slow
def test_an_fsdp_checkpoint_resumes_on_one_process_with_the_same_state_and_global_batch(one_process, reference,
                                                                                         helpers):
    assert_close_losses(losses_after_resume(helpers, one_process), losses_after_resume(helpers, reference))
    assert (one_process / f"ckpt_{STEPS}.pt").is_file()               # what a single-process run writes
    helpers.assert_weights_close(helpers.final_weights(one_process), helpers.final_weights(reference),
                                 atol=TOLERANCE)


@pytest.mark.slow
def test_an_fsdp_checkpoint_of_two_processes_resumes_on_four(tmp_path, train_config, helpers, reference):
    out, stderr = resume_in_processes(tmp_path, train_config, helpers, reference / f"ckpt_{SAVED}", 4)
    assert "gradient_accumulation_steps 2 -> 1" in stderr                # 2 x 4 x 1 = 8
    saved, mine = load_checkpoint_file(reference / f"ckpt_{SAVED}"), load_checkpoint_file(out / f"ckpt_{SAVED}")
    assert_same_tensors(mine["model"], saved["model"])
    assert_same_tensors(mine["optimizer"]["state"], saved["optimizer"]["state"])
    assert mine["world_size"] == 4 and mine["config"]["gradient_accumulation_steps"] == 1
    assert_close_losses(losses_after_resume(helpers, out), losses_after_resume(helpers, reference))


@pytest.mark.slow
def test_an_fsdp_checkpoint_resumes_under_ddp(tmp_path, train_config, helpers, reference):
    # every DDP process reads the directory whole; the run then writes .pt files, as DDP does
    out, _ = resume_in_processes(tmp_path, train_config, helpers, reference / f"ckpt_{SAVED}", 2, "ddp")
    assert (out / f"ckpt_{SAVED}.pt").is_file() and (out / f"ckpt_{STEPS}.pt").is_file()
    saved, mine = load_checkpoint_file(reference / f"ckpt_{SAVED}"), load_checkpoint_file(out / f"ckpt_{SAVED}.pt")
    assert_same_tensors(mine["model"], saved["model"])
    config = reshard_config(train_config, tmp_path / "unused", parallelism="ddp")
    model = LunarisCodex(config.model)                       # this config's parameter numbering, to read the file's
    named = optimizer_state_by_name(model, build_optimizer(model, config, "cpu"), mine["optimizer"])
    assert_same_tensors(named["state"], saved["optimizer"]["state"])
    assert_close_losses(losses_after_resume(helpers, out), losses_after_resume(helpers, reference))
    helpers.assert_weights_close(helpers.final_weights(out), helpers.final_weights(reference), atol=TOLERANCE)


@pytest.mark.slow
def test_a_single_process_checkpoint_resumes_fsdp_exactly_where_the_reference_was(tmp_path, train_config, helpers,
                                                                                  reference, one_process):
    # the 1-process run's step-5 file (written right after it resumed the reference's directory) back on 2 processes
    out, _ = resume_in_processes(tmp_path, train_config, helpers, one_process / f"ckpt_{SAVED}.pt", 2)
    saved, mine = load_checkpoint_file(reference / f"ckpt_{SAVED}"), load_checkpoint_file(out / f"ckpt_{SAVED}")
    assert_same_tensors(mine["model"], saved["model"])
    assert_same_tensors(mine["optimizer"]["state"], saved["optimizer"]["state"])
    # the same world size and parallelism as the reference: bit for bit
    assert losses_after_resume(helpers, out) == losses_after_resume(helpers, reference)
    helpers.assert_weights_close(helpers.final_weights(out), helpers.final_weights(reference))


@pytest.mark.slow
def test_a_global_batch_another_world_size_cannot_keep_is_refused_with_the_settings_that_can(train_config, tmp_path,
                                                                                             reference):
    with pytest.raises(CheckpointError, match=r"global batch of 8 .* batch_size 1 or 2 or 4 or 8 on 1 process"):
        Trainer(reshard_config(train_config, tmp_path / "run", batch_size=3), resume=reference / f"ckpt_{SAVED}")


@pytest.mark.slow
def test_eval_and_export_read_an_fsdp_checkpoint_directory(tmp_path, capsys, token_data, reference):
    import json

    from conftest import byte_level_tokenizer

    from lunaris.data import ShardDataset
    directory = reference / f"ckpt_{SAVED}"
    model = LunarisCodex.from_checkpoint(directory)
    assert_same_tensors(model.state_dict(), load_checkpoint_file(directory)["model"])
    assert main(["eval", "--checkpoint", str(directory), "--data", str(token_data.val), "--max-batches", "2",
                 "--batch-size", "2"]) == 0
    result = json.loads(capsys.readouterr().out)
    x, y = ShardDataset(token_data.val, model.config.max_seq_len).get_batch(range(4))
    with torch.no_grad():
        expected = model(x, targets=y).main_loss.item()          # the same 4 sequences, all tokens counted
    assert result["step"] == SAVED and result["loss"] == pytest.approx(expected, rel=1e-5)

    tokenizer = tmp_path / "tokenizer.json"
    byte_level_tokenizer().save(str(tokenizer))
    assert main(["export", "--checkpoint", str(directory), "--out", str(tmp_path / "hf"),
                 "--tokenizer", str(tokenizer)]) == 0
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    with torch.no_grad():
        torch.testing.assert_close(hf(x).logits, model(x).logits, atol=1e-4, rtol=1e-4)


# ---- the data order, at the loader: which samples each step trains on --------------------------------------

class Samples:
    """N samples; a batch is the sample indices themselves (x and y)."""
    data_dir = "samples"

    def __init__(self, n: int):
        self.n = n

    def __len__(self) -> int:
        return self.n

    def get_batch(self, indices):
        ids = torch.tensor(list(indices))
        return ids, ids


def global_steps(n: int, world: int, accumulation: int, steps: int, state=None, batch_size: int = 2) -> list:
    """The sorted sample ids each of `steps` steps trains on, over all `world` ranks, after `state`."""
    loaders = [TokenLoader(Samples(n), batch_size, rank=r, world_size=world, seed=3) for r in range(world)]
    if state is not None:
        for loader in loaders:
            loader.load_state_dict(state)
    streams = [iter(loader) for loader in loaders]
    found = [sorted(int(i) for stream in streams for _ in range(accumulation) for i in next(stream)[0])
             for _ in range(steps)]
    return found, loaders[0].state_dict()


@pytest.mark.parametrize("world", [1, 4])
def test_a_resharded_step_trains_on_the_samples_of_the_reference_step(world):
    accumulation = 8 // (2 * world)                                       # the global batch of 8 kept
    for n, same_steps in ((96, 20), (103, 7)):
        # 96 samples: every world size uses all of them each epoch (12 steps), so the order is kept across epochs;
        # 103: the epoch ends after 96 (4 processes), 100 (2) or 102 (1) samples: kept up to step 12 only
        reference, _ = global_steps(n, 2, 2, SAVED + 20)
        _, state = global_steps(n, 2, 2, SAVED)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")   # the loader notes that its micro-batches changed size
            resumed, _ = global_steps(n, world, accumulation, 20, state)
        assert resumed[:same_steps] == reference[SAVED:SAVED + same_steps], n
        if n == 103:
            assert resumed[same_steps] != reference[SAVED + same_steps]   # step 13 crosses the epoch's end
