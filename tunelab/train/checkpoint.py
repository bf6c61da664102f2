"""Checkpoints as single safetensors files, written atomically (never a pickle)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from tunelab.errors import TunelabError
from tunelab.train.distributed import like


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


def read_meta(path: Path) -> dict:
    """A checkpoint's metadata alone (no tensors read)."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), "pt") as f:
            return json.loads((f.metadata() or {}).get("tunelab", "{}"))
    except (SafetensorError, OSError, json.JSONDecodeError) as e:
        raise TunelabError(f"{path}: cannot read checkpoint: {e}") from None


def training_state(tuned, optimizer: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    """Trainable tensors + AdamW moments (enough, with the loop's counters, to resume exactly);
    under FSDP these are the rank's shards, for `distributed.gather`."""
    tensors = {f"trainable.{k}": v for k, v in tuned.trainable_state().items()}
    for idx, st in optimizer.state_dict()["state"].items():
        for key, value in st.items():
            tensors[f"optim.{idx}.{key}"] = torch.as_tensor(value)
    return tensors


def restore_trainable(tuned, tensors: dict[str, torch.Tensor]) -> None:
    """Load whole trainable tensors into `tuned`, each split like its parameter under FSDP."""
    params = dict(tuned.named_parameters())
    tuned.load_trainable_state(
        {k: like(v, params[k]) if k in params else v for k, v in tensors.items()}
    )


def load_training_state(path: Path, tuned, optimizer: torch.optim.Optimizer) -> dict:
    """Read a checkpoint of whole tensors into `tuned` and `optimizer`, each split like the
    parameter it belongs to when FSDP shards the model."""
    tensors, meta = load(path)
    n = len("trainable.")
    restore_trainable(tuned, {k[n:]: v for k, v in tensors.items() if k.startswith("trainable.")})
    by_index = [p for g in optimizer.param_groups for p in g["params"]]
    state: dict[int, dict] = {}
    for key, value in tensors.items():
        if key.startswith("optim."):
            _, idx, name = key.split(".", 2)
            p = by_index[int(idx)] if int(idx) < len(by_index) else None
            if p is not None and value.shape == p.shape:  # a moment, not the step count
                value = like(value, p)
            state.setdefault(int(idx), {})[name] = value
    sd = optimizer.state_dict()
    sd["state"] = state
    optimizer.load_state_dict(sd)
    return meta
