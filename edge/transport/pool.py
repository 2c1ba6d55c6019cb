"""`WorkerPool`: a Transport over several workers: least-outstanding or round-robin, a
worker is confirmed (health SERVING + GetModelInfo lists our bundle hash) before use,
marked down after failures and probed back."""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from dataclasses import dataclass
from typing import Callable, Literal

from splitexit.edge.transport.base import SERVING, OffloadError, Transport, check_timeout
from splitexit.edge.transport.grpc_channel import GrpcTransport
from splitexit.proto import PROTOCOL_VERSION  # ModelInfo.protocol_version this edge understands
from splitexit.proto import inference_pb2 as pb

__all__ = ["PoolConfig", "WorkerPool", "WorkerStatus", "check_model_info"]

log = logging.getLogger(__name__)

WorkerState = Literal["unconfirmed", "up", "down", "mismatch"]


@dataclass(frozen=True, kw_only=True)
class PoolConfig:
    strategy: Literal["least_outstanding", "round_robin"] = "least_outstanding"
    # Consecutive failed calls (unreachable, draining, timed out) before a worker is taken
    # out of rotation; a success resets the count.
    max_failures: int = 2
    # A down worker is probed (health + model info) this often, so it comes back on its own
    # (with the channel's reconnect backoff capped at 1 s: within about 2 s of its return).
    probe_interval_s: float = 1.0
    # A worker serving another bundle is asked again this rarely (it may be upgraded).
    mismatch_probe_interval_s: float = 60.0
    confirm_timeout_s: float = 2.0  # per probe RPC

    def __post_init__(self) -> None:
        if self.strategy not in ("least_outstanding", "round_robin"):
            raise ValueError(f"unknown strategy {self.strategy!r}; expected least_outstanding or round_robin")
        if self.max_failures < 1:
            raise ValueError("max_failures must be >= 1")
        if not (self.probe_interval_s > 0 and self.mismatch_probe_interval_s > 0 and self.confirm_timeout_s > 0):
            raise ValueError("probe intervals and the confirm timeout must be > 0")


@dataclass(frozen=True)
class WorkerStatus:
    """A snapshot of one pool member."""

    key: str
    state: WorkerState
    outstanding: int
    sent: int  # requests answered by this worker
    failures: int  # consecutive failures
    last_error: str
    worker_id: str
    limits: tuple[int, int] | None  # (max_message_bytes, max_batch_rows) from ModelInfo


@dataclass
class _Worker:
    key: str
    transport: Transport
    state: WorkerState = "unconfirmed"
    outstanding: int = 0
    sent: int = 0
    failures: int = 0
    last_error: str = ""
    worker_id: str = ""
    limits: tuple[int, int] | None = None
    next_probe: float = 0.0  # loop time; 0 = now

    def snapshot(self) -> WorkerStatus:
        return WorkerStatus(self.key, self.state, self.outstanding, self.sent, self.failures, self.last_error,
                            self.worker_id, self.limits)


# Codes after which a request may go to another worker: it was not answered, and running it
# elsewhere (same request id) is safe.
_TRY_ELSEWHERE = frozenset({"UNAVAILABLE", "RESOURCE_EXHAUSTED", "FAILED_PRECONDITION", "UNIMPLEMENTED"})
# Codes that say the worker (not the request) is unwell. A missed deadline is not among
# them: under a latency budget a healthy but busy worker misses deadlines too, so a miss
# only starts a health probe, which takes a partitioned worker out within confirm_timeout_s.
_WORKER_FAILURE = frozenset({"UNAVAILABLE", "INTERNAL", "UNKNOWN", "UNIMPLEMENTED"})


def check_model_info(info: pb.ModelInfo, *, bundle_hash: str, model: str | None = None,
                     split: int | None = None, codec: str | None = None) -> str | None:
    """Why this worker cannot serve our offloads (None = it can): protocol version, a model
    spec with our bundle hash (and name), our split point and codec."""
    if info.protocol_version != PROTOCOL_VERSION:
        return f"protocol version {info.protocol_version}, this edge speaks {PROTOCOL_VERSION}"
    specs = [m for m in info.models if m.bundle_hash == bundle_hash and (model is None or m.name == model)]
    if not specs:
        served = ", ".join(f"{m.name}@{m.bundle_hash[:12]}" for m in info.models) or "nothing"
        return f"serves {served}, not bundle {bundle_hash[:12]}"
    spec = specs[0]
    if split is not None and spec.splits and split not in [s.split for s in spec.splits]:
        return f"does not accept split {split} (accepts {[s.split for s in spec.splits]})"
    if codec is not None and spec.codecs and codec not in spec.codecs:
        return f"does not decode codec {codec} (decodes {', '.join(spec.codecs)})"
    return None


class WorkerPool:
    """A Transport over several cloud workers.

    A worker is used only after it is confirmed: health SERVING and a GetModelInfo that
    lists our bundle hash (`check_model_info`). mDNS and static lists only propose
    workers. A worker that fails `max_failures` times in a row is marked down and probed
    back every `probe_interval_s` by a background task (started on first use, stopped by
    `close`); a hash mismatch marks it `mismatch`. A request that a worker did not answer
    (unavailable, overloaded, mismatched) goes to the next confirmed worker while its
    deadline allows, with the same request id.
    """

    name = "pool"

    def __init__(self, *, bundle_hash: str, model: str | None = None, split: int | None = None,
                 codec: str | None = None, config: PoolConfig | None = None,
                 connect: Callable[[str], Transport] | None = None) -> None:
        self.bundle_hash = bundle_hash
        self.model = model
        self.split = split
        self.codec = codec
        self.config = config or PoolConfig()
        self._connect = connect or (lambda address: GrpcTransport(address))
        self._workers: dict[str, _Worker] = {}
        self._rr = 0
        self._prober: asyncio.Task[None] | None = None
        self._confirming: dict[str, asyncio.Task[bool]] = {}
        self._closed = False

    # membership
    def add(self, key: str, transport: Transport | None = None) -> None:
        """Propose a worker (unconfirmed until probed). `transport` defaults to
        `connect(key)` (a GrpcTransport to the address). Re-adding a known key is a no-op."""
        if key in self._workers:
            return
        self._workers[key] = _Worker(key, transport if transport is not None else self._connect(key))

    async def remove(self, key: str) -> None:
        worker = self._workers.pop(key, None)
        if worker is not None:
            await worker.transport.close()

    def workers(self) -> list[WorkerStatus]:
        return [w.snapshot() for w in self._workers.values()]

    def __len__(self) -> int:
        return len(self._workers)

    @property
    def limits(self) -> tuple[int, int] | None:
        """The tightest (max_message_bytes, max_batch_rows) over confirmed workers."""
        known = [w.limits for w in self._workers.values() if w.state == "up" and w.limits]
        if not known:
            return None
        return min(m for m, _ in known), min(r for _, r in known)

    # confirmation and probing
    async def confirm(self, key: str) -> bool:
        """Probe one worker now (health, then model info); True when it is up. Concurrent
        callers share one probe."""
        return await asyncio.shield(self._confirm_task(key))

    def _confirm_task(self, key: str) -> "asyncio.Task[bool]":
        """The probe of `key` under way, or a new one (cancelled by `close`)."""
        task = self._confirming.get(key)
        if task is None:
            task = asyncio.ensure_future(self._confirm(key))
            self._confirming[key] = task
            task.add_done_callback(functools.partial(self._confirmed, key))
        return task

    def _confirmed(self, key: str, _task: "asyncio.Task[bool]") -> None:
        self._confirming.pop(key, None)

    async def _confirm(self, key: str) -> bool:
        worker = self._workers.get(key)
        if worker is None:
            return False
        loop = asyncio.get_running_loop()
        timeout = self.config.confirm_timeout_s
        try:
            status = await worker.transport.health(timeout)
            if status != SERVING:
                raise OffloadError("UNAVAILABLE", f"health {status}")
            info = await worker.transport.model_info(timeout)
        except OffloadError as exc:
            worker.state, worker.last_error = "down", str(exc)
            worker.next_probe = loop.time() + self.config.probe_interval_s
            return False
        why = check_model_info(info, bundle_hash=self.bundle_hash, model=self.model, split=self.split,
                               codec=self.codec)
        if why is not None:
            worker.state, worker.last_error = "mismatch", why
            worker.next_probe = loop.time() + self.config.mismatch_probe_interval_s
            log.warning("worker %s not used: %s", key, why)
            return False
        limits = (int(info.limits.max_message_bytes), int(info.limits.max_batch_rows))
        worker.limits = limits if all(v > 0 for v in limits) else None
        worker.worker_id, worker.state, worker.failures, worker.last_error = info.worker_id, "up", 0, ""
        return True

    async def probe(self, *, force: bool = False) -> None:
        """Probe every worker that is not up and is due (all of them with force)."""
        now = asyncio.get_running_loop().time()
        due = [w.key for w in self._workers.values() if w.state != "up" and (force or w.next_probe <= now)]
        if due:
            await asyncio.gather(*(self.confirm(k) for k in due))

    async def _probe_loop(self) -> None:
        while not self._closed:
            await asyncio.sleep(self.config.probe_interval_s)
            try:
                await self.probe()
            except asyncio.CancelledError:
                raise
            except Exception:  # a probe must never end the loop
                log.exception("worker probe failed")

    def _start_prober(self) -> None:
        if self._prober is None or self._prober.done():
            self._prober = asyncio.get_running_loop().create_task(self._probe_loop())

    # the Transport API
    def _pick(self, exclude: set[str]) -> _Worker | None:
        up = [w for w in self._workers.values() if w.state == "up" and w.key not in exclude]
        if not up:
            return None
        self._rr += 1
        # Rotating the start breaks ties evenly: sequential calls spread too.
        start = self._rr % len(up)
        rotated = up[start:] + up[:start]
        if self.config.strategy == "round_robin":
            return rotated[0]
        return min(rotated, key=lambda w: w.outstanding)

    async def _choose(self, exclude: set[str], deadline: float) -> _Worker | None:
        worker = self._pick(exclude)
        if worker is not None:
            return worker
        # Nothing up: confirm the proposed ones that are due, within this call's time.
        loop = asyncio.get_running_loop()
        due = [w.key for w in self._workers.values()
               if w.key not in exclude and w.state in ("unconfirmed", "down") and w.next_probe <= loop.time()]
        if due and deadline - loop.time() > 0:
            try:
                await asyncio.wait_for(asyncio.gather(*(self.confirm(k) for k in due)), deadline - loop.time())
            except asyncio.TimeoutError:
                pass
        return self._pick(exclude)

    def _record_failure(self, worker: _Worker, exc: OffloadError) -> None:
        worker.last_error = str(exc)
        if exc.code == "DEADLINE_EXCEEDED" and not self._closed:
            self._confirm_task(worker.key)  # slow, or gone? its health says, in the background
        elif exc.code == "FAILED_PRECONDITION":
            worker.state = "mismatch"
            worker.next_probe = asyncio.get_running_loop().time() + self.config.mismatch_probe_interval_s
        elif exc.code in _WORKER_FAILURE:
            worker.failures += 1
            if worker.failures >= self.config.max_failures:
                worker.state = "down"
                worker.next_probe = asyncio.get_running_loop().time() + self.config.probe_interval_s
                log.warning("worker %s marked down: %s", worker.key, exc)

    async def infer(self, request: pb.InferRequest, timeout: float) -> pb.InferResponse:
        if self._closed:
            raise OffloadError("CANCELLED", "the worker pool is closed", reason="no_worker")
        self._start_prober()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + check_timeout(timeout)
        tried: set[str] = set()
        last: OffloadError | None = None
        while True:
            worker = await self._choose(tried, deadline)
            if worker is None:
                if last is not None:
                    raise last
                states = ", ".join(f"{w.key} {w.state}" for w in self._workers.values()) or "no workers known"
                raise OffloadError("UNAVAILABLE", f"no confirmed worker ({states})", reason="no_worker")
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise last or OffloadError("DEADLINE_EXCEEDED", "no time left to offload", worker=worker.key)
            tried.add(worker.key)
            worker.outstanding += 1
            try:
                response = await worker.transport.infer(request, remaining)
            except OffloadError as exc:
                last = exc if exc.worker else OffloadError(exc.code, exc.message, reason=exc.reason,
                                                           worker=worker.key)
                self._record_failure(worker, last)
                if exc.code not in _TRY_ELSEWHERE:
                    raise last from None
                continue
            finally:
                worker.outstanding -= 1
            worker.failures = 0
            worker.sent += 1
            if not response.worker_id:
                response.worker_id = worker.worker_id or worker.key
            return response

    async def model_info(self, timeout: float) -> pb.ModelInfo:
        loop = asyncio.get_running_loop()
        worker = await self._choose(set(), loop.time() + check_timeout(timeout))
        if worker is None:
            raise OffloadError("UNAVAILABLE", "no confirmed worker", reason="no_worker")
        return await worker.transport.model_info(timeout)

    async def health(self, timeout: float) -> str:
        loop = asyncio.get_running_loop()
        worker = await self._choose(set(), loop.time() + check_timeout(timeout))
        return SERVING if worker is not None else "NOT_SERVING"

    async def close(self) -> None:
        self._closed = True
        tasks = [t for t in (self._prober, *self._confirming.values()) if t is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._prober = None
        workers, self._workers = list(self._workers.values()), {}
        await asyncio.gather(*(w.transport.close() for w in workers), return_exceptions=True)
