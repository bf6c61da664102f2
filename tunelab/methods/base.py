"""What every method shares: a backbone plus a trainable part, the one helper that says which
parameters train, and saving/loading those tensors with their names and shapes checked."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn

from tunelab.errors import TunelabError
from tunelab.lm.head_cache import head_label_logprobs, prefill
from tunelab.lm.scoring import label_logprobs, target_logprobs

TRAINABLE_FILE = "trainable.safetensors"


def set_trainable(module: nn.Module, trainable: bool) -> None:
    for p in module.parameters():
        p.requires_grad_(trainable)


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The model's stack of transformer blocks (the ModuleList as long as the layer count)."""
    n = model.config.num_hidden_layers
    for _, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) == n:
            return module
    raise TunelabError(f"cannot find the {n} transformer blocks of {type(model).__name__}")


class TunedLM(nn.Module):
    """A causal LM, optionally with a soft prompt in its input, a key/value prefix at
    every layer, and a classification head on its final hidden state. Methods differ only in
    which of these parameters train."""

    def __init__(
        self,
        model: nn.Module,
        prompt: nn.Module | None = None,
        bos_id: int | None = None,
        head: nn.Module | None = None,
        prefix: nn.Module | None = None,
    ):
        super().__init__()
        self.model = model
        self.prompt = prompt
        self.head = head
        self.prefix = prefix  # key/value vectors every layer attends to before the input
        self.bos_id = bos_id
        self.group_lr: dict[str, float] = {}  # parameter-name prefix -> its own learning rate

    def embed(self, input_ids: torch.Tensor, attention_mask: torch.Tensor):
        """(B, T) ids → (B, T', D) input embeddings and (B, T') mask, soft prompt included."""
        embeds = self.model.get_input_embeddings()(input_ids)  # (B, T, D)
        if self.prompt is None:
            return embeds, attention_mask
        return self.prompt.insert(embeds, attention_mask, input_ids, self.bos_id)

    def forward(self, batch: dict, verbalizer=None, head_ids: list[int] | None = None):
        """The batch's scores: (B, C) label log-probabilities, or without a verbalizer the
        log-probabilities of the target tokens. With `head_ids` the rows come without the head
        every prompt starts with (lm/head_cache.py): it runs once here, with gradients, and
        every row attends to it.

        The training step goes through this call, so that a wrapper hooked on forward (FSDP's
        `fully_shard`, which gathers the embeddings and soft prompt) sees the whole step."""
        if verbalizer is None:
            return target_logprobs(self, batch)
        if head_ids is not None:
            return head_label_logprobs(self, prefill(self, head_ids), batch, verbalizer)
        return label_logprobs(self, batch, verbalizer)

    def param_groups(self, lr: float, weight_decay: float) -> list[dict]:
        """AdamW groups of the trainable parameters; `base_lr` is each group's peak rate."""
        groups: dict[float, list] = {}
        for name, p in self.named_parameters():
            if p.requires_grad:
                own = [v for k, v in self.group_lr.items() if name.startswith(k)]
                groups.setdefault(own[0] if own else lr, []).append(p)
        return [
            {"params": ps, "lr": g_lr, "base_lr": g_lr, "weight_decay": weight_decay}
            for g_lr, ps in groups.items()
        ]

    def trainable_state(self) -> dict[str, torch.Tensor]:
        """The tensors that train (and so the ones an artifact or checkpoint must keep)."""
        return {n: p.detach() for n, p in self.named_parameters() if p.requires_grad}

    def load_trainable_state(self, state: dict[str, torch.Tensor], source: str = "") -> None:
        from tunelab.io import check_shapes

        params = dict(self.named_parameters())
        check_shapes(state, {n: p.shape for n, p in params.items()}, source, complete=False)
        with torch.no_grad():
            for name, value in state.items():
                params[name].copy_(value)


@contextmanager
def backbone_alone(tuned: TunedLM) -> Iterator[TunedLM | None]:
    """`tuned`'s backbone without the method's parts, for scoring the zero-shot model: no soft
    prompt, prefix or head, and PEFT adapter layers (LoRA) switched off for the duration. None
    when the method adds no parts (full, freeze): then `tuned` is the backbone itself, and only
    before training is it the zero-shot model."""
    # a PEFT layer exists only if peft was imported (no need to import it here)
    peft = sys.modules.get("peft.tuners.tuners_utils")
    layers = [
        m
        for m in tuned.model.modules()
        if peft and isinstance(m, peft.BaseTunerLayer) and not m.disable_adapters
    ]
    if not layers and tuned.prompt is None and tuned.prefix is None and tuned.head is None:
        yield None
        return
    # switching adapters back on makes them trainable: a frozen core (hybrid) must stay frozen
    flags = [(p, p.requires_grad) for p in tuned.model.parameters()]
    for layer in layers:
        layer.enable_adapters(False)
    try:
        yield TunedLM(tuned.model, bos_id=tuned.bos_id)
    finally:
        for layer in layers:
            layer.enable_adapters(True)
        for p, flag in flags:
            p.requires_grad_(flag)


def save_trainable(tuned: TunedLM, out: Path) -> None:
    """The trained tensors under their own names (methods PEFT has no format for)."""
    from tunelab.io import atomic_save

    atomic_save(tuned.trainable_state(), out / TRAINABLE_FILE, {"format": "pt"})


def load_trainable(tuned: TunedLM, out: Path) -> TunedLM:
    from tunelab.io import read_tensors

    path = out / TRAINABLE_FILE
    tuned.load_trainable_state(read_tensors(path), str(path))
    set_trainable(tuned, False)
    return tuned
