"""Full fine-tuning: every weight trains, at a low learning rate (the usual 1e-5 to 5e-5)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from tunelab.errors import TunelabError
from tunelab.methods.base import TunedLM, load_trainable, save_trainable, set_trainable


@dataclass
class FullConfig:
    lr: float = 5e-5  # searched: SST-2 kept 2e-5, TREC and the demo chose 9.5e-5 (RESULTS.md)
    weight_decay: float = 0.01

    def __post_init__(self):
        if self.lr <= 0:
            raise TunelabError(f"lr must be > 0, got {self.lr}")


def build(backbone, cfg: FullConfig, verbalizer, seed: int = 0) -> TunedLM:
    set_trainable(backbone.model, True)
    return TunedLM(backbone.model, bos_id=backbone.tokenizer.bos_token_id)


def save_files(tuned: TunedLM, cfg, out: Path, base_path: str) -> None:
    save_trainable(tuned, out)


def restore(backbone, cfg, out: Path, adapter_name: str = "default") -> TunedLM:
    set_trainable(backbone.model, True)  # so every weight is looked for in the file
    return load_trainable(TunedLM(backbone.model, bos_id=backbone.tokenizer.bos_token_id), out)
