"""Artifacts: a method's files (PEFT's adapter format where PEFT has one) plus `tunelab.json`
(task, template, verbalizer, base model fingerprint, metrics, versions), so that inference
reproduces training exactly."""

from __future__ import annotations

import dataclasses
import platform
import time
from pathlib import Path

import torch

from tunelab import __version__, methods
from tunelab.errors import TunelabError
from tunelab.io import META, read_meta, staged_dir, write_json
from tunelab.models import Backbone, load_backbone
from tunelab.tasks.readers import Record
from tunelab.tasks.spec import TaskSpec

BASE_KEYS = ("name", "fingerprint")
# every file or folder a method's save_files may write, besides META; predictions-SPLIT.jsonl
# (from `tunelab eval`) describe the weights, so they go with them too
ARTIFACT_FILES = {
    META,
    "adapter_config.json",
    "adapter_model.safetensors",
    "trainable.safetensors",
    "prefix_encoder.safetensors",
    "prompt",
}


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
    calibration: dict | None = None,
) -> None:
    """Write the artifact into a folder beside `out` and rename it into place as a whole: the
    old artifact stays complete until the new one is (checkpoints and other files are kept).
    `calibration`: the label bias measured on the final weights (evaluate/calibrate.py)."""
    with staged_dir(out, replaced=is_artifact_file) as tmp:
        methods.get(method).save_files(tuned, method_cfg, tmp, backbone.path)
        meta = _meta(method, method_cfg, task, backbone, train_cfg, metrics, history, demo_pool)
        write_json({**meta, "calibration": calibration}, tmp / META)


def is_artifact_file(name: str) -> bool:
    """Whether a name in an artifact folder is the artifact's own (replaced when it is
    rewritten), rather than a checkpoint or the user's file (kept)."""
    return name in ARTIFACT_FILES or (name.startswith("predictions-") and name.endswith(".jsonl"))


def _meta(method, method_cfg, task, backbone, train_cfg, metrics, history, demo_pool) -> dict:
    return {
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
    _check_meta(meta, path / META)
    check_finite(path)
    base = meta["base_model"]
    backbone = backbone or load_backbone(base["name"])
    if backbone.fingerprint != base["fingerprint"]:
        raise TunelabError(
            f"{path}: this adapter was trained on base model {base['name']!r} (fingerprint "
            f"{base['fingerprint']}), but the loaded model {backbone.name!r} has fingerprint "
            f"{backbone.fingerprint}"
        )
    try:
        cfg = methods.get(meta["method"]).config(**meta["method_config"])
    except TypeError as e:
        raise TunelabError(f"{path / META}: method_config: {e}") from None
    tuned = methods.get(meta["method"]).restore(backbone, cfg, path, lora_name or "default")
    task = TaskSpec.from_dict(meta["task"], source=str(path / META))
    return tuned, task, meta, backbone


def _check_meta(meta: dict, source: Path) -> None:
    """The keys loading reads, with the types it needs (a hand-edited file fails here)."""
    base = meta.get("base_model")
    if methods.find(meta.get("method")) is None:
        raise TunelabError(
            f"{source}: method: expected one of {', '.join(methods.METHODS)}, "
            f"got {meta.get('method')!r}"
        )
    if not isinstance(base, dict) or not all(isinstance(base.get(k), str) for k in BASE_KEYS):
        raise TunelabError(
            f"{source}: base_model: expected a mapping with {', '.join(BASE_KEYS)}, got {base!r}"
        )
    for key in ("method_config", "task"):
        if not isinstance(meta.get(key), dict):
            raise TunelabError(f"{source}: {key}: expected a mapping, got {meta.get(key)!r}")


def check_finite(path: Path) -> None:
    """Refuse an artifact whose tensors hold NaN or infinity (a diverged run's): it would
    predict nothing but NaN."""
    from safetensors import SafetensorError, safe_open

    for file in sorted([*path.glob("*.safetensors"), *path.glob("*/*.safetensors")]):
        if file.parent.name == "checkpoints":
            continue
        try:
            with safe_open(str(file), "pt") as f:
                for name in f.keys():
                    t = f.get_tensor(name)
                    if t.is_floating_point() and not bool(torch.isfinite(t).all()):
                        bad = "NaN" if bool(torch.isnan(t).any()) else "infinity"
                        raise TunelabError(
                            f"{file}: tensor {name!r} holds {bad}; the run that wrote it "
                            "diverged (retrain with a lower lr)"
                        )
        except (SafetensorError, OSError) as e:
            raise TunelabError(f"{file}: cannot read: {e}") from None
