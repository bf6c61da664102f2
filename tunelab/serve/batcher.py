"""Gathering concurrent requests into mixed-task batches.

Requests wait at most `window_ms` for company, up to `max_batch` inputs; then one worker thread
runs the batch (rows of every task on the shared backbone in the same forward passes, see
forward.py; generation requests gather the same way, see decode.py). The same single worker
also runs artifact loads and unloads, so the models are never used by two threads at once and
the event loop stays free to accept requests.
"""

from __future__ import annotations

import asyncio
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch

from tunelab.serve.decode import generate_mixed
from tunelab.serve.forward import classify_mixed
from tunelab.tasks.encode import Example


def encode_inputs(entry, inputs: list) -> list[Example]:
    """Token ids of each input's prompt, encoded exactly as `tunelab predict` encodes them.

    An input is a text (a task with one input field) or an object of field -> text.
    """
    return entry.model.encode(inputs)


@dataclass
class _Job:
    entry: object
    examples: list[Example]
    future: asyncio.Future
    max_tokens: int | None = None  # generation only


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
        self.queues: dict[str, asyncio.Queue[_Job]] = {}
        self._tasks: list[asyncio.Task] = []

    def start(self) -> None:
        loop = asyncio.get_running_loop()
        self.queues = {"classify": asyncio.Queue(), "generate": asyncio.Queue()}
        self._tasks = [loop.create_task(self._loop(kind)) for kind in self.queues]

    async def stop(self) -> None:
        """Finish every queued request, then stop the worker."""
        while any(not q.empty() for q in self.queues.values()):
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

    async def generate(self, entry, examples: list[Example], max_tokens: int) -> list[str]:
        """Greedy continuations, decoded together with other requests' rows of any task."""
        future = asyncio.get_running_loop().create_future()
        await self.queues["generate"].put(_Job(entry, examples, future, max_tokens))
        return await future

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
            jobs = await self._gather(queue)
            live = [j for j in jobs if not j.future.done()]  # a client may have gone away
            if not live:
                continue
            try:
                if kind == "classify":
                    args = [(j.entry, j.examples) for j in live]
                    outs = await self.run(self.compute, args, self.pad_id)
                else:
                    args = [(j.entry, j.examples, j.max_tokens) for j in live]
                    outs = await self.run(generate_mixed, args, self.pad_id)
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


def _requeue_first(queue: asyncio.Queue, job: _Job) -> None:
    rest = []
    while not queue.empty():
        rest.append(queue.get_nowait())
    for j in [job, *rest]:
        queue.put_nowait(j)
