"""Writing results so that none is lost: output paths checked before any work, files (text, JSON,
safetensors) written beside their place and renamed over it, and artifact folders renamed into
place as a whole. Reading them back: tensors with their metadata, an artifact's tunelab.json."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from tunelab.errors import TunelabError

if TYPE_CHECKING:
    import torch

META = "tunelab.json"  # an artifact's metadata file


def _nearest_existing(path: Path) -> Path:
    path = path.absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def check_writable_dir(path: Path, option: str) -> None:
    """Refuse, before any work, a directory that cannot be created or written."""
    if path.exists() and not path.is_dir():
        raise TunelabError(f"{option} {path}: exists and is not a directory")
    base = _nearest_existing(path)
    if not base.is_dir():
        raise TunelabError(f"{option} {path}: {base} is a file, not a directory")
    try:  # a real write: permissions, read-only file systems, /proc
        tempfile.TemporaryFile(dir=base).close()
    except OSError as e:
        raise TunelabError(f"{option} {path}: cannot write in {base}: {e.strerror}") from None


def prepare_output_file(path: Path, option: str) -> None:
    """Make sure a file can be written at `path` before any work: its folder is created if
    missing; a directory there, a file in the way or no permission is refused."""
    if path.is_dir():
        raise TunelabError(f"{option} {path}: is a directory; give a file name")
    check_writable_dir(path.parent, option)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise TunelabError(f"{option} {path}: cannot create its folder: {e.strerror}") from None
    if path.exists() and not os.access(path, os.W_OK):
        raise TunelabError(f"{option} {path}: cannot write it (permission denied)")


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _link_tree(src: Path, dst: Path) -> None:
    """Hard links of every file under src at dst (a copy where links cannot be made)."""
    if src.is_dir() and not src.is_symlink():
        dst.mkdir()
        for child in src.iterdir():
            _link_tree(child, dst / child.name)
        return
    try:
        os.link(src, dst, follow_symlinks=False)
    except OSError:
        shutil.copy2(src, dst, follow_symlinks=False)


def recover(out: Path) -> None:
    """Put back a folder that a write killed between its two renames left aside."""
    for old in out.parent.glob(f".{out.name}.old-*"):
        if not out.exists() and (old / out.name).is_dir():
            os.replace(old / out.name, out)
        shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def staged_dir(out: Path, replaced: Callable[[str], bool]) -> Iterator[Path]:
    """Yield an empty folder beside `out` to write a new version of it into; when the block
    ends without error, the new folder takes `out`'s place as a whole.

    Entries of the old `out` whose names `replaced` does not claim, and that the new version does
    not hold (checkpoints, the user's own files) are carried over as hard links. The old folder
    stays in place, complete, until the new one is: a crash before the swap leaves it as it was
    (and a staging folder `.NAME.new-*` beside it, which the next write removes)."""
    out = Path(os.path.realpath(out))  # a symlinked folder is rewritten where it really is
    out.parent.mkdir(parents=True, exist_ok=True)
    recover(out)
    for stale in out.parent.glob(f".{out.name}.new-*"):  # an earlier write's, killed midway
        shutil.rmtree(stale, ignore_errors=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.new-"))
    try:
        yield tmp
        if out.is_dir():
            for entry in out.iterdir():
                if not replaced(entry.name) and not (tmp / entry.name).exists():
                    _link_tree(entry, tmp / entry.name)
        tmp.chmod(0o755)
        _fsync_dir(tmp)
        if out.is_dir():
            old = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.old-"))
            os.replace(out, old / out.name)  # the two renames: out is absent only in between
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
        _fsync_dir(out.parent)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def write_text(text: str, path: Path) -> None:
    """Write a text file atomically (temporary file beside it, then rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def write_json(obj: dict, path: Path) -> None:
    """Write JSON atomically (temporary file, then rename)."""
    write_text(json.dumps(obj, indent=2, ensure_ascii=False, default=list) + "\n", path)


def atomic_save(tensors: dict[str, torch.Tensor], path: Path, meta: dict | None = None) -> None:
    """Write to a temporary file beside `path`, flush it to disk, then rename over `path`."""
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    save_file(tensors, str(tmp), metadata={"tunelab": json.dumps(meta or {})})
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)


def load_tensors(path: Path) -> tuple[dict[str, torch.Tensor], dict]:
    """A safetensors file's tensors and the metadata `atomic_save` wrote with them."""
    from safetensors import SafetensorError, safe_open
    from safetensors.torch import load_file

    try:
        tensors = load_file(str(path))
        with safe_open(str(path), "pt") as f:
            meta = json.loads((f.metadata() or {}).get("tunelab", "{}"))
    except (SafetensorError, OSError, json.JSONDecodeError) as e:
        raise TunelabError(f"{path}: cannot read checkpoint: {e}") from None
    return tensors, meta


def read_tensors(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file that must be there (an artifact's weights)."""
    if not path.is_file():
        raise TunelabError(f"{path}: missing")
    return load_tensors(path)[0]


def check_shapes(tensors: dict, want: dict[str, tuple], source, complete: bool = True) -> None:
    """Refuse, naming `source`, tensors that have no place in `want` (name -> shape), have
    another shape, or (when `complete`) are missing."""
    for name in tensors:
        if name not in want:
            raise TunelabError(f"{source}: tensor {name!r} has no place in this model")
    for name, shape in want.items():
        got = tensors.get(name)
        if got is None and complete:
            have = ", ".join(tensors) or "nothing"
            raise TunelabError(f"{source}: no tensor {name!r} (has: {have})")
        if got is not None and tuple(got.shape) != tuple(shape):
            raise TunelabError(
                f"{source}: tensor {name!r} has shape {tuple(got.shape)}, but this model and "
                f"config need {tuple(shape)}"
            )


def read_tensors_meta(path: Path) -> dict:
    """A safetensors file's metadata alone (no tensors read)."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), "pt") as f:
            return json.loads((f.metadata() or {}).get("tunelab", "{}"))
    except (SafetensorError, OSError, json.JSONDecodeError) as e:
        raise TunelabError(f"{path}: cannot read checkpoint: {e}") from None


def read_meta(path: Path) -> dict:
    """An artifact folder's metadata (its tunelab.json), refused with a clear error when absent."""
    meta_path = path / META
    if not path.is_dir():
        raise TunelabError(f"{path}: no such adapter directory")
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise TunelabError(f"{meta_path}: missing; is {path} a tunelab artifact?") from None
    except (OSError, ValueError) as e:  # ValueError: not JSON, or not UTF-8
        raise TunelabError(f"{meta_path}: cannot read: {e}") from None
    if not isinstance(meta, dict):
        raise TunelabError(f"{meta_path}: expected a JSON object, got {type(meta).__name__}")
    return meta
