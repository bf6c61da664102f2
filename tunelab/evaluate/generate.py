"""Greedy decoding with a key/value cache, for every method (soft prompt, prefix, LoRA, ...)."""

from __future__ import annotations

import torch

from tunelab.tasks.batch import _pad
from tunelab.tasks.encode import Example


def cut_at_stop(text: str, stop: list[str]) -> str:
    """The text before the first stop string; leading whitespace is not the output yet (a
    model that opens with a newline has not ended its answer)."""
    text = text.lstrip()
    ends = [text.find(s) for s in stop if s and s in text]
    return text[: min(ends)] if ends else text


@torch.no_grad()
def greedy_generate(
    tuned,
    examples: list[Example],
    tokenizer,
    max_new_tokens: int,
    stop: list[str],
    batch_size: int = 16,
    progress=None,
) -> list[str]:
    """The greedy continuation of each prompt, up to EOS, a stop string or max_new_tokens."""
    from transformers import DynamicCache

    model = tuned.model
    device = next(tuned.parameters()).device
    was_training = tuned.training
    tuned.eval()
    order = sorted(range(len(examples)), key=lambda i: len(examples[i].ids))
    out: list[str] = [""] * len(examples)
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        # left padding: every row's next token is predicted at the last column
        ids, mask = _pad([examples[i].ids for i in idx], tokenizer.pad_token_id, "left")
        ids, mask = ids.to(device), mask.to(device)
        embeds, mask = tuned.embed(ids, mask)
        pos = (mask.cumsum(1) - 1).clamp(min=0)
        if tuned.prefix is not None:
            cache = tuned.prefix.cache(len(idx), embeds.dtype)
            pos = pos + tuned.prefix.n
            mask = torch.cat([mask.new_ones(len(idx), tuned.prefix.n), mask], 1)
        else:
            cache = DynamicCache()
        generated = torch.empty(len(idx), 0, dtype=torch.long, device=device)
        done = torch.zeros(len(idx), dtype=torch.bool, device=device)
        for _ in range(max_new_tokens):
            h = model.base_model(
                inputs_embeds=embeds,
                attention_mask=mask,
                position_ids=pos,
                past_key_values=cache,
                use_cache=True,
            ).last_hidden_state
            nxt = model.get_output_embeddings()(h[:, -1]).argmax(-1)  # (B,)
            nxt = nxt.masked_fill(done, tokenizer.pad_token_id)
            generated = torch.cat([generated, nxt[:, None]], 1)
            done |= nxt == tokenizer.eos_token_id
            if stop:
                texts = tokenizer.batch_decode(generated, skip_special_tokens=True)
                ended = [any(s in t.lstrip() for s in stop if s) for t in texts]
                done |= torch.tensor(ended, device=device)
            if bool(done.all()):
                break
            embeds = model.get_input_embeddings()(nxt[:, None])  # (B, 1, D)
            mask = torch.cat([mask, mask.new_ones(len(idx), 1)], 1)
            pos = pos[:, -1:] + 1
        for row, i in enumerate(idx):
            text = tokenizer.decode(generated[row], skip_special_tokens=True)
            out[i] = cut_at_stop(text, stop).strip()
        if progress is not None:
            progress.update(len(idx))
    tuned.train(was_training)
    return out
