"""Selective freezing: train only the top k transformer blocks, or the parameters whose names
match a pattern (attention only, norms only, ...); everything else stays frozen."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from tunelab.errors import TunelabError
from tunelab.methods.base import (
    TunedLM,
    decoder_layers,
    load_trainable,
    save_trainable,
    set_trainable,
)


@dataclass
class FreezeConfig:
    train_top: int = 2  # the top k transformer blocks train (when `modules` is empty)
    modules: str = ""  # else: a regular expression over parameter names, e.g. "self_attn|norm"
    lr: float = 1e-4
    weight_decay: float = 0.01

    def __post_init__(self):
        if not self.modules and self.train_top < 1:
            raise TunelabError(f"train_top must be >= 1, got {self.train_top}")
        try:
            re.compile(self.modules)
        except re.error as e:
            raise TunelabError(f"modules={self.modules!r}: not a regular expression: {e}") from None


def _unfreeze(model, cfg: FreezeConfig) -> None:
    set_trainable(model, False)
    if cfg.modules:
        matched = [p for n, p in model.named_parameters() if re.search(cfg.modules, n)]
        if not matched:
            names = [n for n, _ in model.named_parameters()][:6]
            raise TunelabError(
                f"modules={cfg.modules!r} matches no parameter (names look like: "
                f"{', '.join(names)}, ...)"
            )
        for p in matched:
            p.requires_grad_(True)
        return
    layers = decoder_layers(model)
    if cfg.train_top > len(layers):
        raise TunelabError(f"train_top={cfg.train_top}, but the model has {len(layers)} blocks")
    for layer in layers[len(layers) - cfg.train_top :]:
        set_trainable(layer, True)


def build(backbone, cfg: FreezeConfig, verbalizer, seed: int = 0) -> TunedLM:
    _unfreeze(backbone.model, cfg)
    return TunedLM(backbone.model, bos_id=backbone.tokenizer.bos_token_id)


def save_files(tuned: TunedLM, cfg, out: Path, base_path: str) -> None:
    save_trainable(tuned, out)


def restore(backbone, cfg: FreezeConfig, out: Path, adapter_name: str = "default") -> TunedLM:
    tuned = build(backbone, cfg, None)
    return load_trainable(tuned, out)
