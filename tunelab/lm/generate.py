"""Greedy decoding with a key/value cache, for every method (soft prompt, prefix, LoRA, ...)."""

from __future__ import annotations

import torch

from tunelab.lm.scoring import after_prefix, with_cache
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
        mask, pos, cache = after_prefix(tuned, mask, pos, embeds.dtype)
        if cache is None:
            cache = DynamicCache()
        texts = greedy_loop(
            tuned.model,
            tokenizer,
            (embeds, mask, pos, cache),
            [max_new_tokens] * len(idx),
            [stop] * len(idx),
            tokenizer.pad_token_id,
        )
        for i, text in zip(idx, texts):
            out[i] = text
        if progress is not None:
            progress.update(len(idx))
    tuned.train(was_training)
    return out


@torch.no_grad()
def greedy_loop(model, tokenizer, start, limits: list[int], stops: list[list[str]], pad: int):
    """Greedy decoding from `start` = (left-padded input embeddings, mask, positions, a cache of
    whatever precedes them): row r ends at EOS, at one of `stops[r]` or after `limits[r]` tokens.
    Returns each row's text, cut at its stop string. `tunelab predict`/`eval` and the server's
    mixed-task batches decode with this one loop."""
    embeds, mask, pos, cache = start
    device, B = embeds.device, embeds.shape[0]
    limit = torch.tensor(limits, device=device)
    generated = torch.empty(B, 0, dtype=torch.long, device=device)
    done = torch.zeros(B, dtype=torch.bool, device=device)
    for step in range(max(limits)):
        h = model.base_model(
            inputs_embeds=embeds,
            attention_mask=mask,
            position_ids=pos,
            use_cache=True,
            **with_cache(model.base_model, cache),
        ).last_hidden_state
        nxt = model.get_output_embeddings()(h[:, -1]).argmax(-1).masked_fill(done, pad)  # (B,)
        generated = torch.cat([generated, nxt[:, None]], 1)
        done |= (nxt == tokenizer.eos_token_id) | (step + 1 >= limit)
        if any(stops):
            texts = tokenizer.batch_decode(generated, skip_special_tokens=True)
            ended = [any(s in t.lstrip() for s in st if s) for t, st in zip(texts, stops)]
            done |= torch.tensor(ended, device=device)
        if bool(done.all()):
            break
        embeds = model.get_input_embeddings()(nxt[:, None])  # (B, 1, D)
        mask = torch.cat([mask, mask.new_ones(B, 1)], 1)
        pos = pos[:, -1:] + 1
    texts = tokenizer.batch_decode(generated, skip_special_tokens=True)
    return [cut_at_stop(t, st).strip() for t, st in zip(texts, stops)]
