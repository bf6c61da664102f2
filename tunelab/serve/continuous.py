"""Continuous batching for generation: rows join and leave the decoding batch at every step.

The batch of one backbone is a left-padded key/value cache (B, H, T, Dh) per layer with its
(B, T) mask: every row's history ends at the last column, so one token per row decodes them
all in one forward pass. A new row is prefilled (its task's cached head + its own tokens, as
decode.py starts a static batch, rows of many tasks in one pass), then merged into the running
cache (both padded on the left to the wider width, concatenated along the batch). A row that is
done (EOS, its own `max_tokens`, one of its own stop strings, or cancelled) leaves at once: the
batch axis is indexed, and columns no row needs any more are cut from the left. Each row keeps
its own task's head, its own LoRA routing (forward.py `routing`) and its own limits, so rows of
different tasks still share every forward pass.

Every step runs on the batcher's single model thread (batcher.py); between steps the event loop
admits new requests, and classification batches and hot loads take their turn on that thread.
A row's text is what the static path (`greedy_loop`, `tunelab predict`) returns for it: the
same greedy tokens, cut the same way.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from tunelab.lm.generate import cut_at_stop
from tunelab.lm.head_cache import after_heads
from tunelab.lm.scoring import after_prefix, cache_from, cache_of, with_cache
from tunelab.serve.forward import head_of, length_chunks, precision, routing, task_routing
from tunelab.tasks.encode import Example


@dataclass(eq=False)
class Row:
    """One generation in the decoding batch. `on_token(piece)` (optional) is called on the
    model thread with each piece of new text, already cut at the stop strings: the pieces put
    together are the final text. Setting `cancelled` makes the row leave at the next step."""

    entry: object
    example: Example
    limit: int  # the most tokens it may generate
    stop: list[str]
    on_token: Callable[[str], None] | None = None
    cancelled: bool = False
    tag: object = None  # the caller's (which request, which input)
    tokens: list[int] = field(default_factory=list)
    text: str | None = None  # set when the row is finished
    finish_reason: str | None = None  # then too: stop (EOS, a stop string), length, cancelled
    sent: str = ""  # what on_token has been given so far

    def visible(self, tokenizer) -> str:
        return cut_at_stop(tokenizer.decode(self.tokens, skip_special_tokens=True), self.stop)


def held_back(text: str, stop: list[str]) -> str:
    """The part of a row's visible text that is safe to stream before the row ends: without
    trailing whitespace (the final text is stripped), an incomplete character, or an ending
    that may be the start of a stop string."""
    # an unfinished UTF-8 character decodes as a replacement character (a byte or three)
    for _ in range(3):
        text = text.removesuffix("\ufffd")
    text = text.rstrip()
    cut = 0
    for s in stop:
        for k in range(min(len(s) - 1, len(text)), 0, -1):
            if text.endswith(s[:k]):
                cut = max(cut, k)
                break
    return text[: len(text) - cut].rstrip() if cut else text


class _Batch:
    """The running rows of one backbone: their cache, mask, next positions, pending tokens."""

    def __init__(self, model, tokenizer):
        self.model, self.tokenizer = model, tokenizer
        self.rows: list[Row] = []
        self.keys: list[torch.Tensor] = []  # per layer (B, H, T, Dh)
        self.values: list[torch.Tensor] = []
        self.mask: torch.Tensor | None = None  # (B, T)
        self.pos: torch.Tensor | None = None  # (B,) the position of each row's next token
        self.nxt: torch.Tensor | None = None  # (B,) each row's last token, not in the cache yet

    def add(self, rows, cache, mask, pos, nxt) -> None:
        keys = [layer.keys for layer in cache.layers]
        values = [layer.values for layer in cache.layers]
        if not self.rows:
            self.rows, self.keys, self.values = list(rows), keys, values
            self.mask, self.pos, self.nxt = mask, pos, nxt
            return
        width = max(self.mask.size(1), mask.size(1))
        self.keys = [_cat_left(a, b, width) for a, b in zip(self.keys, keys)]
        self.values = [_cat_left(a, b, width) for a, b in zip(self.values, values)]
        self.mask = _cat_left(self.mask, mask, width)
        self.pos, self.nxt = torch.cat([self.pos, pos]), torch.cat([self.nxt, nxt])
        self.rows += rows

    def keep(self, keep: list[int]) -> None:
        if len(keep) == len(self.rows):
            return
        self.rows = [self.rows[i] for i in keep]
        if not keep:
            self.keys, self.values, self.mask = [], [], None
            return
        idx = torch.tensor(keep, device=self.mask.device)
        mask = self.mask[idx]
        first = int(mask.any(0).int().argmax())  # columns before it are padding for every row
        self.mask = mask[:, first:]
        self.keys = [k[idx, :, first:] for k in self.keys]
        self.values = [v[idx, :, first:] for v in self.values]
        self.pos, self.nxt = self.pos[idx], self.nxt[idx]

    def cache(self):
        return cache_from(self.keys, self.values)


def _cat_left(a: torch.Tensor, b: torch.Tensor, width: int) -> torch.Tensor:
    """Rows of a then rows of b, both zero-padded on the left of dim 2 (keys) or 1 (mask) to
    `width`: masked slots still enter the attention product with weight 0, so zeros."""
    dim = 2 if a.dim() == 4 else 1

    def pad(t):
        missing = width - t.size(dim)
        if missing == 0:
            return t
        shape = list(t.shape)
        shape[dim] = missing
        return torch.cat([t.new_zeros(shape), t], dim)

    return torch.cat([pad(a), pad(b)], 0)


class Decoder:
    """Continuous greedy decoding over rows of any task. Used from one thread only (the
    batcher's model thread): `step(new_rows)` admits the new rows and decodes one token for
    every running row; it returns the rows that finished in it."""

    def __init__(self, pad: int, on_step: Callable[[list[Row]], None] | None = None):
        self.pad = pad
        self.batches: dict[int, _Batch] = {}
        # called with the rows of each decoding forward pass (tests, benchmarks)
        self.on_step = on_step

    @property
    def rows(self) -> list[Row]:
        return [r for b in self.batches.values() for r in b.rows]

    def __len__(self) -> int:
        return sum(len(b.rows) for b in self.batches.values())

    def clear(self) -> list[Row]:
        """Drop every row (after a failed step); returns them."""
        rows = self.rows
        self.batches = {}
        return rows

    @torch.no_grad()
    def step(self, new: list[Row] = ()) -> list[Row]:
        finished: list[Row] = []
        for row in new:
            if row.cancelled or row.limit < 1:
                row.finish_reason = "cancelled" if row.cancelled else "length"
                self._finish(row, row.entry.backbone.tokenizer)
                finished.append(row)
                continue
            model = row.entry.tuned.model
            self.batches.setdefault(id(model), _Batch(model, row.entry.backbone.tokenizer))
        by_model: dict[int, list[Row]] = {}
        for row in new:
            if row.text is None:
                by_model.setdefault(id(row.entry.tuned.model), []).append(row)
        for key, rows in by_model.items():
            self._prefill(self.batches[key], rows)
        for key, batch in list(self.batches.items()):
            finished += self._leave(batch)
            if batch.rows:
                self._decode(batch)
                finished += self._leave(batch)
            if not batch.rows:
                del self.batches[key]
        return finished

    def _prefill(self, batch: _Batch, rows: list[Row]) -> None:
        """Run new rows (their task's cached head + their own tokens) and merge them in."""
        cached, plain = [], []
        for row in rows:
            head = head_of(row.entry)
            u = head.slots_for(row.example.ids)
            (plain if u is None else cached).append((row, head, u))
        for chunk in length_chunks(
            [len(r.example.ids) - h.skipped_tokens(u) for r, h, u in cached]
        ):
            part = [cached[i] for i in chunk]
            embeds, mask, pos, cache = after_heads(
                batch.model,
                [h for _, h, _ in part],
                [u for _, _, u in part],
                [r.example.ids[h.skipped_tokens(u) :] for r, h, u in part],
                self.pad,
            )
            names = [r.entry.adapter or "__base__" for r, _, _ in part]
            with routing(batch.model, names), precision(part[0][0].entry):
                self._run_prefill(batch, [r for r, _, _ in part], embeds, mask, pos, cache)
        for row, _, _ in plain:  # the row does not start like its head: the plain path
            tuned = row.entry.tuned
            device = next(tuned.parameters()).device
            ids = torch.tensor([row.example.ids], device=device)
            embeds, mask = tuned.embed(ids, torch.ones_like(ids))
            pos = (mask.cumsum(1) - 1).clamp(min=0)
            mask, pos, cache = after_prefix(tuned, mask, pos, embeds.dtype)
            with task_routing(row.entry), precision(row.entry):
                self._run_prefill(batch, [row], embeds, mask, pos, cache)

    def _run_prefill(self, batch: _Batch, rows, embeds, mask, pos, cache) -> None:
        from transformers import DynamicCache

        model = batch.model
        out = model.base_model(
            inputs_embeds=embeds,
            attention_mask=mask,
            position_ids=pos,
            use_cache=True,
            **with_cache(model.base_model, DynamicCache() if cache is None else cache),
        )
        nxt = model.get_output_embeddings()(out.last_hidden_state[:, -1]).argmax(-1)  # (b,)
        batch.add(rows, cache_of(out), mask, pos[:, -1] + 1, nxt)
        self._took(batch, rows, nxt)

    def _decode(self, batch: _Batch) -> None:
        """One token for every running row."""
        model, B = batch.model, len(batch.rows)
        if self.on_step is not None:
            self.on_step(list(batch.rows))
        embeds = model.get_input_embeddings()(batch.nxt[:, None])  # (B, 1, D)
        mask = torch.cat([batch.mask, batch.mask.new_ones(B, 1)], 1)
        names = [r.entry.adapter or "__base__" for r in batch.rows]
        with routing(model, names), precision(batch.rows[0].entry):  # one store: one precision
            out = model.base_model(
                inputs_embeds=embeds,
                attention_mask=mask,
                position_ids=batch.pos[:, None],
                use_cache=True,
                **with_cache(model.base_model, batch.cache()),
            )
        cache = cache_of(out)
        batch.keys = [layer.keys for layer in cache.layers]
        batch.values = [layer.values for layer in cache.layers]
        batch.mask, batch.pos = mask, batch.pos + 1
        batch.nxt = model.get_output_embeddings()(out.last_hidden_state[:, -1]).argmax(-1)
        self._took(batch, batch.rows, batch.nxt)

    def _took(self, batch: _Batch, rows: list[Row], nxt: torch.Tensor) -> None:
        """Each row's new token: ends it at EOS, its limit or a stop string; streams its text."""
        tok = batch.tokenizer
        for row, t in zip(rows, nxt.tolist()):
            row.tokens.append(t)
            stopped = t == tok.eos_token_id  # or at a stop string, below
            if row.stop or row.on_token is not None:
                text = tok.decode(row.tokens, skip_special_tokens=True)
                stopped = stopped or any(s in text.lstrip() for s in row.stop if s)
                if not stopped and len(row.tokens) < row.limit and row.on_token is not None:
                    self._send(row, held_back(cut_at_stop(text, row.stop), row.stop))
            if stopped or len(row.tokens) >= row.limit:
                row.finish_reason = "stop" if stopped else "length"
                self._finish(row, tok)

    def _leave(self, batch: _Batch) -> list[Row]:
        gone = [r for r in batch.rows if r.text is not None or r.cancelled]
        if gone:
            for r in gone:
                if r.text is None:  # cancelled: what it had
                    r.finish_reason = "cancelled"
                    self._finish(r, batch.tokenizer)
            batch.keep([i for i, r in enumerate(batch.rows) if r.text is None])
        return gone

    def _finish(self, row: Row, tokenizer) -> None:
        row.text = row.visible(tokenizer).strip()
        if row.on_token is not None and not row.cancelled:
            self._send(row, row.text)

    @staticmethod
    def _send(row: Row, text: str) -> None:
        if len(text) > len(row.sent) and text.startswith(row.sent):
            piece, row.sent = text[len(row.sent) :], text
            row.on_token(piece)
