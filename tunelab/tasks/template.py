"""Prompt templates: Python format strings with `{field}` placeholders."""

from __future__ import annotations

import string


def placeholders(template: str) -> list[str]:
    """The field names a template uses, in order."""
    return [name for _, name, _, _ in string.Formatter().parse(template) if name]


def render(template: str, fields: dict) -> str:
    """Fill a template from a row's fields (values are turned into text)."""
    return template.format_map({k: "" if v is None else str(v) for k, v in fields.items()})
