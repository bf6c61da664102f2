"""Mixed-task forward passes over one backbone, with each task's fixed leading part cached.

A task's prompt starts the same way for every request: its key/value prefix (prefix tuning),
BOS, its soft prompt, and the template's text before the first placeholder. That part's keys
and values are computed once per task (`HeadCache`) and every row of that task attends to them
instead of recomputing them. In one batch, rows of different tasks sit side by side: each row's
cached head is placed right-aligned in one padded cache (its own soft prompt and prefix come
with it), its own tokens follow, and each task's rows are scored by that task's verbalizer or
classification head. Scores equal the uncached path (`tunelab predict`) up to float rounding.
"""

from __future__ import annotations

import string
from dataclasses import dataclass

import torch

from tunelab.models.scoring import label_logprobs, label_logprobs_at, make_batch
from tunelab.tasks.batch import _pad
from tunelab.tasks.encode import Example


@dataclass
class HeadCache:
    keys: list[torch.Tensor]  # per layer (H, slots, Dh)
    values: list[torch.Tensor]
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
        return self.n_prefix + m + (self.n_prompt if self.n_prompt else 0)


def fixed_text(template: str) -> str:
    """The template's text before its first placeholder (what every prompt starts with)."""
    for literal, name, _, _ in string.Formatter().parse(template):
        return literal if name is not None or literal else ""
    return ""


@torch.no_grad()
def build_head(tuned, task, tokenizer) -> HeadCache:
    """Run the task's fixed leading part once and keep its keys and values."""
    model = tuned.model
    device = next(model.parameters()).device
    ids = tokenizer([fixed_text(task.template)], add_special_tokens=True)["input_ids"][0]
    bos = tokenizer.bos_token_id
    lead = 1 if bos is not None and ids[:1] == [bos] else 0
    # the last fixed token may merge with the input's first characters in the full prompt's
    # tokenization; keep it out of the head so that real prompts still start with the head
    ids = ids[: max(lead, len(ids) - 1)]
    n_prefix = tuned.prefix.n if tuned.prefix is not None else 0
    prompt = tuned.prompt
    prompt_at = 0
    if prompt is not None and prompt.insert_at == "after_bos" and tuned.bos_id is not None:
        prompt_at = lead
    n_prompt = prompt.n if prompt is not None else 0
    if not ids and not n_prompt:
        if tuned.prefix is None:
            return HeadCache([], [], [], 0, 0, 0)
        cache = tuned.prefix.cache(1, model.get_input_embeddings().weight.dtype)
    else:
        tok = torch.tensor([ids or [tokenizer.pad_token_id]], device=device)
        mask = torch.ones_like(tok) if ids else torch.zeros_like(tok)
        if ids:
            embeds, mask = tuned.embed(tok, mask)  # (1, T + n_prompt, D)
        else:  # a soft prompt alone: no tokens to embed around it
            embeds, mask = prompt.embedding[None].to(model.dtype), mask.new_ones(1, n_prompt)
        pos = torch.arange(embeds.size(1), device=device)[None] + n_prefix
        cache = None
        if tuned.prefix is not None:
            cache = tuned.prefix.cache(1, embeds.dtype)
            mask = torch.cat([mask.new_ones(1, n_prefix), mask], 1)
        out = model.base_model(
            inputs_embeds=embeds,
            attention_mask=mask,
            position_ids=pos,
            past_key_values=cache,
            use_cache=True,
        )
        cache = out.past_key_values
    keys = [layer.keys[0].clone() for layer in cache.layers]  # (H, slots, Dh)
    values = [layer.values[0].clone() for layer in cache.layers]
    return HeadCache(keys, values, ids, prompt_at, n_prompt, n_prefix)


def head_of(entry) -> HeadCache:
    if entry.head_cache is None:
        entry.head_cache = build_head(entry.tuned, entry.task, entry.backbone.tokenizer)
    return entry.head_cache


@torch.no_grad()
def cached_hidden(model, heads: list[HeadCache], used: list[int], suffixes: list[list[int]], pad):
    """Final hidden states (B, S, D) of rows that each continue `used[b]` slots of their own
    head; rows are left-padded, so every row's last token is at S - 1."""
    device = next(model.parameters()).device
    ids, smask = _pad(suffixes, pad, "left")
    ids, smask = ids.to(device), smask.to(device)
    embeds = model.get_input_embeddings()(ids)  # (B, S, D)
    used_t = torch.tensor(used, device=device)
    pos = used_t[:, None] + (smask.cumsum(1) - 1).clamp(min=0)  # positions go on after the head
    P = max(used)
    if P == 0:
        return model.base_model(
            inputs_embeds=embeds, attention_mask=smask, position_ids=pos
        ).last_hidden_state
    from transformers import DynamicCache

    B = len(suffixes)
    hmask = smask.new_zeros(B, P)
    cache = DynamicCache()
    layers = model.config.num_hidden_layers
    ref = next(h for h, u in zip(heads, used) if u)
    H, Dh = ref.keys[0].shape[0], ref.keys[0].shape[2]
    for layer in range(layers):
        k = embeds.new_zeros(B, H, P, Dh)  # (B, H, P, Dh): each head right-aligned
        v = embeds.new_zeros(B, H, P, Dh)
        for b, (head, u) in enumerate(zip(heads, used)):
            if u:
                k[b, :, P - u :] = head.keys[layer][:, :u]
                v[b, :, P - u :] = head.values[layer][:, :u]
        cache.update(k, v, layer)
    for b, u in enumerate(used):
        hmask[b, P - u :] = 1
    out = model.base_model(
        inputs_embeds=embeds,
        attention_mask=torch.cat([hmask, smask], 1),
        position_ids=pos,
        past_key_values=cache,
    )
    return out.last_hidden_state


def _rows(entry, ex: Example) -> list[tuple[list[int], list[int] | None]]:
    """(prompt ids, target word) rows of one example, as `make_batch` builds them."""
    verbalizer = entry.prep.verbalizer
    if entry.tuned.head is not None or verbalizer.single_token:
        return [(ex.ids, None)]
    return [(ex.ids + w[:-1], w) for w in verbalizer.words]


@torch.no_grad()
def classify_mixed(jobs: list[tuple[object, list[Example]]], pad: int) -> list[torch.Tensor]:
    """(N, C) label log-probabilities for each (task entry, examples) job; the jobs of tasks on
    one backbone run as one forward pass."""
    results: list[torch.Tensor | None] = [None] * len(jobs)
    by_model: dict[int, list[int]] = {}
    for j, (entry, _) in enumerate(jobs):
        by_model.setdefault(id(entry.tuned.model), []).append(j)
    for group in by_model.values():
        model = jobs[group[0]][0].tuned.model
        rows, spans = [], {}  # spans: job -> (its rows, the examples they cover)
        uncached: dict[int, list[int]] = {}
        for j in group:
            entry, examples = jobs[j]
            head = head_of(entry)
            start, kept = len(rows), []
            for i, ex in enumerate(examples):
                u = head.slots_for(ex.ids)
                if u is None:
                    uncached.setdefault(j, []).append(i)
                    continue
                kept.append(i)
                m = u - head.n_prefix - head.n_prompt  # head tokens this row skips
                rows += [(head, u, ids[m:], w) for ids, w in _rows(entry, ex)]
            spans[j] = (slice(start, len(rows)), kept)
        h = None
        if rows:
            h = cached_hidden(
                model, [r[0] for r in rows], [r[1] for r in rows], [r[2] for r in rows], pad
            )
        for j in group:
            entry, examples = jobs[j]
            out = torch.empty(len(examples), len(entry.prep.verbalizer.labels))
            sl, kept = spans[j]
            if kept:
                out[kept] = _score(entry, h[sl], [r[3] for r in rows[sl]]).cpu()
            if j in uncached:
                idx = uncached[j]
                out[idx] = _uncached(entry, [examples[i] for i in idx], pad).cpu()
            results[j] = out
    return results


def _score(entry, h: torch.Tensor, words: list) -> torch.Tensor:
    """A task's label log-probabilities from its rows' hidden states (R, S, D)."""
    last = torch.full((h.size(0),), h.size(1) - 1, device=h.device)
    batch = {}
    if words[0] is not None:
        target_ids, target_mask = _pad(words, 0, "right")  # (R, L)
        batch = {"target_ids": target_ids.to(h.device), "target_mask": target_mask.to(h.device)}
    return label_logprobs_at(entry.tuned, h, last, batch, entry.prep.verbalizer).float()


def _uncached(entry, examples: list[Example], pad: int) -> torch.Tensor:
    """The plain path (as `tunelab predict` scores) for rows that cannot use the head cache."""
    device = next(entry.tuned.parameters()).device
    batch = make_batch(entry.tuned, examples, entry.prep.verbalizer, pad, "left", device)
    return label_logprobs(entry.tuned, batch, entry.prep.verbalizer)
