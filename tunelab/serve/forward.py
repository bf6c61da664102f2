"""Mixed-task forward passes over one backbone, with each task's fixed leading part cached.

A task's prompt starts the same way for every request: its key/value prefix (prefix tuning),
BOS, its soft prompt, and the template's text before the first placeholder. That part's keys
and values are computed once per task (`HeadCache`, tunelab/lm/head_cache.py) and every row
of that task attends to them instead of recomputing them. In one batch, rows of different tasks
sit side by side: each row's cached head is placed right-aligned in one padded cache (its own
soft prompt and prefix come with it), its own tokens follow, and each task's rows are scored by
that task's verbalizer or classification head. Scores equal the uncached path (`tunelab
predict`) up to float rounding.
"""

from __future__ import annotations

import string
from contextlib import contextmanager

import torch

from tunelab.device import autocast
from tunelab.evaluate.calibrate import apply as calibrated
from tunelab.evaluate.loaded import distribution
from tunelab.lm.head_cache import (
    HeadCache,
    cached_hidden,
    label_rows,
    prefill,
    score_rows,
)
from tunelab.lm.scoring import label_logprobs, make_batch
from tunelab.tasks.encode import Example


def fixed_text(template: str) -> str:
    """The template's text before its first placeholder (what every prompt starts with)."""
    for literal, _, _, _ in string.Formatter().parse(template):
        return literal
    return ""


@torch.no_grad()
def build_head(tuned, task, tokenizer) -> HeadCache:
    """A task's head: BOS, soft prompt and the template's fixed opening, run once."""
    ids = tokenizer([fixed_text(task.template)], add_special_tokens=True)["input_ids"][0]
    lead = 1 if tokenizer.bos_token_id is not None and ids[:1] == [tokenizer.bos_token_id] else 0
    # the last fixed token may merge with the input's first characters in the full prompt's
    # tokenization; keep it out of the head so that real prompts still start with the head
    return prefill(tuned, ids[: max(lead, len(ids) - 1)])


def precision(entry):
    """The autocast this task's forward passes run under: bfloat16 where the store serves in it
    (its LoadedModel.bf16, as `tunelab eval --bf16` runs), else none."""
    return autocast(next(entry.tuned.parameters()).device, entry.model.bf16)


def head_of(entry) -> HeadCache:
    if entry.head_cache is None:
        with task_routing(entry), precision(entry):
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
                m = head.skipped_tokens(u)
                adapter = entry.adapter or "__base__"
                own = label_rows(entry.tuned, entry.prep.verbalizer, ex)
                rows += [(head, u, ids[m:], w, adapter) for ids, w in own]
            spans[j] = (slice(start, len(rows)), kept)
        if rows:
            # the last K positions of every row: enough for the longest label word's tokens
            K = max(len(r[3]) if r[3] is not None else 1 for r in rows)
            h = None
            for chunk in length_chunks([len(r[2]) for r in rows]):
                part = [rows[i] for i in chunk]
                with routing(model, [r[4] for r in part]), precision(jobs[group[0]][0]):
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
                words = [r[3] for r in rows[sl]]
                out[kept] = score_rows(entry.tuned, entry.prep.verbalizer, h[sl], words).cpu()
            if j in uncached:
                idx = uncached[j]
                out[idx] = _uncached(entry, [examples[i] for i in idx], pad).cpu()
            results[j] = out
    return results


def final_logprobs(entry, logp: torch.Tensor) -> torch.Tensor:
    """classify_mixed's (N, C) label log-probabilities, calibrated where the task is (as
    `tunelab predict --calibrate` scores)."""
    return logp if entry.calibration is None else calibrated(logp, entry.calibration)


def labelled(entry, logp: torch.Tensor) -> list[tuple[str, dict[str, float]]]:
    """Each row's label and every label's probability from classify_mixed's scores."""
    labels = entry.prep.verbalizer.labels
    return [distribution(labels, row) for row in final_logprobs(entry, logp).exp().tolist()]


def _uncached(entry, examples: list[Example], pad: int) -> torch.Tensor:
    """The plain path (as `tunelab predict` scores) for rows that cannot use the head cache."""
    device = next(entry.tuned.parameters()).device
    batch = make_batch(entry.tuned, examples, entry.prep.verbalizer, pad, "left", device)
    with task_routing(entry), precision(entry):
        return label_logprobs(entry.tuned, batch, entry.prep.verbalizer).float()
