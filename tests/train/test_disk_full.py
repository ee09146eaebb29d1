"""A disk that fills (or a quota, or a read-only directory) never ends in a traceback.

Each moment is tested on a real small disk (a tmpfs this test mounts, when it may: root and permitted; skipped
otherwise) and with a writer made to fail the way a full disk does, in both forms a writer raises: the plain
OSError(ENOSPC) and torch's zip writer's RuntimeError with the OSError as its context. After each: the one clear
message and exit status 2, the previous checkpoint loadable, no temporary file left, and, once the space is back, the
same command resumes and computes exactly the losses of an uninterrupted run.
"""

import errno
import re
import sys
from pathlib import Path

import full_disk
import processes
import pytest
import torch

from lunaris.cli import main as cli_main
from lunaris.errors import DiskError, LunarisError
from lunaris.fileio import disk_full_error, disk_problem, on_full_disk
from lunaris.train import train

KEYS = dict(model={"dropout": 0.1}, max_steps=6, save_interval=2, keep_last=2, warmup_steps=2)
FORMS = ["write", "flush"]  # the writer raises torch's wrapped RuntimeError / a plain OSError


@pytest.fixture
def disk(tmp_path):
    """A real 8 MB filesystem, unmounted afterwards; the test is skipped where it cannot be mounted."""
    mounted = full_disk.small_disk(tmp_path / "disk")
    if mounted is None:
        pytest.skip("mounting a small tmpfs needs root and permission to mount")
    yield mounted
    full_disk.unmount(mounted)


@pytest.fixture(scope="module")
def reference(tmp_path_factory, train_config, helpers):
    """The uninterrupted run: losses by step, final weights, and the size of one checkpoint file."""
    out = tmp_path_factory.mktemp("reference")
    train(train_config(out, **KEYS))
    return helpers.losses_by_step(out), helpers.final_weights(out), (out / "ckpt_6.pt").stat().st_size


def run_cli(config, capsys) -> tuple:
    status = cli_main(["train", str(config)])
    return status, capsys.readouterr().err


def saved_step(out) -> int:
    return torch.load(out / "latest_checkpoint.pt", map_location="cpu", weights_only=True)["step"]


def temporaries(out) -> list:
    return sorted(p.name for p in out.iterdir() if ".tmp" in p.name)


def assert_clear(status: int, err: str, *phrases) -> None:
    assert status == 2, err
    assert "Traceback" not in err and "RuntimeError" not in err, err
    assert err.startswith("error: could not write ") and err.count("\n") == 1, err  # one paragraph
    for phrase in phrases:
        assert phrase in err, (phrase, err)


def assert_resumes_exactly(config, out, reference, helpers, capsys, from_step: int) -> None:
    status = cli_main(["train", str(config)])
    captured = capsys.readouterr()
    assert status == 0, captured.err
    assert (f"at step {from_step}" in captured.out) if from_step else ("starting at step 0" in captured.out)
    losses, weights, _ = reference
    assert helpers.losses_by_step(out) == losses
    helpers.assert_weights_close(helpers.final_weights(out), weights)
    assert temporaries(out) == []


def save_hook(monkeypatch, at_step: int, action) -> None:
    """Run `action()` just before the checkpoint of `at_step` is written."""
    from lunaris.train import checkpoint as ckpt
    original = ckpt.save_checkpoint

    def save(state, out_dir, step, *args, **kwargs):
        if step == at_step:
            action()
        return original(state, out_dir, step, *args, **kwargs)
    monkeypatch.setattr(ckpt, "save_checkpoint", save)


# ---- the one judgement and message ------------------------------------------------------------------

class FakeCheckpointException(BaseException):
    """What torch.distributed.checkpoint raises: every rank's failure in `failures`, pickled (context lost)."""

    def __init__(self, failures):
        super().__init__("CheckpointException ranks")
        self.failures = failures


@pytest.mark.parametrize("code, words", [
    (errno.ENOSPC, "the disk is full"), (errno.EDQUOT, "the disk quota is used up"),
    (errno.EROFS, "the filesystem is read-only"), (errno.EACCES, "permission denied"),
    (errno.EPERM, "permission denied")])
def test_a_disk_problem_is_recognised_by_its_cause_whatever_wraps_it(tmp_path, code, words):
    plain = OSError(code, "from the kernel")
    assert disk_problem(plain) is plain
    # the two forms, from torch.save itself: a write that fails inside its zip writer becomes a RuntimeError whose
    # context is the OSError; a flush that fails at its end is a plain OSError
    with pytest.raises(RuntimeError) as wrapped:
        with open(tmp_path / "f", "wb") as real:
            torch.save({"x": torch.zeros(10_000)}, full_disk.FullDiskFile(real, 1000, "write", code))
    assert "unexpected pos" in str(wrapped.value) and disk_problem(wrapped.value).errno == code
    with pytest.raises(OSError) as flushed:
        with open(tmp_path / "f", "wb") as real:
            torch.save({"x": torch.zeros(10_000)}, full_disk.FullDiskFile(real, 0, "flush", code))
    assert type(flushed.value) is not RuntimeError and disk_problem(flushed.value) is flushed.value
    assert disk_problem(FakeCheckpointException({1: (OSError(code, "x"), None)})).errno == code
    assert disk_problem(ValueError("bad")) is None
    assert disk_problem(OSError(errno.EIO, "I/O error")) is None
    assert disk_problem(RuntimeError("No space left on device")) is None  # the cause decides, not the text
    error = disk_full_error(wrapped.value, tmp_path / "f", "Nothing is lost.", "try again")
    assert isinstance(error, DiskError) and isinstance(error, LunarisError)
    assert str(error).startswith(f"could not write {tmp_path / 'f'}: {words}") and "Nothing is lost." in str(error)
    with pytest.raises(DiskError, match="could not write here"):
        with on_full_disk("here"):
            raise RuntimeError("wrapped") from plain
    with pytest.raises(ValueError):
        with on_full_disk("here"):
            raise ValueError("not the disk")


@pytest.mark.parametrize("form", FORMS)
def test_every_atomic_write_says_so_and_keeps_the_previous_file(tmp_path, monkeypatch, form):
    """fileio's atomic writes (manifests, shards, reports, run files): the clear message, the old file unchanged."""
    from lunaris.fileio import atomic_open, atomic_write_json
    target = tmp_path / "report.json"
    atomic_write_json(target, {"old": True})
    with full_disk.failing_writes(monkeypatch, ".report.json.tmp", room=3, at=form):
        with pytest.raises(DiskError) as raised:
            atomic_write_json(target, {"new": list(range(1000))})
    assert str(raised.value) == (f"could not write {target}: the disk is full (No space left on device). The "
                                 f"previous report.json is unchanged. Free disk space, then run the same command "
                                 f"again.")
    assert target.read_text() == '{\n  "old": true\n}\n' and temporaries(tmp_path) == []
    with full_disk.failing_writes(monkeypatch, ".new.pt.tmp", room=1000, at=form):
        with pytest.raises(DiskError, match="new.pt: the disk is full") as raised:
            with atomic_open(tmp_path / "new.pt", "wb") as f:
                torch.save({"x": torch.zeros(10_000)}, f)   # "write": torch's RuntimeError inside the block
    assert "previous" not in str(raised.value) and temporaries(tmp_path) == []
    with pytest.raises(KeyError):                       # any other failure passes unchanged
        with atomic_open(tmp_path / "other.txt") as f:
            raise KeyError("not the disk")
    assert temporaries(tmp_path) == []


def test_prepare_on_a_full_disk(tmp_path, monkeypatch, capsys):
    """`lunaris prepare` (its shards): the message, exit status 2, no staging directory left; then it succeeds."""
    import json
    source = tmp_path / "docs.jsonl"
    source.write_text("".join(json.dumps({"text": f"the quick brown fox {i} jumps over the lazy dog"}) + "\n"
                              for i in range(200)))
    out = tmp_path / "data"
    command = ["prepare", str(source), "--out", str(out), "--vocab-size", "300", "--val-tokens", "100",
               "--shard-tokens", "1000", "--no-progress"]
    with full_disk.failing_writes(monkeypatch, ".shard_00000.npy.tmp", room=100):
        status = cli_main(command)
    err = capsys.readouterr().err
    assert status == 2 and "Traceback" not in err, err
    assert err.startswith("error: could not write ") and "shard_00000.npy: the disk is full" in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["docs.jsonl"]            # nothing half-made
    assert cli_main(command) == 0 and (out / "manifest.json").is_file()


# ---- checkpoints ------------------------------------------------------------------------------------

@pytest.mark.parametrize("form", ["real", *FORMS])
def test_the_first_checkpoint_on_a_full_disk(tmp_path, request, monkeypatch, train_config, helpers, capsys,
                                             reference, form):
    root = request.getfixturevalue("disk") if form == "real" else tmp_path
    out = root / "run"
    config = helpers.write_yaml(train_config(out, **KEYS), tmp_path / "run.yaml")
    if form == "real":  # room for the run files and metrics, half a checkpoint more
        ballast = full_disk.fill(root, leave=reference[2] // 2)
        status, err = run_cli(config, capsys)
        ballast.unlink()
    else:
        with full_disk.failing_writes(monkeypatch, ".ckpt_2.pt.tmp", room=reference[2] // 2, at=form):
            status, err = run_cli(config, capsys)
    assert_clear(status, err, f"checkpoint {out / 'ckpt_2.pt'}", "No checkpoint was written yet",
                 "training starts from step 0")
    assert not list(out.glob("ckpt_*")) and not (out / "latest_checkpoint.pt").exists()
    assert temporaries(out) == []
    assert_resumes_exactly(config, out, reference, helpers, capsys, from_step=0)


@pytest.mark.parametrize("form", ["real", *FORMS])
def test_a_later_checkpoint_that_fills_the_disk_part_way(tmp_path, request, monkeypatch, train_config, helpers,
                                                         capsys, reference, form):
    root = request.getfixturevalue("disk") if form == "real" else tmp_path
    out = root / "run"
    config = helpers.write_yaml(train_config(out, **KEYS), tmp_path / "run.yaml")
    if form == "real":
        save_hook(monkeypatch, 4, lambda: full_disk.fill(root, leave=reference[2] // 2))
        status, err = run_cli(config, capsys)
        (root / "ballast").unlink()
    else:
        with full_disk.failing_writes(monkeypatch, ".ckpt_4.pt.tmp", room=reference[2] // 2, at=form):
            status, err = run_cli(config, capsys)
    assert_clear(status, err, f"checkpoint {out / 'ckpt_4.pt'}", "The newest complete checkpoint, ckpt_2.pt "
                 "(step 2), is intact", "it resumes from step 2", "Free disk space")
    assert saved_step(out) == 2 and not (out / "ckpt_4.pt").exists()   # loadable with weights_only
    assert temporaries(out) == []
    monkeypatch.undo()
    assert_resumes_exactly(config, out, reference, helpers, capsys, from_step=2)


def test_a_read_only_run_directory_and_a_hard_link_on_a_full_disk(tmp_path, monkeypatch, train_config, helpers,
                                                                   capsys, reference):
    """EROFS while writing a checkpoint; and ENOSPC when latest_checkpoint.pt's link is made, after the numbered
    file was written: the numbered file is whole, and the run resumes from it."""
    import os
    out = tmp_path / "run"
    config = helpers.write_yaml(train_config(out, **KEYS), tmp_path / "run.yaml")
    with full_disk.failing_writes(monkeypatch, ".ckpt_4.pt.tmp", room=1000, code=errno.EROFS):
        status, err = run_cli(config, capsys)
    assert_clear(status, err, "the filesystem is read-only", "Make the filesystem writable again",
                 "ckpt_2.pt (step 2)")
    assert temporaries(out) == [] and saved_step(out) == 2

    # what a disk that turned read-only did not let a write delete goes when the run starts again
    stale = [out / ".ckpt_4.pt.tmp-99999", out / ".metrics.jsonl.tmp-99999", out / ".ckpt_4.tmp"]
    stale[0].write_bytes(b"half")
    stale[1].write_text("{")
    stale[2].mkdir()
    real_link = os.link

    def full_link(source, target, *args, **kwargs):
        if "ckpt_6" in str(source):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_link(source, target, *args, **kwargs)
    with monkeypatch.context() as patch:
        patch.setattr(os, "link", full_link)
        status, err = run_cli(config, capsys)
    assert_clear(status, err, "latest_checkpoint.pt", "ckpt_6.pt (step 6), is intact")  # not a copy on a full disk
    assert not any(path.exists() for path in stale)
    assert temporaries(out) == [] and saved_step(out) == 4
    losses, weights, _ = reference
    assert helpers.losses_by_step(out) == losses
    helpers.assert_weights_close(helpers.final_weights(out), weights)  # ckpt_6.pt: newer than the link


# ---- metrics.jsonl and run files ---------------------------------------------------------------------

def test_metrics_jsonl_on_a_full_disk(tmp_path, monkeypatch, train_config, helpers, capsys, reference):
    """A plain OSError from metrics.jsonl's write at step 5, after the step-4 checkpoint."""
    out = tmp_path / "run"
    config = helpers.write_yaml(train_config(out, **KEYS), tmp_path / "run.yaml")
    from lunaris.train.logging import RunLogger
    original = RunLogger.log

    def log(self, step, record, console=True):
        if step == 5:  # 40 more characters fit
            self.jsonl = full_disk.FullDiskFile(self.jsonl, 40, "write")
        return original(self, step, record, console)
    monkeypatch.setattr(RunLogger, "log", log)
    status, err = run_cli(config, capsys)
    assert (out / "ckpt_4.pt").exists() and not (out / "ckpt_6.pt").exists()
    assert_clear(status, err, f"{out / 'metrics.jsonl'}: the disk is full", "ckpt_4.pt (step 4), is intact",
                 "it resumes from step 4")
    monkeypatch.undo()
    assert_resumes_exactly(config, out, reference, helpers, capsys, from_step=4)


@pytest.mark.parametrize("name", ["config.yaml", "run_info.json", "metrics.jsonl"])
def test_a_run_file_on_a_full_disk(tmp_path, monkeypatch, train_config, helpers, capsys, reference, name):
    """The files a run writes before its first step (metrics.jsonl rewritten on resume)."""
    out = tmp_path / "run"
    config = helpers.write_yaml(train_config(out, **KEYS), tmp_path / "run.yaml")
    if name != "metrics.jsonl":  # rewritten only when a run resumes
        with full_disk.failing_writes(monkeypatch, f".{name}.tmp", room=10):
            assert_clear(*run_cli(config, capsys), f"{out / name}: the disk is full", "No checkpoint was written yet")
        assert temporaries(out) == []
    assert cli_main(["train", str(config), "--max_steps=2"]) == 0                    # the warmup: as in 6 steps
    capsys.readouterr()
    with full_disk.failing_writes(monkeypatch, f".{name}.tmp", room=10):
        assert_clear(*run_cli(config, capsys), f"{out / name}: the disk is full", "ckpt_2.pt (step 2), is intact",
                     "it resumes from step 2")
    assert temporaries(out) == []
    assert_resumes_exactly(config, out, reference, helpers, capsys, from_step=2)


def test_metrics_on_a_really_full_disk(disk, tmp_path, monkeypatch, train_config, helpers, capsys):
    """The disk fills while metrics.jsonl grows (its next line needs a new block); a restart on the still-full disk
    stops at its write probe; with space back, the run resumes exactly."""
    from lunaris.train.logging import RunLogger
    keys = dict(model={"dropout": 0.1}, warmup_steps=0, min_lr=3e-3, learning_rate=3e-3, save_interval=1000)
    out = disk / "run"
    config = helpers.write_yaml(train_config(out, **keys), tmp_path / "run.yaml")
    assert cli_main(["train", str(config), "--max_steps=2"]) == 0                  # ckpt_2.pt
    original = RunLogger.log

    def log(self, step, record, console=True):
        if step == 3:
            full_disk.fill(disk)                                                      # not a block left
        return original(self, step, record, console)
    with monkeypatch.context() as patch:
        patch.setattr(RunLogger, "log", log)
        status = cli_main(["train", str(config), "--max_steps=40"])
    err = capsys.readouterr().err
    assert_clear(status, err, f"{out / 'metrics.jsonl'}: the disk is full (No space left on device)",
                 "ckpt_2.pt (step 2), is intact", "it resumes from step 2")
    assert saved_step(out) == 2 and temporaries(out) == []

    status = cli_main(["train", str(config), "--max_steps=40"])                      # still full
    err = capsys.readouterr().err
    assert status == 2 and "Traceback" not in err and "is not writable (No space left on device)" in err, err
    assert not list(out.glob(".write-test-*")) and temporaries(out) == []          # its probe is gone too

    (disk / "ballast").unlink()
    assert cli_main(["train", str(config), "--max_steps=40"]) == 0
    capsys.readouterr()
    straight = tmp_path / "straight"
    train(train_config(straight, **{**keys, "max_steps": 40}))
    assert helpers.losses_by_step(out) == helpers.losses_by_step(straight)
    helpers.assert_weights_close(helpers.final_weights(out), helpers.final_weights(straight))


# ---- a plot -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("form", ["real", *FORMS])
def test_a_plot_on_a_full_disk(tmp_path, request, monkeypatch, capsys, form):
    import json
    root = request.getfixturevalue("disk") if form == "real" else tmp_path / "plots"
    root.mkdir(exist_ok=True)
    (root / "metrics.jsonl").write_text("".join(json.dumps({"step": s, "loss/total": 5 - s / 10, "lr": 1e-3}) + "\n"
                                                for s in range(1, 30)))
    png = root / "training.png"
    assert cli_main(["plot", str(root)]) == 0
    before = png.read_bytes()
    png.write_bytes(before[:100] + b"old")  # the previous figure, to be kept as it is
    capsys.readouterr()
    if form == "real":
        full_disk.fill(root, leave=8192)
        status = cli_main(["plot", str(root)])
        (root / "ballast").unlink()
    else:
        with full_disk.failing_writes(monkeypatch, ".training.png.tmp", room=5000, at=form):
            status = cli_main(["plot", str(root)])
    err = capsys.readouterr().err
    assert status == 2 and err.startswith(f"error: could not write {png}: the disk is full"), err
    assert "Traceback" not in err and "The previous training.png is unchanged" in err and "--out FILE" in err
    assert png.read_bytes() == before[:100] + b"old" and temporaries(root) == []
    assert cli_main(["plot", str(root)]) == 0                                        # space back
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and len(png.read_bytes()) > 1000


# ---- FSDP: torch.distributed.checkpoint on two gloo processes ----------------------------------------

def two_processes(args: list, env: dict, directory: Path, timeout: float = 240) -> list:
    """The two workers torchrun would start (RANK, WORLD_SIZE, MASTER_ADDR/PORT), started directly so that each one's
    own exit status is seen (torchrun's agent stops the other worker as soon as one exits with an error); returns
    [(exit status, stdout + stderr)] by rank."""
    directory.mkdir(parents=True, exist_ok=True)
    port, workers = processes.free_port(), processes.Processes(directory)
    try:
        started = [workers.start(f"rank{rank}", [sys.executable, *args], env={
            **env, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2",
            "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}) for rank in (0, 1)]
        workers.wait_all(started, timeout)
        return [(p.returncode, workers.output(p)) for p in started]
    finally:
        workers.close()


def assert_both_ranks_stopped(results: list, *messages) -> None:
    """Each rank exited with status 2 after one line `error: MESSAGE` (rank 0 the first of `messages`, rank 1 the
    second), without a traceback."""
    for (status, output), message in zip(results, messages):
        assert status == 2 and f"error: {message}" in output, output[-3000:]
        assert not re.search(r"Traceback|CheckpointException|RuntimeError", output), output[-3000:]


def assert_checkpoint_failed_on_both_ranks(results: list, out) -> None:
    message = (f"could not write checkpoint {out / 'ckpt_4'}: the disk is full (No space left on device). What it "
               f"had written was deleted. The newest complete checkpoint, ckpt_2 (step 2), is intact. Free disk "
               f"space, then run the same command again: it resumes from step 2.")
    assert_both_ranks_stopped(results, message, message)  # both ranks saw the disk's error
    assert sorted(p.name for p in out.iterdir() if p.name.startswith((".ckpt", "ckpt"))) == ["ckpt_2"]
    assert (out / "latest_checkpoint").resolve() == (out / "ckpt_2").resolve()


@pytest.mark.slow
def test_an_fsdp_checkpoint_and_metrics_on_a_full_disk_stop_both_ranks(tmp_path, train_config, helpers):
    """torch.distributed.checkpoint on two gloo processes: rank 1's shard file fills the disk inside torch.save (its
    RuntimeError) while rank 0's fails on a flush (a plain OSError); rank 0's metrics.jsonl fills it; then a real
    full disk. Every time both ranks end with a message and exit status 2, the step-2 checkpoint stays the newest,
    and the restart under torchrun after space is back computes the uninterrupted run's losses."""
    mounted = full_disk.small_disk(tmp_path / "disk")
    try:
        run_fsdp_chain(tmp_path, mounted or tmp_path, mounted is not None, train_config, helpers)
    finally:
        if mounted is not None:
            full_disk.unmount(mounted)


def run_fsdp_chain(tmp_path, root, real: bool, train_config, helpers) -> None:
    keys = dict(parallelism="fsdp", warmup_steps=0, learning_rate=3e-3, min_lr=3e-3, max_steps=4, save_interval=2,
                keep_last=2)
    env = helpers.subprocess_env()
    straight, out = tmp_path / "straight", root / "run"
    reference = helpers.write_yaml(train_config(straight, **keys), tmp_path / "straight.yaml")
    config = helpers.write_yaml(train_config(out, **keys), tmp_path / "run.yaml")
    for done in (helpers.torchrun(["-m", "lunaris", "train", str(reference)]),
                 helpers.torchrun(["-m", "lunaris", "train", str(config), "--max_steps=2"])):
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    command = ["-m", "lunaris", "train", str(config)]

    def run(name, run_env):
        return two_processes(command, run_env, tmp_path / name)

    ckpt_bytes = sum(p.stat().st_size for p in (out / "ckpt_2").iterdir())
    shards = full_disk.child_env(env, tmp_path / "site-shards", (".ckpt_4.tmp/__1_", ckpt_bytes // 8, "write", 1),
                                 (".ckpt_4.tmp/__0_", 0, "flush", 0))
    assert_checkpoint_failed_on_both_ranks(run("shards", shards), out)

    metrics = full_disk.child_env(env, tmp_path / "site-metrics", ("/metrics.jsonl", 0, "write", 0))
    assert_both_ranks_stopped(run("metrics", metrics),
                              f"could not write {out / 'metrics.jsonl'}: the disk is full (No space left on device). "
                              f"The newest complete checkpoint, ckpt_2 (step 2), is intact.",
                              "rank 1: stopping because another rank failed (its message is above).")
    assert (out / "latest_checkpoint").resolve() == (out / "ckpt_2").resolve()
    if real:
        ballast = full_disk.fill(root, leave=ckpt_bytes // 2)
        assert_checkpoint_failed_on_both_ranks(run("real", env), out)
        ballast.unlink()

    done = helpers.torchrun(command)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "resuming from" in done.stdout and "at step 2" in done.stdout
    assert helpers.losses_by_step(out) == helpers.losses_by_step(straight)
