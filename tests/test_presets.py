"""Presets ship once, in the package, and load by name wherever Lunaris is installed."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import prepared_words

import lunaris
from lunaris import ConfigError, load_config
from lunaris.cli import main
from lunaris.config_sources import OLD_PRESET_NAMES, PRESETS, preset_names
from lunaris.inspect_config import build_on_meta

ROOT = Path(__file__).resolve().parent.parent
SRC = Path(lunaris.__file__).resolve().parent.parent


def test_the_presets_live_once_in_the_package_and_configs_is_them():
    assert PRESETS == Path(lunaris.__file__).parent / "presets"
    assert preset_names() == ["demo-cpu", "dense-124m", "dense-277m", "moc-v4", "moc-v4-simple", "moe-124m"]
    assert (ROOT / "configs").resolve() == PRESETS.resolve()  # a checkout's configs/ is the same files
    assert 'lunaris = ["presets/*.yaml"]' in (ROOT / "pyproject.toml").read_text()  # shipped as package data


@pytest.mark.parametrize("name", preset_names())
def test_each_preset_says_what_it_builds_on_its_first_line(name):
    first = (PRESETS / f"{name}.yaml").read_text().splitlines()[0]
    match = re.match(r"# ([\w-]+): ([\d,]+) parameters", first)
    assert match, f"{name}.yaml must start with '# {name}: N parameters'"
    assert match.group(1) == name
    model = build_on_meta(load_config(name).model)
    assert int(match.group(2).replace(",", "")) == model.num_params()


def test_a_preset_loads_by_name_from_outside_the_repository(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert load_config("dense-124m") == load_config(PRESETS / "dense-124m.yaml")
    assert load_config("dense-124m.yaml", ["--max_steps=5"]).max_steps == 5
    config = load_config("dense-1b")                         # the old name of dense-277m
    assert config == load_config("dense-277m") and config.model.d_model == 1024
    assert load_config(ROOT / "configs" / "dense-1b.yaml") == config  # ... also as the path it had in a checkout
    with pytest.raises(ConfigError) as info:
        load_config("dense-12m")
    message = str(info.value)
    assert "config dense-12m is neither a file nor a preset (did you mean 'dense-124m'?)" in message
    assert "demo-cpu, dense-124m, dense-277m, moc-v4, moc-v4-simple, moe-124m" in message
    with pytest.raises(ConfigError, match=r"configs/dense-124m.yaml does not exist \(the preset 'dense-124m' loads "
                                          r"by its name alone\)"):
        load_config("configs/dense-124m.yaml")                # no configs/ here, as after `pip install lunaris`
    with pytest.raises(ConfigError) as info:                 # problems name the preset
        load_config("demo-cpu", ["--model.n_heads=3"])
    assert str(info.value).startswith("preset demo-cpu with 1 command-line override has 2 problems:")
    assert OLD_PRESET_NAMES == {"dense-1b": "dense-277m"}


def test_commands_take_a_preset_name_outside_the_repository(tmp_path, capsys):
    env = {**os.environ, "PYTHONPATH": str(SRC)}
    result = subprocess.run([sys.executable, "-m", "lunaris", "config", "moe-124m", "--model.n_layers=2"],
                            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "n_layers: 2" in result.stdout and "# parameters:" in result.stdout
    assert main(["train", "dense-12m"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: config dense-12m is neither a file nor a preset") and "Traceback" not in err
    assert main(["config"]) == 2 and "a YAML file or a preset (demo-cpu, dense-124m" in capsys.readouterr().err


@pytest.mark.slow
def test_lunaris_train_trains_a_preset_by_name(tmp_path):
    data = prepared_words(tmp_path, "alpha beta gamma delta epsilon zeta eta theta", n_docs=6, doc_words=400,
                          val_tokens=200, shard_tokens=2000)
    run = tmp_path / "elsewhere"
    run.mkdir()
    env = {**os.environ, "PYTHONPATH": str(SRC)}
    command = [sys.executable, "-m", "lunaris", "train", "demo-cpu", f"--data_dir={data}", "--out_dir=run",
               "--model.vocab_size=320", "--model.max_seq_len=32", "--batch_size=2", "--max_steps=2",
               "--warmup_steps=1", "--eval_interval=0", "--device=cpu", "--num_workers=0"]
    result = subprocess.run(command, cwd=run, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert (run / "run" / "latest_checkpoint.pt").is_file()
