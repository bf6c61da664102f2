"""What every method shares: a backbone plus a trainable part, and the one helper that says
which parameters train."""

from __future__ import annotations

import torch
from torch import nn


def set_trainable(module: nn.Module, trainable: bool) -> None:
    for p in module.parameters():
        p.requires_grad_(trainable)


class TunedLM(nn.Module):
    """A causal LM and, optionally, a soft prompt inserted into its input embeddings."""

    def __init__(
        self, model: nn.Module, prompt: nn.Module | None = None, bos_id: int | None = None
    ):
        super().__init__()
        self.model = model
        self.prompt = prompt
        self.bos_id = bos_id

    def embed(self, input_ids: torch.Tensor, attention_mask: torch.Tensor):
        """(B, T) ids → (B, T', D) input embeddings and (B, T') mask, soft prompt included."""
        embeds = self.model.get_input_embeddings()(input_ids)  # (B, T, D)
        if self.prompt is None:
            return embeds, attention_mask
        return self.prompt.insert(embeds, attention_mask, input_ids, self.bos_id)

    def trainable_state(self) -> dict[str, torch.Tensor]:
        """The tensors that train (and so the ones an artifact or checkpoint must keep)."""
        return {n: p.detach() for n, p in self.named_parameters() if p.requires_grad}

    def load_trainable_state(self, state: dict[str, torch.Tensor]) -> None:
        params = dict(self.named_parameters())
        with torch.no_grad():
            for name, value in state.items():
                params[name].copy_(value)
