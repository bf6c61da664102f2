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
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from tunelab.models.scoring import label_logprobs, label_logprobs_at, make_batch
from tunelab.tasks.batch import _pad
from tunelab.tasks.encode import Example


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


def fixed_text(template: str) -> str:
    """The template's text before its first placeholder (what every prompt starts with)."""
    for literal, _, _, _ in string.Formatter().parse(template):
        return literal
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
            return HeadCache(None, None, [], 0, 0, 0)
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
    keys = torch.stack([layer.keys[0] for layer in cache.layers])  # (layers, H, slots, Dh)
    values = torch.stack([layer.values[0] for layer in cache.layers])
    return HeadCache(keys, values, ids, prompt_at, n_prompt, n_prefix)


def head_of(entry) -> HeadCache:
    if entry.head_cache is None:
        with task_routing(entry):
            entry.head_cache = build_head(entry.tuned, entry.task, entry.backbone.tokenizer)
    return entry.head_cache


@contextmanager
def routing(model, names):
    """Route each row through its own LoRA adapter ("__base__": none) in the forward passes
    inside, by PEFT's `adapter_names`; `names` is one name per row or a function of the batch
    size. Once the backbone holds LoRA adapters, every pass must say which rows use which."""
    from peft.tuners.lora import LoraLayer

    layers = [m for m in model.modules() if isinstance(m, LoraLayer)]
    if not layers:
        yield
        return

    def hook(module, args, kwargs):
        rows = (args[0] if args else kwargs["x"]).shape[0]
        kwargs["adapter_names"] = names(rows) if callable(names) else names
        return args, kwargs

    handles = [m.register_forward_pre_hook(hook, with_kwargs=True) for m in layers]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def task_routing(entry):
    """Every row of these passes belongs to one task."""
    return routing(entry.tuned.model, lambda rows: [entry.adapter or "__base__"] * rows)


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
    cache, hmask = stack_heads(heads, used, embeds)
    out = model.base_model(
        inputs_embeds=embeds,
        attention_mask=torch.cat([hmask, smask], 1),
        position_ids=pos,
        past_key_values=cache,
    )
    return out.last_hidden_state


def stack_heads(heads: list[HeadCache], used: list[int], like: torch.Tensor):
    """One DynamicCache for a batch: row b holds the first used[b] slots of its own task's
    head, right-aligned (B, H, P, Dh) per layer, and its (B, P) mask. This copy is all that
    switching task costs a row."""
    from transformers import DynamicCache

    B, P = len(heads), max(used)
    ref = next(h for h, u in zip(heads, used) if u)
    L, H, _, Dh = ref.keys.shape
    k = like.new_empty(L, B, H, P, Dh)
    v = like.new_empty(L, B, H, P, Dh)
    mask = torch.zeros(B, P, dtype=torch.long, device=like.device)
    for b, (head, u) in enumerate(zip(heads, used)):
        # masked slots still enter the attention product (with weight 0): zeros, not garbage
        k[:, b, :, : P - u] = 0
        v[:, b, :, : P - u] = 0
        if u:
            k[:, b, :, P - u :] = head.keys[:, :, :u]
            v[:, b, :, P - u :] = head.values[:, :, :u]
            mask[b, P - u :] = 1
    cache = DynamicCache()
    for layer in range(L):
        cache.update(k[layer], v[layer], layer)
    return cache, mask


def _rows(entry, ex: Example) -> list[tuple[list[int], list[int] | None]]:
    """(prompt ids, target word) rows of one example, as `make_batch` builds them."""
    verbalizer = entry.prep.verbalizer
    if entry.tuned.head is not None or verbalizer.single_token:
        return [(ex.ids, None)]
    return [(ex.ids + w[:-1], w) for w in verbalizer.words]


def length_chunks(lengths: list[int], slack: float = 1.2) -> list[list[int]]:
    """Row indices in chunks of similar length (sorted), each padded to at most `slack` times
    its real tokens: on a CPU a padded token costs as much as a real one."""
    chunks: list[list[int]] = []
    real = 0
    for i in sorted(range(len(lengths)), key=lengths.__getitem__):
        chunk = chunks[-1] if chunks else None
        # sorted ascending: the new row sets the chunk's padded width
        if chunk is None or (len(chunk) + 1) * lengths[i] > slack * (real + lengths[i]):
            chunks.append([i])
            real = lengths[i]
        else:
            chunk.append(i)
            real += lengths[i]
    return chunks


@torch.no_grad()
def classify_mixed(jobs: list[tuple[object, list[Example]]], pad: int) -> list[torch.Tensor]:
    """(N, C) label log-probabilities for each (task entry, examples) job. Rows of all tasks on
    one backbone share forward passes: sorted by length into chunks that waste little on
    padding, tasks mixed freely within a chunk."""
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
                adapter = entry.adapter or "__base__"
                rows += [(head, u, ids[m:], w, adapter) for ids, w in _rows(entry, ex)]
            spans[j] = (slice(start, len(rows)), kept)
        if rows:
            # the last K positions of every row: enough for the longest label word's tokens
            K = max(len(r[3]) if r[3] is not None else 1 for r in rows)
            h = None
            for chunk in length_chunks([len(r[2]) for r in rows]):
                part = [rows[i] for i in chunk]
                with routing(model, [r[4] for r in part]):
                    hc = cached_hidden(  # (C, S, D), left-padded: each row ends at S - 1
                        model,
                        [r[0] for r in part],
                        [r[1] for r in part],
                        [r[2] for r in part],
                        pad,
                    )
                if h is None:
                    h = hc.new_zeros(len(rows), K, hc.size(-1))  # (R, K, D)
                k = min(K, hc.size(1))
                h[chunk, K - k :] = hc[:, hc.size(1) - k :]
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
    with task_routing(entry):
        return label_logprobs(entry.tuned, batch, entry.prep.verbalizer)
