"""The server's trust boundary: which bearer keys may do what, and which folders may be read.

Inference keys may classify, generate and read the task list; admin keys may also load and
unload tasks. Keys come from files or the environment, never only from the command line (where
`ps` shows them). Loads over HTTP name a folder under the operator's `--adapter-root` by a
relative path; anything that resolves outside it is refused with one message, whether or not
it exists, so a client learns nothing about the rest of the file system.
"""

from __future__ import annotations

import hashlib
import hmac
import os
from dataclasses import dataclass, field
from pathlib import Path

from tunelab.errors import TunelabError

OUTSIDE = "path must name a folder under the server's --adapter-root by a relative path"


class OutsideRoot(TunelabError):
    """A requested artifact path that is not inside the adapter root."""


def read_key_file(path: str | Path, flag: str) -> list[str]:
    """Keys from a file, one per line (blank lines and `#` comments skipped)."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise TunelabError(f"{flag} {path}: cannot read: {e}") from None
    keys = [k for k in map(str.strip, text.splitlines()) if k and not k.startswith("#")]
    if not keys:
        raise TunelabError(f"{flag} {path}: no keys in it (one per line)")
    return keys


def split_env(value: str | None) -> list[str]:
    """Keys from an environment variable: comma-separated."""
    return [k.strip() for k in (value or "").split(",") if k.strip()]


def _digest(key: str) -> bytes:
    # comparing fixed-length digests keeps compare_digest's time independent of key lengths
    return hashlib.sha256(key.encode("utf-8", "surrogatepass")).digest()


@dataclass(frozen=True)
class Keys:
    inference: tuple[str, ...] = field(default=(), repr=False)
    admin: tuple[str, ...] = field(default=(), repr=False)

    def __post_init__(self):
        both = set(self.inference) & set(self.admin)
        if both:
            raise TunelabError("an admin key is also an inference key; give them different keys")
        if any(not k or any(c.isspace() for c in k) for k in (*self.inference, *self.admin)):
            raise TunelabError("a key is empty or holds white space; use one token per key")

    def role(self, authorization: str | None) -> str | None:
        """'admin', 'inference' or None for an `Authorization: Bearer KEY` header value."""
        scheme, _, token = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not token:
            return None
        given = _digest(token.strip())
        # every key is compared, so the time taken says nothing about which one matched
        admin = inference = False
        for key in self.admin:
            admin |= hmac.compare_digest(given, _digest(key))
        for key in self.inference:
            inference |= hmac.compare_digest(given, _digest(key))
        return "admin" if admin else "inference" if inference else None


def resolve_under(root: Path, relative: str) -> Path:
    """The folder `relative` names under `root` (itself resolved), or OutsideRoot.

    Absolute paths and `..` are refused outright; symlinks are followed, and the folder and
    every link inside it must stay under the root.
    """
    parts = relative.replace("\\", "/").split("/")
    if os.path.isabs(relative) or relative.startswith(("/", "\\")) or ".." in parts:
        raise OutsideRoot(OUTSIDE)
    try:
        path = Path(os.path.realpath(root / relative))
    except (OSError, ValueError):  # an embedded NUL, a loop of links
        raise OutsideRoot(OUTSIDE) from None
    if not path.is_relative_to(root) or _links_out(root, path):
        raise OutsideRoot(OUTSIDE)
    return path


def _links_out(root: Path, folder: Path) -> bool:
    """Whether any symlink inside `folder` points outside `root` (the loader opens its files)."""
    try:
        for dirpath, dirnames, filenames in os.walk(folder):
            for name in dirnames + filenames:
                p = os.path.join(dirpath, name)
                if os.path.islink(p) and not Path(os.path.realpath(p)).is_relative_to(root):
                    return True
    except (OSError, ValueError):
        return True
    return False


def shown_path(root: Path | None, path: Path) -> str:
    """How clients see an artifact's folder: relative to the root, else 'startup'."""
    if root is not None:
        resolved = Path(os.path.realpath(path))
        if resolved.is_relative_to(root):
            return resolved.relative_to(root).as_posix()
    return "startup"


def hide_root(message: str, root: Path | None) -> str:
    """An error message with the server's root folder cut out of every path in it."""
    if root is None or root == Path(root.anchor):  # a root of / would leave no path readable
        return message
    return message.replace(str(root) + os.sep, "").replace(str(root), ".")
