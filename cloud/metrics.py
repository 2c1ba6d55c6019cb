"""Prometheus metrics of one cloud worker, in a registry of its own.

Every server gets its own `CollectorRegistry` (never prometheus_client's global default
one), so two workers in one process (tests, the simulation harness) do not mix counts and
a second server never fails on a duplicate metric name.

Metric names (all prefixed `splitexit_`):

| name                         | type      | labels        | what                                   |
|------------------------------|-----------|---------------|----------------------------------------|
| requests_total               | counter   | method, code  | finished RPCs by gRPC status name      |
| errors_total                 | counter   | code          | failed requests (non-OK), stream ones too |
| rows_total                   | counter   | model         | rows answered                          |
| batch_rows                   | histogram | model         | rows per batch the tail ran on         |
| queue_rows                   | gauge     |               | rows waiting in the batcher            |
| queue_seconds                | histogram | model         | arrival -> start of the request's batch |
| compute_seconds              | histogram | model         | one batch's compute                    |
| request_seconds              | histogram | method        | whole request inside the worker        |
| duplicate_requests_total     | counter   |               | retries answered from the answer cache |
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest, start_http_server

__all__ = ["Metrics", "StatsSnapshot"]

# Loopback gRPC costs ~0.7 ms; a batch at most a few hundred ms on a CPU.
_LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)


@dataclass(frozen=True)
class StatsSnapshot:
    """Totals since start, for the once-a-minute log line."""

    requests: int
    errors: int
    rows: int
    batches: int
    mean_batch: float
    queue_rows: int


class Metrics:
    """The worker's metrics; `text()` renders them, `serve_http(port)` exposes them."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter("splitexit_requests", "Finished RPCs by method and gRPC status code",
                                ("method", "code"), registry=r)
        self.errors = Counter("splitexit_errors", "Failed requests by gRPC status code", ("code",), registry=r)
        self.rows = Counter("splitexit_rows", "Rows answered", ("model",), registry=r)
        self.batch_rows = Histogram("splitexit_batch_rows", "Rows per batch the tail ran on", ("model",),
                                    buckets=_BATCH_BUCKETS, registry=r)
        self.queue_rows = Gauge("splitexit_queue_rows", "Rows waiting in the batcher", registry=r)
        self.queue_seconds = Histogram("splitexit_queue_seconds", "From arrival to the start of the request's batch",
                                       ("model",), buckets=_LATENCY_BUCKETS, registry=r)
        self.compute_seconds = Histogram("splitexit_compute_seconds", "Compute time of one batch", ("model",),
                                         buckets=_LATENCY_BUCKETS, registry=r)
        self.request_seconds = Histogram("splitexit_request_seconds", "Whole request inside the worker", ("method",),
                                         buckets=_LATENCY_BUCKETS, registry=r)
        self.duplicates = Counter("splitexit_duplicate_requests", "Retried requests (same request id) answered "
                                  "without computing again", registry=r)
        self._http: tuple[Any, threading.Thread] | None = None

    # -- recording -------------------------------------------------------------------------
    def request_done(self, method: str, code: str, seconds: float) -> None:
        self.requests.labels(method, code).inc()
        self.request_seconds.labels(method).observe(seconds)
        if code != "OK":
            self.errors.labels(code).inc()

    def stream_error(self, code: str) -> None:
        """A request inside InferStream failed (the stream itself goes on)."""
        self.errors.labels(code).inc()

    def batch_done(self, model: str, rows: int, compute_s: float) -> None:
        self.batch_rows.labels(model).observe(rows)
        self.compute_seconds.labels(model).observe(compute_s)

    def rows_answered(self, model: str, rows: int, queue_s: float) -> None:
        self.rows.labels(model).inc(rows)
        self.queue_seconds.labels(model).observe(queue_s)

    # -- reading ---------------------------------------------------------------------------
    def text(self) -> str:
        """The Prometheus text exposition of this registry."""
        return generate_latest(self.registry).decode()

    def value(self, name: str, labels: dict[str, str] | None = None) -> float:
        """One sample's value (0 when absent), e.g. value("splitexit_errors_total", {"code": "NOT_FOUND"})."""
        got = self.registry.get_sample_value(name, labels or {})
        return 0.0 if got is None else float(got)

    def _total(self, metric: str) -> float:
        return sum(s.value for m in self.registry.collect() if m.name == metric
                   for s in m.samples if s.name == metric + "_total")

    def snapshot(self) -> StatsSnapshot:
        batches = sum(s.value for m in self.registry.collect() if m.name == "splitexit_batch_rows"
                      for s in m.samples if s.name == "splitexit_batch_rows_count")
        batch_sum = sum(s.value for m in self.registry.collect() if m.name == "splitexit_batch_rows"
                        for s in m.samples if s.name == "splitexit_batch_rows_sum")
        return StatsSnapshot(requests=int(self._total("splitexit_requests")), errors=int(self._total("splitexit_errors")),
                             rows=int(self._total("splitexit_rows")), batches=int(batches),
                             mean_batch=batch_sum / batches if batches else 0.0,
                             queue_rows=int(self.value("splitexit_queue_rows")))

    # -- HTTP ------------------------------------------------------------------------------
    def serve_http(self, port: int, host: str = "0.0.0.0") -> int:
        """Serve /metrics on host:port in a daemon thread; returns the bound port."""
        if self._http is not None:
            raise RuntimeError("metrics are already served")
        server, thread = start_http_server(port, addr=host, registry=self.registry)
        self._http = (server, thread)
        return int(server.server_address[1])

    def close(self) -> None:
        """Stop the HTTP endpoint (if any) and join its thread."""
        if self._http is None:
            return
        server, thread = self._http
        self._http = None
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)
