"""Prometheus text exposition of the server's counters and histograms (no client library)."""

from __future__ import annotations

import threading
from collections import defaultdict

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


class _Histogram:
    def __init__(self, buckets):
        self.buckets = buckets
        self.counts = [0] * len(buckets)
        self.total = 0
        self.sum = 0.0

    def observe(self, value: float) -> None:
        for i, edge in enumerate(self.buckets):
            if value <= edge:
                self.counts[i] += 1
        self.total += 1
        self.sum += value

    def lines(self, name: str, labels: str) -> list[str]:
        sep = "," if labels else ""
        out = [
            f'{name}_bucket{{{labels}{sep}le="{edge}"}} {n}'
            for edge, n in zip(self.buckets, self.counts)
        ]
        out.append(f'{name}_bucket{{{labels}{sep}le="+Inf"}} {self.total}')
        tail = f"{{{labels}}}" if labels else ""
        out.append(f"{name}_sum{tail} {self.sum:.6f}")
        out.append(f"{name}_count{tail} {self.total}")
        return out


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


class Metrics:
    def __init__(self):
        self._lock = threading.Lock()
        self.requests: dict[tuple[str, str, int], int] = defaultdict(int)
        self.inputs: dict[tuple[str, str], int] = defaultdict(int)
        self.latency: dict[tuple[str, str], _Histogram] = {}
        self.batch_rows = _Histogram(BATCH_BUCKETS)
        self.batch_requests = _Histogram(BATCH_BUCKETS)
        self.cancelled_rows = 0

    def observe_request(
        self, endpoint: str, task: str, status: int, seconds: float, n_inputs: int
    ) -> None:
        with self._lock:
            self.requests[(endpoint, task, status)] += 1
            self.inputs[(endpoint, task)] += n_inputs
            key = (endpoint, task)
            if key not in self.latency:
                self.latency[key] = _Histogram(LATENCY_BUCKETS)
            self.latency[key].observe(seconds)

    def observe_batch(self, rows: int, requests: int) -> None:
        with self._lock:
            self.batch_rows.observe(rows)
            self.batch_requests.observe(requests)

    def observe_cancelled(self, rows: int) -> None:
        with self._lock:
            self.cancelled_rows += rows

    def render(self, tasks_loaded: int) -> str:
        with self._lock:
            out = [
                "# HELP tunelab_requests_total Requests by endpoint, task and HTTP status.",
                "# TYPE tunelab_requests_total counter",
            ]
            for (ep, task, status), n in sorted(self.requests.items()):
                labels = f'endpoint="{ep}",task="{_escape(task)}",status="{status}"'
                out.append(f"tunelab_requests_total{{{labels}}} {n}")
            out += [
                "# HELP tunelab_inputs_total Inputs (rows) received by endpoint and task.",
                "# TYPE tunelab_inputs_total counter",
            ]
            for (ep, task), n in sorted(self.inputs.items()):
                out.append(f'tunelab_inputs_total{{endpoint="{ep}",task="{_escape(task)}"}} {n}')
            out += [
                "# HELP tunelab_request_seconds Request latency by endpoint and task.",
                "# TYPE tunelab_request_seconds histogram",
            ]
            for (ep, task), hist in sorted(self.latency.items()):
                out += hist.lines(
                    "tunelab_request_seconds", f'endpoint="{ep}",task="{_escape(task)}"'
                )
            out += [
                "# HELP tunelab_batch_rows Inputs per forward batch (all tasks together).",
                "# TYPE tunelab_batch_rows histogram",
                *self.batch_rows.lines("tunelab_batch_rows", ""),
                "# HELP tunelab_batch_requests Requests per forward batch.",
                "# TYPE tunelab_batch_requests histogram",
                *self.batch_requests.lines("tunelab_batch_requests", ""),
                "# HELP tunelab_cancelled_rows_total Streamed rows dropped from decoding because "
                "their client went away.",
                "# TYPE tunelab_cancelled_rows_total counter",
                f"tunelab_cancelled_rows_total {self.cancelled_rows}",
                "# HELP tunelab_tasks_loaded Tasks loaded now.",
                "# TYPE tunelab_tasks_loaded gauge",
                f"tunelab_tasks_loaded {tasks_loaded}",
            ]
        return "\n".join(out) + "\n"
