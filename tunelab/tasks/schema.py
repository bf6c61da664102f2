"""Type-check a mapping against a dataclass's annotations, naming the key path of a bad value.

The task spec's dataclasses are the schema: `build(TaskSpec, yaml_mapping, ...)` checks every
key and value against the field types (str, int, float, lists, mappings, nested dataclasses,
`X | None`) and raises one TunelabError naming file, line, key and value."""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Callable

from tunelab.errors import TunelabError

Where = Callable[[str], str]  # dotted key -> "file:line"


def _expected(hint) -> str:
    origin = typing.get_origin(hint)
    if hint is str:
        return "text"
    if hint is bool:
        return "true or false"
    if hint is int:
        return "a whole number"
    if hint is float:
        return "a number"
    if origin is list:
        return f"a list of {_expected(typing.get_args(hint)[0])}"
    if hint is dict or origin is dict or dataclasses.is_dataclass(hint):
        return "a mapping"
    return str(hint)


def _fail(where: Where, key: str, value, hint, shown_key: str | None = None):
    shown = shown_key or key
    raise TunelabError(f"{where(key)}: {shown}: expected {_expected(hint)}, got {value!r}")


def check(value, hint, key: str, where: Where):
    """`value` checked against the type `hint`; a string where a list of strings is expected
    becomes a list of one (`input_fields: text`)."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):  # only `X | None` occurs
        if value is None and type(None) in args:
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return check(value, inner, key, where)
    if dataclasses.is_dataclass(hint):
        if not isinstance(value, dict):
            _fail(where, key, value, hint)
        return build(hint, value, where, prefix=key + ".")
    if origin is list:
        if isinstance(value, str) and args[0] is str:
            value = [value]
        if not isinstance(value, list):
            _fail(where, key, value, hint)
        for i, item in enumerate(value):
            if not isinstance(item, args[0]) or isinstance(item, bool):
                _fail(where, key, item, args[0], f"{key}[{i}]")
        return list(value)
    if hint is dict or origin is dict:
        if not isinstance(value, dict):
            _fail(where, key, value, hint)
        if not args:
            return dict(value)
        # keys are names (labels, splits): YAML may read `1:` as a number
        return {str(k): check(v, args[1], f"{key}.{k}", where) for k, v in value.items()}
    ok = {
        str: isinstance(value, str),
        bool: isinstance(value, bool),
        int: isinstance(value, int) and not isinstance(value, bool),
        float: isinstance(value, (int, float)) and not isinstance(value, bool),
    }.get(hint, True)
    if not ok:
        _fail(where, key, value, hint)
    return value


def build(cls, values: dict, where: Where, prefix: str = "", skip: tuple[str, ...] = ()):
    """An instance of dataclass `cls` from a mapping, every key known and every value typed."""
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.name not in skip}
    for key in values:
        if key not in fields:
            what = f"key {prefix}{key}" if prefix else f"task key {key!r}"
            raise TunelabError(
                f"{where(prefix + str(key))}: unknown {what} (known: {', '.join(sorted(fields))})"
            )
    missing = [
        name
        for name, f in fields.items()
        if name not in values
        and f.default is dataclasses.MISSING
        and f.default_factory is dataclasses.MISSING
    ]
    if missing:
        raise TunelabError(f"{where(prefix.rstrip('.'))}: `{prefix}{missing[0]}:` is required")
    typed = {k: check(v, hints[k], prefix + k, where) for k, v in values.items()}
    return cls(**typed)
