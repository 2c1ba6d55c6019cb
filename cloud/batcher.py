"""Dynamic batching: requests with the same key share one tail call.

Requests are queued per key (the servicer uses (model, split, dtype, feature shape, ...)),
and a worker task per key forms a batch when `max_batch` rows are waiting or the oldest
request has waited `max_queue_delay_ms`, whichever comes first. A batch always takes at
least one request and never splits one. The batch runs in `run_batch` on the compute
executor (a thread, so the event loop keeps accepting and refusing requests meanwhile);
per-request results are handed back to the waiting callers.

Up to `concurrent_batches` batches compute at once, each on a compute thread of its own
(the executor has that many): on a CPU where torch's intra-op threads do not pay at the
served batch size, two single-threaded batches side by side nearly double the throughput
of one batch on two threads. While every compute thread is busy, the next batch is formed
as soon as it is full and handed to the executor behind them (`queued_batches`), so that it
starts the moment a compute thread is free: under load the event loop is busy answering
the last batch's requests and would otherwise leave the compute idle until it comes round.
A partial batch is not sent ahead: with the compute busy there is no point in cutting the
wait for company short.

Admission is decided at once, by time as well as by count: `submit` raises
RequestError(RESOURCE_EXHAUSTED) without queueing when
- the work ahead of the request (rows waiting and computing, every key), in full batches
  at each key's measured batch time, would keep it waiting longer than
  `max_queue_wait_ms`, or that wait and its own batch would end past its deadline
  (its own compute is not waiting: a lone slow request is served): under overload a queue
  that holds more than callers will wait for fills with requests that expire in it, and
  the worker then spends its compute on answers nobody reads (goodput collapses); a
  caller refused at once can try another worker or answer on the edge while it still has
  time;
- `queue_limit_rows` or `queue_limit_requests` would be passed (a hard cap, whatever the
  timing).
A request whose deadline would pass before its batch ends is dropped before compute
(DEADLINE_EXCEEDED), and one whose caller went away (cancelled) is skipped.
"""

from __future__ import annotations

import asyncio
import collections
import functools
import time
from concurrent.futures import Executor
from dataclasses import dataclass, field
from typing import Any, Callable, Hashable, Sequence

from splitexit.cloud.errors import RequestError

__all__ = ["BatchInfo", "Batcher", "BatcherConfig", "RunBatch"]

# run_batch(key, payloads) -> one result per payload; an Exception instance in the list
# fails only that request (a RequestError keeps its code, anything else is INTERNAL).
RunBatch = Callable[[Hashable, Sequence[Any]], Sequence[Any]]


@dataclass(frozen=True, kw_only=True)
class BatcherConfig:
    max_batch: int = 32  # rows per tail call: large enough to amortize, small enough for latency
    max_queue_delay_ms: float = 2.0  # the most a lone request waits for company
    queue_limit_rows: int = 2048  # waiting rows, all keys together; beyond: RESOURCE_EXHAUSTED
    queue_limit_requests: int = 512  # waiting requests, all keys together
    # the longest a request may expect to wait behind the work ahead of it; beyond: RESOURCE_EXHAUSTED
    max_queue_wait_ms: float = 250.0
    queued_batches: int = 1  # full batches handed to the executor ahead of the running ones; 0 = none
    concurrent_batches: int = 1  # batches computing at once: the executor's compute threads

    def __post_init__(self) -> None:
        if self.concurrent_batches < 1:
            raise ValueError(f"concurrent_batches must be >= 1, got {self.concurrent_batches}")
        if self.queued_batches < 0:
            raise ValueError(f"queued_batches must be >= 0, got {self.queued_batches}")
        if self.max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {self.max_batch}")
        if not 0 <= self.max_queue_delay_ms <= 10_000:
            raise ValueError(f"max_queue_delay_ms must be in 0..10000, got {self.max_queue_delay_ms}")
        if self.queue_limit_rows < 1 or self.queue_limit_requests < 1:
            raise ValueError("queue limits must be >= 1")
        if not 0 < self.max_queue_wait_ms <= 600_000:
            raise ValueError(f"max_queue_wait_ms must be in (0, 600000], got {self.max_queue_wait_ms}")


@dataclass(frozen=True)
class BatchInfo:
    """Where one request's time went inside the worker."""

    queue_s: float  # arrival -> start of its batch
    compute_s: float  # the batch's run_batch call
    batch_rows: int  # rows in that batch (>= the request's)


@dataclass(frozen=True)
class _Estimate:
    batch_s: float  # the compute of one full batch of a key
    from_full: bool  # measured on batches at least half full (else on smaller ones, until such a one)


@dataclass(eq=False)
class _Item:
    rows: int
    payload: Any
    arrival: float
    deadline: float | None  # time.monotonic() value, None = none
    future: asyncio.Future = field(repr=False)


class Batcher:
    """Queues per key and one worker task per key; compute goes to `executor`, which
    should have `config.concurrent_batches` threads.

    Create and use it inside one running event loop; `close()` it when done.
    """

    def __init__(self, config: BatcherConfig, run_batch: RunBatch, *, executor: Executor,
                 on_depth: Callable[[int], None] | None = None,
                 on_batch: Callable[[Hashable, int, float], None] | None = None) -> None:
        self.config = config
        self._run_batch = run_batch
        self._executor = executor
        self._on_depth = on_depth  # queued rows changed (a gauge)
        self._on_batch = on_batch  # (key, rows, compute seconds) after each batch
        self._queues: dict[Hashable, collections.deque[_Item]] = {}
        self._wakes: dict[Hashable, asyncio.Event] = {}
        self._workers: dict[Hashable, asyncio.Task[None]] = {}
        self._queued_rows = 0
        self._queued_requests = 0
        # per key: rows queued or computing (the work ahead of a new request), and the
        # estimate of one full batch's compute (keys differ: models, shapes)
        self._work_rows: dict[Hashable, int] = {}
        self._estimates: dict[Hashable, _Estimate] = {}
        self._closed = False

    @property
    def queued_rows(self) -> int:
        return self._queued_rows

    @property
    def queued_requests(self) -> int:
        return self._queued_requests

    async def submit(self, key: Hashable, payload: Any, *, rows: int, deadline: float | None = None,
                     arrival: float | None = None) -> tuple[Any, BatchInfo]:
        """Queue `payload` (`rows` rows) under `key` and wait for its result.

        deadline: a time.monotonic() value after which the request is not computed.
        Raises RequestError: RESOURCE_EXHAUSTED (queue full, at once), DEADLINE_EXCEEDED,
        UNAVAILABLE (closed), or the per-request error run_batch returned.
        """
        if self._closed:
            raise RequestError("UNAVAILABLE", "the worker is shutting down")
        now = time.monotonic()
        wait_s = self.expected_wait_s()
        refusal = self._refusal(rows, wait_s)
        if refusal is not None:
            raise refusal
        if deadline is not None and now + wait_s + self._batches_s(key, rows) > deadline:
            raise RequestError("RESOURCE_EXHAUSTED",
                               f"overloaded: about {1e3 * wait_s:.0f} ms of work is ahead of this request, and "
                               f"its deadline is {1e3 * (deadline - now):.0f} ms away: retry elsewhere")
        loop = asyncio.get_running_loop()
        item = _Item(rows, payload, now if arrival is None else arrival, deadline, loop.create_future())
        queue = self._queues.get(key)
        if queue is None:
            queue = self._queues[key] = collections.deque()
            self._wakes[key] = asyncio.Event()
            self._workers[key] = asyncio.create_task(self._work(key), name=f"batcher:{key}")
        queue.append(item)
        self._depth(rows, 1)
        self._ahead(key, rows)
        self._wakes[key].set()
        try:
            return await item.future
        finally:
            if not item.future.done():  # the caller was cancelled: the worker skips it
                item.future.cancel()

    def refusal(self, rows: int = 0) -> RequestError | None:
        """The refusal a request of `rows` rows gets now whatever its deadline (a queue
        limit, or more than `max_queue_wait_ms` of work ahead), or None. With rows=0, what
        can be told before the request is read: the server refuses a call on it at its
        headers (`splitexit.cloud.server`), before its body is received."""
        return self._refusal(rows, self.expected_wait_s())

    def _refusal(self, rows: int, wait_s: float) -> RequestError | None:
        c = self.config
        if self._queued_requests + 1 > c.queue_limit_requests or self._queued_rows + rows > c.queue_limit_rows:
            return RequestError("RESOURCE_EXHAUSTED",
                                f"queue full ({self._queued_requests} requests, {self._queued_rows} rows waiting; "
                                f"limits {c.queue_limit_requests} requests, {c.queue_limit_rows} rows): retry later")
        if wait_s * 1e3 > c.max_queue_wait_ms:
            return RequestError("RESOURCE_EXHAUSTED",
                                f"overloaded: about {1e3 * wait_s:.0f} ms of work is ahead of this request "
                                f"(limit {c.max_queue_wait_ms:g} ms): retry later or elsewhere")
        return None

    def expected_wait_s(self) -> float:
        """Seconds a request queued now would wait before its own batch computes: the rows
        ahead of it (waiting and computing, every key), in full batches at the measured
        time of one of their key's, shared among the compute threads. A key not timed yet
        counts nothing. Whole batches, not rows: a batch of 1 row costs nearly what a full
        one does, so a per-row time measured at light load would refuse a burst the
        batcher serves at once."""
        ahead = sum(self._batches_s(key, rows) for key, rows in self._work_rows.items() if rows)
        return ahead / self.config.concurrent_batches

    def _batches_s(self, key: Hashable, rows: int) -> float:
        """The compute of `rows` rows of `key` in full batches (0 while its time is unknown)."""
        estimate = self._estimates.get(key)
        return 0.0 if estimate is None else -(-rows // self.config.max_batch) * estimate.batch_s

    def _ahead(self, key: Hashable, rows: int) -> None:
        """Rows of `key` joined (> 0) or left (< 0) the work ahead: queued or computing."""
        self._work_rows[key] = self._work_rows.get(key, 0) + rows

    def _timed_batch(self, key: Hashable, rows: int, compute_s: float) -> None:
        """A batch's compute time joins its key's estimate of a full batch's (recent ones
        weigh more): a batch at least half full scaled to a full one; smaller ones only
        until such a batch has been seen."""
        full = 2 * rows >= self.config.max_batch
        estimate = self._estimates.get(key)
        if not full and estimate is not None and estimate.from_full:
            return
        sample = compute_s * self.config.max_batch / rows if full else compute_s
        if estimate is None or full != estimate.from_full:
            self._estimates[key] = _Estimate(sample, full)
        else:
            self._estimates[key] = _Estimate(0.8 * estimate.batch_s + 0.2 * sample, full)

    def _depth(self, rows: int, requests: int) -> None:
        self._queued_rows += rows
        self._queued_requests += requests
        if self._on_depth is not None:
            self._on_depth(self._queued_rows)

    async def _gather(self, key: Hashable, busy: Callable[[], bool]) -> list[_Item]:
        """Wait for the batch of `key` to be due and take it out of the queue: full, or,
        with a compute thread free (`busy()` false), once its oldest request has waited
        the queue delay."""
        queue, wake = self._queues[key], self._wakes[key]
        delay = self.config.max_queue_delay_ms / 1000
        while not queue:
            wake.clear()
            await wake.wait()
        while True:
            rows = sum(i.rows for i in queue)
            if rows >= self.config.max_batch:
                break
            wake.clear()
            if busy():  # a batch finishing sets `wake` too: then the delay rule applies
                await wake.wait()
                continue
            left = queue[0].arrival + delay - time.monotonic()  # from the oldest request's arrival
            if left <= 0:
                break
            try:
                await asyncio.wait_for(wake.wait(), left)
            except asyncio.TimeoutError:  # not the builtin TimeoutError before Python 3.11
                break
        batch = [queue.popleft()]
        taken = batch[0].rows
        while queue and taken + queue[0].rows <= self.config.max_batch:
            taken += queue[0].rows
            batch.append(queue.popleft())
        return batch

    async def _work(self, key: Hashable) -> None:
        running: set[asyncio.Task[None]] = set()  # batches handed to the executor, not yet answered
        wake = self._wakes[key]  # set by a new request, and by a batch answered: `_gather` looks again
        computing = self.config.concurrent_batches  # batches the executor runs at once
        try:
            while True:
                while len(running) >= computing + self.config.queued_batches:
                    await asyncio.wait(running, return_when=asyncio.FIRST_COMPLETED)
                batch = await self._gather(key, busy=lambda: len(running) >= computing)
                now = time.monotonic()
                # the batch's own compute: a request due before it ends would be answered too late
                ends = now + self._batches_s(key, sum(item.rows for item in batch))
                live = []
                for item in batch:
                    if item.future.done():  # cancelled by its caller while waiting
                        self._depth(-item.rows, -1)
                        self._ahead(key, -item.rows)
                        continue
                    if item.deadline is not None and item.deadline <= ends:
                        self._depth(-item.rows, -1)
                        self._ahead(key, -item.rows)
                        item.future.set_exception(RequestError(
                            "DEADLINE_EXCEEDED", f"its deadline passes before its batch would end "
                                                 f"({1000 * (now - item.arrival):.1f} ms in the queue)"))
                        continue
                    live.append(item)  # still counted as waiting until its batch starts
                if not live:
                    continue
                task = asyncio.create_task(self._compute(key, live), name=f"batch:{key}")
                running.add(task)
                task.add_done_callback(functools.partial(_finished, running, wake))  # the compute is freer
        finally:
            for task in running:
                task.cancel()
            await asyncio.gather(*running, return_exceptions=True)

    def _run_timed(self, key: Hashable, items: list[_Item], loop: asyncio.AbstractEventLoop
                   ) -> tuple[list[Any], float, float]:
        """In the compute thread: the batch's results (an error for a request whose
        deadline passed while the batch waited behind another), and when it ran."""
        started = time.monotonic()
        rows = sum(i.rows for i in items)
        loop.call_soon_threadsafe(self._depth, -rows, -len(items))  # no longer waiting (still ahead: computing)
        due = [i for i, item in enumerate(items) if item.deadline is None or item.deadline > started]
        results: list[Any] = [RequestError("DEADLINE_EXCEEDED", "deadline passed in the queue")] * len(items)
        if due:
            computed = self._run_batch(key, [items[i].payload for i in due])
            if len(computed) != len(due):
                raise RuntimeError(f"run_batch returned {len(computed)} results for {len(due)} requests")
            for i, result in zip(due, computed):
                results[i] = result
        return results, started, time.monotonic()

    async def _compute(self, key: Hashable, live: list[_Item]) -> None:
        loop = asyncio.get_running_loop()
        rows = sum(i.rows for i in live)
        started = ended = time.monotonic()
        job = self._executor.submit(self._run_timed, key, live, loop)
        try:
            results, started, ended = await asyncio.wrap_future(job)
        except asyncio.CancelledError:
            self._ahead(key, -rows)
            if job.cancel():  # it never started (and now never will): its rows stop waiting here
                self._depth(-rows, -len(live))
            for item in live:
                if not item.future.done():
                    item.future.set_exception(RequestError("UNAVAILABLE", "the worker is shutting down"))
            raise
        except Exception as exc:  # a bug in run_batch fails its batch, never the worker
            results = [RequestError("INTERNAL", f"batch failed: {type(exc).__name__}: {exc}")] * len(live)
            ended = time.monotonic()
        self._ahead(key, -rows)  # computed: no longer ahead of anyone
        compute = ended - started
        if job.exception() is None:  # it ran to the end: a compute time to learn from
            self._timed_batch(key, rows, compute)
        if self._on_batch is not None:
            self._on_batch(key, rows, compute)
        for item, result in zip(live, results):
            if item.future.done():
                continue
            if isinstance(result, BaseException):
                item.future.set_exception(result if isinstance(result, RequestError)
                                          else RequestError("INTERNAL", f"{type(result).__name__}: {result}"))
            else:
                item.future.set_result((result, BatchInfo(started - item.arrival, compute, rows)))

    async def close(self) -> None:
        """Stop the workers; requests still waiting get UNAVAILABLE."""
        self._closed = True
        for task in self._workers.values():
            task.cancel()
        for task in self._workers.values():
            try:
                await task
            except asyncio.CancelledError:
                pass
        for key, queue in self._queues.items():
            while queue:
                item = queue.popleft()
                self._depth(-item.rows, -1)
                self._ahead(key, -item.rows)
                if not item.future.done():
                    item.future.set_exception(RequestError("UNAVAILABLE", "the worker is shutting down"))
        self._workers.clear()


def _finished(running: set[asyncio.Task[None]], wake: asyncio.Event, task: asyncio.Task[None]) -> None:
    """A batch's compute ended: it no longer counts, and the loop may start the next."""
    running.discard(task)
    wake.set()
