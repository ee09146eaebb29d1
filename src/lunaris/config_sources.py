"""Where a config's values come from: a YAML file or a preset shipped in the package, and overrides.

Everything here turns text into flat keys with YAML-typed values, `{"model.d_model": 64, "max_steps": 10}`, and
remembers which override set which key; lunaris.config types and checks the values against the declared fields.
"""

import difflib
import re
from pathlib import Path

import yaml

from lunaris.errors import ConfigError, suggest

PRESETS = Path(__file__).parent / "presets"   # configs/ of a source checkout is this directory
OLD_PRESET_NAMES = {"dense-1b": "dense-277m"}  # renamed to what they build; the old names still load


class _YAMLLoader(yaml.SafeLoader):
    """YAML as configs mean it: `1e-3` and `1e4` are numbers (YAML 1.1 reads an exponent without a dot as text)."""


_YAMLLoader.add_implicit_resolver("tag:yaml.org,2002:float",
                                  re.compile(r"^[-+]?(?:\d[\d_]*(?:\.[\d_]*)?|\.\d[\d_]*)[eE][-+]?\d+$"),
                                  list("-+.0123456789"))


def read_yaml(path, what: str = "config file", hint: str = "or the name of a preset"):
    """The parsed YAML of `path` ({} for an empty file); a missing, unreadable or invalid file is a ConfigError
    naming `what` and, for a missing one, the `hint`."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{what} {path} does not exist; pass the path of a YAML file ({hint}).")
    try:
        data = yaml.load(path.read_text(encoding="utf-8"), Loader=_YAMLLoader)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{what} {path} is not valid YAML: {exc}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{what} {path} cannot be read: {exc}") from None
    return data if data is not None else {}


def preset_names() -> list:
    """The presets shipped in the package, by name (`dense-124m`); an old name has no file of its own."""
    return sorted(path.stem for path in PRESETS.glob("*.yaml"))


def find_config(config) -> tuple:
    """`(file, what to call it)` for a config argument: a YAML file, or a preset's name (`dense-124m`, or an old
    name such as `dense-1b`, which also loads as `configs/dense-1b.yaml` from a checkout). Anything else is a
    ConfigError that lists the presets."""
    path = Path(config)
    if path.is_file():
        return path, str(config)
    asked = path.stem if path.suffix in (".yaml", ".yml") else path.name
    name = OLD_PRESET_NAMES.get(asked, asked)
    preset = PRESETS / f"{name}.yaml"
    if preset.is_file() and (path.parent == Path(".") or path.parent.resolve() == PRESETS.resolve()):
        return preset, f"preset {asked}"
    names = preset_names()
    hint = suggest(name, names + list(OLD_PRESET_NAMES))
    if preset.is_file():
        hint = f" (the preset '{name}' loads by its name alone)"
    old = "; ".join(f"{o} is the old name of {n}" for o, n in OLD_PRESET_NAMES.items())
    a_path = path.suffix in (".yaml", ".yml") or path.parent != Path(".")
    what = f"config file {config} does not exist" if a_path else f"config {config} is neither a file nor a preset"
    raise ConfigError(f"{what}{hint}; pass the path of a YAML file or the name of a preset: {', '.join(names)} "
                      f"({old}).")


def flatten(data, source: str, problems: list) -> dict:
    """A config mapping -> `{"model.d_model": ..., "max_steps": ...}`; a malformed layout becomes a problem."""
    flat: dict = {}
    if not isinstance(data, dict):
        problems.append(f"{source} must be a YAML mapping of keys to values (got {type(data).__name__}).")
        return flat
    for key, value in data.items():
        key = str(key)
        if key != "model":
            flat[key] = value
        elif isinstance(value, dict):
            flat.update({f"model.{k}": v for k, v in value.items()})
        elif value is not None:
            problems.append(f"'model' must be a mapping of model keys (vocab_size, d_model, ...), got {value!r}.")
    return flat


def _command_line_words(words, problems: list) -> tuple:
    """`(written, count)` of `--key=value` / `--key value` words: `(key, value text, how it was written, text)`."""
    args, written, count, i = [str(word) for word in words], [], 0, 0
    while i < len(args):
        arg, i, count = args[i], i + 1, count + 1
        if not arg.startswith("--"):
            problems.append(f"override '{arg}' must look like --key=value or --model.key=value.")
        elif "=" in arg:
            key, value = arg[2:].split("=", 1)
            written.append((key, value, arg, value))
        elif i < len(args) and not args[i].startswith("--"):
            written.append((arg[2:], args[i], f"{arg} {args[i]}", args[i]))
            i += 1
        else:
            problems.append(f"override '{arg}' has no value; write it as --{arg[2:]}=VALUE.")
    return written, count


def override_items(overrides, problems: list) -> tuple:
    """`(items, count)`: `(key, value, how it was written, text)` per override, the value YAML-typed and the text as
    written (a text field keeps it: `--wandb_run_name=007`); malformed overrides become problems.

    `overrides` is a list of command-line words (`--key=value`, `--key value`, `--model.key=value`)
    or a dict (`{'learning_rate': 1e-3, 'model.n_layers': 4}` or `{'model': {'n_layers': 4}}`).
    """
    if overrides is None:
        return [], 0
    if isinstance(overrides, dict):
        written = [(str(key), value, f"--{key}={value}", None) for key, value in overrides.items()]
        count = len(written)
    else:
        written, count = _command_line_words(overrides, problems)
    items = []
    while written:
        key, value, text, raw = written.pop(0)
        key = key.replace("-", "_")
        if isinstance(value, dict):  # a dict override may nest: {'model': {'n_layers': 4}}
            written[:0] = [(f"{key}.{k}", v, f"--{key}.{k}={v}", None) for k, v in value.items()]
        elif not all(key.split(".")):
            problems.append(f"override '{text}' names no key; write it as --key=value or --model.key=value.")
        elif key == "model":
            problems.append(f"override '{text}' sets the whole model section; set one model key at a time, "
                            f"e.g. --model.n_layers=4.")
        else:
            items.append((key, _yaml_value(value) if isinstance(value, str) else value, text,
                          raw if raw is not None or not isinstance(value, str) else value))
    return items, count


def _yaml_value(text: str):
    """A command-line value typed as YAML types it: '1e-3' -> 0.001, 'true' -> True, 'null' -> None."""
    try:
        return yaml.load(text, Loader=_YAMLLoader)
    except yaml.YAMLError:
        return text


def unknown_key(key: str, origin, model_names, train_names) -> str:
    """The sentence for a key that is no field, with a "did you mean" hint where one fits."""
    in_model = key.startswith("model.")
    name = key[len("model."):] if in_model else key
    right = name if in_model else f"model.{name}"  # the same key in the other section
    if name in (train_names if in_model else model_names):
        if origin:
            hint = f" (did you mean '--{right}'?)"
        elif in_model:
            hint = f" (did you mean '{right}'? it belongs at the top level, not under 'model:')"
        else:
            hint = f" (did you mean '{right}'? it belongs under 'model:')"
    elif origin:
        everything = list(train_names) + [f"model.{n}" for n in model_names]
        match = difflib.get_close_matches(key, everything, n=1, cutoff=0.6)
        hint = f" (did you mean '--{match[0]}'?)" if match else ""
    else:
        hint = suggest(name, model_names if in_model else train_names)
    where = f" in {origin}" if origin else ""
    return f"unknown key '{key}'{where}{hint}."


def source_name(source, override_count: int, command_line: bool) -> str:
    """What the error heading blames: the file (or preset), and the overrides when there are any."""
    if not override_count:
        return source or "config"
    kind = "command-line override" if command_line else "override"
    return f"{source or 'the default config'} with {override_count} {kind}{'s' if override_count > 1 else ''}"
