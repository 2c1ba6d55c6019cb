"""A closed-loop load generator for a cloud worker, one client per process.

Each client process opens one gRPC channel and keeps `inflight` prebuilt, serialized
InferRequests in flight (a new one goes out as soon as one is answered): as concurrent
unary Infer calls, or (`stream=True`) as messages of one InferStream call. Requests are sent
as bytes and answers parsed only for their row count and ServerTiming, so a client spends
as little CPU as it can. Every send carries a request id of its own (the worker answers a
repeated id from its answer cache, which would measure the cache, not the tail). It imports grpc and protobuf but never torch, so a spawned client
starts quickly, and, being a process, its Python never takes the worker's GIL.

All clients start together: each connects and sends one request, then waits on a barrier
shared with the parent; the parent then publishes the measurement window (wall-clock
times) and sets `go`, and every client records the requests that complete inside it.
"""

from __future__ import annotations

import asyncio
import os
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

__all__ = ["ClientPlan", "ClientReport", "INFER_METHOD", "LoadError", "OpenLoopPlan", "OpenLoopReport",
           "STREAM_METHOD", "run_client", "run_client_processes", "run_open_client"]

INFER_METHOD = "/splitexit.v1.SplitInference/Infer"
STREAM_METHOD = "/splitexit.v1.SplitInference/InferStream"
_SYNC_TIMEOUT_S = 300.0  # a client whose parent is gone must not wait forever


@dataclass(frozen=True)
class ClientPlan:
    address: str
    payloads: tuple[bytes, ...]  # serialized InferRequests, sent round-robin
    inflight: int  # requests this client keeps outstanding
    timeout_s: float = 30.0
    max_message_bytes: int = 64 * 1024 * 1024
    # added to the client process's niceness: loopback clients stand for remote edge
    # devices, so they should not take CPU time from the worker they measure
    nice: int = 0
    # False: `inflight` concurrent unary Infer calls; True: one InferStream call per client
    # with `inflight` requests outstanding on it
    stream: bool = False

    def __post_init__(self) -> None:
        if not self.payloads:
            raise ValueError("a client needs at least one request to send")
        if self.inflight < 1:
            raise ValueError(f"inflight must be >= 1, got {self.inflight}")


@dataclass(frozen=True)
class ClientReport:
    """What one client saw inside the window."""

    latencies_ms: tuple[float, ...]  # per request completed inside the window
    rows: int  # rows answered inside the window
    requests: int
    errors: dict[str, int] = field(default_factory=dict)  # status name -> count (whole run)
    batch_rows: dict[int, int] = field(default_factory=dict)  # served batch size -> rows served in one
    cpu_s: float = 0.0  # this client process's CPU time inside the window


def with_request_id(payload: bytes, request_id: str) -> bytes:
    """A serialized InferRequest with its request_id replaced: protobuf keeps the last
    value of a scalar field that appears twice, so appending field 1 (tag 0x0a, a
    length-delimited string) is a valid re-encoding, without parsing the message."""
    data = request_id.encode()
    if len(data) > 127:  # one-byte varint length
        raise ValueError("request id too long")
    return payload + bytes((0x0A, len(data))) + data


async def _client(plan: ClientPlan, barrier: Any, go: Any, window: Any) -> ClientReport:
    import grpc

    options = [("grpc.max_send_message_length", plan.max_message_bytes),
               ("grpc.max_receive_message_length", plan.max_message_bytes)]
    loop = asyncio.get_running_loop()
    async with grpc.aio.insecure_channel(plan.address, options=options) as channel:
        # bytes in, bytes out: no per-call protobuf serialization on the client
        infer: Any = channel.unary_unary(INFER_METHOD, request_serializer=None, response_deserializer=None)
        await infer(plan.payloads[0], timeout=plan.timeout_s, wait_for_ready=True)  # connected and warm
        await loop.run_in_executor(None, barrier.wait, _SYNC_TIMEOUT_S)
        if not await loop.run_in_executor(None, go.wait, _SYNC_TIMEOUT_S):
            raise TimeoutError(f"no start signal within {_SYNC_TIMEOUT_S} s")
        start, end = float(window[0]), float(window[1])

        tag = f"{os.getpid()}-"
        tally = _Tally(start, end)
        send = _stream_sends if plan.stream else _unary_sends
        method: Any = (channel.stream_stream(STREAM_METHOD, request_serializer=None, response_deserializer=None)
                  if plan.stream else infer)

        async def cpu_in_window() -> float:
            await asyncio.sleep(max(0.0, start - time.time()))
            begin = time.process_time()
            await asyncio.sleep(max(0.0, end - time.time()))
            return time.process_time() - begin

        cpu = asyncio.ensure_future(cpu_in_window())
        await send(method, plan, tag, end, tally)
        cpu_s = await cpu
    return ClientReport(tuple(tally.latencies), tally.rows, len(tally.latencies), tally.errors, tally.batch_rows, cpu_s)


@dataclass
class _Tally:
    """What a client counts: answers completed inside the window [start, end]."""

    start: float
    end: float
    latencies: list[float] = field(default_factory=list)
    rows: int = 0
    errors: dict[str, int] = field(default_factory=dict)
    batch_rows: dict[int, int] = field(default_factory=dict)

    def error(self, code: str) -> None:
        self.errors[code] = self.errors.get(code, 0) + 1

    def answered(self, raw: bytes, sent: float, done: float) -> None:
        """A serialized answer, parsed only when it completed inside the window."""
        if self.start <= done <= self.end:
            from splitexit.proto import inference_pb2 as pb

            self.answered_message(pb.InferResponse.FromString(raw), sent, done)

    def answered_message(self, response: Any, sent: float, done: float) -> None:
        if not self.start <= done <= self.end:
            return
        if response.HasField("error"):  # a stream answers a failed request in-band
            self.error(_status_name(response.error.code))
            return
        n = len(response.rows)
        self.rows += n
        self.latencies.append((done - sent) * 1e3)
        b = int(response.timing.batch_size)
        self.batch_rows[b] = self.batch_rows.get(b, 0) + n


def _status_name(code: int) -> str:
    import grpc

    return next((status.name for status in grpc.StatusCode if status.value[0] == code), f"STATUS_{code}")


async def _unary_sends(infer: Any, plan: ClientPlan, tag: str, end: float, tally: _Tally) -> None:
    """`plan.inflight` lanes, each one unary call after another until `end`."""
    import grpc

    async def one_lane(lane: int) -> None:
        i = lane
        while (sent := time.time()) < end:
            try:
                raw = await infer(with_request_id(plan.payloads[i % len(plan.payloads)], f"{tag}{i}"),
                                  timeout=plan.timeout_s)
            except grpc.aio.AioRpcError as exc:
                tally.error(exc.code().name)
                continue
            finally:
                i += plan.inflight
            tally.answered(raw, sent, time.time())

    await asyncio.gather(*(one_lane(k) for k in range(plan.inflight)))


async def _stream_sends(open_stream: Any, plan: ClientPlan, tag: str, end: float, tally: _Tally) -> None:
    """One stream; a new request goes out whenever fewer than `plan.inflight` are unanswered."""
    import grpc

    from splitexit.proto import inference_pb2 as pb

    call = open_stream(timeout=plan.timeout_s + max(0.0, end - time.time()))
    credits = asyncio.Semaphore(plan.inflight)
    sent_at: dict[str, float] = {}

    async def writer() -> None:
        i = 0
        while time.time() < end:
            await credits.acquire()
            request_id = f"{tag}{i}"
            sent_at[request_id] = time.time()
            await call.write(with_request_id(plan.payloads[i % len(plan.payloads)], request_id))
            i += 1
        await call.done_writing()

    async def reader() -> None:
        while (raw := await call.read()) is not grpc.aio.EOF:
            credits.release()
            done = time.time()
            response = pb.InferResponse.FromString(raw)  # its request id says when it was sent
            tally.answered_message(response, sent_at.pop(response.request_id, done), done)

    try:
        await asyncio.gather(writer(), reader())
    except grpc.aio.AioRpcError as exc:
        tally.error(exc.code().name)


def run_client(plan: ClientPlan, barrier: Any, go: Any, window: Any, results: Any) -> None:
    """Process entry point: run the client and put its ClientReport (or the error's text)
    on `results`. `barrier` is shared by every client and the parent; `window` is a shared
    array of two wall-clock times (start, end) that the parent fills before setting `go`."""
    try:
        if plan.nice:
            os.nice(plan.nice)
        results.put(asyncio.run(_client(plan, barrier, go, window)))
    except BaseException as exc:  # the parent must hear of it rather than wait
        results.put(f"{type(exc).__name__}: {exc}")
        raise


# --- open loop: requests at a rate, whatever the answers ---------------------------------
@dataclass(frozen=True)
class OpenLoopPlan:
    """Poisson arrivals at `rate` requests/s, as many independent devices would send: a
    request goes out at its time whether or not earlier ones were answered (overload is
    offered, not negotiated). Each call has `timeout_s` as its gRPC deadline."""

    address: str
    payloads: tuple[bytes, ...]
    rate: float
    rows: int  # rows per request (every payload carries this many)
    timeout_s: float = 1.0
    nice: int = 0
    seed: int = 0
    max_message_bytes: int = 64 * 1024 * 1024

    def __post_init__(self) -> None:
        if not self.payloads:
            raise ValueError("a client needs at least one request to send")
        if self.rate <= 0:
            raise ValueError(f"rate must be > 0, got {self.rate}")


@dataclass(frozen=True)
class OpenLoopReport:
    """Every request sent inside the window, by how it ended (waited for after the window)."""

    latencies_ms: dict[str, tuple[float, ...]]  # status name ("OK", "RESOURCE_EXHAUSTED", ...) -> latencies
    rows_ok: int  # rows answered OK
    sent: int
    behind_s: float  # the most a send went out after its scheduled time (the client's own lag)
    cpu_s: float  # this client process's CPU time inside the window


async def _open_client(plan: OpenLoopPlan, barrier: Any, go: Any, window: Any) -> OpenLoopReport:
    import random

    import grpc

    options = [("grpc.max_send_message_length", plan.max_message_bytes),
               ("grpc.max_receive_message_length", plan.max_message_bytes)]
    loop = asyncio.get_running_loop()
    rng = random.Random(plan.seed)
    async with grpc.aio.insecure_channel(plan.address, options=options) as channel:
        infer: Any = channel.unary_unary(INFER_METHOD, request_serializer=None, response_deserializer=None)
        await infer(plan.payloads[0], timeout=30.0, wait_for_ready=True)  # connected and warm
        await loop.run_in_executor(None, barrier.wait, _SYNC_TIMEOUT_S)
        if not await loop.run_in_executor(None, go.wait, _SYNC_TIMEOUT_S):
            raise TimeoutError(f"no start signal within {_SYNC_TIMEOUT_S} s")
        start, end = float(window[0]), float(window[1])
        outcomes: dict[str, list[float]] = {}
        tag = f"o{os.getpid()}-"

        async def one(i: int) -> None:
            sent = time.time()
            try:
                await infer(with_request_id(plan.payloads[i % len(plan.payloads)], f"{tag}{i}"),
                            timeout=plan.timeout_s)
                code = "OK"
            except grpc.aio.AioRpcError as exc:
                code = exc.code().name
            outcomes.setdefault(code, []).append((time.time() - sent) * 1e3)

        await asyncio.sleep(max(0.0, start - time.time()))
        cpu0 = time.process_time()
        calls: list[asyncio.Task[None]] = []
        due, behind = start, 0.0
        while (due := due + rng.expovariate(plan.rate)) < end:
            if (wait := due - time.time()) > 0:
                await asyncio.sleep(wait)
            behind = max(behind, time.time() - due)
            calls.append(asyncio.ensure_future(one(len(calls))))
        await asyncio.sleep(max(0.0, end - time.time()))
        cpu_s = time.process_time() - cpu0
        await asyncio.gather(*calls)
    latencies = {code: tuple(v) for code, v in outcomes.items()}
    return OpenLoopReport(latencies, plan.rows * len(latencies.get("OK", ())), len(calls), behind, cpu_s)


def run_open_client(plan: OpenLoopPlan, barrier: Any, go: Any, window: Any, results: Any) -> None:
    """Process entry point of an open-loop client (see `run_client` for the protocol)."""
    try:
        if plan.nice:
            os.nice(plan.nice)
        results.put(asyncio.run(_open_client(plan, barrier, go, window)))
    except BaseException as exc:
        results.put(f"{type(exc).__name__}: {exc}")
        raise


# --- the processes ------------------------------------------------------------------------
class LoadError(RuntimeError):
    """A client process did not start, failed, or did not report."""


def run_client_processes(target: Callable[..., None], plans: Sequence[Any], *, warmup_s: float, duration_s: float,
                         during: Callable[[], Any] | None = None) -> tuple[list[Any], tuple[Any, Any]]:
    """One process per plan running `target` (`run_client` or `run_open_client`): once all
    are connected, the window opens `warmup_s` later for `duration_s`; returns their
    reports and what `during()` returned at the window's start and at its end (None
    without it). Raises LoadError."""
    import multiprocessing
    import threading
    from queue import Empty

    mp = multiprocessing.get_context("spawn")
    barrier, go, window, results = mp.Barrier(len(plans) + 1), mp.Event(), mp.Array("d", 2), mp.Queue()
    procs = [mp.Process(target=target, name=f"bench-client-{c}", args=(plan, barrier, go, window, results),
                        daemon=True) for c, plan in enumerate(plans)]
    for p in procs:
        p.start()
    try:
        try:
            barrier.wait(timeout=180)  # every client connected and answered once
        except threading.BrokenBarrierError:
            raise LoadError(f"client processes did not start: {_drain(results) or 'no report'}") from None
        start = time.time() + warmup_s
        window[0], window[1] = start, start + duration_s
        go.set()
        _sleep_until(start)
        first = during() if during else None
        _sleep_until(start + duration_s)
        last = during() if during else None
        reports = []
        for _ in procs:
            try:
                got = results.get(timeout=120)
            except Empty:
                raise LoadError("a client process did not report") from None
            if isinstance(got, str):
                raise LoadError(f"a client process failed: {got}")
            reports.append(got)
        for p in procs:
            p.join(30)
    finally:
        for p in procs:
            if p.is_alive():
                p.terminate()
                p.join(5)
    return reports, (first, last)


def _sleep_until(t: float) -> None:
    while (left := t - time.time()) > 0:
        time.sleep(min(left, 0.05))


def _drain(results: Any) -> str:
    from queue import Empty

    texts = []
    while True:
        try:
            texts.append(str(results.get(timeout=1)))
        except Empty:
            return "; ".join(texts)
