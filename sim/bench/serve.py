"""`bench serve`: the cloud worker's throughput next to the bare tail it serves.

The reference edge network is exported cut after `--split` with a policy fitted on
validation; the test split's rows that the edge leaves undecided give the features (and
policy state) that the requests carry, as edge agents would send them. The default cut is
BENCH.md's reference tail, "its last two stages": the runs of blocks at the two lowest
resolutions (stages 4..9 and the final head of the ResNet-20, split 3). With `--route
final` (default) each row's next exit is the final head, so the worker skips the tail's
exit heads and computes exactly the bare tail; `--route policy` keeps the edge's state
(rows may then leave early at cloud exits: compare with `runner_sps`).

- `raw_tail_sps`: the bare tail in torch (the plain stages split+1.. and the final head,
  no exits, no policy, no protobuf) on a batch of `--batch` real features, timed in the
  worker's process, in a thread with the worker's torch threads, right before and right
  after the served run (median over both).
- `served_sps`: rows answered per second through gRPC on loopback. `--clients` client
  processes (multiprocessing, spawn: their Python never takes the worker's GIL) each
  keep `--inflight` requests of `--rows` rows in flight on one channel (closed loop), so
  clients x inflight x rows rows are outstanding and the dynamic batcher forms batches
  of `--batch` rows. Counted over a `--duration` window after `--warmup`. `--stream`
  sends the same requests as messages of one InferStream call per client.
- `raw_tail_parallel_sps` (with `--concurrent-batches N` > 1): the bare tail in N threads
  at once, each on its own batch with the worker's compute threads' torch threads: what
  the worker's compute could do at most with its parallelism, and `ratio_to_parallel_tail`
  the served samples/s over that (the strict reading of the ratio).
- `ratio = served_sps / raw_tail_sps`; `p50_ms`/`p99_ms`: per-request latency seen by the
  clients; `batch_hist`: batches by size as the worker reported them (ServerTiming).
- `profile`: where a served batch's time goes, each part timed alone in this process:
  the bare tail, the worker's whole compute call (`ServedModel.run_batch`: decoding the
  requests' features and policy state, exit runner, answers), what the event loop does
  per request (protobuf, header checks) and response building for the batch's requests;
  beside the worker's own compute time per batch and its compute threads' busy share
  while serving (its metrics; summed over the threads, so up to `--concurrent-batches`),
  and CPU time per batch of the worker's process and of the clients while serving (robust
  to other load on the machine, unlike wall time).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch

from splitexit import wire
from splitexit.cli import CliError
from splitexit.codec import CODECS
from splitexit.cloud.batcher import BatcherConfig
from splitexit.cloud.server import SWITCH_INTERVAL_MS, ServerConfig, compute_executor
from splitexit.cloud.requests import ServiceLimits, parse_request
from splitexit.cloud.served import ServedModel, load_models
from splitexit.proto import inference_pb2 as pb
from splitexit.runtime import Pending, RowState
from splitexit.sim.bench.common import BenchContext, add_untrained_argument, log
from splitexit.sim.bench.serving import (SplitBundle, WorkerThread, add_bundle_arguments, last_stages_split,
                                         pending_rows, split_bundle)
from splitexit.sim.loadgen import ClientPlan, ClientReport, LoadError, run_client, run_client_processes

HELP = "cloud worker samples/s through gRPC vs the bare tail in torch (ratio), latency, batch sizes"
REQUESTS_PER_CLIENT = 64  # distinct prebuilt requests each client cycles through
ROUTES = ("final", "policy")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_bundle_arguments(parser, split_default="before the last two ResNet stages, BENCH.md's reference tail")
    parser.add_argument("--route", choices=ROUTES, default="final",
                        help="final: the requests' rows are bound for the final head, so the worker computes exactly "
                             "the bare tail; policy: the edge's own policy state (rows may leave at cloud exits)")
    parser.add_argument("--batch", type=int, default=32, help="the served batch size: the batcher's max rows (default: 32)")
    parser.add_argument("--max-delay-ms", type=float, default=2.0, help="the batcher's max queue delay (default: 2)")
    parser.add_argument("--rows", type=int, default=4, help="rows per request (default: 4)")
    parser.add_argument("--clients", type=int, default=2, help="client processes (default: 2)")
    parser.add_argument("--inflight", type=int, default=16,
                        help="requests in flight per client (default: 16: with 2 clients of 4-row requests, four "
                             "batches outstanding, one computing, one queued behind it and two on their way)")
    parser.add_argument("--stream", action="store_true",
                        help="each client sends its requests on one InferStream call instead of concurrent unary "
                             "Infer calls (same requests in flight)")
    parser.add_argument("--codec", choices=CODECS, default=None,
                        help="the requests' feature codec (default: the bundle's, as an edge agent sends)")
    parser.add_argument("--client-nice", type=int, default=10,
                        help="niceness added to the client processes, so that on a shared machine they take "
                             "CPU from the worker only when it leaves some (default: 10; 0 = equal)")
    parser.add_argument("--switch-interval-ms", type=float, default=SWITCH_INTERVAL_MS,
                        help="the worker process's GIL switch interval, as `splitexit cloud serve` sets it "
                             "(default: %(default)s)")
    parser.add_argument("--server-threads", type=int, default=None,
                        help="torch threads of each of the worker's compute threads (default: torch's default, "
                             "shared out among them)")
    parser.add_argument("--concurrent-batches", type=int, default=1,
                        help="batches the worker computes at once, each on a compute thread of its own "
                             "(`cloud serve --concurrent-batches`; default: %(default)s)")
    parser.add_argument("--duration", type=float, default=0.0, help="measured seconds (default 10, 1.5 with --quick)")
    parser.add_argument("--warmup", type=float, default=-1.0, help="seconds of load before measuring "
                                                                   "(default 2, 0.5 with --quick)")
    add_untrained_argument(parser)
    parser.add_argument("--tail-seconds", type=float, default=0.0,
                        help="seconds of bare-tail timing before and after (default 2, 0.3 with --quick)")


@dataclass(frozen=True)
class Settings:
    batch: int
    max_delay_ms: float
    rows: int
    clients: int
    inflight: int
    server_threads: int | None  # as asked (None: torch's default)
    concurrent_batches: int  # the worker's compute threads
    switch_interval_ms: float  # sys.setswitchinterval in the bench process, where the worker runs
    client_nice: int
    stream: bool  # InferStream (one per client) instead of unary Infer calls
    codec: str | None  # the requests' feature codec; None = the bundle's
    duration_s: float
    warmup_s: float
    tail_s: float

    @classmethod
    def from_args(cls, args: argparse.Namespace, quick: bool) -> "Settings":
        s = cls(batch=args.batch, max_delay_ms=args.max_delay_ms, rows=args.rows, clients=args.clients,
                inflight=args.inflight, server_threads=args.server_threads, concurrent_batches=args.concurrent_batches,
                switch_interval_ms=args.switch_interval_ms, client_nice=args.client_nice, stream=args.stream,
                codec=args.codec,
                duration_s=args.duration or (1.5 if quick else 10.0),
                warmup_s=args.warmup if args.warmup >= 0 else (0.5 if quick else 2.0),
                tail_s=args.tail_seconds or (0.3 if quick else 2.0))
        for name in ("batch", "rows", "clients", "inflight", "concurrent_batches"):
            if getattr(s, name) < 1:
                raise CliError(f"--{name.replace('_', '-')} must be >= 1")
        if not 0 <= s.client_nice <= 19:
            raise CliError("--client-nice must be in 0..19")
        if s.server_threads is not None and s.server_threads < 1:
            raise CliError("--server-threads must be >= 1")
        if s.switch_interval_ms <= 0:
            raise CliError("--switch-interval-ms must be > 0")
        if s.rows > s.batch:
            raise CliError(f"--rows {s.rows} exceeds --batch {s.batch}: a request is never split across batches")
        if s.duration_s <= 0 or s.tail_s <= 0:
            raise CliError("--duration and --tail-seconds must be > 0")
        return s

    @property
    def outstanding_rows(self) -> int:
        return self.clients * self.inflight * self.rows


# --- timing helpers ---------------------------------------------------------------------
@dataclass(frozen=True)
class Timing:
    """Repeated calls of one function: wall seconds per call, and this process's CPU
    seconds per call (every thread: torch's intra-op threads too)."""

    wall_s: tuple[float, ...]
    cpu_s: float

    @property
    def median_s(self) -> float:
        return statistics.median(self.wall_s)

    def joined(self, other: "Timing") -> "Timing":
        n, m = len(self.wall_s), len(other.wall_s)
        return Timing(self.wall_s + other.wall_s, (self.cpu_s * n + other.cpu_s * m) / (n + m))


def _parallel_sps(executor: ThreadPoolExecutor, threads: int, tail: Callable[[], object], rows: int,
                  seconds: float) -> float:
    """Rows per second of `tail` (on `rows` rows) run in `threads` threads of `executor` at
    once, over about `seconds`."""
    start = threading.Barrier(threads)

    def loop() -> tuple[int, float, float]:
        tail()
        start.wait()
        t0 = time.perf_counter()
        calls = 0
        while calls < 3 or time.perf_counter() - t0 < seconds:
            tail()
            calls += 1
        return calls, t0, time.perf_counter()

    runs = [f.result() for f in [executor.submit(loop) for _ in range(threads)]]
    return sum(calls for calls, _, _ in runs) * rows / (max(t1 for _, _, t1 in runs) - min(t0 for _, t0, _ in runs))


def _timed(fn: Callable[[], object], seconds: float, *, min_calls: int = 5) -> Timing:
    """`fn` repeated for about `seconds` (after two warm-up calls)."""
    fn(), fn()
    times: list[float] = []
    cpu0 = time.process_time()
    ends = time.perf_counter() + seconds
    while len(times) < min_calls or time.perf_counter() < ends:
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return Timing(tuple(times), (time.process_time() - cpu0) / len(times))


def bare_tail(served: ServedModel) -> Callable[[torch.Tensor], torch.Tensor]:
    """The worker's own tail modules, called plainly: stages split+1.. and the final head."""
    model, split = served.bundle.model, served.bundle.split
    stages = list(model.stages)[split + 1:]

    def tail(x: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            for stage in stages:
                x = stage(x)
            return model.head(x)

    return tail


def to_final_head(pending: Pending, bundle: SplitBundle) -> Pending:
    """The same rows with their policy's next exit set to the final head: the worker then
    skips the cloud-side exit heads (as for a policy that skips heads) and runs the plain
    stages and the final head, the bare tail's work."""
    final = len(bundle.edge().manifest.exits) - 1  # ladder index of the final head
    state = replace(pending.state, next_exit=np.full_like(pending.state.next_exit, final))
    return Pending(pending.rows, pending.feature, state)


def _rows(pending: Pending, index: np.ndarray) -> tuple[torch.Tensor, RowState]:
    return pending.feature[torch.from_numpy(index)], pending.state.take(index)


def build_requests(edge_bundle: Any, pending: Pending, *, rows: int, count: int, prefix: str,
                   codec: str | None = None) -> list[pb.InferRequest]:
    """`count` requests of `rows` pending rows each (cycling through them), as an edge agent
    builds them (`wire.build_request`: feature in `codec`, policy state, edge exit infos)."""
    m = len(pending.rows)
    out = []
    for j in range(count):
        index = (np.arange(rows) + j * rows) % m
        feature, state = _rows(pending, index)
        out.append(wire.build_request(edge_bundle, feature, state, [f"{prefix}{j}-{r}" for r in range(rows)],
                                      request_id=f"{prefix}{j}", codec=codec))
    return out


# --- the served run ---------------------------------------------------------------------
@dataclass(frozen=True)
class MetricsPoint:
    """The worker's metrics and this (the worker's) process's CPU time at one moment."""

    compute_s: float
    batches: float
    batch_rows: float
    cpu_s: float


def _metrics_point(worker: WorkerThread, model: str) -> MetricsPoint:
    m = worker.server.metrics
    labels = {"model": model}
    return MetricsPoint(m.value("splitexit_compute_seconds_sum", labels), m.value("splitexit_batch_rows_count", labels),
                        m.value("splitexit_batch_rows_sum", labels), time.process_time())


@dataclass(frozen=True)
class ServedRun:
    reports: list[ClientReport]
    before: MetricsPoint  # the worker's metrics at the window's start and end
    after: MetricsPoint
    window_s: float


def served_run(worker: WorkerThread, model: str, payloads: Sequence[Sequence[bytes]], s: Settings) -> ServedRun:
    """Start the client processes, open the window once all are connected, collect."""
    plans = [ClientPlan(worker.address, tuple(payloads[c]), s.inflight, nice=s.client_nice, stream=s.stream)
             for c in range(s.clients)]
    try:
        reports, (before, after) = run_client_processes(run_client, plans, warmup_s=s.warmup_s,
                                                        duration_s=s.duration_s,
                                                        during=lambda: _metrics_point(worker, model))
    except LoadError as exc:
        raise CliError(str(exc)) from None
    return ServedRun(reports, before, after, s.duration_s)


# --- the benchmark ----------------------------------------------------------------------
def _ms(seconds: float) -> float:
    return round(1e3 * seconds, 4)


def run(ctx: BenchContext, args: argparse.Namespace) -> dict:
    s = Settings.from_args(args, ctx.quick)
    with tempfile.TemporaryDirectory(prefix="splitexit-serve-") as tmp:
        bundle = split_bundle(ctx, Path(tmp), split=args.split, policy=args.policy, budget=args.budget,
                              default=last_stages_split)
        # the tail's size, beside its speed: BENCH.md's reference point is a tail's samples/s
        extra = {**bundle.summary(), "route": args.route,
                 "tail_macs": ctx.costs(bundle.trained).cloud_macs(bundle.split)}
        pending = pending_rows(bundle, ctx.dataset.test)
        if args.route == "final":
            pending = to_final_head(pending, bundle)
        result = measure(bundle.path, pending, s, extra=extra)
    plot(ctx, result)
    return result


def measure(bundle_path: Path, pending: Pending, s: Settings, *, extra: dict | None = None) -> dict:
    """The whole measurement for one bundle and the pending rows its requests carry (also
    usable on any bundle, e.g. an untrained network of the reference architecture)."""
    from splitexit.bundle import load_bundle

    edge_bundle = load_bundle(bundle_path, "edge")
    models = load_models([bundle_path])
    served = next(iter(models.values()))
    config = ServerConfig(host="127.0.0.1", port=0, drain_grace_s=1.0, compute_threads=s.server_threads,
                          max_request_rows=max(256, s.rows),
                          batching=BatcherConfig(max_batch=s.batch, max_queue_delay_ms=s.max_delay_ms,
                                                 concurrent_batches=s.concurrent_batches))
    limits = ServiceLimits(max_request_rows=config.max_request_rows)
    per_batch = max(1, s.batch // s.rows)  # requests in one served batch
    requests = build_requests(edge_bundle, pending, rows=s.rows, count=s.clients * REQUESTS_PER_CLIENT, prefix="r",
                              codec=s.codec)
    payloads = [[r.SerializeToString() for r in requests[c * REQUESTS_PER_CLIENT:(c + 1) * REQUESTS_PER_CLIENT]]
                for c in range(s.clients)]
    x = pending.feature[torch.arange(s.batch) % len(pending.rows)].contiguous()
    tail = bare_tail(served)
    log(f"served batch {s.batch}: {s.clients} client processes x {s.inflight} in flight x {s.rows} rows"
        f"{' on one stream each' if s.stream else ''} "
        f"= {s.outstanding_rows} rows outstanding; tail = stages {served.bundle.split + 1}.."
        f"{served.bundle.model.num_stages - 1} + head")
    switch_interval = sys.getswitchinterval()
    sys.setswitchinterval(s.switch_interval_ms / 1000)  # as `splitexit cloud serve` runs the worker
    try:
        with WorkerThread(config, models) as worker, \
                compute_executor(config, "bench-compute") as compute:
            threads = compute.submit(torch.get_num_threads).result()
            # in-process parts of a served batch, each alone (the worker is idle meanwhile)
            # what the event loop does per request (headers; bodies decode in run_batch, as served)
            parse_t = _timed(lambda: [parse_request(pb.InferRequest.FromString(p), models, limits, defer_decode=True)
                                      for p in payloads[0][:per_batch]], s.tail_s)
            parsed = [parse_request(r, models, limits, defer_decode=True) for r in requests[:per_batch]]
            run_batch_t = compute.submit(_timed, lambda: served.run_batch(parsed), s.tail_s).result()
            answers = served.run_batch(parsed)
            respond_t = _timed(lambda: [_response(p.request_id, a).SerializeToString() for p, a in zip(parsed, answers)],
                               s.tail_s)
            before = compute.submit(_timed, lambda: tail(x), s.tail_s).result()
            log(f"bare tail before: {s.batch / before.median_s:.0f} samples/s ({threads} torch threads)")
            served_r = served_run(worker, served.name, payloads, s)
            # every send has an id of its own: none may be answered from the worker's answer cache
            duplicates = int(worker.server.metrics.value("splitexit_duplicate_requests_total"))
            after = compute.submit(_timed, lambda: tail(x), s.tail_s).result()
            log(f"bare tail after: {s.batch / after.median_s:.0f} samples/s")
            parallel = None
            if s.concurrent_batches > 1:
                parallel = _parallel_sps(compute, s.concurrent_batches, lambda: tail(x), s.batch, 2 * s.tail_s)
                log(f"bare tail in {s.concurrent_batches} threads at once: {parallel:.0f} samples/s")
    finally:
        sys.setswitchinterval(switch_interval)
    parts = Parts(tail=before.joined(after), run_batch=run_batch_t, parse=parse_t, respond=respond_t)
    return _report(s, served_r, parts, before, after, threads, parallel,
                   {**(extra or {}), "answered_from_cache": duplicates, "codec": s.codec or edge_bundle.codec})


@dataclass(frozen=True)
class Parts:
    """A served batch's parts, each timed alone in the worker's process."""

    tail: Timing  # the bare tail on the batch
    run_batch: Timing  # the worker's compute call for the batch's requests (bodies decoded in it)
    parse: Timing  # the batch's requests on the event loop: protobuf and header checks
    respond: Timing  # the batch's responses: built and serialized


def _response(request_id: str, rows: Any) -> pb.InferResponse:
    """What the servicer answers a request with (timing fields filled like it does)."""
    response = pb.InferResponse(request_id=request_id, worker_id="bench",
                                timing=pb.ServerTiming(queue_ms=1.0, compute_ms=1.0, batch_size=32))
    response.rows.extend(rows)
    return response


def _merge(dicts: Sequence[dict[Any, int]]) -> dict[Any, int]:
    out: dict[Any, int] = {}
    for d in dicts:
        for k, n in d.items():
            out[k] = out.get(k, 0) + n
    return out


def _report(s: Settings, r: ServedRun, parts: Parts, before: Timing, after: Timing, threads: int,
            parallel_sps: float | None, extra: dict) -> dict:
    raw_tail_sps = s.batch / parts.tail.median_s
    rows = sum(c.rows for c in r.reports)
    served_sps = rows / r.window_s
    latencies = np.array([v for c in r.reports for v in c.latencies_ms]) if rows else np.zeros(1)
    batch_rows = _merge([c.batch_rows for c in r.reports])
    errors = _merge([c.errors for c in r.reports])
    batches = r.after.batches - r.before.batches
    compute_s = r.after.compute_s - r.before.compute_s
    # CPU per batch of `batch` rows: robust to other load on the machine, unlike wall time
    full_batches = rows / s.batch if rows else float("nan")
    profile: dict[str, Any] = {
        "tail_ms": _ms(parts.tail.median_s),
        "run_batch_ms": _ms(parts.run_batch.median_s),
        "parse_ms": _ms(parts.parse.median_s),
        "respond_ms": _ms(parts.respond.median_s),
        "requests_per_batch": max(1, s.batch // s.rows),
        "served_ms_per_batch": round(1e3 * s.batch / served_sps, 4) if served_sps else None,
        "serving_compute_ms": round(1e3 * compute_s / batches, 4) if batches else None,
        "compute_busy": round(compute_s / r.window_s, 4),
        "cpu_ms": {
            "tail": _ms(parts.tail.cpu_s), "run_batch": _ms(parts.run_batch.cpu_s), "parse": _ms(parts.parse.cpu_s),
            "respond": _ms(parts.respond.cpu_s),
            "worker_serving": _ms((r.after.cpu_s - r.before.cpu_s) / full_batches),
            "clients_serving": _ms(sum(c.cpu_s for c in r.reports) / full_batches),
        },
        "note": "per batch of `batch` rows. *_ms: wall, each part timed alone with the worker idle; "
                "serving_compute_ms and compute_busy: the worker's compute threads while serving (its metrics; "
                "busy summed over the threads); "
                "cpu_ms: CPU time of the worker's process (all threads) per batch, alone and while serving, "
                "and of the client processes while serving",
    }
    result = {
        **extra,
        "settings": {**asdict(s), "server_threads_effective": threads, "outstanding_rows": s.outstanding_rows,
                     "client_kind": "processes (multiprocessing spawn), one grpc.aio channel each, closed loop"},
        "raw_tail_kind": "stages split+1.. + final head in torch (no exits, no policy), the worker's own modules",
        "raw_tail_sps": round(raw_tail_sps, 1),
        "raw_tail_sps_before": round(s.batch / before.median_s, 1),
        "raw_tail_sps_after": round(s.batch / after.median_s, 1),
        "runner_sps": round(s.batch / parts.run_batch.median_s, 1),
        "served_sps": round(served_sps, 1),
        "ratio": round(served_sps / raw_tail_sps, 4),
        **({"raw_tail_parallel_sps": round(parallel_sps, 1),
            "ratio_to_parallel_tail": round(served_sps / parallel_sps, 4)} if parallel_sps else {}),
        "ratio_to_runner": round(served_sps * parts.run_batch.median_s / s.batch, 4),
        "p50_ms": round(float(np.percentile(latencies, 50)), 3),
        "p99_ms": round(float(np.percentile(latencies, 99)), 3),
        "mean_ms": round(float(latencies.mean()), 3),
        "requests": sum(c.requests for c in r.reports),
        "rows": rows,
        "errors": errors,
        # batches by size, from each answered row's ServerTiming.batch_size (rows / size)
        "batch_hist": {str(b): round(n / b, 1) for b, n in sorted(batch_rows.items())},
        "batch_rows_share": {str(b): round(n / rows, 4) for b, n in sorted(batch_rows.items())} if rows else {},
        "mean_batch_rows": round((r.after.batch_rows - r.before.batch_rows) / batches, 2) if batches else None,
        "profile": profile,
    }
    cpu = profile["cpu_ms"]
    vs_parallel = f"; vs the bare tail in parallel: {served_sps / parallel_sps:.3f}" if parallel_sps else ""
    log(f"served {served_sps:.0f} samples/s vs bare tail {raw_tail_sps:.0f}: ratio {result['ratio']:.3f} "
        f"(vs the worker's own compute call {result['runner_sps']:.0f}/s: {result['ratio_to_runner']:.3f}"
        f"{vs_parallel}); "
        f"latency p50 {result['p50_ms']:.1f} ms, p99 {result['p99_ms']:.1f} ms; mean batch {result['mean_batch_rows']}")
    log(f"per batch of {s.batch}, alone: tail {profile['tail_ms']:.3f} ms, run_batch {profile['run_batch_ms']:.3f}, "
        f"parse {profile['parse_ms']:.3f}, respond {profile['respond_ms']:.3f}; served: "
        f"{profile['served_ms_per_batch']} ms, worker compute {profile['serving_compute_ms']} ms (busy "
        f"{profile['compute_busy']:.2f})")
    log(f"CPU ms per batch: tail {cpu['tail']:.3f}, run_batch {cpu['run_batch']:.3f}, parse {cpu['parse']:.3f}; "
        f"while serving: worker {cpu['worker_serving']:.3f}, clients {cpu['clients_serving']:.3f}")
    if errors:
        log(f"WARNING: errors {errors}")
    return result


def plot(ctx: BenchContext, result: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    names = ["bare tail", "worker compute call", "served (gRPC)"]
    values = [result["raw_tail_sps"], result["runner_sps"], result["served_sps"]]
    ax1.bar(names, values, color=["tab:gray", "tab:blue", "tab:green"])
    ax1.set_ylabel("samples / s")
    s = result["settings"]
    ax1.set_title(f"batch {s['batch']}: ratio {result['ratio']:.2f}, p50 {result['p50_ms']:.1f} ms, "
                  f"p99 {result['p99_ms']:.1f} ms", fontsize=9)
    sizes = sorted(result["batch_hist"], key=int)
    ax2.bar(sizes, [result["batch_hist"][b] for b in sizes], color="tab:green")
    ax2.set_xlabel("rows per batch")
    ax2.set_ylabel("batches")
    ax2.set_title(f"{s['clients']} clients x {s['inflight']} in flight x {s['rows']} rows", fontsize=9)
    fig.tight_layout()
    fig.savefig(ctx.out / "serve.png", dpi=120)
    plt.close(fig)
