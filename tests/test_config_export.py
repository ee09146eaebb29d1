"""The config code that an exported `trust_remote_code` model embeds: plain dataclasses and the cross-field rules,
importing only the standard library, torch and transformers (no lunaris, no pydantic, no annotated_types)."""

import ast
import dataclasses
import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import byte_level_tokenizer, tiny_model_config

from lunaris import LunarisCodex, TrainConfig
from lunaris.export import export_checkpoint
from lunaris.export.remote_code import modeling_source

pytest.importorskip("transformers")

BLOCKED = ("lunaris", "pydantic", "pydantic_core", "annotated_types")

LOAD_WITHOUT_LUNARIS = f"""
import json, sys
for name in {BLOCKED!r}:
    sys.modules[name] = None  # `import name` now fails, as where they are not installed
import torch, transformers
hf = transformers.AutoModelForCausalLM.from_pretrained(sys.argv[1], trust_remote_code=True).eval()
module = sys.modules[type(hf).__module__]
with torch.no_grad():
    logits = hf(torch.arange(12).view(2, 6) % 320).logits
try:  # the rules run here too (the declared types and bounds are left to the lunaris that trained the model)
    module.model_config_from_dict({{"d_model": 64, "n_heads": 3, "n_layer": 2}}, source="config.json")
except module.ConfigError as exc:
    problems = exc.problems
print(json.dumps({{"logits": logits.tolist(), "problems": problems}}))
"""


def imports_outside_try(tree) -> set:
    """Top-level package of every import that is not inside a try block (transformers checks those are installed)."""
    found = set()

    def visit(node):
        if isinstance(node, ast.Try):
            return
        if isinstance(node, ast.Import):
            found.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            found.add(node.module.split(".")[0])
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return found


def test_the_embedded_config_imports_only_the_standard_library_torch_and_transformers():
    source = modeling_source()
    assert imports_outside_try(ast.parse(source)) - set(sys.stdlib_module_names) == {"torch", "transformers"}
    config_section = source.split("# lunaris.config\n")[1].split("# lunaris.model")[0]
    defined = {node.name for node in ast.parse(config_section.split("\n", 2)[2]).body if hasattr(node, "name")}
    assert {"LunarisCodexConfig", "model_config_from_dict", "raise_problems"} <= defined
    assert not defined & {"TrainConfig", "load_config", "read_yaml", "spec_problems"}  # training-only code stays out


def test_an_exported_moc_model_loads_without_lunaris_or_pydantic(tmp_path):
    model = LunarisCodex(tiny_model_config(vocab_size=320, n_experts=4, top_k=2, n_reasoning_steps=2)).eval()
    run = tmp_path / "run"
    run.mkdir()
    torch.save({"model": model.state_dict(), "config": dataclasses.asdict(TrainConfig(model=model.config)),
                "step": 1}, run / "latest_checkpoint.pt")
    byte_level_tokenizer().save(str(run / "tokenizer.json"))
    assert export_checkpoint(run, tmp_path / "hf")["format"] == "lunaris"
    env = {**os.environ, "HF_MODULES_CACHE": str(tmp_path / "modules")}
    result = subprocess.run([sys.executable, "-c", LOAD_WITHOUT_LUNARIS, str(tmp_path / "hf")], env=env,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    out = json.loads(result.stdout.strip().splitlines()[-1])
    with torch.no_grad():
        expected = model(torch.arange(12).view(2, 6) % 320).logits
    torch.testing.assert_close(torch.tensor(out["logits"]), expected, rtol=0, atol=1e-5)
    assert out["problems"] == ["unknown key 'model.n_layer' (did you mean 'n_layers'?).",
                               "model.d_model (64) must be divisible by model.n_heads (3)."]
