"""Batched label prediction: every example's label log-probabilities, in length-sorted batches."""

from __future__ import annotations

import torch

from tunelab.device import autocast
from tunelab.lm.head_cache import HeadCache, after_head, head_ids, head_label_logprobs, prefill
from tunelab.lm.scoring import label_logprobs, make_batch
from tunelab.tasks.encode import Example
from tunelab.tasks.verbalizer import Verbalizer


@torch.no_grad()
def predict_logprobs(
    tuned,
    examples: list[Example],
    verbalizer: Verbalizer,
    pad_id: int,
    batch_size: int = 32,
    padding_side: str = "left",
    bf16: bool = False,
    progress=None,
    reuse_head: bool = True,
) -> torch.Tensor:
    """(N, C) label log-probabilities, in the order of `examples`.

    With `reuse_head`, the part every prompt starts with (BOS, the soft prompt, shared
    template text) runs once and each batch attends to its cached keys and values
    (tunelab/lm/head_cache.py); the scores equal the plain path up to float rounding."""
    device = next(tuned.parameters()).device
    was_training = tuned.training
    tuned.eval()
    # length-sorted batches waste little on padding; results go back to input order
    order = sorted(range(len(examples)), key=lambda i: len(examples[i].ids))
    out = torch.empty(len(examples), len(verbalizer.labels))
    with autocast(device, bf16):
        head = shared_head(tuned, examples) if reuse_head else None
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        part = [examples[i] for i in idx]
        if head is not None:  # the rows run only what follows the head
            part = after_head(part, len(head.token_ids))
        batch = make_batch(tuned, part, verbalizer, pad_id, padding_side, device)
        with autocast(device, bf16):
            if head is not None:
                logp = head_label_logprobs(tuned, head, batch, verbalizer)
            else:
                logp = label_logprobs(tuned, batch, verbalizer)
        out[idx] = logp.float().cpu()
        if progress is not None:
            progress.update(len(idx))
    tuned.train(was_training)
    return out


def shared_head(tuned, examples: list[Example]) -> HeadCache | None:
    """The head every example starts with (BOS, the soft prompt, shared template text), run
    once; None where it is not worth it (see `head_cache.head_ids`)."""
    ids = head_ids(tuned, [ex.ids for ex in examples])
    return None if ids is None else prefill(tuned, ids)
