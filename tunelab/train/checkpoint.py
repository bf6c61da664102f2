"""Checkpoints as single safetensors files, written atomically (never a pickle) by tunelab/io.py:
the trainable tensors and optimizer moments, split like their parameters under FSDP."""

from __future__ import annotations

from pathlib import Path

import torch

from tunelab.io import load_tensors
from tunelab.train.distributed import like


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
    tensors, meta = load_tensors(path)
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
