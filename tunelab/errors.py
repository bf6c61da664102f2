"""The one error type for bad user input: printed as one line, exit code 2, no traceback."""

from __future__ import annotations


class TunelabError(Exception):
    """Something the user gave us is wrong; the message names the file, line and value."""


def at(path: object, line: int | None = None) -> str:
    """`file:line` prefix for an error message."""
    return f"{path}:{line}" if line is not None else f"{path}"


class SettingError(TunelabError):
    """A training setting (`--set key=value`, or a keyword of `tunelab.train`) that is unknown
    or of the wrong type; `key` names it. The message starts with the key (`lr=abc: ...`); the
    command line puts `--set ` before it."""

    def __init__(self, key: str, message: str):
        super().__init__(message)
        self.key = key
