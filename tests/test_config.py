"""Config loading, overrides and validation."""

from pathlib import Path

import pytest
import yaml

import lunaris
from lunaris import ConfigError, LunarisCodexConfig, TrainConfig, load_config
from lunaris.cli import main
from lunaris.config import model_config_from_dict
from lunaris.taskspec import SPEC_HELP

FIXTURES = Path(__file__).parent / "fixtures"
DEMO_PRESET = Path(lunaris.__file__).parent / "presets" / "demo-cpu.yaml"


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
    # the recipe options stay off for configs that do not name them: the 2023 recipe, exactly as before
    assert (config.optimizer, config.lr_schedule) == ("adamw", "cosine")
    assert (m.qk_norm, m.zero_init_out, m.logit_softcap, m.attention_mask) == (False, False, None, "causal")


def test_seed_moc_example_loads_unchanged():
    config = load_config(FIXTURES / "seed_moc_train.yaml")
    m = config.model
    assert (m.n_experts, m.top_k, m.capacity_factor, m.n_reasoning_steps) == (8, 2, 1.25, 3)
    assert m.aux_loss_weight == 1e-2 and m.router_z_loss_weight == 1e-3 and m.dropout == 0.05
    assert m.use_simple_collab is False and m.resolved_collab_mode == "mha"
    assert (config.beta1, config.beta2, config.device) == (0.9, 0.95, "cuda")
    assert (config.optimizer, config.lr_schedule, m.load_balance, m.qk_norm) == ("adamw", "cosine", "aux_loss", False)


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


def problem_lines(error) -> list:
    """The heading and the '  - ' lines of a ConfigError."""
    heading, *lines = str(error.value).split("\n")
    assert all(line.startswith("  - ") for line in lines)
    return heading, [line[4:] for line in lines]


def test_unknown_key_does_not_hide_an_invalid_value(tmp_path):
    path = write_yaml(tmp_path, "learnig_rate: 1e-3\nmodel:\n  n_heads: 7\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    heading, lines = problem_lines(info)
    assert heading == f"{path} has 2 problems:"
    assert lines == ["unknown key 'learnig_rate' (did you mean 'learning_rate'?).",
                     "model.d_model (768, the default) must be divisible by model.n_heads (7)."]


def test_unknown_model_key_does_not_hide_a_bad_type_or_value_elsewhere(tmp_path):
    path = write_yaml(tmp_path, {"model": {"d_modle": 64, "dropout": 1.5}, "batch_size": "big", "dtype": "fp8"})
    with pytest.raises(ConfigError) as info:
        load_config(path)
    heading, lines = problem_lines(info)
    assert heading.endswith("has 4 problems:")
    assert "unknown key 'model.d_modle' (did you mean 'd_model'?)." in lines
    assert "batch_size must be an integer, got 'big'." in lines
    assert "model.dropout must be in [0, 1), got 1.5." in lines
    assert "dtype must be one of auto, bf16, fp16, fp32, got 'fp8'." in lines


def test_bad_override_and_bad_file_value_are_reported_together(tmp_path):
    path = write_yaml(tmp_path, {"model": {"d_model": 64, "n_heads": 4}, "learning_rate": -1.0})
    with pytest.raises(ConfigError) as info:
        load_config(path, ["--learnig_rate=1e-3", "--max_steps=ten", "stray", "--min_lr"])
    heading, lines = problem_lines(info)
    assert heading == f"{path} with 4 command-line overrides has 5 problems:"
    assert lines == [
        "override 'stray' must look like --key=value or --model.key=value.",
        "override '--min_lr' has no value; write it as --min_lr=VALUE.",
        "unknown key 'learnig_rate' in --learnig_rate=1e-3 (did you mean '--learning_rate'?).",
        "max_steps must be an integer, got 'ten' (from --max_steps=ten).",
        "learning_rate must be positive, got -1.0.",
    ]


def test_every_kind_of_problem_at_once(tmp_path):
    path = write_yaml(tmp_path, {"d_model": 64, "model": {"n_heads": 5, "top_k": "two"}, "beta1": 1.0})
    with pytest.raises(ConfigError) as info:
        load_config(path, ["--model.n_kv_heads=2", "--model.learning_rate=1", "--model=small"])
    heading, lines = problem_lines(info)
    assert heading.endswith("with 3 command-line overrides has 7 problems:")
    for expected in ("override '--model=small' sets the whole model section",
                     "unknown key 'd_model' (did you mean 'model.d_model'? it belongs under 'model:').",
                     "model.top_k must be an integer, got 'two'.",
                     "unknown key 'model.learning_rate' in --model.learning_rate=1 (did you mean '--learning_rate'?).",
                     "model.d_model (768, the default) must be divisible by model.n_heads (5).",
                     "model.n_heads (5) must be divisible by model.n_kv_heads (2, from --model.n_kv_heads=2).",
                     "beta1 must be in [0, 1), got 1.0."):
        assert sum(expected in line for line in lines) == 1, expected


def test_a_value_of_the_wrong_type_is_not_judged_again(tmp_path):
    # d_model cannot be typed: its default must not be reported as indivisible by n_heads
    path = write_yaml(tmp_path, {"model": {"d_model": "wide", "n_heads": 7}})
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert problem_lines(info)[1] == ["model.d_model must be an integer, got 'wide'."]


def test_problems_name_the_override_that_set_a_value():
    with pytest.raises(ConfigError) as info:
        load_config(DEMO_PRESET, ["--max_steps=10", "--model.n_heads=3", "--dtype", "bf61"])
    heading, lines = problem_lines(info)
    assert heading == f"{DEMO_PRESET} with 3 command-line overrides has 3 problems:"
    assert lines == [
        "model.d_model (128) must be divisible by model.n_heads (3, from --model.n_heads=3).",
        "model.n_heads (3, from --model.n_heads=3) must be divisible by model.n_kv_heads (2).",
        "dtype must be one of auto, bf16, fp16, fp32, got 'bf61' (from --dtype bf61) (did you mean 'bf16'?).",
    ]
    with pytest.raises(ConfigError) as info:  # dict overrides (from code) are named the same way
        load_config(DEMO_PRESET, {"model": {"top_k": 9, "n_experts": 4}})
    assert problem_lines(info) == (
        f"{DEMO_PRESET} with 1 override has 1 problem:",
        ["model.top_k (9, from --model.top_k=9) must be <= model.n_experts (4, from --model.n_experts=4)."])


def test_a_warmup_longer_than_the_run_is_allowed():
    # `lunaris train configs/demo-cpu.yaml --max_steps=10`: the run ends during the 40-step warmup
    config = load_config(DEMO_PRESET, ["--max_steps=10"])
    assert (config.warmup_steps, config.max_steps) == (40, 10)
    assert load_config(None, {"warmup_steps": 500, "max_steps": 100}).warmup_steps == 500


def test_string_overrides_keep_their_text():
    config = load_config(DEMO_PRESET, ["--wandb_run_name=007", "--max-steps", "1_000"])
    assert config.wandb_run_name == "007" and config.max_steps == 1000


def test_model_config_from_dict_reports_every_problem():
    with pytest.raises(ConfigError) as info:
        model_config_from_dict({"d_model": 64, "n_heads": 3, "n_layer": 2}, source="model config in x.pt")
    heading, lines = problem_lines(info)
    assert heading == "model config in x.pt has 2 problems:"
    assert lines == ["unknown key 'model.n_layer' (did you mean 'n_layers'?).",
                     "model.d_model (64) must be divisible by model.n_heads (3)."]


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


def test_cli_error_heading_names_the_overrides(capsys):
    assert main(["config", str(DEMO_PRESET), "--max_steps=10", "--model.n_heads=3"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {DEMO_PRESET} with 2 command-line overrides has 2 problems:")
    assert "model.n_heads (3, from --model.n_heads=3)" in err


def test_cli_config_shows_parameter_count(tmp_path, capsys):
    assert main(["config", str(FIXTURES / "seed_dense_train_config.yaml"), "--model.n_layers=2"]) == 0
    out = capsys.readouterr().out
    assert "n_layers: 2" in out and "# parameters:" in out


def test_collab_mode_none_is_the_top_k_mode_not_null(tmp_path):
    # "none" is a value of collab_mode (plain top-k MoE), not YAML/CLI null; null still means the default (mha)
    path = write_yaml(tmp_path, {"model": {"n_experts": 4, "collab_mode": "none"}})
    assert load_config(path).model.resolved_collab_mode == "none"
    assert load_config(DEMO_PRESET, ["--model.n_experts=4", "--model.collab_mode=none"]).model.resolved_collab_mode \
        == "none"
    assert load_config(DEMO_PRESET, ["--model.n_experts=4", "--model.collab_mode=null"]).model.resolved_collab_mode \
        == "mha"
    assert load_config(DEMO_PRESET, ["--wandb_project=none"]).wandb_project is None    # elsewhere none is null


# ---- one declared field per key, sections, problems as a list ---------------------------------------------------

def test_a_config_error_carries_its_problems_one_by_one(tmp_path):
    import pickle
    path = write_yaml(tmp_path, {"model": {"d_model": 100, "n_heads": 16}, "batch_size": 0})
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert info.value.problems == problem_lines(info)[1] and len(info.value.problems) == 2
    assert pickle.loads(pickle.dumps(info.value)).problems == info.value.problems
    assert ConfigError("one sentence.").problems == ["one sentence."]


def test_choices_are_declared_once_and_the_cli_uses_them():
    from lunaris.cli import build_parser
    from lunaris.config import choices
    assert choices("dtype") == ("auto", "bf16", "fp16", "fp32")
    assert choices("model.collab_mode") == ("mha", "simple", "none") and choices("max_steps") == ()
    with pytest.raises(KeyError):
        choices("model.learning_rate")
    sub = next(a for a in build_parser()._actions if a.dest == "command").choices
    for command, option, key in (("generate", "--dtype", "dtype"), ("eval", "--dtype", "dtype"),
                                 ("demo", "--device", "device")):
        action = next(a for a in sub[command]._actions if option in a.option_strings)
        assert tuple(action.choices) == choices(key), (command, option)


def test_sections_group_the_declarations_but_keys_and_attributes_stay_flat():
    from lunaris.config import field_docs
    from lunaris.inspect_config import sections
    config = TrainConfig()
    flat = [name for name, _, _ in field_docs(TrainConfig)]
    grouped = [row[0] for _, rows in sections(TrainConfig) for row in rows]
    assert sorted(grouped) == sorted(flat) and len(set(grouped)) == len(grouped)  # each key in exactly one section
    assert list(config.to_dict()) == ["model", *flat]                             # the model first, then flat keys
    assert [title.split(":")[0] for title, _ in sections(TrainConfig)] == [
        "Data and batches", "Optimizer", "Schedule", "Checkpoints", "Logging and evaluation", "Runtime"]
    assert [title.split(" ")[1] for title, _ in sections(LunarisCodexConfig)] == ["architecture", "recipe", "MoC"]
    assert config.learning_rate == 3e-4 and config.model.d_model == 768 and config.resolved_min_lr == 3e-4 / 10
    assert dataclasses_replace_keeps_working()


def dataclasses_replace_keeps_working() -> bool:
    import dataclasses
    model = dataclasses.replace(LunarisCodexConfig(), n_layers=2)
    return model.n_layers == 2 and model.problems() == [] and dataclasses.asdict(model)["n_layers"] == 2


def test_every_field_is_checked_against_its_declaration_even_without_loading():
    # a config built in code: the same sentences as a loaded one; a rule never judges a value that is invalid itself
    assert LunarisCodexConfig(n_heads=0).problems() == ["model.n_heads must be a positive integer, got 0."]
    assert LunarisCodexConfig(n_kv_heads=0, collab_heads=-2).problems() == [
        "model.n_kv_heads must be a positive integer or null, got 0.",
        "model.collab_heads must be a positive integer or null, got -2."]
    problems = TrainConfig(device="gpu", min_lr=1.0, eval_tasks=["x="], seed="s").problems()
    assert problems == ["device must be one of auto, cuda, cpu, mps, got 'gpu' (did you mean 'cpu'?).",
                        "seed must be an integer, got 's'.",
                        "min_lr (1.0) must be between 0 and learning_rate (0.0003).",
                        f"eval_tasks: task 'x=' has no path: {SPEC_HELP}."]


def test_values_are_typed_from_the_declaration(tmp_path):
    config = load_config(None, ["--max_steps=1e4", "--model.n_experts", "4", "--eval_tasks=embedded",
                                "--model.collab_mode", "None", "--wandb_project=NULL"])
    assert config.max_steps == 10000 and isinstance(config.max_steps, int) and config.model.n_experts == 4
    assert config.eval_tasks == ["embedded"] and config.model.collab_mode is None and config.wandb_project is None
    assert load_config(None, {"wandb_run_name": "007", "model": {"rope_theta": 500}}).wandb_run_name == "007"
    with pytest.raises(ConfigError) as info:
        load_config(None, ["--max_steps=2.5", "--compile_model=maybe", "--model.d_model=null", "--eval_tasks=7"])
    assert problem_lines(info)[1] == [
        "max_steps must be an integer, got 2.5 (from --max_steps=2.5).",
        "compile_model must be true or false, got 'maybe' (from --compile_model=maybe).",
        "model.d_model must not be null (from --model.d_model=null).",
        f"eval_tasks: task 7 is not a task: {SPEC_HELP}."]


def test_parse_overrides_nests_typed_values():
    from lunaris.config import parse_overrides
    assert parse_overrides(["--learning_rate=1e-3", "--model.n_layers", "4", "--wandb_run_name=null"]) == {
        "learning_rate": 0.001, "model": {"n_layers": 4}, "wandb_run_name": None}
    with pytest.raises(ConfigError) as info:
        parse_overrides(["stray", "--max_steps"])
    assert len(info.value.problems) == 2


def test_the_config_imports_nothing_above_it():
    # config -> config_sources, taskspec -> errors: the eval_tasks check no longer imports the tasks package
    import ast
    allowed = {"lunaris.config": {"lunaris.config_fields", "lunaris.config_sources", "lunaris.errors",
                                  "lunaris.taskspec"},
               "lunaris.config_fields": {"lunaris.errors"},
               "lunaris.config_sources": {"lunaris.errors"}, "lunaris.taskspec": {"lunaris.errors"}}
    for module, expected in allowed.items():
        path = Path(lunaris.__file__).parent / f"{module.split('.')[1]}.py"
        imported = {node.module for node in ast.walk(ast.parse(path.read_text()))
                    if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("lunaris")}
        assert imported == expected, module
