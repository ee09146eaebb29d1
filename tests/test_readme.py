"""The README cannot rot: its reference table, examples, configs and commands are checked here."""

import json
import os
import re
import sys
from pathlib import Path

import processes
import pytest

from lunaris import load_config
from lunaris.inspect_config import reference_table

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()


def fenced_blocks(language: str, marker: str = None) -> list:
    """Bodies of ```language ...``` blocks; with `marker`, only blocks whose info string carries that word."""
    return [body for lang, info, body in re.findall(r"```(\w+)([^\n]*)\n(.*?)```", README, re.S)
            if lang == language and (marker is None or marker in info.split())]


def named_files() -> dict:
    """{name: text} of the blocks whose info string names the file a reader saves them as (```yaml file=NAME```)."""
    return {name: body for name, body in re.findall(r"```\w+ [^\n]*\bfile=(\S+)[^\n]*\n(.*?)```", README, re.S)}


def section(title: str) -> str:
    match = re.search(rf"^## {re.escape(title)}\n(.*?)(?=^## )", README, re.S | re.M)
    assert match, f"README has no '## {title}' section"
    return match.group(1)


def test_config_reference_matches_the_code():
    start, end = "<!-- config-reference:start -->\n", "\n<!-- config-reference:end -->"
    table = README.split(start)[1].split(end)[0]
    assert table == reference_table(), \
        "README config reference is stale: regenerate it with `lunaris config --reference`"


def test_ci_runs_the_readme_setup_and_test_commands():
    setup = re.search(r"```bash\n(.*?)\n```", section("Setup"), re.S).group(1).strip()
    test = re.search(r"```bash\n(.*?)\n```", section("Tests"), re.S).group(1).strip()
    ci_lines = [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines()
                if line.strip() and not line.startswith("#")]
    assert setup in ci_lines and test in ci_lines
    assert ci_lines.index(setup) < ci_lines.index(test) and ci_lines[-1] == test


def test_runnable_python_examples_run(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)   # outside the repository, as after `pip install`: presets load by name
    blocks = fenced_blocks("python", "runnable")
    assert blocks
    for code in blocks:
        exec(compile(code, "README.md", "exec"), {"__name__": "readme_example"})


def test_every_yaml_config_in_the_readme_loads(tmp_path):
    configs = [block for block in fenced_blocks("yaml") if "model:" in block]
    for i, block in enumerate(configs):
        path = tmp_path / f"readme_{i}.yaml"
        path.write_text(block)
        load_config(path)


@pytest.mark.parametrize("path", sorted((ROOT / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_config_validates_and_builds_on_meta(path, capsys):
    from lunaris.inspect_config import build_on_meta
    config = load_config(path)
    model = build_on_meta(config.model)
    with capsys.disabled():
        print(f"\n{path.name}: {model.num_params():,} parameters")
    assert model.num_params() > 0
    assert os.path.relpath(path, ROOT).replace(os.sep, "/") in README or path.name in README, \
        f"{path.name} is not mentioned in the README"


# The README's runnable shell blocks, scaled down so the suite stays fast (the Tests section documents this).
SCALE_DOWN = [("lunaris demo", "lunaris demo --max-steps 6 --corpus-mb 0.4"),
              ("--max_steps=300", "--max_steps=6 --warmup_steps=2"),
              ("--max_steps=100 --warmup_steps=10", "--max_steps=6 --warmup_steps=2"), ("--limit 400", "--limit 8"),
              ("--max-tokens 2000000", "--max-tokens 60000"),
              ("--tokenizer-sample-bytes 8e6", "--tokenizer-sample-bytes 5e5"),
              ("flops: 1.55e12", "flops: 1.2e11"), ("seeds: 2", "seeds: 1")]   # the sweep file


def scaled_down(text: str) -> str:
    for original, scaled in SCALE_DOWN:
        text = text.replace(original, scaled)
    return text


@pytest.mark.timeout(1500)   # every runnable block twice, the fine-tuning of the demo's model included
def test_runnable_shell_blocks_work(tmp_path):
    """In a fresh directory outside the repository (with its configs/, as a reader's checkout has), the files the
    README tells the reader to save (the sweep file), then every runnable block, in order, twice."""
    blocks = fenced_blocks("bash", "runnable")
    assert len(blocks) >= 3 and "sweep.yaml" in named_files()
    (tmp_path / "configs").symlink_to(ROOT / "configs")
    for name, text in named_files().items():
        (tmp_path / name).write_text(scaled_down(text))
    env = {**os.environ, "PATH": os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", "")}
    for block in blocks:
        script = scaled_down(block)
        for attempt in ("first run", "second run"):  # every block is safe to paste twice
            result = processes.run(["bash", "-euo", "pipefail", "-c", script], 900, cwd=tmp_path, env=env)
            assert result.returncode == 0, f"README block failed ({attempt}):\n{script}\n--- stdout\n" \
                                           f"{result.stdout[-3000:]}\n--- stderr\n{result.stderr[-3000:]}"
    assert (tmp_path / "runs/demo/dense/training.png").is_file()
    assert (tmp_path / "runs/demo/demo-dense.json").is_file()
    assert (tmp_path / "hf/pylib/model.safetensors").is_file()
    assert (tmp_path / "runs/pylib/training.png").is_file()
    assert (tmp_path / "runs/chat/tokenizer_config.json").is_file()   # fine-tuned from the demo, with its template
    assert json.loads((tmp_path / "data/chat/manifest.json").read_text())["tokenizer_added_tokens"]
    sweep = json.loads((tmp_path / "runs/sweeps/sweep/results.json").read_text())
    assert [(row["variant"], row["steps"]) for row in sweep["variants"]] == [("dense", 3), ("topk", 3)]


def test_the_plan_example_is_what_lunaris_plan_prints(capsys):
    """The `lunaris plan` example of Multi-GPU and multi-node, run: the same lines, every number within 5% (a
    machine with a GPU traces the step there, with its own attention kernel)."""
    import shlex

    from lunaris.cli import main
    (block,) = fenced_blocks("text", "plan-example")
    command, *shown = block.rstrip("\n").splitlines()
    assert command.startswith("$ lunaris plan ")
    assert main(shlex.split(command)[2:]) == 0
    printed = capsys.readouterr().out.rstrip("\n").splitlines()
    number = r"\d[\d,]*(?:\.\d+)?"
    assert len(printed) == len(shown), "\n".join(printed)
    for got, want in zip(printed, shown):
        assert re.split(number, got) == re.split(number, want), f"{got!r} != {want!r}"
        for a, b in zip(re.findall(number, got), re.findall(number, want)):
            assert float(a.replace(",", "")) == pytest.approx(float(b.replace(",", "")), rel=0.05, abs=0.011), \
                f"{got!r} != {want!r}"
