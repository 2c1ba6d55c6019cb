"""Answers by request id, so that a retried request is answered once.

An edge retries on UNAVAILABLE and on a lost connection with the same request id. The
first try may still be computing, or may have been answered with the answer lost on the
way back; either way the retry must not run the rows a second time. The worker keeps the
answer (or the computation under way) of recent request ids for `ttl_s`:
a duplicate waits for the same computation or gets the stored answer.

The key is the request id with the model, its bundle and the sample ids, so two edges that
happen to pick the same id for different rows never share an answer. Failures are not
kept: a retry after an error computes again.
"""

from __future__ import annotations

import asyncio
import collections
import time
from dataclasses import dataclass
from typing import Awaitable, Callable, Hashable

from splitexit.proto import inference_pb2 as pb

__all__ = ["AnswerCache", "AnswerCacheConfig"]


@dataclass(frozen=True, kw_only=True)
class AnswerCacheConfig:
    ttl_s: float = 60.0  # longer than an edge's whole retry window (its call deadline)
    max_entries: int = 4096  # oldest go first beyond it

    def __post_init__(self) -> None:
        if self.ttl_s < 0 or self.max_entries < 0:
            raise ValueError("ttl_s and max_entries must be >= 0 (0 turns the cache off)")


class AnswerCache:
    """In one event loop: `await answer(key, compute)` runs `compute` once per key."""

    def __init__(self, config: AnswerCacheConfig, *, on_hit: Callable[[], None] | None = None) -> None:
        self.config = config
        self._on_hit = on_hit
        self._entries: collections.OrderedDict[Hashable, tuple[float, asyncio.Future[pb.InferResponse]]] = \
            collections.OrderedDict()
        self.hits = 0

    def __len__(self) -> int:
        return len(self._entries)

    async def answer(self, key: Hashable, compute: Callable[[], Awaitable[pb.InferResponse]]) -> pb.InferResponse:
        if not self.config.max_entries or not self.config.ttl_s:
            return await compute()
        self._expire()
        entry = self._entries.get(key)
        if entry is not None:
            shared = entry[1]
            try:
                response = await asyncio.shield(shared)
                self.hits += 1
                if self._on_hit is not None:
                    self._on_hit()
                return response
            except asyncio.CancelledError:
                if not shared.cancelled():  # we were cancelled ourselves, not the first try
                    raise
            # the first try failed or was cancelled: compute afresh (below)
        future: asyncio.Future[pb.InferResponse] = asyncio.get_running_loop().create_future()
        self._entries[key] = (time.monotonic() + self.config.ttl_s, future)
        self._entries.move_to_end(key)
        while len(self._entries) > self.config.max_entries:
            self._entries.popitem(last=False)
        try:
            response = await compute()
        except BaseException:
            if self._entries.get(key, (0, None))[1] is future:
                del self._entries[key]
            future.cancel()  # duplicates waiting on it compute afresh; nothing is left unretrieved
            raise
        future.set_result(response)
        return response

    def _expire(self) -> None:
        now = time.monotonic()
        while self._entries:
            key, (expires, _) = next(iter(self._entries.items()))
            if expires > now:
                return
            del self._entries[key]
