"""Overload of one cloud worker: open-loop load at k times its capacity (issue 21).

The worker is a `splitexit cloud serve` process at normal priority. Its capacity is
measured first: closed-loop clients keep enough requests in flight to keep it busy, and
capacity is the rows/s it answers. Then, for each factor k, open-loop client processes
send Poisson arrivals at k x capacity (in requests of `rows` rows, each with a gRPC
deadline of `timeout_s`, as edge devices would: a request goes out whether or not the
earlier ones were answered). Clients run on the same cores as the worker, at a lower
priority (`nice`); their CPU share is reported, and so is how far behind schedule they
fell (a client starved of CPU offers less than k x).

Per factor: `reject_p99_ms` (time to a RESOURCE_EXHAUSTED answer), `accepted_p99_ms` (time
to an OK answer), `goodput` (rows answered OK per second over the capacity), the outcome
of every request by status, what the worker's own metrics counted (`worker_codes`: every
request the worker saw ends under a code there, CANCELLED included), and the worker's
resident memory (VmRSS) and peak (VmHWM) before and after.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from splitexit.sim.bench.common import free_port, log
from splitexit.sim.loadgen import (ClientPlan, ClientReport, OpenLoopPlan, OpenLoopReport, run_client,
                                  run_client_processes, run_open_client)

__all__ = ["OverloadSettings", "measure_overload"]


@dataclass(frozen=True)
class OverloadSettings:
    factors: tuple[float, ...] = (3.0, 8.0)
    rows: int = 4  # rows per request
    clients: int = 2  # client processes
    duration_s: float = 10.0  # measured window per load level
    warmup_s: float = 1.0  # load before the window opens
    timeout_s: float = 1.0  # each request's gRPC deadline
    client_nice: int = 19  # the clients stand for remote devices: the worker comes first
    # rows kept in flight (all clients together) while capacity is measured: a few batches,
    # enough to keep the compute busy without ever being refused
    capacity_rows: int = 128
    worker_threads: int | None = None  # the worker's --threads (None: torch's default)
    worker_args: tuple[str, ...] = ()  # more `cloud serve` options


class _Worker:
    """`splitexit cloud serve` in a process of its own, with its metrics on HTTP."""

    def __init__(self, bundle: Path, metrics_port: int, threads: int | None, extra: Sequence[str] = ()) -> None:
        self.metrics_port = metrics_port
        extra = [*([] if threads is None else ["--threads", str(threads)]), *extra]
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "splitexit.cli", "cloud", "serve", str(bundle), "--host", "127.0.0.1",
             "--port", "0", "--no-advertise", "--grace", "1", "--metrics-port", str(metrics_port), *extra],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if " on " not in line:
            self.stop()
            raise RuntimeError(f"the worker did not start: {line.strip()} {self.proc.stderr.read()[-2000:] if self.proc.stderr else ''}")
        self.address = line.split(" on ", 1)[1].split()[0]
        # keep reading its output so that a full pipe never blocks it
        self._readers = [threading.Thread(target=_drain, args=(stream,), daemon=True)
                         for stream in (self.proc.stdout, self.proc.stderr)]
        for reader in self._readers:
            reader.start()

    def memory_mb(self) -> dict[str, float]:
        fields = {}
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            name, _, value = line.partition(":")
            if name in ("VmRSS", "VmHWM"):
                fields[name] = round(int(value.split()[0]) / 1024, 1)
        return {"rss_mb": fields["VmRSS"], "peak_rss_mb": fields["VmHWM"]}

    def cpu_s(self) -> float:
        stat = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(stat[11]) + int(stat[12])) / os.sysconf("SC_CLK_TCK")

    def counts(self) -> dict[str, float]:
        """From the worker's metrics: splitexit_requests_total for Infer by code (keyed by
        the code's name), and its batches' count, rows and compute seconds."""
        from prometheus_client.parser import text_string_to_metric_families

        text = urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=10).read().decode()
        out: dict[str, float] = {}
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                if sample.name == "splitexit_requests_total" and sample.labels.get("method") == "Infer":
                    out[sample.labels["code"]] = sample.value
                elif sample.name in ("splitexit_batch_rows_count", "splitexit_batch_rows_sum",
                                     "splitexit_compute_seconds_sum"):
                    out[sample.name] = out.get(sample.name, 0.0) + sample.value
        return out

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        for reader in getattr(self, "_readers", ()):
            reader.join(5)
        for stream in (self.proc.stdout, self.proc.stderr):
            if stream is not None:
                stream.close()


def _drain(stream: Any) -> None:
    for _ in stream:
        pass


def _p(values: Sequence[float], q: float) -> float | None:
    return round(float(np.percentile(values, q)), 2) if values else None


def measure_overload(bundle: Path, payloads: Sequence[bytes], s: OverloadSettings) -> dict[str, Any]:
    """Capacity, then each factor of it; `payloads`: serialized InferRequests of `s.rows` rows."""
    cores = os.cpu_count() or 1
    per_client = [tuple(payloads[c::s.clients]) for c in range(s.clients)]
    worker = _Worker(bundle, free_port(), s.worker_threads, s.worker_args)
    try:
        point = lambda: (time.monotonic(), worker.cpu_s(), worker.counts())  # noqa: E731
        inflight = max(1, s.capacity_rows // (s.rows * s.clients))
        plans = [ClientPlan(worker.address, p, inflight, timeout_s=30.0, nice=s.client_nice) for p in per_client]
        reports, _ = run_client_processes(run_client, plans, warmup_s=s.warmup_s, duration_s=s.duration_s)
        closed: list[ClientReport] = reports
        capacity = sum(r.rows for r in closed) / s.duration_s
        latencies = [x for r in closed for x in r.latencies_ms]
        refused = sum(r.errors.get("RESOURCE_EXHAUSTED", 0) for r in closed)
        log(f"overload: capacity {capacity:.0f} rows/s ({s.clients} closed-loop clients x {inflight} "
            f"in flight x {s.rows} rows; p50 {_p(latencies, 50)} ms; {refused} refused)")
        result: dict[str, Any] = {"capacity_rows_s": round(capacity, 1), "rows_per_request": s.rows,
                                  "timeout_ms": 1e3 * s.timeout_s, "capacity_p50_ms": _p(latencies, 50),
                                  "capacity_refused": refused,
                                  "memory_before": worker.memory_mb()}
        for k in s.factors:
            rate = k * capacity / s.rows / s.clients  # requests/s per client
            open_plans = [OpenLoopPlan(worker.address, p, rate, s.rows, timeout_s=s.timeout_s, nice=s.client_nice,
                                       seed=c) for c, p in enumerate(per_client)]
            opened: list[OpenLoopReport]
            opened, (first, last) = run_client_processes(run_open_client, open_plans, warmup_s=s.warmup_s,
                                                                duration_s=s.duration_s, during=point)
            time.sleep(s.timeout_s + 0.5)  # the window's last requests end (or expire) at the worker too
            after = worker.counts()
            delta = {c: after.get(c, 0.0) - first[2].get(c, 0.0) for c in after}
            batches = delta.pop("splitexit_batch_rows_count", 0.0)
            batch_rows, compute_s = delta.pop("splitexit_batch_rows_sum", 0.0), delta.pop("splitexit_compute_seconds_sum", 0.0)
            worker_codes = {c: int(n) for c, n in delta.items() if n}
            by_code: dict[str, list[float]] = {}
            for r in opened:
                for code, v in r.latencies_ms.items():
                    by_code.setdefault(code, []).extend(v)
            sent = sum(r.sent for r in opened)
            rows_ok = sum(r.rows_ok for r in opened)
            entry = {
                "offered_rows_s": round(sent * s.rows / s.duration_s, 1),
                "offered_factor": round(sent * s.rows / s.duration_s / capacity, 2),
                "sent": sent, "codes": {c: len(v) for c, v in sorted(by_code.items())},
                "reject_p50_ms": _p(by_code.get("RESOURCE_EXHAUSTED", []), 50),
                "reject_p99_ms": _p(by_code.get("RESOURCE_EXHAUSTED", []), 99),
                "accepted_p50_ms": _p(by_code.get("OK", []), 50),
                "accepted_p99_ms": _p(by_code.get("OK", []), 99),
                "goodput": round(rows_ok / s.duration_s / capacity, 3),
                "cancelled": worker_codes.get("CANCELLED", 0),
                "worker_codes": worker_codes,
                "client_behind_ms": round(1e3 * max(r.behind_s for r in opened), 1),
                "client_cpu_share": round(sum(r.cpu_s for r in opened) / (s.duration_s * cores), 3),
                "worker_cpu_share": round((last[1] - first[1]) / ((last[0] - first[0]) * cores), 3),
                "memory_after": worker.memory_mb(),
                # the worker's batches over the window and its drain: how full, how long, how busy
                "batch_mean_rows": round(batch_rows / batches, 1) if batches else None,
                "batch_mean_ms": round(1e3 * compute_s / batches, 2) if batches else None,
                "compute_busy": round(compute_s / (s.duration_s + s.timeout_s + 0.5), 3),
            }
            log(f"overload {k:g}x: offered {entry['offered_factor']}x, goodput {entry['goodput']}, "
                f"rejections p99 {entry['reject_p99_ms']} ms, accepted p99 {entry['accepted_p99_ms']} ms, "
                f"codes {entry['codes']}, worker {worker_codes}, clients' CPU {entry['client_cpu_share']}, batches of "
                f"{entry['batch_mean_rows']} rows in {entry['batch_mean_ms']} ms, compute busy {entry['compute_busy']}")
            result[f"{k:g}x"] = entry
        return result
    finally:
        worker.stop()
