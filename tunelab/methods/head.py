"""A task-specific classification layer on the final hidden state at the answer position,
with the backbone frozen or trainable (`train_backbone=true`)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from tunelab.errors import TunelabError
from tunelab.methods.base import (
    TRAINABLE_FILE,
    TunedLM,
    load_trainable,
    save_trainable,
    set_trainable,
)


@dataclass
class HeadConfig:
    train_backbone: bool = False
    init: str = "labels"  # labels: the LM head's rows of the label words (= zero-shot); random
    lr: float = 1e-3  # the head's
    backbone_lr: float = 2e-5  # the backbone's, when it trains
    weight_decay: float = 0.0

    def __post_init__(self):
        if self.init not in ("labels", "random"):
            raise TunelabError(f"init must be labels or random, got {self.init!r}")
        if self.lr <= 0 or self.backbone_lr <= 0:
            raise TunelabError(f"lr and backbone_lr must be > 0, got {self.lr}, {self.backbone_lr}")


def _head(
    model,
    n_labels: int,
    owner: list[int] | None,
    first_tokens: list[int] | None,
    cfg: HeadConfig,
    seed: int,
) -> nn.Linear:
    hidden = model.get_input_embeddings().weight.shape[1]
    head = nn.Linear(hidden, n_labels)
    torch.manual_seed(seed)
    nn.init.normal_(head.weight, std=0.02)
    nn.init.zeros_(head.bias)
    if cfg.init == "labels" and first_tokens is not None:
        # each label starts as the mean LM-head row of its words' first tokens: the head
        # begins where zero-shot scoring is
        rows = model.get_output_embeddings().weight.detach().float()
        with torch.no_grad():
            for c in range(n_labels):
                ids = [t for t, o in zip(first_tokens, owner) if o == c]
                head.weight[c] = rows[ids].mean(0)
    return head.to(model.get_input_embeddings().weight.dtype)


def _tuned(backbone, cfg: HeadConfig, head: nn.Linear) -> TunedLM:
    set_trainable(backbone.model, cfg.train_backbone)
    tuned = TunedLM(backbone.model, bos_id=backbone.tokenizer.bos_token_id, head=head)
    tuned.group_lr = {"model.": cfg.backbone_lr}
    return tuned


def build(backbone, cfg: HeadConfig, verbalizer, seed: int = 0) -> TunedLM:
    if verbalizer is None:
        raise TunelabError("method head needs a classification task (label_field, verbalizer)")
    first = [w[0] for w in verbalizer.words]
    head = _head(backbone.model, len(verbalizer.labels), verbalizer.owner, first, cfg, seed)
    return _tuned(backbone, cfg, head)


def save_files(tuned: TunedLM, cfg, out: Path, base_path: str) -> None:
    save_trainable(tuned, out)


def restore(backbone, cfg: HeadConfig, out: Path, adapter_name: str = "default") -> TunedLM:
    from safetensors import safe_open

    path = out / TRAINABLE_FILE
    if not path.is_file():
        raise TunelabError(f"{path}: missing")
    with safe_open(str(path), "pt") as f:
        if "head.weight" not in f.keys():
            raise TunelabError(f"{path}: no tensor 'head.weight'")
        n_labels = f.get_slice("head.weight").get_shape()[0]
    head = _head(backbone.model, n_labels, None, None, HeadConfig(init="random"), 0)
    tuned = _tuned(backbone, cfg, head)
    return load_trainable(tuned, out)
