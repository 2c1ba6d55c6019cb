"""The dynamic batcher on its own: a full batch is handed to the compute thread while
another computes, so it starts without the event loop's help; partial batches wait."""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from splitexit.cloud.batcher import Batcher, BatcherConfig


class _Compute:
    """A run_batch that blocks its first call on a gate and records when each batch ran."""

    def __init__(self) -> None:
        self.gate = threading.Event()
        self.calls: list[tuple[list[str], float]] = []

    def __call__(self, key, payloads):
        if not self.calls:
            self.gate.wait(10)
        self.calls.append((list(payloads), time.monotonic()))
        return [f"done:{p}" for p in payloads]


async def _until(predicate, timeout: float = 5.0) -> None:
    ends = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < ends, "condition not reached in time"
        await asyncio.sleep(0.002)


@pytest.mark.parametrize("queued_batches", [1, 0])
def test_a_full_batch_waits_in_the_compute_thread_and_a_partial_one_in_the_queue(queued_batches: int) -> None:
    compute = _Compute()

    async def body() -> None:
        config = BatcherConfig(max_batch=4, max_queue_delay_ms=0, queued_batches=queued_batches)
        with ThreadPoolExecutor(max_workers=1) as executor:
            batcher = Batcher(config, compute, executor=executor)
            a = asyncio.ensure_future(batcher.submit("k", "a", rows=4))
            await _until(lambda: batcher.queued_rows == 0)  # A computes (blocked)
            b = asyncio.ensure_future(batcher.submit("k", "b", rows=4))  # a full batch
            c = asyncio.ensure_future(batcher.submit("k", "c", rows=1))  # a partial one: no point sending it ahead
            await asyncio.sleep(0.05)
            assert batcher.queued_rows == 5  # B counts as waiting until it starts
            compute.gate.set()
            time.sleep(0.3)  # the event loop is busy: only a batch already handed over can run now
            unblocked = time.monotonic()
            results = await asyncio.gather(a, b, c)
            assert [r for r, _ in results] == ["done:a", "done:b", "done:c"]
            assert [p for p, _ in compute.calls] == [["a"], ["b"], ["c"]]
            b_started = compute.calls[1][1]
            assert (b_started < unblocked) == (queued_batches > 0)
            assert compute.calls[2][1] >= unblocked  # C was formed once the compute was free
            assert batcher.queued_rows == 0 and batcher.queued_requests == 0
            info = results[1][1]
            assert info.batch_rows == 4 and info.compute_s >= 0 and info.queue_s > 0
            await batcher.close()

    asyncio.run(asyncio.wait_for(body(), 30))


@contextlib.asynccontextmanager
async def _computing_a(compute: _Compute):
    """A batcher of 2-row batches whose compute thread holds batch A (at the gate)."""
    with ThreadPoolExecutor(max_workers=1) as executor:
        batcher = Batcher(BatcherConfig(max_batch=2, max_queue_delay_ms=0), compute, executor=executor)
        a = asyncio.ensure_future(batcher.submit("k", "a", rows=2))
        await _until(lambda: batcher.queued_rows == 0)
        yield batcher, a


def test_a_batch_handed_ahead_drops_requests_whose_deadline_passed_behind_the_running_one() -> None:
    compute = _Compute()

    async def body() -> None:
        async with _computing_a(compute) as (batcher, a):
            late = asyncio.ensure_future(batcher.submit("k", "late", rows=2, deadline=time.monotonic() + 0.1))
            await asyncio.sleep(0.2)  # handed ahead, then its deadline passed while A still computed
            compute.gate.set()
            assert (await a)[0] == "done:a"
            with pytest.raises(Exception) as info:
                await late
            assert getattr(info.value, "code", None) == "DEADLINE_EXCEEDED"
            assert [p for p, _ in compute.calls] == [["a"]]
            await _until(lambda: batcher.queued_rows == 0)
            await batcher.close()

    asyncio.run(asyncio.wait_for(body(), 30))


def test_closing_answers_batches_handed_ahead_as_unavailable() -> None:
    compute = _Compute()

    async def body() -> None:
        async with _computing_a(compute) as (batcher, a):
            b = asyncio.ensure_future(batcher.submit("k", "b", rows=2))
            await asyncio.sleep(0.05)
            await batcher.close()
            compute.gate.set()
            for future in (a, b):
                with pytest.raises(Exception) as info:
                    await future
                assert getattr(info.value, "code", None) == "UNAVAILABLE"
            assert batcher.queued_rows == 0

    asyncio.run(asyncio.wait_for(body(), 30))


def test_with_a_compute_thread_free_a_partial_batch_runs_beside_a_busy_one() -> None:
    gate = threading.Event()

    def compute(key, payloads):
        if payloads == ["a"]:
            gate.wait(10)
        return [f"done:{p}" for p in payloads]

    async def body() -> None:
        config = BatcherConfig(max_batch=2, max_queue_delay_ms=0, concurrent_batches=2)
        with ThreadPoolExecutor(max_workers=config.concurrent_batches) as executor:
            batcher = Batcher(config, compute, executor=executor)
            a = asyncio.ensure_future(batcher.submit("k", "a", rows=2))
            await _until(lambda: batcher.queued_rows == 0)  # A computes (blocked)
            # a lone row: with one compute thread it would wait for A (see the first test)
            b, _ = await asyncio.wait_for(batcher.submit("k", "b", rows=1), 5)
            assert b == "done:b" and not a.done()
            gate.set()
            assert (await a)[0] == "done:a"
            await batcher.close()

    asyncio.run(asyncio.wait_for(body(), 30))


def test_concurrent_batches_must_be_positive() -> None:
    with pytest.raises(ValueError, match="concurrent_batches"):
        BatcherConfig(concurrent_batches=0)


class _Timed:
    """A run_batch taking `seconds` per call, whatever its size (as a batch on a CPU does
    until it is full)."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.calls: list[list[str]] = []

    def __call__(self, key, payloads):
        time.sleep(self.seconds)
        self.calls.append(list(payloads))
        return [f"done:{p}" for p in payloads]


async def _learned(batcher: Batcher, rows: int) -> None:
    """One batch of `rows` rows computed, so the batcher knows how long a batch takes."""
    await batcher.submit("k", "warm", rows=rows)


def test_a_request_expected_to_wait_past_its_deadline_is_refused_at_once() -> None:
    """Overload: 8 batches of 50 ms are ahead of a request with 200 ms left. Queued, it
    would expire in the queue (and, computed late, be answered to nobody); it is refused
    at once instead, and one with time enough is accepted and answered."""
    from splitexit.cloud.errors import RequestError

    async def body() -> None:
        with ThreadPoolExecutor(max_workers=1) as executor:
            batcher = Batcher(BatcherConfig(max_batch=4, max_queue_delay_ms=0, max_queue_wait_ms=10_000),
                              _Timed(0.05), executor=executor)
            await _learned(batcher, 4)
            ahead = [asyncio.ensure_future(batcher.submit("k", f"a{i}", rows=4)) for i in range(8)]
            await asyncio.sleep(0)
            t0 = time.monotonic()
            with pytest.raises(RequestError) as refused:
                await batcher.submit("k", "late", rows=4, deadline=time.monotonic() + 0.2)
            assert refused.value.code == "RESOURCE_EXHAUSTED" and "deadline" in refused.value.message
            assert time.monotonic() - t0 < 0.02  # at once, not after waiting
            result, _ = await batcher.submit("k", "patient", rows=4, deadline=time.monotonic() + 5.0)
            assert result == "done:patient"
            await asyncio.gather(*ahead)
            await batcher.close()

    asyncio.run(asyncio.wait_for(body(), 30))


def test_a_request_expected_to_wait_past_the_queue_wait_limit_is_refused_and_a_burst_is_not() -> None:
    """The expected wait counts whole batches of the work ahead: after small batches (1
    row in 50 ms) a burst of four 1-row requests is one batch, not four; past
    `max_queue_wait_ms` (here 160 ms: three batches and a bit) requests are refused,
    without a deadline too. A request's own compute is not waiting: alone in the queue,
    one whose batch takes longer than the limit is served (a worker must never refuse
    everything because its batches are slow)."""
    from splitexit.cloud.errors import RequestError

    async def body() -> None:
        with ThreadPoolExecutor(max_workers=1) as executor:
            batcher = Batcher(BatcherConfig(max_batch=4, max_queue_delay_ms=0, max_queue_wait_ms=160),
                              _Timed(0.05), executor=executor)
            await _learned(batcher, 1)
            assert batcher.expected_wait_s() == 0.0  # nothing ahead
            burst = [asyncio.ensure_future(batcher.submit("k", f"b{i}", rows=1)) for i in range(4)]
            more = [asyncio.ensure_future(batcher.submit("k", f"c{i}", rows=4)) for i in range(3)]
            await asyncio.sleep(0)
            assert batcher.expected_wait_s() == pytest.approx(0.2, rel=0.5)  # four batches ahead
            with pytest.raises(RequestError) as refused:
                await batcher.submit("k", "one too many", rows=4)
            assert refused.value.code == "RESOURCE_EXHAUSTED" and "limit 160 ms" in refused.value.message
            assert all(not t.done() or t.exception() is None for t in burst + more)
            results = await asyncio.gather(*burst, *more)
            assert [r for r, _ in results] == [f"done:b{i}" for i in range(4)] + [f"done:c{i}" for i in range(3)]
            await batcher.close()
        with ThreadPoolExecutor(max_workers=1) as executor:
            slow = Batcher(BatcherConfig(max_batch=4, max_queue_delay_ms=0, max_queue_wait_ms=100),
                           _Timed(0.3), executor=executor)
            await _learned(slow, 4)  # a full batch takes 300 ms, three times the limit
            result, _ = await slow.submit("k", "alone", rows=4)
            assert result == "done:alone"
            await slow.close()

    asyncio.run(asyncio.wait_for(body(), 30))


def test_a_request_whose_deadline_falls_inside_its_batch_is_not_computed() -> None:
    """Accepted with time enough, a request whose deadline then falls before its batch
    could end is dropped before compute (DEADLINE_EXCEEDED): computed, it would answer
    nobody. Batches took 50 ms; the one ahead takes 150 ms, leaving the next request
    40 ms, less than a batch."""
    from splitexit.cloud.errors import RequestError

    async def body() -> None:
        compute = _Timed(0.05)
        with ThreadPoolExecutor(max_workers=1) as executor:
            batcher = Batcher(BatcherConfig(max_batch=2, max_queue_delay_ms=0, queued_batches=0), compute,
                              executor=executor)
            await _learned(batcher, 2)
            compute.seconds = 0.15
            first = asyncio.ensure_future(batcher.submit("k", "first", rows=2))
            await _until(lambda: batcher.queued_rows == 0)
            t0 = time.monotonic()
            tight = asyncio.ensure_future(batcher.submit("k", "tight", rows=2, deadline=t0 + 0.19))
            await asyncio.sleep(0)
            assert not tight.done()  # accepted: ~2 batches of 50 ms ahead
            await first
            with pytest.raises(RequestError) as dropped:
                await tight
            assert dropped.value.code == "DEADLINE_EXCEEDED" and "before its batch would end" in dropped.value.message
            assert time.monotonic() < t0 + 0.19  # told before its deadline, not at it
            assert ["tight"] not in compute.calls
            await batcher.close()

    asyncio.run(asyncio.wait_for(body(), 30))
