"""Prompt templates: Python format strings with `{field}` placeholders."""

from __future__ import annotations

import string


def placeholders(template: str) -> list[str]:
    """The field names a template uses, in order."""
    return [name for _, name, _, _ in string.Formatter().parse(template) if name]


def template_problem(template: str) -> str | None:
    """What is wrong with a template as a format string of named fields, or None."""
    try:
        parts = list(string.Formatter().parse(template))
    except ValueError as e:  # an unpaired brace
        return f"not a valid template ({e}; write {{{{ and }}}} for literal braces)"
    for _, name, spec, conversion in parts:
        if name is None:
            continue
        if name == "" or name.isdigit():
            return f"placeholder {{{name}}} needs a field name, e.g. {{text}}"
        if not name.isidentifier():
            return f"placeholder {{{name}}}: only plain field names, e.g. {{text}}"
        if conversion not in (None, "r", "s", "a"):
            return f"placeholder {{{name}!{conversion}}}: unknown conversion !{conversion}"
        try:
            format("text", spec or "")
        except ValueError as e:
            return f"placeholder {{{name}:{spec}}}: {e}"
    return None


def render(template: str, fields: dict) -> str:
    """Fill a template from a row's fields (values are turned into text)."""
    return template.format_map({k: "" if v is None else str(v) for k, v in fields.items()})
