"""Examples → padded tensors. Dynamic padding: each batch is as long as its longest row."""

from __future__ import annotations

import torch

from tunelab.tasks.encode import Example
from tunelab.tasks.verbalizer import Verbalizer


def _pad(rows: list[list[int]], pad_id: int, side: str) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        span = slice(width - len(r), width) if side == "left" else slice(0, len(r))
        ids[i, span], mask[i, span] = torch.tensor(r, dtype=torch.long), 1
    return ids, mask


def with_targets(
    prompts: list[list[int]], targets: list[list[int]], pad_id: int, side: str
) -> dict[str, torch.Tensor]:
    """Rows of prompt + target (but its last token), so that every target token is predicted
    inside the row: the row's last len(target) positions predict the target."""
    ids, mask = _pad([p + t[:-1] for p, t in zip(prompts, targets)], pad_id, side)
    target_ids, target_mask = _pad(targets, 0, "right")  # (R, L)
    return {
        "input_ids": ids,
        "attention_mask": mask,
        "target_ids": target_ids,
        "target_mask": target_mask,
    }


def collate(
    examples: list[Example],
    verbalizer: Verbalizer | None,
    pad_id: int,
    padding_side: str = "left",
    expand: bool | None = None,
) -> dict[str, torch.Tensor]:
    """Pad a batch.

    Generation (no verbalizer): one row per example with its target.
    Single-token label words: one row per example, scored at its last position.
    Otherwise (`expand`) one row per (example, label word), the word as the row's target.
    """
    if verbalizer is None:
        return with_targets(
            [ex.ids for ex in examples], [ex.target for ex in examples], pad_id, padding_side
        )
    labels = torch.tensor([-100 if ex.label is None else ex.label for ex in examples])
    if expand is None:
        expand = not verbalizer.single_token
    if expand:
        W = verbalizer.words
        batch = with_targets(
            [ex.ids for ex in examples for _ in W],
            [w for _ in examples for w in W],
            pad_id,
            padding_side,
        )
    else:
        ids, mask = _pad([ex.ids for ex in examples], pad_id, padding_side)
        batch = {"input_ids": ids, "attention_mask": mask}
    return {**batch, "labels": labels}
