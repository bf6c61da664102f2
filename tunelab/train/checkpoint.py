"""Checkpoints as single safetensors files, written atomically (never a pickle)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from tunelab.errors import TunelabError


def atomic_save(tensors: dict[str, torch.Tensor], path: Path, meta: dict | None = None) -> None:
    """Write to a temporary file beside `path`, flush it to disk, then rename over `path`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    save_file(tensors, str(tmp), metadata={"tunelab": json.dumps(meta or {})})
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_json(obj: dict, path: Path) -> None:
    """Write JSON atomically (temporary file, then rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(
        json.dumps(obj, indent=2, ensure_ascii=False, default=list) + "\n", encoding="utf-8"
    )
    os.replace(tmp, path)


def load(path: Path) -> tuple[dict[str, torch.Tensor], dict]:
    from safetensors import safe_open

    try:
        tensors = load_file(str(path))
        with safe_open(str(path), "pt") as f:
            meta = json.loads((f.metadata() or {}).get("tunelab", "{}"))
    except (SafetensorError, OSError, json.JSONDecodeError) as e:
        raise TunelabError(f"{path}: cannot read checkpoint: {e}") from None
    return tensors, meta


def save_training_state(path: Path, tuned, optimizer: torch.optim.Optimizer, meta: dict) -> None:
    """Trainable tensors + AdamW moments + loop counters: enough to resume exactly."""
    tensors = {f"trainable.{k}": v for k, v in tuned.trainable_state().items()}
    for idx, st in optimizer.state_dict()["state"].items():
        for key, value in st.items():
            tensors[f"optim.{idx}.{key}"] = torch.as_tensor(value)
    atomic_save(tensors, path, meta)


def load_training_state(path: Path, tuned, optimizer: torch.optim.Optimizer) -> dict:
    tensors, meta = load(path)
    tuned.load_trainable_state(
        {k[len("trainable.") :]: v for k, v in tensors.items() if k.startswith("trainable.")}
    )
    state: dict[int, dict] = {}
    for key, value in tensors.items():
        if key.startswith("optim."):
            _, idx, name = key.split(".", 2)
            state.setdefault(int(idx), {})[name] = value
    sd = optimizer.state_dict()
    sd["state"] = state
    optimizer.load_state_dict(sd)
    return meta
