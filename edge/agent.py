"""The edge agent: head + exits on the device, the rest offloaded, an answer for every row.

One `infer` call takes a batch through the bundle's head with `ExitRunner` (real compute
skipping): rows the policy lets exit are answered at once; the pending rows' features
(with their policy state) go to a cloud worker in `InferRequest`s built by
`splitexit.wire`; rows a cascade policy escalates ship their raw input instead. Whatever
the cloud cannot answer in time (unreachable, overloaded, draining, mismatched, too slow,
a malformed answer) is answered with the row's most confident local exit, flagged
`degraded` with the reason, and may be spooled to refine later. Every input gets exactly
one final answer; `refine` yields later updates to degraded ones. Each batch is cut at
`split` (one of the bundle's split points), or where the `SplitChooser` re-plans it from
the agent's own offloads and answers (`AgentConfig.replan`, `splitexit.edge.replan`).

`EdgeAgent` is asyncio-based; `SyncEdgeAgent` runs one in a private event loop thread.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import threading
import time
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Any, AsyncIterator, Sequence

from splitexit.edge.answering import AnswerMaker
from splitexit.edge.config import AgentConfig
from splitexit.edge.head import EdgeHead, Offload, Prepared
from splitexit.edge.replan import SplitChooser
from splitexit.edge.results import Answer
from splitexit.edge.spool import Spool
from splitexit.edge.trace import TRACE_VERSION, TraceWriter
from splitexit.edge.transport import OffloadError, Transport
from splitexit.plan import LinkEstimator

if TYPE_CHECKING:
    from splitexit.manifest import Bundle
    from splitexit.runtime import Engine

__all__ = ["AgentConfig", "EdgeAgent", "SyncEdgeAgent"]

log = logging.getLogger(__name__)

# Codes after which refining a spooled entry can never succeed: it is dropped.
_PERMANENT = frozenset({"INVALID_ARGUMENT", "NOT_FOUND", "FAILED_PRECONDITION", "UNIMPLEMENTED"})


class EdgeAgent:
    """Runs the head of an edge bundle and offloads through a `Transport`.

    bundle: an edge bundle's path (run by the engine `config.engine` picks), or a loaded
        edge `Bundle` (run by `engine`, default torch on its model).
    transport: a GrpcTransport, WorkerPool, InProcessTransport...; None = offline (every
        pending row is answered locally, degraded with reason "no_worker"). The agent
        closes it in `close`.
    spool: a directory (or Spool) to keep failed offloads in for `refine`.
    trace: a file (or TraceWriter) for one msgpack record per `infer` call.
    """

    def __init__(self, bundle: "Bundle | str | Path", transport: Transport | None = None, *,
                 config: AgentConfig | None = None, spool: Spool | str | Path | None = None,
                 trace: TraceWriter | str | Path | None = None, engine: "Engine | None" = None) -> None:
        from splitexit.edge.engine import open_edge
        from splitexit.manifest import Bundle

        config = config or AgentConfig()
        if not isinstance(bundle, Bundle):
            bundle, engine = open_edge(bundle, config.engine, threads=config.engine_threads)  # type: ignore[arg-type]
        if bundle.part != "edge":
            raise ValueError(f"the edge agent needs the edge part of a bundle, got the {bundle.part} part")
        self.bundle = bundle
        self.config = config
        self.transport = transport
        self.spool = Spool(spool) if isinstance(spool, (str, Path)) else spool
        self.trace = TraceWriter(trace) if isinstance(trace, (str, Path)) else trace
        self.head = EdgeHead(bundle, self.config, self._limits, engine)  # the head's run and the requests it leaves
        # where to cut: `split` (the bundle's first; any of its splits), or re-planned online
        self.split = bundle.split
        self.chooser = (SplitChooser(bundle.manifest, config.replan, self.head.codec)
                        if config.replan is not None else None)
        # the uplink as this agent's own offloads see it (for re-planning)
        self.link = self.chooser.link if self.chooser is not None else LinkEstimator()
        self._answered_offloads = 0
        self.answering = AnswerMaker(bundle, self.config)  # rows' answers: edge, cloud or degraded
        self._seq = 0

    # --- helpers -----------------------------------------------------------------------
    async def _compute(self, fn: Any, *args: Any) -> Any:
        if self.config.compute_in_thread:
            return await asyncio.to_thread(fn, *args)
        return fn(*args)

    def _limits(self) -> tuple[int, int]:
        rows, size = self.config.max_batch_rows, self.config.max_message_bytes
        advertised = getattr(self.transport, "limits", None)
        if isinstance(advertised, tuple) and len(advertised) == 2:
            size, rows = min(size, advertised[0] or size), min(rows, advertised[1] or rows)
        return rows, size

    # --- the API -----------------------------------------------------------------------
    async def infer(self, inputs: Any, sample_ids: Sequence[str] | None = None, *,
                    budget_ms: float | None = None) -> list[Answer]:
        """Answers for a batch, in input order. `inputs`: uint8 images [B, H, W, C] (numpy
        or torch, or a list of [H, W, C] arrays) or normalized float inputs [B, C, H, W].
        `budget_ms` overrides the configured latency budget for this call."""
        answers: dict[int, Answer] = {}
        async for position, answer in self.stream(inputs, sample_ids, budget_ms=budget_ms):
            answers[position] = answer
        return [answers[i] for i in range(len(answers))]

    async def stream(self, inputs: Any, sample_ids: Sequence[str] | None = None, *,
                     budget_ms: float | None = None) -> AsyncIterator[tuple[int, Answer]]:
        """(position in the batch, answer) as each becomes known: edge exits first, then the
        cloud's or the degraded answers. Exactly one answer per input row."""
        t0 = time.perf_counter()
        started = time.time()
        batch_id = uuid.uuid4().hex
        n = len(inputs)
        if sample_ids is None:
            ids = [f"{self._seq + i}" for i in range(n)]
        else:
            ids = [str(s) for s in sample_ids]
        self._seq += n
        chooser = self.chooser
        split = chooser.split_for_batch() if chooser is not None else self.split
        prepared: Prepared = await self._compute(self.head.prepare, inputs, ids, split)
        budget = budget_ms if budget_ms is not None else self.config.latency_budget_ms
        route = {"edge": 0, "cloud": 0, "degraded": 0}
        reasons: dict[str, int] = {}
        exit_hist: dict[str, int] = {}
        workers: set[str] = set()
        answered: set[int] = set()

        def elapsed_ms() -> float:
            return (time.perf_counter() - t0) * 1e3

        def note(position: int, answer: Answer) -> tuple[int, Answer]:
            assert position not in answered, f"row {position} answered twice"
            answered.add(position)
            route[answer.route] += 1
            if answer.reason and answer.route == "degraded":
                reasons[answer.reason] = reasons.get(answer.reason, 0) + 1
            if answer.worker:
                workers.add(answer.worker)
            if chooser is not None and answer.route != "degraded":
                chooser.observe_answer(answer.exit, answer.network == self.bundle.name)
            return position, answer

        now = elapsed_ms()
        for pos, k, probs, _ in prepared.edge:
            key = str(self.answering.stage(k))
            exit_hist[key] = exit_hist.get(key, 0) + 1
            yield note(pos, self.answering.edge(ids[pos], k, probs, now))

        offload_start = time.perf_counter()
        tasks = [asyncio.ensure_future(self._offload(o, budget, t0)) for o in prepared.offloads]
        try:
            for done in asyncio.as_completed(tasks):
                offload, result = await done
                if isinstance(result, OffloadError):
                    spooled = await self._spool(offload, result)
                    latency = elapsed_ms()
                    for pos in offload.positions:
                        yield note(pos, self.answering.degraded(ids[pos], prepared.fallback[pos], result.reason, latency,
                                                       spooled=spooled))
                else:
                    for pos, answer in zip(offload.positions, result):
                        yield note(pos, answer)
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        assert len(answered) == n, f"{n - len(answered)} rows left unanswered"  # the promise of this class
        offload_ms = (time.perf_counter() - offload_start) * 1e3 if tasks else 0.0
        if self.trace is not None:
            self.trace.write({
                "v": TRACE_VERSION, "request_id": batch_id, "t": started, "rows": n,
                "exits_evaluated": prepared.evaluated, "exit_hist": exit_hist, "route": route, "reasons": reasons,
                "bytes_up": sum(o.record.get("bytes_up", 0) for o in prepared.offloads),
                "bytes_down": sum(o.record.get("bytes_down", 0) for o in prepared.offloads),
                "timings_ms": {"prepare": round(prepared.prepare_ms, 3), "head": round(prepared.head_ms, 3),
                               "encode": round(prepared.encode_ms, 3), "offload": round(offload_ms, 3),
                               "total": round(elapsed_ms(), 3)},
                "workers": sorted(workers), "offloads": [o.record for o in prepared.offloads],
                "link": _link_record(self.link), "split": split,
                **({"plan": chooser.record()} if chooser is not None else {}),
            })

    async def _offload(self, offload: Offload, budget_ms: float | None,
                       t0: float) -> tuple[Offload, list[Answer] | OffloadError]:
        request = offload.request
        record = offload.record
        record.update(request_id=request.request_id if request is not None else None, kind=offload.kind,
                      rows=len(offload.positions), worker=None, status="OK", bytes_up=0, bytes_down=0, rtt_ms=0.0)
        timeout_ms = self.config.request_timeout_ms
        budget_left_ms = None if budget_ms is None else budget_ms - (time.perf_counter() - t0) * 1e3
        # the latency budget, not the request timeout, sets the deadline
        budget_bound = budget_left_ms is not None and budget_left_ms < timeout_ms
        if budget_left_ms is not None and budget_bound:
            timeout_ms = budget_left_ms
        if request is None:
            assert offload.error is not None
            error = offload.error
        elif self.transport is None:
            error = OffloadError("UNAVAILABLE", "no cloud worker configured", reason="no_worker")
        elif timeout_ms < self.config.min_offload_ms:
            error = OffloadError("DEADLINE_EXCEEDED", "the latency budget was spent on the edge",
                                 reason="latency_budget")
        else:
            sent = time.perf_counter()
            record["bytes_up"] = request.ByteSize()
            try:
                response = await self.transport.infer(request, timeout_ms / 1e3)
                rtt = (time.perf_counter() - sent) * 1e3
                worker = response.worker_id or getattr(self.transport, "name", "")
                record.update(worker=worker, bytes_down=response.ByteSize(), rtt_ms=round(rtt, 3),
                              queue_ms=round(response.timing.queue_ms, 3),
                              compute_ms=round(response.timing.compute_ms, 3),
                              batch_size=response.timing.batch_size)
                if self._answered_offloads:  # the first one also paid for the connection's set-up
                    self.link.observe(record["bytes_up"], rtt / 1e3,
                                      server_ms=response.timing.queue_ms + response.timing.compute_ms)
                self._answered_offloads += 1
                return offload, self.answering.cloud(request, response, (time.perf_counter() - t0) * 1e3, worker)
            except Exception as exc:  # foreign transports too: a row must never go unanswered
                error = OffloadError.from_exception(exc)
                waited = time.perf_counter() - sent
                if budget_bound and error.code == "DEADLINE_EXCEEDED":  # what really happened
                    error = OffloadError(error.code, error.message, reason="latency_budget", worker=error.worker)
                elif error.code == "DEADLINE_EXCEEDED":  # the link (or the cloud) takes at least this long
                    self.link.observe_timeout(waited)
                record["rtt_ms"] = round(waited * 1e3, 3)
                record["worker"] = error.worker or None
        record.update(status=error.code, reason=error.reason, error=error.message[:200])
        return offload, error

    async def _spool(self, offload: Offload, error: OffloadError) -> bool:
        if self.spool is None or offload.request is None:
            return False
        try:
            await asyncio.to_thread(self.spool.put, offload.request, reason=error.reason)
        except OSError as exc:  # a full disk must not cost the answer
            log.warning("could not spool request %s: %s", offload.request.request_id, exc)
            return False
        offload.record["spooled"] = True
        return True

    async def refine(self) -> AsyncIterator[Answer]:
        """Resend spooled requests and yield their answers (update=True), oldest first.
        Stops at the first request the cloud still cannot answer (it stays spooled);
        entries that can never be answered (another bundle, refused as invalid) are
        dropped with a warning."""
        if self.spool is None:
            raise ValueError("this agent has no spool to refine")
        entries = await asyncio.to_thread(self.spool.entries)
        try:
            for entry in entries:
                if entry.bundle_hash != self.bundle.hash:
                    log.warning("spooled request %s is for bundle %s, not %s: left in the spool",
                                entry.request_id, entry.bundle_hash[:12], self.bundle.hash[:12])
                    continue
                request = entry.message()
                if self.transport is None:
                    return
                sent = time.perf_counter()
                try:
                    response = await self.transport.infer(request, self.config.refine_timeout_ms / 1e3)
                    worker = response.worker_id or getattr(self.transport, "name", "")
                    answers = self.answering.cloud(request, response, (time.perf_counter() - sent) * 1e3, worker,
                                                  update=True)
                except OffloadError as exc:
                    if exc.code in _PERMANENT or exc.reason == "bad_response":
                        log.warning("dropping spooled request %s: %s", entry.request_id, exc)
                        await asyncio.to_thread(self.spool.done, [entry.request_id], outcome="dropped")
                        continue
                    return
                for answer in answers:
                    yield answer
                await asyncio.to_thread(self.spool.done, [entry.request_id])
        finally:
            await asyncio.to_thread(self.spool.compact)

    async def close(self) -> None:
        if self.transport is not None:
            await self.transport.close()
        if self.trace is not None:
            self.trace.close()

    async def __aenter__(self) -> "EdgeAgent":
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


def _link_record(link: LinkEstimator) -> dict[str, float] | None:
    estimate = link.estimate()
    if estimate is None or estimate.up_mbps is None:
        return None
    return {"up_mbps": round(estimate.up_mbps, 3), "rtt_ms": round(estimate.rtt_ms, 3)}


class SyncEdgeAgent:
    """A blocking facade over `EdgeAgent`: it owns an event loop in a background thread,
    so it also works where another loop is running (a notebook, a GUI).

    Build transports for it as usual: gRPC channels are created lazily in its loop.
    """

    def __init__(self, bundle: "Bundle | str | Path", transport: Transport | None = None, **kwargs: Any) -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="splitexit-edge", daemon=True)
        self._thread.start()
        try:
            self.agent = EdgeAgent(bundle, transport, **kwargs)
        except BaseException:
            self._stop()
            raise

    def _run(self, coro: Any, timeout: float | None = None) -> Any:
        future = asyncio.run_coroutine_threadsafe(coro, self._loop)
        try:
            return future.result(timeout)
        except concurrent.futures.TimeoutError:
            future.cancel()
            raise

    def infer(self, inputs: Any, sample_ids: Sequence[str] | None = None, *,
              budget_ms: float | None = None) -> list[Answer]:
        return self._run(self.agent.infer(inputs, sample_ids, budget_ms=budget_ms))

    def refine(self) -> list[Answer]:
        async def collect() -> list[Answer]:
            return [a async for a in self.agent.refine()]

        return self._run(collect())

    def run_coroutine(self, coro: Any) -> Any:
        """Run any coroutine in the agent's loop (e.g. `pool.probe()`)."""
        return self._run(coro)

    def _stop(self) -> None:
        if self._loop.is_closed():
            return
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)
        self._loop.close()

    def close(self) -> None:
        if self._loop.is_closed():
            return
        try:
            self._run(self.agent.close(), timeout=10)
        finally:
            self._stop()

    def __enter__(self) -> "SyncEdgeAgent":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
