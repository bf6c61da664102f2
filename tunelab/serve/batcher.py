"""Gathering concurrent requests into mixed-task batches.

Requests wait at most `window_ms` for company, up to `max_batch` inputs; then one worker thread
runs the batch (rows of every task on the shared backbone in one forward pass, see
forward.py). The same single worker also runs generation, artifact loads and unloads, so the
models are never used by two threads at once and the event loop stays free to accept requests.
"""

from __future__ import annotations

import asyncio
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch

from tunelab.errors import TunelabError
from tunelab.evaluate.cli import _record
from tunelab.evaluate.generate import greedy_generate
from tunelab.serve.forward import classify_mixed, task_routing
from tunelab.tasks.encode import Example, encode
from tunelab.tasks.readers import Record


def encode_inputs(entry, inputs: list) -> list[Example]:
    """Token ids of each input's prompt, encoded exactly as `tunelab predict` encodes them.

    An input is a text (a task with one input field) or an object of field -> text.
    """
    task = entry.task
    records = []
    for i, item in enumerate(inputs, start=1):
        if isinstance(item, dict):
            missing = [f for f in task.input_fields if f not in item]
            if missing:
                raise TunelabError(f"input {i}: missing field {missing[0]!r}")
            records.append(Record({k: str(v) for k, v in item.items()}, "input", i))
        else:
            records.append(_record(task, item, i))
    prep = entry.prep
    for i, r in enumerate(records, start=1):
        for k, v in r.fields.items():
            try:
                v.encode("utf-8")
            except UnicodeEncodeError:  # a lone surrogate from a JSON "\ud800" escape
                raise TunelabError(f"input {i}: field {k!r} is not valid Unicode text") from None
    return encode(task, records, prep.tokenizer, prep.demos, prep.max_length)


@dataclass
class _Job:
    entry: object
    examples: list[Example]
    future: asyncio.Future
    queued: float


class Batcher:
    def __init__(self, pad_id: int, window_ms: float = 5.0, max_batch: int = 64, metrics=None):
        self.pad_id = pad_id
        self.window = window_ms / 1000
        self.max_batch = max_batch
        self.metrics = metrics
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="tunelab-model")
        # jobs [(task entry, examples)] -> [(N, C) log-probabilities]; a benchmark swaps in its
        # peer's way of running the same batches
        self.compute = classify_mixed
        self.queue: asyncio.Queue[_Job] | None = None
        self._task: asyncio.Task | None = None

    def start(self) -> None:
        self.queue = asyncio.Queue()
        self._task = asyncio.get_running_loop().create_task(self._loop())

    async def stop(self) -> None:
        """Finish every queued request, then stop the worker."""
        while self.queue is not None and not self.queue.empty():
            await asyncio.sleep(self.window or 0.001)
        if self._task is not None:
            self._task.cancel()
        self.executor.shutdown(wait=True)

    async def run(self, fn, *args):
        """Run `fn` on the model thread (loads, unloads, generation)."""
        return await asyncio.get_running_loop().run_in_executor(self.executor, fn, *args)

    async def classify(self, entry, examples: list[Example]) -> torch.Tensor:
        """(N, C) label log-probabilities, computed in whatever batch the request joins."""
        future = asyncio.get_running_loop().create_future()
        await self.queue.put(_Job(entry, examples, future, time.perf_counter()))
        return await future

    async def generate(self, entry, examples: list[Example], max_tokens: int) -> list[str]:
        task = entry.task

        def work():
            with torch.no_grad(), task_routing(entry):
                return greedy_generate(
                    entry.tuned,
                    examples,
                    entry.backbone.tokenizer,
                    max_tokens,
                    task.generation.stop,
                )

        return await self.run(work)

    async def _gather(self) -> list[_Job]:
        jobs = [await self.queue.get()]
        size = len(jobs[0].examples)
        deadline = time.perf_counter() + self.window
        while size < self.max_batch:
            left = deadline - time.perf_counter()
            if left <= 0 and self.queue.empty():
                break
            try:
                job = await asyncio.wait_for(self.queue.get(), timeout=max(left, 0))
            except (asyncio.TimeoutError, TimeoutError):
                break
            if size + len(job.examples) > self.max_batch:
                await self._requeue_first(job)  # it starts the next batch
                break
            jobs.append(job)
            size += len(job.examples)
        return jobs

    async def _requeue_first(self, job: _Job) -> None:
        rest = []
        while not self.queue.empty():
            rest.append(self.queue.get_nowait())
        for j in [job, *rest]:
            self.queue.put_nowait(j)

    async def _loop(self) -> None:
        while True:
            jobs = await self._gather()
            live = [j for j in jobs if not j.future.done()]  # a client may have gone away
            if not live:
                continue
            try:
                outs = await self.run(
                    self.compute, [(j.entry, j.examples) for j in live], self.pad_id
                )
            except Exception as e:  # one bad batch fails its requests, not the server
                for j in live:
                    if not j.future.done():
                        j.future.set_exception(e)
                continue
            if self.metrics is not None:
                self.metrics.observe_batch(sum(len(j.examples) for j in live), len(live))
            for j, out in zip(live, outs):
                if not j.future.done():
                    j.future.set_result(out)
