"""The keys and values of a prompt's fixed leading part, computed once and reused by every row.

Every prompt of a task starts the same way: its key/value prefix (prefix tuning), BOS, its
soft prompt, and the template's text before the first placeholder. That part's keys and values
are computed once (`prefill` → `HeadCache`) and each row runs only its own tokens, attending to
the cached head (`cached_hidden`). Evaluation uses it for one task (tunelab/lm/predict.py)
and the server for rows of many tasks in one batch, each row with its own task's head
(tunelab/serve/forward.py). Scores equal the uncached path up to float rounding.

Training uses it too (tunelab/train/loop.py): every row of a batch shares the head, so it runs
once per micro-batch, with gradients, instead of once per row; its keys and values are expanded
over the batch and the gradient of every row flows back into the one head (the soft prompt).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from tunelab.lm.scoring import (
    after_prefix,
    cache_from,
    cache_of,
    expanded_cache,
    label_logprobs_at,
    last_positions,
    with_cache,
)
from tunelab.tasks.batch import _pad
from tunelab.tasks.encode import Example
from tunelab.tasks.verbalizer import Verbalizer


@dataclass
class HeadCache:
    keys: torch.Tensor | None  # (layers, H, slots, Dh); None when the head is empty
    values: torch.Tensor | None
    token_ids: list[int]  # the head's tokens (BOS, fixed template text), soft prompt excluded
    prompt_at: int  # index into token_ids where the soft prompt sits
    n_prompt: int  # soft-prompt vectors (0 without one)
    n_prefix: int  # prefix-tuning slots before everything (0 without)

    @property
    def slots(self) -> int:
        return self.n_prefix + len(self.token_ids) + self.n_prompt

    def slots_for(self, ids: list[int]) -> int | None:
        """How many leading head slots a row with these prompt ids can reuse (None: the row
        does not start like the head, e.g. its BOS was cut; it takes the uncached path)."""
        m = 0
        limit = min(len(self.token_ids), len(ids) - 1)  # at least one token left to run
        while m < limit and ids[m] == self.token_ids[m]:
            m += 1
        if self.n_prompt and m < self.prompt_at:
            return None
        return self.n_prefix + m + self.n_prompt

    def skipped_tokens(self, used: int) -> int:
        """How many of a row's own tokens the first `used` slots stand for."""
        return used - self.n_prefix - self.n_prompt


# a shared head shorter than this is not worth caching: its keys cost a copy per row
MIN_HEAD_POSITIONS = 4


def shared_ids(rows: list[list[int]]) -> list[int]:
    """The leading token ids every row starts with, leaving each row at least one token."""
    if not rows:
        return []
    first, limit = rows[0], min(len(r) for r in rows) - 1
    m = 0
    while m < limit and all(r[m] == first[m] for r in rows):
        m += 1
    return first[:m]


def head_ids(tuned, rows: list[list[int]]) -> list[int] | None:
    """The token ids of the head every row starts with, for `prefill`: the ids all rows share
    (the soft prompt goes after them or after their BOS). None when the head would be too short
    to be worth it, or the rows disagree on where the soft prompt goes (some start with BOS,
    some do not), or a row is too short to leave a token after it."""
    ids = shared_ids(rows)
    prompt = tuned.prompt
    if not rows or len(ids) + (prompt.n if prompt is not None else 0) < MIN_HEAD_POSITIONS:
        return None
    if prompt is not None and not ids and any(r[:1] == [tuned.bos_id] for r in rows):
        return None
    return ids


def prefill(tuned, ids: list[int]) -> HeadCache:
    """Run the head (prefix, these leading token ids, the soft prompt where `TunedLM.embed`
    would put it) once and keep its keys and values. Under `torch.no_grad` for serving and
    evaluation; with gradients in training, where they flow back into the soft prompt."""
    model = tuned.model
    device = next(model.parameters()).device
    prompt = tuned.prompt
    lead = 1 if tuned.bos_id is not None and ids[:1] == [tuned.bos_id] else 0
    prompt_at = lead if prompt is not None and prompt.insert_at == "after_bos" else 0
    n_prefix = tuned.prefix.n if tuned.prefix is not None else 0
    n_prompt = prompt.n if prompt is not None else 0
    if not ids and not n_prompt:
        if tuned.prefix is None:
            return HeadCache(None, None, [], 0, 0, 0)
        cache = tuned.prefix.cache(1, model.get_input_embeddings().weight.dtype)
    else:
        if ids:
            tok = torch.tensor([ids], device=device)
            embeds, mask = tuned.embed(tok, torch.ones_like(tok))  # (1, T + n_prompt, D)
        else:  # a soft prompt alone: no tokens to embed around it
            embeds = prompt.vectors()[None].to(model.get_input_embeddings().weight.dtype)
            mask = torch.ones(1, n_prompt, dtype=torch.long, device=device)
        pos = torch.arange(embeds.size(1), device=device)[None]
        mask, pos, cache = after_prefix(tuned, mask, pos, embeds.dtype)
        out = model.base_model(
            inputs_embeds=embeds,
            attention_mask=mask,
            position_ids=pos,
            use_cache=True,
            **with_cache(model.base_model, cache),
        )
        cache = cache_of(out)
    keys = torch.stack([layer.keys[0] for layer in cache.layers])  # (layers, H, slots, Dh)
    values = torch.stack([layer.values[0] for layer in cache.layers])
    return HeadCache(keys, values, list(ids), prompt_at, n_prompt, n_prefix)


def after_heads(model, heads: list[HeadCache], used: list[int], suffixes: list[list[int]], pad):
    """The inputs of rows that each continue `used[b]` slots of their own head: embeddings of
    the left-padded suffixes (B, S, D), the mask over head slots and suffix, the positions after
    each head, and the stacked head cache (None when no row uses a head)."""
    device = next(model.parameters()).device
    ids, smask = _pad(suffixes, pad, "left")
    ids, smask = ids.to(device), smask.to(device)
    embeds = model.get_input_embeddings()(ids)  # (B, S, D)
    used_t = torch.tensor(used, device=device)
    pos = used_t[:, None] + (smask.cumsum(1) - 1).clamp(min=0)  # positions go on after the head
    if max(used) == 0:
        return embeds, smask, pos, None
    cache, hmask = stack_heads(heads, used, embeds)
    return embeds, torch.cat([hmask, smask], 1), pos, cache


@torch.no_grad()
def cached_hidden(model, heads: list[HeadCache], used: list[int], suffixes: list[list[int]], pad):
    """Final hidden states (B, S, D) of rows that each continue `used[b]` slots of their own
    head; rows are left-padded, so every row's last token is at S - 1."""
    embeds, mask, pos, cache = after_heads(model, heads, used, suffixes, pad)
    out = model.base_model(
        inputs_embeds=embeds,
        attention_mask=mask,
        position_ids=pos,
        **with_cache(model.base_model, cache),
    )
    return out.last_hidden_state


def head_hidden(tuned, head: HeadCache, input_ids: torch.Tensor, attention_mask: torch.Tensor):
    """Final hidden states (B, S, D) of rows that all continue the whole of one head: its keys
    and values are expanded over the batch (a view, no copy). Padding either side."""
    model = tuned.model
    B = input_ids.size(0)
    embeds = model.get_input_embeddings()(input_ids)  # (B, S, D)
    pos = head.slots + (attention_mask.cumsum(1) - 1).clamp(min=0)  # after the head
    if head.keys is None:
        return model.base_model(
            inputs_embeds=embeds, attention_mask=attention_mask, position_ids=pos
        ).last_hidden_state
    cache = expanded_cache(head.keys, head.values, B)
    mask = torch.cat([attention_mask.new_ones(B, head.slots), attention_mask], 1)
    out = model.base_model(
        inputs_embeds=embeds,
        attention_mask=mask,
        position_ids=pos,
        **with_cache(model.base_model, cache),
    )
    return out.last_hidden_state


def head_label_logprobs(tuned, head: HeadCache, batch: dict, verbalizer: Verbalizer):
    """(B, C) label log-probabilities of a batch (`scoring.make_batch`) of what follows the
    head in each row, as `scoring.label_logprobs` scores the whole rows."""
    mask = batch["attention_mask"]
    h = head_hidden(tuned, head, batch["input_ids"], mask)
    return label_logprobs_at(tuned, h, last_positions(mask), batch, verbalizer)


def after_head(examples: list[Example], n: int) -> list[Example]:
    """The examples with the head's n tokens cut from the front of their prompts."""
    return [replace(ex, ids=ex.ids[n:]) for ex in examples]


def stack_heads(heads: list[HeadCache], used: list[int], like: torch.Tensor):
    """One DynamicCache for a batch: row b holds the first used[b] slots of its own head,
    right-aligned (B, H, P, Dh) per layer, and its (B, P) mask. This copy is all that switching
    task costs a row. Keys keep the dtype they were computed in (bf16 under autocast)."""
    B, P = len(heads), max(used)
    ref = next(h for h, u in zip(heads, used) if u)
    L, H, _, Dh = ref.keys.shape
    k = ref.keys.new_empty(L, B, H, P, Dh)
    v = ref.values.new_empty(L, B, H, P, Dh)
    mask = torch.zeros(B, P, dtype=torch.long, device=like.device)
    for b, (head, u) in enumerate(zip(heads, used)):
        # masked slots still enter the attention product (with weight 0): zeros, not garbage
        k[:, b, :, : P - u] = 0
        v[:, b, :, : P - u] = 0
        if u:
            k[:, b, :, P - u :] = head.keys[:, :, :u]
            v[:, b, :, P - u :] = head.values[:, :, :u]
            mask[b, P - u :] = 1
    return cache_from(k, v), mask


def label_rows(tuned, verbalizer: Verbalizer, ex: Example) -> list[tuple[list[int], list | None]]:
    """(prompt ids, target word) rows of one example, as `scoring.make_batch` builds them: one
    row, or one per label word when words span several tokens."""
    if tuned.head is not None or verbalizer.single_token:
        return [(ex.ids, None)]
    return [(ex.ids + w[:-1], w) for w in verbalizer.words]


def score_rows(tuned, verbalizer: Verbalizer, h: torch.Tensor, words: list) -> torch.Tensor:
    """(N, C) label log-probabilities from `label_rows`' hidden states (R, S, D), each row
    ending at S - 1."""
    last = torch.full((h.size(0),), h.size(1) - 1, device=h.device)
    batch = {}
    if words[0] is not None:
        target_ids, target_mask = _pad(words, 0, "right")  # (R, L)
        batch = {"target_ids": target_ids.to(h.device), "target_mask": target_mask.to(h.device)}
    return label_logprobs_at(tuned, h, last, batch, verbalizer).float()
