"""Examples → padded tensors. Dynamic padding: each batch is as long as its longest row."""

from __future__ import annotations

import torch

from tunelab.tasks.encode import Example
from tunelab.tasks.verbalizer import Verbalizer


def collate(
    examples: list[Example],
    verbalizer: Verbalizer,
    pad_id: int,
    padding_side: str = "left",
    expand: bool | None = None,
) -> dict[str, torch.Tensor]:
    """Pad prompts into a batch.

    Single-token label words: one row per example, scored at its last position.
    Otherwise (`expand`) one row per (example, label word): the prompt followed by the word's
    tokens but its last, so that every token of the word is predicted inside the row.
    """
    if expand is None:
        expand = not verbalizer.single_token
    if not expand:
        rows = [ex.ids for ex in examples]
    else:
        rows = [ex.ids + w[:-1] for ex in examples for w in verbalizer.words]
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        if padding_side == "left":
            ids[i, width - len(r) :], mask[i, width - len(r) :] = torch.tensor(r), 1
        else:
            ids[i, : len(r)], mask[i, : len(r)] = torch.tensor(r), 1
    labels = torch.tensor([-100 if ex.label is None else ex.label for ex in examples])
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}
