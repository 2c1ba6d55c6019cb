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
