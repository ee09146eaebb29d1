"""`lunaris config`: show a resolved config with its model's size, and the reference table of keys."""

import dataclasses
import inspect

import yaml

from lunaris.config import LunarisCodexConfig, TrainConfig, field_docs, load_config
from lunaris.config_fields import TYPE_WORDS, hints, range_text, unwrap
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


def sections(cls) -> list:
    """`(title, [(name, default, allowed values in words, help)])` per section of a config class, in field order:
    each section is a base class of `cls` (its docstring's first line is the title)."""
    rows = {}
    for name, default, text in field_docs(cls):
        base, optional, options = unwrap(hints(cls)[name])
        bounds = cls.__dataclass_fields__[name].metadata.get("bounds")
        allowed = ("one of " + ", ".join(options) if options else
                   range_text(base, bounds) if bounds else TYPE_WORDS[base])
        rows[name] = (name, default, allowed + (" or null" if optional else ""), text)
    grouped = []
    for klass in reversed(cls.__mro__):
        names = [name for name in inspect.get_annotations(klass) if name in rows]
        if names and klass is not cls:
            grouped.append((klass.__doc__.strip().splitlines()[0], [rows[name] for name in names]))
    return grouped


def reference_table() -> str:
    """Markdown tables of every key (model keys prefixed `model.`): default, allowed values and meaning, one table
    per section."""
    groups = [(title, "model.", rows) for title, rows in sections(LunarisCodexConfig)]
    groups += [(title, "", rows) for title, rows in sections(TrainConfig)]
    tables = []
    for title, prefix, rows in groups:
        lines = [f"**{title}**", "", "| key | default | value | meaning |", "| --- | --- | --- | --- |"]
        for name, default, allowed, help_text in rows:
            meaning = help_text.replace("|", "\\|")  # a "|" would split the cell
            lines.append(f"| `{prefix}{name}` | `{_format_default(default)}` | {allowed} | {meaning} |")
        tables.append("\n".join(lines))
    return "\n\n".join(tables)
