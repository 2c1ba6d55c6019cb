"""A closed-loop load generator for a cloud worker, one client per process.

Each client process opens one gRPC channel and keeps `inflight` prebuilt, serialized
InferRequests in flight (a new one goes out as soon as one is answered). Requests are sent
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
from typing import Any

__all__ = ["ClientPlan", "ClientReport", "INFER_METHOD", "run_client"]

INFER_METHOD = "/splitexit.v1.SplitInference/Infer"
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

    from splitexit.proto import inference_pb2 as pb

    options = [("grpc.max_send_message_length", plan.max_message_bytes),
               ("grpc.max_receive_message_length", plan.max_message_bytes)]
    loop = asyncio.get_running_loop()
    latencies: list[float] = []
    batch_rows: dict[int, int] = {}
    errors: dict[str, int] = {}
    rows = 0
    async with grpc.aio.insecure_channel(plan.address, options=options) as channel:
        # bytes in, bytes out: no per-call protobuf serialization on the client
        infer = channel.unary_unary(INFER_METHOD, request_serializer=None, response_deserializer=None)
        await infer(plan.payloads[0], timeout=plan.timeout_s, wait_for_ready=True)  # connected and warm
        await loop.run_in_executor(None, barrier.wait, _SYNC_TIMEOUT_S)
        if not await loop.run_in_executor(None, go.wait, _SYNC_TIMEOUT_S):
            raise TimeoutError(f"no start signal within {_SYNC_TIMEOUT_S} s")
        start, end = float(window[0]), float(window[1])

        tag = f"{os.getpid()}-"

        async def one_lane(lane: int) -> None:
            nonlocal rows
            i = lane
            while True:
                sent = time.time()
                if sent >= end:
                    return
                try:
                    request = with_request_id(plan.payloads[i % len(plan.payloads)], f"{tag}{i}")
                    raw = await infer(request, timeout=plan.timeout_s)
                except grpc.aio.AioRpcError as exc:
                    errors[exc.code().name] = errors.get(exc.code().name, 0) + 1
                    continue
                finally:
                    i += plan.inflight
                done = time.time()
                if start <= done <= end:
                    response = pb.InferResponse.FromString(raw)
                    n = len(response.rows)
                    rows += n
                    latencies.append((done - sent) * 1e3)
                    b = int(response.timing.batch_size)
                    batch_rows[b] = batch_rows.get(b, 0) + n

        async def cpu_in_window() -> float:
            await asyncio.sleep(max(0.0, start - time.time()))
            begin = time.process_time()
            await asyncio.sleep(max(0.0, end - time.time()))
            return time.process_time() - begin

        cpu = asyncio.ensure_future(cpu_in_window())
        await asyncio.gather(*(one_lane(k) for k in range(plan.inflight)))
        cpu_s = await cpu
    return ClientReport(tuple(latencies), rows, len(latencies), errors, batch_rows, cpu_s)


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
