"""Artifacts: PEFT's adapter files plus `tunelab.json` (task, template, verbalizer, base model
fingerprint, metrics, versions), so that inference reproduces training exactly."""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import time
from pathlib import Path

import torch

from tunelab import __version__, methods
from tunelab.errors import TunelabError
from tunelab.models import Backbone, load_backbone
from tunelab.tasks.readers import Record
from tunelab.tasks.spec import TaskSpec
from tunelab.train.checkpoint import atomic_save

META = "tunelab.json"
WEIGHTS = "adapter_model.safetensors"
CONFIG = "adapter_config.json"


def versions() -> dict:
    import peft
    import transformers

    return {
        "tunelab": __version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "python": platform.python_version(),
    }


def _write_json(obj: dict, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def save_artifact(
    out: Path,
    method: str,
    method_cfg,
    tuned,
    task: TaskSpec,
    backbone: Backbone,
    train_cfg=None,
    metrics: dict | None = None,
    history: list | None = None,
    demo_pool: list[Record] | None = None,
) -> None:
    out.mkdir(parents=True, exist_ok=True)
    peft_config, tensors = methods.get(method).peft_files(tuned, method_cfg, backbone.path)
    atomic_save(tensors, out / WEIGHTS, {"format": "pt"})
    _write_json(peft_config, out / CONFIG)
    meta = {
        "format": 1,
        "method": method,
        "method_config": dataclasses.asdict(method_cfg),
        "task": task.to_dict(),
        "base_model": {
            "name": backbone.name,
            "path": backbone.path,
            "fingerprint": backbone.fingerprint,
        },
        "train_config": dataclasses.asdict(train_cfg) if train_cfg else None,
        "metrics": metrics or {},
        "history": history or [],
        # demonstrations are drawn from these rows at prediction time
        "demonstration_pool": [r.fields for r in demo_pool or []],
        "versions": versions(),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    _write_json(meta, out / META)


def read_meta(path: Path) -> dict:
    meta_path = path / META
    if not path.is_dir():
        raise TunelabError(f"{path}: no such adapter directory")
    try:
        return json.loads(meta_path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise TunelabError(f"{meta_path}: missing; is {path} a tunelab artifact?") from None
    except (OSError, json.JSONDecodeError) as e:
        raise TunelabError(f"{meta_path}: cannot read: {e}") from None


def load_artifact(path: Path, backbone: Backbone | None = None):
    """(tuned model, task spec, meta, backbone) from an artifact directory.

    The base model is checked by fingerprint and the tensors by shape before anything runs.
    """
    from tunelab.train.checkpoint import load

    meta = read_meta(path)
    weights = path / WEIGHTS
    if not weights.is_file():
        pickles = [p.name for p in path.glob("*.bin")] + [p.name for p in path.glob("*.pt")]
        if pickles:
            raise TunelabError(
                f"{path / pickles[0]}: a pickle file; tunelab loads only safetensors"
            )
        raise TunelabError(f"{weights}: missing")
    base = meta["base_model"]
    backbone = backbone or load_backbone(base["name"])
    if backbone.fingerprint != base["fingerprint"]:
        raise TunelabError(
            f"{path}: this adapter was trained on base model {base['name']!r} (fingerprint "
            f"{base['fingerprint']}), but the loaded model {backbone.name!r} has fingerprint "
            f"{backbone.fingerprint}"
        )
    method = methods.get(meta["method"])
    cfg = methods.CONFIGS[meta["method"]](**meta["method_config"])
    tensors, _ = load(weights)
    tuned = method.restore(backbone, cfg, tensors, str(weights))
    task = TaskSpec.from_dict(meta["task"], source=str(path / META))
    return tuned, task, meta, backbone
