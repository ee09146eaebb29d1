"""`lunaris config`: show a resolved config with its model's size, and the reference table of keys."""

import dataclasses

import yaml

from lunaris.config import LunarisCodexConfig, TrainConfig, field_docs, load_config
from lunaris.model import build_on_meta  # noqa: F401  (also importable from here, as before)


def describe_config(path, overrides=None) -> str:
    config = load_config(path, overrides)
    model = build_on_meta(config.model)
    seq = config.model.max_seq_len
    lines = [
        yaml.safe_dump(dataclasses.asdict(config), sort_keys=False).rstrip(),
        "",
        f"# parameters: {model.num_params():,} ({model.num_params(exclude_embedding=True):,} without the embedding)",
        f"# training FLOPs per token at seq {seq}: {model.flops_per_token(seq):.4g}",
        f"# tokens per optimizer step per process: "
        f"{config.batch_size * config.gradient_accumulation_steps * seq:,}",
    ]
    return "\n".join(lines)


def _format_default(value) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    return repr(value) if isinstance(value, str) else str(value)


def reference_table() -> str:
    """Markdown table of every key (model keys prefixed `model.`), default and meaning."""
    rows = ["| key | default | meaning |", "| --- | --- | --- |"]
    keys = [(f"model.{name}", default, text) for name, default, text in field_docs(LunarisCodexConfig)]
    keys += list(field_docs(TrainConfig))
    for name, default, help_text in keys:
        meaning = help_text.replace("|", "\\|")  # "mha | simple" would split the cell
        rows.append(f"| `{name}` | `{_format_default(default)}` | {meaning} |")
    return "\n".join(rows)
