"""The worker's answer cache: a retried request id is computed once."""

from __future__ import annotations

import asyncio

import pytest

from splitexit.cloud.answers import AnswerCache, AnswerCacheConfig
from splitexit.cloud.errors import RequestError
from splitexit.proto import inference_pb2 as pb


class Counting:
    """A compute that counts its runs and waits for `gate` (when given)."""

    def __init__(self, gate: asyncio.Event | None = None, fail: BaseException | None = None) -> None:
        self.runs = 0
        self.gate = gate
        self.fail = fail

    async def __call__(self) -> pb.InferResponse:
        self.runs += 1
        if self.gate is not None:
            await self.gate.wait()
        if self.fail is not None:
            raise self.fail
        return pb.InferResponse(request_id=f"run-{self.runs}")


def test_a_duplicate_in_flight_or_answered_shares_the_first_computation() -> None:
    async def body() -> None:
        hits = []
        cache = AnswerCache(AnswerCacheConfig(), on_hit=lambda: hits.append(1))
        gate = asyncio.Event()
        compute = Counting(gate)
        first = asyncio.create_task(cache.answer("k", compute))
        await asyncio.sleep(0)
        second = asyncio.create_task(cache.answer("k", compute))  # while the first computes
        await asyncio.sleep(0)
        gate.set()
        a, b = await asyncio.gather(first, second)
        c = await cache.answer("k", compute)  # after it was answered
        other = await cache.answer("other", compute)
        assert compute.runs == 2 and a.request_id == b.request_id == c.request_id == "run-1"
        assert other.request_id == "run-2" and len(hits) == 2 and cache.hits == 2

    asyncio.run(body())


def test_failures_are_not_kept_and_a_waiting_duplicate_computes_afresh() -> None:
    async def body() -> None:
        cache = AnswerCache(AnswerCacheConfig())
        gate = asyncio.Event()
        failing = Counting(gate, fail=RequestError("DEADLINE_EXCEEDED", "late"))
        first = asyncio.create_task(cache.answer("k", failing))
        await asyncio.sleep(0)
        good = Counting()
        second = asyncio.create_task(cache.answer("k", good))
        await asyncio.sleep(0)
        gate.set()
        with pytest.raises(RequestError, match="late"):
            await first
        assert (await second).request_id == "run-1" and good.runs == 1
        assert (await cache.answer("k", Counting())).request_id == "run-1"  # the retry's answer is kept

    asyncio.run(body())


def test_a_cancelled_duplicate_leaves_the_first_try_running() -> None:
    async def body() -> None:
        cache = AnswerCache(AnswerCacheConfig())
        gate = asyncio.Event()
        compute = Counting(gate)
        first = asyncio.create_task(cache.answer("k", compute))
        await asyncio.sleep(0)
        second = asyncio.create_task(cache.answer("k", compute))
        await asyncio.sleep(0)
        second.cancel()
        with pytest.raises(asyncio.CancelledError):
            await second
        gate.set()
        assert (await first).request_id == "run-1" and compute.runs == 1

    asyncio.run(body())


def test_entries_expire_and_the_cache_is_bounded(monkeypatch) -> None:
    import splitexit.cloud.answers as answers

    now = [1000.0]
    monkeypatch.setattr(answers.time, "monotonic", lambda: now[0])

    async def body() -> None:
        cache = AnswerCache(AnswerCacheConfig(ttl_s=10, max_entries=3))
        compute = Counting()
        for key in "abcd":
            await cache.answer(key, compute)
        assert len(cache) == 3  # "a" went first
        assert (await cache.answer("a", compute)).request_id == "run-5"
        now[0] += 11
        assert (await cache.answer("d", compute)).request_id == "run-6"  # expired
        assert len(cache) == 1
        off = AnswerCache(AnswerCacheConfig(max_entries=0))
        await off.answer("k", compute)
        await off.answer("k", compute)
        assert compute.runs == 8

    asyncio.run(body())
    with pytest.raises(ValueError, match="ttl_s"):
        AnswerCacheConfig(ttl_s=-1)
