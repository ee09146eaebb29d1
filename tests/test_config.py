"""Config loading, overrides and validation."""

from pathlib import Path

import pytest
import yaml

from lunaris import ConfigError, LunarisCodexConfig, TrainConfig, load_config
from lunaris.cli import main

FIXTURES = Path(__file__).parent / "fixtures"


def write_yaml(tmp_path, data, name="c.yaml"):
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data) if not isinstance(data, str) else data)
    return path


def test_seed_dense_example_loads_unchanged():
    config = load_config(FIXTURES / "seed_dense_train_config.yaml")
    m = config.model
    shape = (m.vocab_size, m.d_model, m.n_layers, m.n_heads, m.n_kv_heads, m.max_seq_len)
    assert shape == (50304, 1024, 20, 16, 4, 1024)
    assert m.use_gradient_checkpointing is True and not m.is_moc
    assert config.learning_rate == 2.0e-4 and config.warmup_steps == 2000 and config.max_steps == 200000
    assert config.batch_size == 32 and config.gradient_accumulation_steps == 4 and config.compile_model is True
    assert config.wandb_project is None and config.wandb_run_name == "experiment-001"


def test_seed_moc_example_loads_unchanged():
    config = load_config(FIXTURES / "seed_moc_train.yaml")
    m = config.model
    assert (m.n_experts, m.top_k, m.capacity_factor, m.n_reasoning_steps) == (8, 2, 1.25, 3)
    assert m.aux_loss_weight == 1e-2 and m.router_z_loss_weight == 1e-3 and m.dropout == 0.05
    assert m.use_simple_collab is False and m.resolved_collab_mode == "mha"
    assert (config.beta1, config.beta2, config.device) == (0.9, 0.95, "cuda")


def test_overrides_are_typed_and_applied(tmp_path):
    path = write_yaml(tmp_path, {"model": {"d_model": 64, "n_heads": 4}, "max_steps": 5000})
    config = load_config(path, ["--learning_rate=1e-3", "--model.n_layers=4", "--compile_model", "true",
                                "--model.n_kv_heads=null", "--wandb_project=proj", "--model.capacity_factor=2"])
    assert config.learning_rate == 1e-3 and isinstance(config.learning_rate, float)
    assert config.model.n_layers == 4 and isinstance(config.model.n_layers, int)
    assert config.compile_model is True
    assert config.model.n_kv_heads is None
    assert config.wandb_project == "proj"
    assert config.model.capacity_factor == 2.0 and isinstance(config.model.capacity_factor, float)
    # dict overrides work as well
    assert load_config(path, {"model.n_layers": 3}).model.n_layers == 3


def test_yaml_strings_like_1e_minus_3_become_numbers(tmp_path):
    # YAML 1.1 reads `1e-3` (no dot) as a string; the field type makes it a float.
    path = write_yaml(tmp_path, "learning_rate: 1e-3\nmax_steps: 1e4\nmodel:\n  d_model: 64\n  n_heads: 4\n")
    config = load_config(path)
    assert config.learning_rate == 0.001 and config.max_steps == 10000


@pytest.mark.parametrize("data, expected", [
    ({"model": {"d_model": 100, "n_heads": 16}}, "must be divisible by model.n_heads"),
    ({"model": {"n_heads": 12, "n_kv_heads": 5}}, "must be divisible by model.n_kv_heads"),
    ({"model": {"d_model": 60, "n_heads": 4}}, "must be even for rotary"),
    ({"model": {"n_experts": 4, "top_k": 5}}, "top_k (5) must be <= model.n_experts (4)"),
    ({"model": {"n_layers": 0}}, "model.n_layers must be a positive integer"),
    ({"model": {"dropout": 1.0}}, "model.dropout must be in [0, 1)"),
    ({"warmup_steps": 500, "max_steps": 100}, "warmup_steps (500) must not exceed max_steps (100)"),
    ({"learning_rat": 1e-3}, "unknown key 'learning_rat' (did you mean 'learning_rate'?)"),
    ({"model": {"d_modle": 64}}, "unknown key 'model.d_modle' (did you mean 'd_model'?)"),
    ({"d_model": 64}, "belongs under 'model:'"),
    ({"batch_size": "big"}, "batch_size must be an integer, got 'big'"),
    ({"dtype": "fp8"}, "dtype must be one of auto, bf16, fp16, fp32"),
    ({"model": {"collab_mode": "mha", "use_simple_collab": True}}, "contradicts model.collab_mode"),
    ({"model": {"collab_mode": "fancy"}}, "collab_mode must be one of mha, simple, none"),
])
def test_bad_configs_give_expected_message(tmp_path, data, expected):
    with pytest.raises(ConfigError) as info:
        load_config(write_yaml(tmp_path, data))
    assert expected in str(info.value)
    assert isinstance(info.value, ValueError)


def test_every_problem_is_reported_at_once(tmp_path):
    path = write_yaml(tmp_path, {"model": {"d_model": 100, "n_heads": 16, "dropout": 2.0},
                                 "learning_rate": -1.0, "batch_size": 0})
    with pytest.raises(ConfigError) as info:
        load_config(path)
    message = str(info.value)
    assert "4 problems" in message
    for fragment in ("divisible by model.n_heads", "model.dropout", "learning_rate must be positive", "batch_size"):
        assert fragment in message


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(write_yaml(tmp_path, "model: [unclosed"))
    with pytest.raises(ConfigError, match="must be a YAML mapping"):
        load_config(write_yaml(tmp_path, "- a\n- b\n"))


def test_derived_values():
    config = LunarisCodexConfig(d_model=768, n_heads=12, ffn_mult=4.0, multiple_of=256)
    assert config.kv_heads == 12 and config.head_dim == 64
    assert config.ffn_hidden == 2048  # 4 * 768 * 2/3 = 2048
    assert LunarisCodexConfig(d_model=1000, n_heads=10, multiple_of=256).ffn_hidden == 2816  # 2666 -> 2816
    assert LunarisCodexConfig(ffn_hidden_size=100).ffn_hidden == 100
    assert LunarisCodexConfig(n_reasoning_steps=4).irl_step_scale == 0.5
    assert not LunarisCodexConfig(n_experts=0).is_moc and not LunarisCodexConfig(n_experts=None).is_moc
    moc = LunarisCodexConfig(n_experts=4, moc_every=2, n_layers=4)
    assert [moc.is_moc_layer(i) for i in range(4)] == [False, True, False, True]
    assert LunarisCodexConfig(use_simple_collab=True).resolved_collab_mode == "simple"


def test_round_trip_through_dict():
    config = TrainConfig(model=LunarisCodexConfig(d_model=64, n_heads=4), learning_rate=1e-3)
    assert TrainConfig.from_dict(config.to_dict()) == config


def test_cli_prints_config_error_without_traceback_and_exits_2(tmp_path, capsys):
    path = write_yaml(tmp_path, {"model": {"d_model": 100, "n_heads": 16}})
    assert main(["config", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and "Traceback" not in err and "divisible" in err


def test_cli_config_shows_parameter_count(tmp_path, capsys):
    assert main(["config", str(FIXTURES / "seed_dense_train_config.yaml"), "--model.n_layers=2"]) == 0
    out = capsys.readouterr().out
    assert "n_layers: 2" in out and "# parameters:" in out
