"""Link emulation in user space: an asyncio TCP proxy that puts one edge-cloud link
between a client and a server, with no root and no kernel support (this kernel has no
netem).

Per direction (`Direction`): a one-way delay with jitter, a bandwidth (a token bucket) or
a real link's capacity replayed from a Mahimahi trace (`Trace`), and losses as TCP would
show them (a retransmission stall of one RTO). For the whole link: outages on a schedule
or on demand (`Outage`: black-hole, refuse, reset), settings that change while it runs
(`LinkProxy.update`), and counters (`LinkCounters`).

How time works: every chunk read from one side gets a release time (when its last byte
would come out of the far end of the link) the moment it is read: it leaves the
bottleneck when the shared bandwidth (or the trace's delivery opportunities) has room for
it, then travels the delay. A writer per connection writes each chunk at its release time,
in order. So a stream keeps flowing at the link's rate while every chunk is late by the
delay: nothing sleeps the delay per write, and the delay does not add up along a stream.
The bandwidth is shared by all connections through the link, as on a real one. Each
connection holds at most `LinkProfile.buffer_bytes` in flight per direction; beyond that
it stops reading, so the sender feels the bottleneck (backpressure) as over TCP.

The delay of a chunk never lets it overtake an earlier one of its connection (TCP
delivers in order); jitter therefore spreads a stream's chunks but cannot reorder them.
"""

from __future__ import annotations

import asyncio
import bisect
import logging
import math
import random
import socket
import tarfile
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Coroutine, Literal, Sequence

__all__ = [
    "Direction",
    "LinkCounters",
    "LinkProfile",
    "LinkProxy",
    "Outage",
    "PROFILES",
    "Trace",
    "load_trace",
]

log = logging.getLogger(__name__)

PACKET_BYTES = 1500  # Mahimahi: one delivery opportunity carries one packet of this size
SEGMENT_BYTES = 1460  # a TCP segment's payload, for the loss model
_READ_BYTES = 16 * 1024  # per read: small enough that a slow link streams instead of jumping


# --- traces ----------------------------------------------------------------------------
@dataclass(frozen=True)
class Trace:
    """A link's capacity over time in Mahimahi's format: delivery opportunities at
    millisecond times, each for one 1,500-byte packet; the trace repeats with a period of
    its last time."""

    name: str
    times_ms: tuple[int, ...]  # sorted, >= 0

    def __post_init__(self) -> None:
        if not self.times_ms:
            raise ValueError(f"trace {self.name!r} has no delivery opportunity")
        if any(b < a for a, b in zip(self.times_ms, self.times_ms[1:])) or self.times_ms[0] < 0:
            raise ValueError(f"trace {self.name!r}: times must be non-negative and ascending")

    @property
    def period_ms(self) -> int:
        """Mahimahi repeats a trace after its last timestamp (at least 1 ms)."""
        return max(1, self.times_ms[-1])

    @property
    def mean_mbps(self) -> float:
        return len(self.times_ms) * PACKET_BYTES * 8 / (self.period_ms / 1e3) / 1e6

    def opportunity_time_ms(self, n: int) -> float:
        """Time of the n-th delivery opportunity, counting over the trace's repeats."""
        cycle, i = divmod(n, len(self.times_ms))
        return cycle * self.period_ms + self.times_ms[i]

    def first_opportunity_at(self, t_ms: float) -> int:
        """Index of the first delivery opportunity at or after `t_ms`."""
        cycle = max(0, int(t_ms // self.period_ms))
        i = bisect.bisect_left(self.times_ms, t_ms - cycle * self.period_ms)
        return cycle * len(self.times_ms) + i

    def mean_mbps_between(self, start_ms: float, end_ms: float) -> float:
        """Capacity over a window, in Mbit/s."""
        n = self.first_opportunity_at(end_ms) - self.first_opportunity_at(start_ms)
        return n * PACKET_BYTES * 8 / ((end_ms - start_ms) / 1e3) / 1e6


def parse_trace(text: str, name: str = "trace") -> Trace:
    """A trace from Mahimahi's text: one integer millisecond time per line."""
    times = []
    for number, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line:
            continue
        try:
            times.append(int(line))
        except ValueError:
            raise ValueError(f"trace {name!r} line {number}: {line[:40]!r} is not a millisecond time") from None
    return Trace(name, tuple(times))


def load_trace(source: str | Path, member: str | None = None) -> Trace:
    """A trace file, or `member` (e.g. "TMobile-LTE-short.up") of a .tar.gz of traces
    such as ../shared/data/cellular-traces.tar.gz."""
    source = Path(source)
    if member is None:
        return parse_trace(source.read_text(), source.name)
    with tarfile.open(source) as archive:
        names = [m for m in archive.getmembers() if m.isfile() and Path(m.name).name == member]
        if not names:
            available = sorted(Path(m.name).name for m in archive.getmembers() if m.isfile())
            raise ValueError(f"{source}: no trace {member!r}; it has {available}")
        handle = archive.extractfile(names[0])
        assert handle is not None
        return parse_trace(handle.read().decode(), member)


# --- settings --------------------------------------------------------------------------
@dataclass(frozen=True, kw_only=True)
class Direction:
    """What one direction of the link does to the bytes that cross it."""

    delay_ms: float = 0.0  # one-way
    jitter_ms: float = 0.0  # spread of the delay (see `jitter`)
    # uniform: delay ± jitter_ms; normal: a normal spread of standard deviation jitter_ms
    # (cut at zero delay)
    jitter: Literal["uniform", "normal"] = "uniform"
    rate_mbps: float | None = None  # token bucket rate; None = as fast as loopback goes
    burst_bytes: int = 16 * 1024  # the bucket's depth
    trace: Trace | None = None  # capacity replayed from a trace (instead of rate_mbps)
    loss: float = 0.0  # probability per TCP segment of a retransmission stall
    rto_ms: float = 200.0  # length of such a stall (TCP's minimum RTO is 200 ms on Linux)

    def __post_init__(self) -> None:
        if self.delay_ms < 0 or self.jitter_ms < 0 or self.rto_ms < 0:
            raise ValueError("delay_ms, jitter_ms and rto_ms must be >= 0")
        if self.jitter not in ("uniform", "normal"):
            raise ValueError(f"jitter must be 'uniform' or 'normal', got {self.jitter!r}")
        if self.rate_mbps is not None and not self.rate_mbps > 0:
            raise ValueError(f"rate_mbps must be > 0 (or None for no limit), got {self.rate_mbps}")
        if self.burst_bytes < 1:
            raise ValueError("burst_bytes must be >= 1")
        if not 0 <= self.loss < 1:
            raise ValueError(f"loss must be in [0, 1), got {self.loss}")
        if self.trace is not None and self.rate_mbps is not None:
            raise ValueError("a direction has a rate or a trace, not both")


@dataclass(frozen=True, kw_only=True)
class LinkProfile:
    """Both directions of a link. `up` is edge -> cloud (client -> server)."""

    up: Direction = field(default_factory=Direction)
    down: Direction = field(default_factory=Direction)
    buffer_bytes: int = 256 * 1024  # in flight per connection and direction before reading stops

    def __post_init__(self) -> None:
        if self.buffer_bytes < _READ_BYTES:
            raise ValueError(f"buffer_bytes must be >= {_READ_BYTES}")

    @classmethod
    def symmetric(cls, *, rtt_ms: float = 0.0, **direction: object) -> "LinkProfile":
        """The same settings both ways, the RTT split evenly."""
        one = Direction(delay_ms=rtt_ms / 2, **direction)  # type: ignore[arg-type]
        return cls(up=one, down=one)


def _profile(up_mbps: float, down_mbps: float | None, rtt_ms: float) -> LinkProfile:
    return LinkProfile(up=Direction(rate_mbps=up_mbps, delay_ms=rtt_ms / 2),
                       down=Direction(rate_mbps=down_mbps, delay_ms=rtt_ms / 2))


# METHODS.md §6. Neurosurgeon gives uplinks only: the downlink (a few hundred bytes of
# answers) is left unlimited, and the RTTs are WebPageTest's for the same class of link
# (3G: 300 ms; LTE: 70 ms, its "4G" profile's; Wi-Fi: 28 ms, its "Cable").
PROFILES: dict[str, LinkProfile] = {
    "3g": _profile(1.1, None, 300.0),
    "lte": _profile(5.85, None, 70.0),
    "wifi": _profile(18.88, None, 28.0),
    "3g-webpagetest": _profile(0.768, 1.6, 300.0),
    "3g-slow": _profile(0.33, 0.78, 200.0),
    "cable": _profile(1.0, 5.0, 28.0),
    "fios": _profile(5.0, 20.0, 4.0),
}


@dataclass(frozen=True)
class Outage:
    """The link fails for `duration_s` from `start_s` (seconds after the proxy started).

    blackhole: nothing crosses (bytes wait, as unacknowledged TCP data would, and cross
        when it ends); new connections hang the same way.
    refuse: every connection is reset and new ones are refused (a worker gone).
    reset: the open connections are reset once, at the start; new ones work.
    """

    start_s: float
    duration_s: float
    mode: Literal["blackhole", "refuse", "reset"] = "blackhole"

    def __post_init__(self) -> None:
        if self.start_s < 0 or self.duration_s < 0:
            raise ValueError("an outage's start and duration must be >= 0")
        if self.mode not in ("blackhole", "refuse", "reset"):
            raise ValueError(f"outage mode must be blackhole, refuse or reset, got {self.mode!r}")

    @property
    def end_s(self) -> float:
        return self.start_s + self.duration_s


@dataclass
class LinkCounters:
    """What crossed the link since it started."""

    bytes_up: int = 0
    bytes_down: int = 0
    chunks_up: int = 0
    chunks_down: int = 0
    stalls: int = 0  # loss stalls (retransmissions)
    connections: int = 0
    refused: int = 0
    resets: int = 0


# --- the bottleneck of one direction ----------------------------------------------------
class _Bottleneck:
    """Departure times through one direction's bandwidth, shared by every connection."""

    def __init__(self, start: float) -> None:
        self.start = start  # loop time of trace time 0
        self.tokens = 0.0  # token bucket: bytes available (negative = owed)
        self.tokens_at = start
        self.next_opportunity = 0  # trace: index of the first opportunity not used up
        self.left_in_opportunity = 0  # bytes still free in opportunity next_opportunity - 1
        self.free_at = start  # trace: when the last chunk finished crossing

    def depart(self, now: float, size: int, direction: Direction) -> float:
        """When a chunk of `size` bytes read at `now` has crossed the bottleneck."""
        if direction.trace is not None:
            return self._depart_trace(now, size, direction.trace)
        if direction.rate_mbps is None:
            return now
        rate = direction.rate_mbps * 1e6 / 8  # bytes per second
        self.tokens = min(direction.burst_bytes, self.tokens + (now - self.tokens_at) * rate)
        self.tokens_at = now
        self.tokens -= size
        return now if self.tokens >= 0 else now - self.tokens / rate

    def _depart_trace(self, now: float, size: int, trace: Trace) -> float:
        # Compared as loop times, not as trace milliseconds: a backlogged link must never
        # look idle through a rounding error and lose the opportunities it still has.
        if now > self.free_at:  # idle since its last chunk: what it could have carried meanwhile is gone
            first = trace.first_opportunity_at((now - self.start) * 1e3)
            if first >= self.next_opportunity:
                self.next_opportunity, self.left_in_opportunity = first, 0
        take = min(size, self.left_in_opportunity)
        size -= take
        self.left_in_opportunity -= take
        last = self.next_opportunity - 1  # the opportunity that carries the chunk's last byte
        if size > 0:
            packets = math.ceil(size / PACKET_BYTES)
            last = self.next_opportunity + packets - 1
            self.next_opportunity += packets
            self.left_in_opportunity = packets * PACKET_BYTES - size
        done = self.start + trace.opportunity_time_ms(max(last, 0)) / 1e3
        self.free_at = max(self.free_at, done)
        return max(now, done)


def _jitter(direction: Direction, rng: random.Random) -> float:
    if direction.jitter_ms == 0:
        return 0.0
    if direction.jitter == "uniform":
        return rng.uniform(-direction.jitter_ms, direction.jitter_ms)
    return rng.gauss(0.0, direction.jitter_ms)


# --- the proxy --------------------------------------------------------------------------
class LinkProxy:
    """A TCP proxy on `listen` that forwards to `target` through an emulated link.

        proxy = LinkProxy(("127.0.0.1", worker_port), PROFILES["lte"])
        await proxy.start()           # proxy.address: point the edge agent here
        proxy.update(up=Direction(rate_mbps=1.0, delay_ms=50))   # while it runs
        proxy.outage("blackhole", 3.0)
        await proxy.close()
    """

    def __init__(self, target: tuple[str, int], profile: LinkProfile | None = None, *,
                 listen: tuple[str, int] = ("127.0.0.1", 0), outages: Sequence[Outage] = (), seed: int = 0,
                 clock_start: float | None = None) -> None:
        """`clock_start`: the event loop time of the proxy's time 0 (of its outages and its
        traces); default: when it starts. Proxies given one clock replay a trace in step."""
        self.target = target
        self.profile = profile or LinkProfile()
        self.listen = listen
        self.counters = LinkCounters()
        self._outages = list(outages)
        self._rng = random.Random(seed)
        self._server: asyncio.Server | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._start = 0.0
        self._clock_start = clock_start
        self._up: _Bottleneck | None = None
        self._down: _Bottleneck | None = None
        self._connections: set[_Connection] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self._handlers: set[asyncio.Task[object]] = set()  # one per accepted connection
        self._outage_changed = asyncio.Event()

    # -- lifecycle ---------------------------------------------------------------------
    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._start = self._loop.time() if self._clock_start is None else self._clock_start
        if self._up is None or self._down is None:  # not sharing another proxy's (`share_link_with`)
            self._up, self._down = _Bottleneck(self._start), _Bottleneck(self._start)
        self._server = await asyncio.start_server(self._accept, *self.listen)
        self._spawn(self._outage_clock())

    def share_link_with(self, other: "LinkProxy") -> None:
        """Carry this proxy's bytes through `other`'s bottlenecks (call before `start`): one
        device's link to several workers is one radio, not one per worker."""
        if other._up is None or other._down is None:
            raise RuntimeError("start the proxy whose link is shared first")
        self._up, self._down = other._up, other._down

    @property
    def address(self) -> str:
        """host:port the client connects to."""
        if self._server is None:
            raise RuntimeError("the link proxy is not started")
        host, port = self._server.sockets[0].getsockname()[:2]
        return f"{host}:{port}"

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for connection in list(self._connections):
            connection.abort()
        handlers = [t for t in self._handlers if not t.done()]
        if handlers:  # they end on their own once their sockets are reset
            await asyncio.wait(handlers, timeout=1.0)
        for task in [*self._tasks, *self._handlers]:
            task.cancel()
        await asyncio.gather(*self._tasks, *self._handlers, return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()
            self._server = None

    async def __aenter__(self) -> "LinkProxy":
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def now_s(self) -> float:
        """Seconds since the proxy started (the clock of outages and traces)."""
        assert self._loop is not None
        return self._loop.time() - self._start

    # -- changes while running ---------------------------------------------------------
    def update(self, *, up: Direction | None = None, down: Direction | None = None) -> None:
        """New settings for one or both directions, from the next chunk on (a trace
        switched in starts from its beginning)."""
        assert self._loop is not None, "start the proxy first"
        for name, new in (("up", up), ("down", down)):
            if new is None:
                continue
            old: Direction = getattr(self.profile, name)
            if new.trace is not None and new.trace is not old.trace:
                setattr(self, f"_{name}", _Bottleneck(self._loop.time()))
        self.profile = replace(self.profile, up=up or self.profile.up, down=down or self.profile.down)

    def outage(self, mode: Literal["blackhole", "refuse", "reset"], duration_s: float) -> Outage:
        """An outage from now on."""
        event = Outage(self.now_s(), duration_s, mode)
        self._outages.append(event)
        self._outage_changed.set()
        return event

    def outage_at(self, t_s: float | None = None) -> Outage | None:
        """The outage in force at `t_s` (default now), if any."""
        t = self.now_s() if t_s is None else t_s
        return next((o for o in self._outages if o.start_s <= t < o.end_s), None)

    # -- internals ---------------------------------------------------------------------
    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _outage_clock(self) -> None:
        """Applies outages at their start (resets) and wakes held traffic at their end."""
        started: set[int] = set()
        while True:
            now = self.now_s()
            for o in self._outages:
                if id(o) not in started and o.start_s <= now:
                    started.add(id(o))
                    if o.mode in ("refuse", "reset"):
                        for connection in list(self._connections):
                            connection.abort()
                            self.counters.resets += 1
            upcoming = [t for o in self._outages for t in (o.start_s, o.end_s) if t > now]
            self._outage_changed.clear()
            wait = (min(upcoming) - now) if upcoming else None
            try:
                await asyncio.wait_for(self._outage_changed.wait(), wait)
            except asyncio.TimeoutError:
                pass
            for connection in list(self._connections):
                connection.wake()

    def blackholed_until(self) -> float | None:
        """Loop time at which the current black-hole outage ends, or None."""
        o = self.outage_at()
        if o is None or o.mode != "blackhole":
            return None
        return self._start + o.end_s

    async def _accept(self, client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if task is not None:
            self._handlers.add(task)
            task.add_done_callback(self._handlers.discard)
        try:
            await self._serve(client_reader, client_writer)
        except asyncio.CancelledError:  # the proxy is closing: the connection goes with it
            _reset(client_writer)

    async def _serve(self, client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> None:
        o = self.outage_at()
        if o is not None and o.mode == "refuse":
            self.counters.refused += 1
            _reset(client_writer)
            return
        hold = self.blackholed_until()
        if hold is not None:  # the handshake would not get through: wait like it
            assert self._loop is not None
            await asyncio.sleep(max(0.0, hold - self._loop.time()))
        try:
            server_reader, server_writer = await asyncio.open_connection(*self.target)
        except OSError as exc:
            log.debug("link proxy: target %s unreachable: %s", self.target, exc)
            _reset(client_writer)
            return
        self.counters.connections += 1
        connection = _Connection(self, client_reader, client_writer, server_reader, server_writer)
        self._connections.add(connection)
        try:
            await connection.run()
        finally:
            self._connections.discard(connection)

    def _schedule(self, up: bool, size: int, last_release: float) -> float:
        """The release time of a chunk read now: bottleneck, loss stall, delay, in order."""
        assert self._loop is not None and self._up is not None and self._down is not None
        now = self._loop.time()
        direction = self.profile.up if up else self.profile.down
        t = (self._up if up else self._down).depart(now, size, direction)
        if direction.loss > 0:
            segments = math.ceil(size / SEGMENT_BYTES)
            if self._rng.random() < 1 - (1 - direction.loss) ** segments:
                t += direction.rto_ms / 1e3
                self.counters.stalls += 1
        t += max(0.0, direction.delay_ms + _jitter(direction, self._rng)) / 1e3
        if up:
            self.counters.bytes_up += size
            self.counters.chunks_up += 1
        else:
            self.counters.bytes_down += size
            self.counters.chunks_down += 1
        return max(t, last_release)  # in order: TCP does not reorder a stream


def _reset(writer: asyncio.StreamWriter) -> None:
    """Close with an RST (SO_LINGER 0), as a refused or reset connection looks."""
    sock = writer.get_extra_info("socket")
    if sock is not None:
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
        except OSError:
            pass
    writer.transport.abort()


class _Connection:
    """One client connection and its connection to the target: a pipe per direction."""

    def __init__(self, proxy: LinkProxy, client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter,
                 server_reader: asyncio.StreamReader, server_writer: asyncio.StreamWriter) -> None:
        self.proxy = proxy
        self.client_writer, self.server_writer = client_writer, server_writer
        self._pipes = [_Pipe(self, client_reader, server_writer, up=True),
                       _Pipe(self, server_reader, client_writer, up=False)]

    async def run(self) -> None:
        tasks = [asyncio.ensure_future(p.pump()) for p in self._pipes] + \
                [asyncio.ensure_future(p.deliver()) for p in self._pipes]
        try:
            await asyncio.gather(*tasks)
        except (ConnectionError, OSError, asyncio.IncompleteReadError):
            self.abort()
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            for writer in (self.client_writer, self.server_writer):
                writer.close()

    def abort(self) -> None:
        _reset(self.client_writer)
        _reset(self.server_writer)
        for pipe in self._pipes:
            pipe.wake()

    def wake(self) -> None:
        for pipe in self._pipes:
            pipe.wake()


class _Pipe:
    """One direction of one connection: reads chunks, stamps their release time, writes
    them out at that time; holds at most the profile's buffer in flight."""

    def __init__(self, connection: _Connection, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, *,
                 up: bool) -> None:
        self.connection, self.reader, self.writer, self.up = connection, reader, writer, up
        self.queue: list[tuple[float, bytes]] = []
        self.queued_bytes = 0
        self.last_release = 0.0
        self.eof = False
        self._changed = asyncio.Event()

    def wake(self) -> None:
        self._changed.set()

    async def pump(self) -> None:
        proxy = self.connection.proxy
        while True:
            while self.queued_bytes >= proxy.profile.buffer_bytes:  # backpressure
                self._changed.clear()
                await self._changed.wait()
            data = await self.reader.read(_READ_BYTES)
            if not data:
                self.eof = True
                self.wake()
                return
            self.last_release = proxy._schedule(self.up, len(data), self.last_release)
            self.queue.append((self.last_release, data))
            self.queued_bytes += len(data)
            self.wake()

    async def deliver(self) -> None:
        proxy = self.connection.proxy
        loop = asyncio.get_running_loop()
        while True:
            if not self.queue:
                if self.eof:
                    if self.writer.can_write_eof():
                        self.writer.write_eof()
                    return
                self._changed.clear()
                await self._changed.wait()
                continue
            release, data = self.queue[0]
            held = proxy.blackholed_until()
            due = max(release, held) if held is not None else release
            if due > loop.time():
                self._changed.clear()
                try:
                    await asyncio.wait_for(self._changed.wait(), due - loop.time())
                except asyncio.TimeoutError:
                    pass
                continue
            self.queue.pop(0)
            self.queued_bytes -= len(data)
            self.wake()
            self.writer.write(data)
            await self.writer.drain()
