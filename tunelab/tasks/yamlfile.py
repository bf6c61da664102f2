"""Read a YAML mapping and remember the line of every key, so errors can name it; write a task
spec back as a task file."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import yaml

from tunelab.errors import TunelabError, at


class _Loader(yaml.SafeLoader):
    """YAML 1.2 booleans: only true/false. Under YAML 1.1, label words yes/no/on/off would
    silently become booleans."""


_Loader.yaml_implicit_resolvers = {
    k: [(tag, rx) for tag, rx in v if tag != "tag:yaml.org,2002:bool"]
    for k, v in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF")
)


def _key_lines(node: yaml.Node, prefix: str, lines: dict[str, int], path: Path) -> None:
    if isinstance(node, yaml.MappingNode):
        for key_node, value_node in node.value:
            key = f"{prefix}{key_node.value}"
            line = key_node.start_mark.line + 1
            if key in lines:  # YAML would silently keep the last one
                raise TunelabError(
                    f"{at(path, line)}: key {key!r} appears twice (first on line {lines[key]})"
                )
            lines[key] = line
            _key_lines(value_node, key + ".", lines, path)


def read_yaml(path: Path) -> tuple[dict, dict[str, int]]:
    """Return (mapping, {dotted key: line number})."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise TunelabError(f"{path}: cannot read task file: {e}") from None
    try:
        data = yaml.load(text, Loader=_Loader)
        node = yaml.compose(text, Loader=_Loader)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        line = mark.line + 1 if mark else None
        raise TunelabError(
            f"{at(path, line)}: not valid YAML: {getattr(e, 'problem', e)}"
        ) from None
    if not isinstance(data, dict):
        raise TunelabError(f"{path}: a task file must be a YAML mapping, got {type(data).__name__}")
    lines: dict[str, int] = {}
    _key_lines(node, "", lines, path)
    return data, lines


def task_yaml(task, header: str = "") -> str:
    """A task spec as a task file: its keys that differ from the defaults, data paths absolute
    (so the file works from any folder), `header` as a leading comment."""
    values = task.to_dict()
    values.pop("source", None)
    kept = {}
    for f in dataclasses.fields(task):
        if f.name not in values or values[f.name] is None:
            continue
        default = f.default if f.default_factory is dataclasses.MISSING else f.default_factory()
        if dataclasses.is_dataclass(default):
            default = dataclasses.asdict(default)
        if values[f.name] != default:
            kept[f.name] = values[f.name]
    body = yaml.safe_dump(kept, sort_keys=False, allow_unicode=True, width=10_000)
    lead = "".join(f"# {line}\n" for line in header.splitlines())
    return lead + body
