"""Greedy generation for rows of many tasks at once, each row continuing its own task's cached
head (soft prompt, prefix, fixed template text) and stopping by its own task's rules: the same
decoding as `tunelab predict` (tunelab/lm/generate.py), batched across tasks."""

from __future__ import annotations

import torch

from tunelab.lm.generate import greedy_generate, greedy_loop
from tunelab.lm.head_cache import after_heads
from tunelab.serve.forward import head_of, length_chunks, precision, routing, task_routing


@torch.no_grad()
def _decode_chunk(model, tokenizer, rows: list[tuple], pad: int) -> list[str]:
    """rows: (head, used slots, suffix ids, adapter, max tokens, stop strings) -> texts."""
    from transformers import DynamicCache

    embeds, mask, pos, cache = after_heads(
        model, [r[0] for r in rows], [r[1] for r in rows], [r[2] for r in rows], pad
    )
    start = (embeds, mask, pos, DynamicCache() if cache is None else cache)
    with routing(model, [r[3] for r in rows]):
        return greedy_loop(model, tokenizer, start, [r[4] for r in rows], [r[5] for r in rows], pad)


@torch.no_grad()
def generate_mixed(jobs: list[tuple], pad: int) -> list[list[str]]:
    """The greedy continuation of each example of each (task entry, examples, max tokens, extra
    stop strings or None) job; jobs of tasks on one backbone decode together to the end of the
    longest (the static path; the server batches continuously, see continuous.py)."""
    results: list[list[str]] = [[""] * len(job[1]) for job in jobs]
    by_model: dict[int, list[int]] = {}
    for j, job in enumerate(jobs):
        by_model.setdefault(id(job[0].tuned.model), []).append(j)
    for group in by_model.values():
        entry0 = jobs[group[0]][0]
        rows, where = [], []  # where: (job, example) of each row
        for j in group:
            entry, examples, limit, extra = jobs[j]
            head = head_of(entry)
            stop = list(entry.task.generation.stop) + list(extra or [])
            for i, ex in enumerate(examples):
                u = head.slots_for(ex.ids)
                if u is None:  # the row does not start like its head: the plain path
                    with task_routing(entry), precision(entry):
                        results[j][i] = greedy_generate(
                            entry.tuned, [ex], entry.backbone.tokenizer, limit, stop
                        )[0]
                    continue
                m = head.skipped_tokens(u)
                rows.append((head, u, ex.ids[m:], entry.adapter or "__base__", limit, stop))
                where.append((j, i))
        for chunk in length_chunks([len(r[2]) for r in rows]):
            with precision(entry0):
                texts = _decode_chunk(
                    entry0.tuned.model, entry0.backbone.tokenizer, [rows[k] for k in chunk], pad
                )
            for k, text in zip(chunk, texts):
                j, i = where[k]
                results[j][i] = text
    return results
