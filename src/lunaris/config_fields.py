"""Declared config fields: how a key is declared, checked against its declaration, and named in a problem.

A key is a dataclass field made by `key(default, help, **bounds)`; its annotation gives the type, and a `Literal`
its choices. `rule` declares a cross-field rule of a config section. `checks` finds every problem of a config, built
in code or loaded; `read_value` and `typed` turn a value from a file or the command line into the field's type.
pydantic checks the values and is imported only then: exported `trust_remote_code` models embed this code and run
it without pydantic, where only the rules run (the model's config was checked when it was trained).
"""

import dataclasses
import functools
import typing
from dataclasses import field
from typing import Annotated, Literal

from lunaris.errors import suggest

TYPE_WORDS = {bool: "true or false", int: "an integer", float: "a number", str: "a string", list: "a list"}
VALUE_ERRORS = {"greater_than", "greater_than_equal", "less_than", "less_than_equal", "literal_error"}
NULL_WORDS = ("null", "~", "none")


def key(default, help: str, **bounds):
    """A config key: a dataclass field with its default, one-line help and bounds (gt, ge, lt, le)."""
    metadata = {"help": help, "bounds": bounds}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata=metadata)
    return field(default=default, metadata=metadata)


def rule(*keys):
    """Declare a cross-field rule: a method `(self, refs)` that returns a sentence (or a list of them) when the
    values of `keys` do not fit together. It is skipped while one of those values is invalid on its own."""
    def declare(method):
        method.rule_keys = keys
        return method
    return declare


@functools.lru_cache(maxsize=None)
def hints(cls) -> dict:
    """Field name -> declared type, for every field of a config class (its sections' included)."""
    return {name: hint for name, hint in typing.get_type_hints(cls).items() if name in cls.__dataclass_fields__}


def field_names(cls) -> list:
    """The keys of a config class (a TrainConfig's `model` is a section, not a key)."""
    return [name for name in hints(cls) if name != "model"]


def unwrap(hint) -> tuple:
    """`(type, optional, choices)`: Optional[Literal['a', 'b']] -> (Literal[...], True, ('a', 'b'))."""
    optional = typing.get_origin(hint) is typing.Union and type(None) in typing.get_args(hint)
    if optional:
        hint = next(arg for arg in typing.get_args(hint) if arg is not type(None))
    return hint, optional, typing.get_args(hint) if typing.get_origin(hint) is Literal else ()


@functools.lru_cache(maxsize=None)
def _adapter(cls, name: str):
    """pydantic's validator of one declared field (type, choices, bounds); None where pydantic is missing."""
    try:
        from pydantic import ConfigDict, Field, TypeAdapter
    except ImportError:  # an exported model's code, run without pydantic
        return None
    bounds = cls.__dataclass_fields__[name].metadata.get("bounds", {})
    return TypeAdapter(Annotated[hints(cls)[name], Field(**bounds)], config=ConfigDict(coerce_numbers_to_str=True))


def typed(cls, name: str, value) -> tuple:
    """`(value as the field's type, None)`, or `(value, pydantic's error)` when it does not fit the declaration."""
    adapter = _adapter(cls, name)
    if adapter is None:
        return value, None
    try:
        return adapter.validate_python(value), None
    except ValueError as exc:  # pydantic's ValidationError
        return value, exc.errors()[0]


def read_value(hint, value, text):
    """A file or command-line value as its field reads it: `text` (as written on the command line) for a text field
    (`--wandb_run_name=007`); null, ~ and none as null for an optional field, unless they are one of its choices
    (collab_mode's none); one entry as a one-item list."""
    base, optional, options = unwrap(hint)
    text = text if isinstance(text, str) else value if isinstance(value, str) else None
    if optional and text is not None and text.strip().lower() in NULL_WORDS and text not in options:
        return None
    if text is not None and (base is str or options):
        return text
    return [value] if base is list and value is not None and not isinstance(value, list) else value


def range_text(base, bounds: dict) -> str:
    """A field's bounds in words: 'a positive integer', 'positive', 'an integer >= 0', 'in [0, 1)'."""
    low, high = bounds.get("gt", bounds.get("ge")), bounds.get("lt", bounds.get("le"))
    if low is not None and high is not None:
        return f"in {'(' if 'gt' in bounds else '['}{low}, {high}{')' if 'lt' in bounds else ']'}"
    if bounds.get("gt") == 0:
        return "a positive integer" if base is int else "positive"
    op, limit = next((op, bounds[k]) for k, op in (("gt", ">"), ("ge", ">="), ("lt", "<"), ("le", "<=")) if k in bounds)
    return f"{'an integer ' if base is int else ''}{op} {limit}"


def sentence(cls, name: str, full_key: str, error: dict, origin=None) -> str:
    """The problem of a value that does not fit its field's declaration, e.g. 'model.dropout must be in [0, 1),
    got 1.5.' or 'dtype must be one of auto, bf16, fp16, fp32, got 'bf61' (from --dtype bf61) (did you mean...'."""
    base, optional, options = unwrap(hints(cls)[name])
    value, where = error["input"], f" (from {origin})" if origin else ""
    if value is None:
        return f"{full_key} must not be null{where}."
    if options:
        return f"{full_key} must be one of {', '.join(options)}, got {value!r}{where}{suggest(value, options)}."
    if error["type"] in VALUE_ERRORS:  # a number of the right type, out of bounds: shown as that type (0 -> 0.0)
        value, what = base(value), range_text(base, cls.__dataclass_fields__[name].metadata["bounds"])
    else:
        what = TYPE_WORDS.get(base, error["msg"].lower())
    return f"{full_key} must be {what}{' or null' if optional else ''}, got {value!r}{where}."


class Refs:
    """How a rule names values: `model.d_model (100)`, `max_steps (10, from --max_steps=10)`, and a key the config
    left unset as `model.d_model (768, the default)`."""

    def __init__(self, config, prefix: str, origins: dict, defaults):
        self.config, self.prefix, self.origins, self.defaults = config, prefix, origins, defaults

    def got(self, name: str) -> str:
        """'got 0' or 'got 0 (from --model.n_layers=0)'."""
        origin = self.origins.get(self.prefix + name)
        return f"got {getattr(self.config, name)!r}" + (f" (from {origin})" if origin else "")

    def ref(self, name: str, form: str = None) -> str:
        """'model.d_model (100)' or 'max_steps (10, from --max_steps=10)'; `form` formats the value instead."""
        full_key, value = self.prefix + name, getattr(self.config, name)
        origin = self.origins.get(full_key)
        if form is not None:
            return form.format(value) + (f" (from {origin})" if origin else "")
        if origin:
            return f"{full_key} ({value}, from {origin})"
        return f"{full_key} ({value}, the default)" if full_key in self.defaults else f"{full_key} ({value})"


def rules(cls) -> list:
    """The `@rule` methods of a config class, section by section."""
    found = {}
    for klass in reversed(cls.__mro__):
        found.update({name: value for name, value in vars(klass).items() if hasattr(value, "rule_keys")})
    return list(found.values())


def checks(config, prefix: str, origins: dict, defaults) -> list:
    """`(keys, sentence)` of every field that does not fit its declaration, then of every rule that fails; a nested
    config (a TrainConfig's model) adds its own checks first."""
    found, invalid = [], set()
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if dataclasses.is_dataclass(value):
            found += value.checks(origins, defaults)
            continue
        _, error = typed(type(config), f.name, value)
        if error:
            full_key = prefix + f.name
            found.append(((full_key,), sentence(type(config), f.name, full_key, error, origins.get(full_key))))
            invalid.add(f.name)
    refs = Refs(config, prefix, origins, defaults)
    for check in rules(type(config)):
        if invalid.isdisjoint(check.rule_keys):
            said = check(config, refs) or []
            keys = tuple(prefix + k for k in check.rule_keys)
            found += [(keys, s) for s in ([said] if isinstance(said, str) else said)]
    return found
