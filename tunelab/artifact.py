"""Artifacts: a method's files (PEFT's adapter format where PEFT has one) plus `tunelab.json`
(task, template, verbalizer, base model fingerprint, metrics, versions), so that inference
reproduces training exactly."""

from __future__ import annotations

import dataclasses
import json
import platform
import time
from pathlib import Path

import torch

from tunelab import __version__, methods
from tunelab.errors import TunelabError
from tunelab.models import Backbone, load_backbone
from tunelab.tasks.readers import Record
from tunelab.tasks.spec import TaskSpec
from tunelab.train.checkpoint import write_json

META = "tunelab.json"


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
    methods.get(method).save_files(tuned, method_cfg, out, backbone.path)
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
    write_json(meta, out / META)


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


def load_artifact(path: Path, backbone: Backbone | None = None, lora_name: str | None = None):
    """(tuned model, task spec, meta, backbone) from an artifact directory.

    The base model is checked by fingerprint and the tensors by shape before anything runs.
    `lora_name`: a LoRA artifact's adapter joins the backbone's others under this name (the
    server routes each row to its own adapter) instead of being its only adapter.
    """
    meta = read_meta(path)
    pickles = sorted(p.name for p in path.iterdir() if p.suffix in (".bin", ".pt", ".pkl", ".pth"))
    if pickles:
        raise TunelabError(f"{path / pickles[0]}: a pickle file; tunelab loads only safetensors")
    base = meta["base_model"]
    backbone = backbone or load_backbone(base["name"])
    if backbone.fingerprint != base["fingerprint"]:
        raise TunelabError(
            f"{path}: this adapter was trained on base model {base['name']!r} (fingerprint "
            f"{base['fingerprint']}), but the loaded model {backbone.name!r} has fingerprint "
            f"{backbone.fingerprint}"
        )
    cfg = methods.CONFIGS[meta["method"]](**meta["method_config"])
    if lora_name is not None and meta["method"] in ("lora", "hybrid"):
        tuned = methods.get(meta["method"]).restore(backbone, cfg, path, adapter_name=lora_name)
    else:
        tuned = methods.get(meta["method"]).restore(backbone, cfg, path)
    task = TaskSpec.from_dict(meta["task"], source=str(path / META))
    return tuned, task, meta, backbone
