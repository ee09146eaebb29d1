"""Loading checkpoints (`model_from_checkpoint`) and the `lunaris generate` command."""

import dataclasses

import pytest
import torch
from conftest import byte_level_tokenizer, tiny_model_config

from lunaris import CheckpointError, LunarisCodex, TrainConfig, model_from_checkpoint
from lunaris.cli import main


def save_run(run_dir, model, step=7, tokenizer=True):
    """A run directory as the trainer leaves it: ckpt_<step>.pt, latest_checkpoint.pt, tokenizer.json."""
    run_dir.mkdir(parents=True, exist_ok=True)
    state = {"model": model.state_dict(), "config": dataclasses.asdict(TrainConfig(model=model.config)),
             "step": step}
    torch.save(state, run_dir / f"ckpt_{step}.pt")
    torch.save(state, run_dir / "latest_checkpoint.pt")
    if tokenizer:
        byte_level_tokenizer().save(str(run_dir / "tokenizer.json"))
    return run_dir


@pytest.fixture
def run_dir(tmp_path):
    return save_run(tmp_path / "run", LunarisCodex(tiny_model_config(vocab_size=320)))


# ---- from_checkpoint -------------------------------------------------------------------------------------

def test_from_checkpoint_loads_config_and_weights_from_a_file_or_a_run_directory(tmp_path):
    model = LunarisCodex(tiny_model_config(vocab_size=320, n_experts=4, n_reasoning_steps=2)).eval()
    save_run(tmp_path / "run", model)
    idx = torch.randint(0, 320, (2, 10))
    for path in (tmp_path / "run", tmp_path / "run" / "ckpt_7.pt"):
        loaded = model_from_checkpoint(path)
        assert loaded.config == model.config and not loaded.training
        assert loaded.wte.weight.device.type == "cpu"
        torch.testing.assert_close(loaded(idx).logits, model(idx).logits, rtol=0, atol=0)


def test_the_classmethod_and_the_old_import_paths_load_the_same_model(tmp_path):
    import lunaris.checkpoints
    import lunaris.data.tokenizer
    import lunaris.generate
    import lunaris.train
    import lunaris.train.checkpoint
    model = LunarisCodex(tiny_model_config(vocab_size=320)).eval()
    save_run(tmp_path / "run", model)
    loaded = LunarisCodex.from_checkpoint(tmp_path / "run", device="cpu")
    assert isinstance(loaded, LunarisCodex) and not loaded.training and loaded.config == model.config
    idx = torch.randint(0, 320, (1, 8))
    torch.testing.assert_close(loaded(idx).logits, model(idx).logits, rtol=0, atol=0)
    with pytest.raises(CheckpointError, match="does not exist"):
        LunarisCodex.from_checkpoint(tmp_path / "nope.pt")
    # names that moved stay importable where they were
    assert lunaris.train.checkpoint.model_from_checkpoint is model_from_checkpoint
    for name in ("load_checkpoint_file", "resolve_checkpoint_path", "find_latest", "checkpoint_step", "LATEST_FILE",
                 "TRAINER_STATE", "clean_state_dict", "numbered_checkpoints"):
        assert getattr(lunaris.train.checkpoint, name) is getattr(lunaris.checkpoints, name)
    assert lunaris.train.load_checkpoint_file is lunaris.checkpoints.load_checkpoint_file
    for name in ("load_tokenizer", "find_tokenizer", "end_of_text_id", "StreamingDecoder"):
        assert getattr(lunaris.generate, name) is getattr(lunaris.data.tokenizer, name)


def test_from_checkpoint_of_a_missing_path_is_a_clear_error(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        model_from_checkpoint(tmp_path / "nope.pt")
    (tmp_path / "empty_run").mkdir()
    with pytest.raises(CheckpointError, match="without checkpoints"):
        model_from_checkpoint(tmp_path / "empty_run")


def test_from_checkpoint_of_an_unreadable_file_is_a_clear_error(tmp_path):
    path = tmp_path / "latest_checkpoint.pt"
    path.write_bytes(b"this is not a checkpoint" * 10)
    with pytest.raises(CheckpointError, match="cannot be read"):
        model_from_checkpoint(path)


def test_weights_that_do_not_fit_the_stored_config_are_a_clear_error(tmp_path):
    small = LunarisCodex(tiny_model_config(d_model=32))
    state = {"model": small.state_dict(), "step": 1,
             "config": dataclasses.asdict(TrainConfig(model=tiny_model_config(d_model=64)))}
    torch.save(state, tmp_path / "ckpt_1.pt")
    with pytest.raises(CheckpointError, match=r"ckpt_1.pt do not fit the model config.*size mismatch"):
        model_from_checkpoint(tmp_path / "ckpt_1.pt")


def test_a_checkpoint_without_a_model_config_is_a_clear_error(tmp_path):
    torch.save({"model": {}, "config": {"learning_rate": 1e-3}, "step": 1}, tmp_path / "ckpt_1.pt")
    with pytest.raises(CheckpointError, match=r"no model config"):
        model_from_checkpoint(tmp_path / "ckpt_1.pt")


# ---- lunaris generate ------------------------------------------------------------------------------------

def test_generate_command_streams_the_greedy_continuation(run_dir, capsys):
    tokenizer = byte_level_tokenizer()
    model = model_from_checkpoint(run_dir)
    eos = tokenizer.token_to_id("<|endoftext|>")
    prompt = "the quick"
    idx = torch.tensor([tokenizer.encode(prompt).ids])
    new = model.generate(idx, 12, temperature=0, eos_token_id=eos)[0, idx.shape[1]:].tolist()
    expected = tokenizer.decode([t for t in new if t != eos])
    assert expected.strip()  # a real continuation, not an immediate end-of-text

    assert main(["generate", "--checkpoint", str(run_dir), "--prompt", prompt, "--max-new-tokens", "12",
                 "--temperature", "0", "--device", "cpu", "--threads", "1"]) == 0
    captured = capsys.readouterr()
    assert captured.out == prompt + expected + "\n"
    assert f"{len(new)} tokens in" in captured.err


def test_generate_command_samples_reproducibly_with_a_seed(run_dir, capsys):
    args = ["generate", "--checkpoint", str(run_dir / "latest_checkpoint.pt"), "--prompt", "hello",
            "--max-new-tokens", "10", "--top-k", "20", "--top-p", "0.9", "--seed", "5", "--device", "cpu"]
    assert main(args) == 0
    first = capsys.readouterr().out
    assert main(args) == 0
    assert capsys.readouterr().out == first and first.startswith("hello")


def test_generate_command_uses_the_tokenizer_override(tmp_path, capsys):
    run = save_run(tmp_path / "run", LunarisCodex(tiny_model_config(vocab_size=320)), tokenizer=False)
    assert main(["generate", "--checkpoint", str(run), "--prompt", "hi", "--max-new-tokens", "2"]) == 2
    assert "no tokenizer.json next to the checkpoint" in capsys.readouterr().err
    byte_level_tokenizer().save(str(tmp_path / "tok.json"))
    assert main(["generate", "--checkpoint", str(run), "--prompt", "hi", "--max-new-tokens", "2",
                 "--tokenizer", str(tmp_path / "tok.json")]) == 0
    assert capsys.readouterr().out.startswith("hi")


def test_generate_command_reports_bad_input_without_a_traceback(run_dir, tmp_path, capsys):
    assert main(["generate", "--checkpoint", str(tmp_path / "missing"), "--prompt", "x"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "does not exist" in err and "Traceback" not in err

    long_prompt = "the quick brown fox " * 40  # far more tokens than max_seq_len=64
    assert main(["generate", "--checkpoint", str(run_dir), "--prompt", long_prompt]) == 2
    captured = capsys.readouterr()
    assert "max_seq_len=64" in captured.err and "shorten the prompt" in captured.err
    assert captured.out == ""  # nothing printed before the error

    assert main(["generate", "--checkpoint", str(run_dir), "--prompt", "x", "--top-p", "2"]) == 2
    assert "top_p must be in (0, 1]" in capsys.readouterr().err

    assert main(["generate", "--checkpoint", str(run_dir), "--prompt", "x", "--device", "gpu"]) == 2
    assert "'gpu' is not a device" in capsys.readouterr().err


def test_generate_command_stops_at_the_context_limit_with_a_note(tmp_path, capsys):
    run = save_run(tmp_path / "run", LunarisCodex(tiny_model_config(vocab_size=320, max_seq_len=16)))
    assert main(["generate", "--checkpoint", str(run), "--prompt", "the quick brown", "--max-new-tokens", "50",
                 "--temperature", "0"]) == 0
    assert "note: generation stopped" in capsys.readouterr().err


# ---- lunaris generate --prompt-file ----------------------------------------------------------------------

def test_prompt_file_continues_every_prompt_in_batches_like_each_prompt_alone(run_dir, tmp_path, capsys):
    import json
    tokenizer = byte_level_tokenizer()
    model = model_from_checkpoint(run_dir)
    eos = tokenizer.token_to_id("<|endoftext|>")
    prompts = ["the quick brown fox", "hello", "lazy dog jumps over", "a"]
    (tmp_path / "prompts.txt").write_text("\n".join(prompts[:2]) + "\n\n" + "\n".join(prompts[2:]) + "\n")
    assert main(["generate", "--checkpoint", str(run_dir), "--prompt-file", str(tmp_path / "prompts.txt"),
                 "--batch-size", "3", "--max-new-tokens", "10", "--temperature", "0", "--no-compile"]) == 0
    captured = capsys.readouterr()
    lines = [json.loads(line) for line in captured.out.splitlines()]
    assert [line["prompt"] for line in lines] == prompts          # in the file's order, blank line skipped
    for line in lines:
        idx = torch.tensor([tokenizer.encode(line["prompt"]).ids])
        new = model.generate(idx, 10, temperature=0, eos_token_id=eos)[0, idx.shape[1]:].tolist()
        assert line["completion"] == tokenizer.decode([t for t in new if t != eos])
    assert "[4 prompts," in captured.err and "batches of up to 3" in captured.err


def test_a_jsonl_prompt_file_holds_json_strings_or_objects(run_dir, tmp_path, capsys):
    import json
    path = tmp_path / "prompts.jsonl"
    path.write_text(json.dumps("line one\nline two") + "\n" + json.dumps({"prompt": "hello"}) + "\n")
    assert main(["generate", "--checkpoint", str(run_dir), "--prompt-file", str(path), "--max-new-tokens", "3",
                 "--temperature", "0"]) == 0
    assert [json.loads(line)["prompt"] for line in capsys.readouterr().out.splitlines()] == ["line one\nline two",
                                                                                             "hello"]
    path.write_text("not json\n")
    assert main(["generate", "--checkpoint", str(run_dir), "--prompt-file", str(path)]) == 2
    assert "line 1 is not JSON" in capsys.readouterr().err
    assert main(["generate", "--checkpoint", str(run_dir), "--prompt-file", str(tmp_path / "missing.txt")]) == 2
    assert "cannot read the prompt file" in capsys.readouterr().err


def test_prompt_and_prompt_file_exclude_each_other_and_compile_is_a_switch(run_dir, tmp_path, capsys):
    from lunaris.cli import build_parser
    with pytest.raises(SystemExit):
        main(["generate", "--checkpoint", str(run_dir), "--prompt", "x", "--prompt-file", str(tmp_path / "p.txt")])
    assert "not allowed with argument" in capsys.readouterr().err
    parse = build_parser().parse_args
    assert parse(["generate", "--checkpoint", "c"]).compile is None
    assert parse(["generate", "--checkpoint", "c", "--compile"]).compile is True
    assert parse(["generate", "--checkpoint", "c", "--no-compile"]).compile is False


def test_generate_reports_the_compilation_time(run_dir, capsys):
    from lunaris.generate import run_generate
    torch._dynamo.reset()
    run_generate(run_dir, "the quick", max_new_tokens=6, temperature=0, device="cpu",
                 compile={"backend": "eager"})
    torch._dynamo.reset()
    err = capsys.readouterr().err
    assert "[compiled the decode step in" in err and "6 tokens in" in err
