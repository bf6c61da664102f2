"""Gathering concurrent requests into mixed-task batches.

Requests wait at most `window_ms` for company, up to `max_batch` inputs; then one worker thread
runs the batch (rows of every task on the shared backbone in the same forward passes, see
forward.py). Generation is batched continuously (continuous.py): while rows decode, new
requests join the decoding batch at the next step and each row leaves as soon as it is done, so
a short request never waits behind a long one; when nothing decodes, the first requests wait
for company the same way. With `continuous = False` a gathered batch of generation requests
decodes to its end before the next starts (decode.py, the static path). The same single worker
also runs artifact loads and unloads, so the models are never used by two threads at once and
the event loop stays free to accept requests.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import torch

from tunelab.serve.continuous import Decoder, Row
from tunelab.serve.decode import generate_mixed
from tunelab.serve.forward import classify_mixed
from tunelab.tasks.encode import Example


def encode_inputs(entry, inputs: list) -> list[Example]:
    """Token ids of each input's prompt, encoded exactly as `tunelab predict` encodes them.

    An input is a text (a task with one input field) or an object of field -> text.
    """
    return entry.model.encode(inputs)


@dataclass
class Generated:
    """One input's generated text, why it ended (stop: EOS or a stop string; length: its
    token limit; cancelled) and the tokens it took (the ending one included). The static path
    (`continuous = False`) knows only the text."""

    text: str
    finish_reason: str | None = None
    tokens: int | None = None


@dataclass(eq=False)
class _Job:
    entry: object
    examples: list[Example]
    future: asyncio.Future
    max_tokens: int | None = None  # generation only
    stop: list[str] | None = None  # generation: stop strings besides the task's own
    on_token: Callable[[str], None] | None = None  # generation: streamed pieces (one input)
    results: list = field(default_factory=list)
    left: int = 0  # rows still decoding


class Batcher:
    def __init__(
        self,
        pad_id: int,
        window_ms: float = 5.0,
        max_batch: int = 64,
        metrics=None,
        continuous: bool = True,
    ):
        self.pad_id = pad_id
        self.window = window_ms / 1000
        self.max_batch = max_batch
        self.metrics = metrics
        # generation: continuous batching (rows join and leave at every step), or static
        # batches that decode to their end (the old way; benchmarks compare the two)
        self.continuous = continuous
        self.decoder = Decoder(pad_id)
        self._decoding = False  # rows admitted and not all finished
        self._generating: set[_Job] = set()  # generation requests not answered yet
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="tunelab-model")
        # jobs [(task entry, examples)] -> [(N, C) log-probabilities]; a benchmark swaps in its
        # peer's way of running the same batches
        self.compute = classify_mixed
        self.queues: dict[str, asyncio.Queue[_Job]] = {}
        self._tasks: list[asyncio.Task] = []

    def start(self) -> None:
        loop = asyncio.get_running_loop()
        self.queues = {"classify": asyncio.Queue(), "generate": asyncio.Queue()}
        self._tasks = [loop.create_task(self._loop(kind)) for kind in self.queues]

    async def stop(self) -> None:
        """Finish every queued request, then stop the worker."""
        while any(not q.empty() for q in self.queues.values()) or self._decoding:
            await asyncio.sleep(self.window or 0.001)
        for t in self._tasks:
            t.cancel()
        self.executor.shutdown(wait=True)

    async def run(self, fn, *args):
        """Run `fn` on the model thread (every use of the models goes through here)."""
        return await asyncio.get_running_loop().run_in_executor(self.executor, fn, *args)

    async def classify(self, entry, examples: list[Example]) -> torch.Tensor:
        """(N, C) label log-probabilities, computed in whatever batch the request joins."""
        future = asyncio.get_running_loop().create_future()
        await self.queues["classify"].put(_Job(entry, examples, future))
        return await future

    async def generate(
        self, entry, examples: list[Example], max_tokens: int, stop: list[str] | None = None
    ) -> list[str]:
        """Greedy continuations, decoded together with other requests' rows of any task, each
        cut at the task's stop strings and at `stop`."""
        return [g.text for g in await self.complete(entry, examples, max_tokens, stop)]

    async def complete(
        self, entry, examples: list[Example], max_tokens: int, stop: list[str] | None = None
    ) -> list[Generated]:
        """As `generate`, with why each text ended and its token count."""
        future = asyncio.get_running_loop().create_future()
        await self._submit(_Job(entry, examples, future, max_tokens, stop))
        return await future

    async def _submit(self, job: _Job) -> None:
        self._generating.add(job)
        job.future.add_done_callback(lambda _: self._generating.discard(job))
        await self.queues["generate"].put(job)

    async def settle(self, entry) -> None:
        """Wait until the generation requests of this task now queued or decoding are
        answered (before it is unloaded: its rows decode step by step between other work)."""
        pending = [j.future for j in self._generating if j.entry is entry]
        if pending:
            await asyncio.wait(pending)

    async def stream(
        self,
        entry,
        example: Example,
        max_tokens: int | None,
        stop: list[str] | None = None,
        ended: list[Generated] | None = None,
    ) -> AsyncIterator[str]:
        """The greedy continuation of one input, piece by piece as it decodes (continuous
        batching), cut at the task's stop strings and at `stop`: the pieces put together are
        what `generate` returns; `ended`, if given, receives the row's Generated once it is
        over. Leaving the iteration early (a client gone) frees the row at the next step."""
        loop = asyncio.get_running_loop()
        pieces: asyncio.Queue = asyncio.Queue()
        end = object()
        future = loop.create_future()
        future.add_done_callback(lambda _: pieces.put_nowait(end))

        def on_token(piece: str) -> None:  # on the model thread
            loop.call_soon_threadsafe(pieces.put_nowait, piece)

        await self._submit(_Job(entry, [example], future, max_tokens, stop, on_token))
        sent = ""
        try:
            while (piece := await pieces.get()) is not end:
                sent += piece
                yield piece
            result = future.result()[0]  # raises what the step raised
            if ended is not None:
                ended.append(result)
            text = result.text
            if len(text) > len(sent) and text.startswith(sent):  # the static path: all at once
                yield text[len(sent) :]
        finally:
            if not future.done():
                future.cancel()  # the row leaves the batch at the next step

    async def _gather(self, queue: asyncio.Queue) -> list[_Job]:
        jobs = [await queue.get()]
        size = len(jobs[0].examples)
        deadline = time.perf_counter() + self.window
        while size < self.max_batch:
            left = deadline - time.perf_counter()
            if left <= 0 and queue.empty():
                break
            try:
                job = await asyncio.wait_for(queue.get(), timeout=max(left, 0))
            except (asyncio.TimeoutError, TimeoutError):
                break
            if size + len(job.examples) > self.max_batch:
                _requeue_first(queue, job)  # it starts the next batch
                break
            jobs.append(job)
            size += len(job.examples)
        return jobs

    async def _loop(self, kind: str) -> None:
        queue = self.queues[kind]
        while True:
            if kind == "generate" and self.continuous:
                await self._decode_steps(queue)
                continue
            jobs = await self._gather(queue)
            live = [j for j in jobs if not j.future.done()]  # a client may have gone away
            if not live:
                continue
            try:
                if kind == "classify":
                    args = [(j.entry, j.examples) for j in live]
                    outs = await self.run(self.compute, args, self.pad_id)
                else:
                    args = [(j.entry, j.examples, _limit(j), j.stop) for j in live]
                    outs = await self.run(generate_mixed, args, self.pad_id)
            except Exception as e:  # one bad batch fails its requests, not the server
                for j in live:
                    if not j.future.done():
                        j.future.set_exception(e)
                continue
            if self.metrics is not None:
                self.metrics.observe_batch(sum(len(j.examples) for j in live), len(live))
            for j, out in zip(live, outs):
                if kind == "generate":
                    out = [Generated(text) for text in out]
                if not j.future.done():
                    j.future.set_result(out)

    async def _decode_steps(self, queue: asyncio.Queue) -> None:
        """Continuous batching: gather the first requests as for any batch, then step the
        decoder until no row is left, admitting queued requests before every step."""
        jobs = await self._gather(queue)
        self._decoding = True
        while True:
            rows = self._admit(jobs)
            if not rows and not len(self.decoder):
                self._decoding = False
                return
            for row in self.decoder.rows:
                row.cancelled = row.cancelled or row.tag[0].future.done()  # a client gone
            try:
                finished = await self.run(self.decoder.step, rows)
            except Exception as e:  # a failed step fails its requests, not the server
                for row in [*rows, *self.decoder.clear()]:
                    if not row.tag[0].future.done():
                        row.tag[0].future.set_exception(e)
                self._decoding = False
                return
            for row in finished:
                job, i = row.tag
                job.results[i] = Generated(row.text, row.finish_reason, len(row.tokens))
                if row.finish_reason == "cancelled" and self.metrics is not None:
                    self.metrics.observe_cancelled(1)
                job.left -= 1
                if job.left == 0 and not job.future.done():
                    job.future.set_result(job.results)
            jobs = []
            room = self.max_batch - len(self.decoder)
            while not queue.empty() and room > 0:
                job = queue.get_nowait()
                if len(job.examples) > room and len(self.decoder):
                    _requeue_first(queue, job)  # it waits for rows to leave
                    break
                jobs.append(job)
                room -= len(job.examples)

    def _admit(self, jobs: list[_Job]) -> list[Row]:
        rows = []
        live = [j for j in jobs if not j.future.done()]  # a client may have gone away
        for job in live:
            if not job.examples:
                job.future.set_result([])
                continue
            stop = list(job.entry.task.generation.stop) + list(job.stop or [])
            job.results, job.left = [""] * len(job.examples), len(job.examples)
            limit = _limit(job)
            for i, ex in enumerate(job.examples):
                rows.append(Row(job.entry, ex, limit, stop, job.on_token, tag=(job, i)))
        if live and self.metrics is not None:
            self.metrics.observe_batch(len(rows), len(live))
        return rows


def _limit(job: _Job) -> int:
    """A generation request's token limit: its own, else its task's."""
    return job.entry.task.generation.max_new_tokens if job.max_tokens is None else job.max_tokens


def _requeue_first(queue: asyncio.Queue, job: _Job) -> None:
    rest = []
    while not queue.empty():
        rest.append(queue.get_nowait())
    for j in [job, *rest]:
        queue.put_nowait(j)
