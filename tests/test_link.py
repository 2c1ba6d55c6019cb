"""The link emulator on loopback: delay, jitter, bandwidth and trace replay measured within
10% of what was asked, loss stalls, outages, and changes while it runs."""

from __future__ import annotations

import asyncio
import statistics
import time
from contextlib import asynccontextmanager
from pathlib import Path
from typing import AsyncIterator

import pytest

from splitexit.sim.link import Direction, LinkProfile, LinkProxy, Outage, Trace, load_trace, parse_trace

pytestmark = pytest.mark.loopback

TRACES = Path(__file__).resolve().parents[2] / "shared" / "data" / "cellular-traces.tar.gz"


async def _echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    except ConnectionError:
        pass
    finally:
        writer.close()


class Sink:
    """A server that counts what arrives, with the time of each chunk."""

    def __init__(self) -> None:
        self.arrivals: list[tuple[float, int]] = []

    async def __call__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(65536):
                self.arrivals.append((time.monotonic(), len(data)))
        except ConnectionError:
            pass
        writer.close()

    def bytes_between(self, start: float, end: float) -> int:
        return sum(n for t, n in self.arrivals if start <= t < end)


@asynccontextmanager
async def _link(profile: LinkProfile, handler=_echo, **kwargs) -> AsyncIterator[LinkProxy]:
    server = await asyncio.start_server(handler, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        async with LinkProxy(("127.0.0.1", port), profile, **kwargs) as proxy:
            yield proxy
    finally:
        server.close()
        await server.wait_closed()


async def _connect(proxy: LinkProxy) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    host, port = proxy.address.rsplit(":", 1)
    return await asyncio.open_connection(host, int(port))


async def _pings(proxy: LinkProxy, count: int, size: int = 64) -> list[float]:
    """Round trips (ms) of `count` messages sent one at a time."""
    reader, writer = await _connect(proxy)
    out = []
    for i in range(count):
        message = bytes([i % 256]) * size
        t0 = time.monotonic()
        writer.write(message)
        await writer.drain()
        assert await reader.readexactly(size) == message  # intact
        out.append((time.monotonic() - t0) * 1e3)
    writer.close()
    return out


def _run(coro, timeout: float = 30.0):
    return asyncio.run(asyncio.wait_for(coro, timeout))


def test_the_round_trip_is_the_two_delays() -> None:
    async def body() -> list[float]:
        async with _link(LinkProfile(up=Direction(delay_ms=40), down=Direction(delay_ms=20))) as proxy:
            return await _pings(proxy, 10)

    rtts = _run(body())
    assert 60 * 0.95 <= statistics.median(rtts) <= 60 * 1.1, rtts


@pytest.mark.slow
def test_jitter_stays_within_its_bounds_and_spreads() -> None:
    async def body() -> list[float]:
        async with _link(LinkProfile(up=Direction(delay_ms=30, jitter_ms=20))) as proxy:
            return await _pings(proxy, 40)

    rtts = sorted(_run(body()))
    # within 30 +- 20 ms (and a little for this machine's own scheduling), spread over the range
    assert 10 * 0.9 <= rtts[0] and rtts[int(0.95 * len(rtts))] <= 50 * 1.1 + 2, rtts
    assert rtts[-1] - rtts[0] > 15


@pytest.mark.slow
@pytest.mark.parametrize("rate_mbps", [4.0, 12.0])
def test_bandwidth_is_what_was_asked(rate_mbps: float) -> None:
    sink = Sink()
    total = int(rate_mbps * 1e6 / 8)  # one second's worth

    async def body() -> float:
        async with _link(LinkProfile(up=Direction(rate_mbps=rate_mbps)), handler=sink) as proxy:
            _, writer = await _connect(proxy)
            start = time.monotonic()
            writer.write(b"x" * total)
            await writer.drain()
            writer.close()
            while sum(n for _, n in sink.arrivals) < total:
                await asyncio.sleep(0.01)
            return time.monotonic() - start

    seconds = _run(body())
    measured = total * 8 / seconds / 1e6
    assert rate_mbps * 0.9 <= measured <= rate_mbps * 1.1, measured


def test_a_trace_is_parsed_and_its_capacity_counted() -> None:
    trace = parse_trace("1\n1\n2\n\n4\n", "t")
    assert trace.times_ms == (1, 1, 2, 4) and trace.period_ms == 4
    assert trace.opportunity_time_ms(5) == 4 + 1  # the second repeat's second opportunity
    assert trace.first_opportunity_at(3) == 3 and trace.first_opportunity_at(4.5) == 4
    assert trace.mean_mbps == pytest.approx(4 * 1500 * 8 / 0.004 / 1e6)
    with pytest.raises(ValueError, match="line 2"):
        parse_trace("1\nfast\n")
    with pytest.raises(ValueError, match="no delivery opportunity"):
        parse_trace("\n")


def _replay_throughput(trace: Trace, window: tuple[float, float]) -> tuple[float, float]:
    """(measured Mbit/s, the trace's Mbit/s) over `window` seconds after the proxy started,
    with the sender always ahead of the link."""
    sink = Sink()

    async def body() -> tuple[float, float]:
        async with _link(LinkProfile(up=Direction(trace=trace)), handler=sink) as proxy:
            start = time.monotonic() - proxy.now_s()
            _, writer = await _connect(proxy)
            chunk = b"x" * 65536
            while proxy.now_s() < window[1] + 0.2:
                writer.write(chunk)
                await writer.drain()  # backpressure: the proxy stops reading at its buffer
            writer.transport.abort()
            got = sink.bytes_between(start + window[0], start + window[1])
            return got * 8 / (window[1] - window[0]) / 1e6, trace.mean_mbps_between(window[0] * 1e3, window[1] * 1e3)

    return _run(body())


@pytest.mark.slow
def test_trace_replay_delivers_the_traces_capacity() -> None:
    # 3 packets every 2 ms for 50 ms, then 1 every 2 ms: 18 and 6 Mbit/s, 12 on average
    times = [t for t in range(2, 51, 2) for _ in range(3)] + list(range(52, 101, 2))
    measured, expected = _replay_throughput(Trace("synthetic", tuple(times)), (0.3, 1.3))
    assert expected == pytest.approx(12.0, rel=0.02)
    assert expected * 0.9 <= measured <= expected * 1.1, (measured, expected)


@pytest.mark.slow
@pytest.mark.data
def test_a_real_cellular_trace_is_replayed_within_ten_percent() -> None:
    if not TRACES.exists():
        pytest.skip(f"cellular traces not found at {TRACES}")
    trace = load_trace(TRACES, "ATT-LTE-driving-2016.up")
    measured, expected = _replay_throughput(trace, (0.5, 3.5))
    assert expected * 0.9 <= measured <= expected * 1.1, (measured, expected)


@pytest.mark.slow
def test_loss_stalls_for_an_rto_and_loses_nothing() -> None:
    async def body() -> tuple[list[float], int]:
        async with _link(LinkProfile(up=Direction(loss=0.3, rto_ms=60))) as proxy:
            rtts = await _pings(proxy, 30, size=4 * 1460)
            return rtts, proxy.counters.stalls

    rtts, stalls = _run(body())
    stalled = [r for r in rtts if r >= 60]
    # every stall shows as a round trip of at least one RTO (a loaded machine may add a slow one)
    assert stalls > 5 and stalls <= len(stalled) <= stalls + 2, (stalls, rtts)


def test_a_blackhole_holds_the_bytes_and_delivers_them_after() -> None:
    async def body() -> float:
        async with _link(LinkProfile()) as proxy:
            reader, writer = await _connect(proxy)
            await _pings(proxy, 1)
            proxy.outage("blackhole", 0.4)
            t0 = time.monotonic()
            writer.write(b"held")
            assert await reader.readexactly(4) == b"held"
            writer.close()
            return time.monotonic() - t0

    assert 0.35 <= _run(body()) <= 0.6


def test_refused_and_reset_connections() -> None:
    async def body() -> None:
        async with _link(LinkProfile(), outages=[Outage(0.3, 0.3, "refuse")]) as proxy:
            reader, writer = await _connect(proxy)
            writer.write(b"a")
            assert await reader.readexactly(1) == b"a"
            await asyncio.sleep(0.35)  # the refusal started: the open connection is reset
            with pytest.raises((ConnectionError, asyncio.IncompleteReadError)):
                writer.write(b"b")
                await writer.drain()
                await reader.readexactly(1)
            reader, writer = await _connect(proxy)  # and a new one is refused
            with pytest.raises((ConnectionError, asyncio.IncompleteReadError)):
                await reader.readexactly(1)
            await asyncio.sleep(0.3)  # over: connections work again
            assert len(await _pings(proxy, 2)) == 2
            assert proxy.counters.refused >= 1 and proxy.counters.resets >= 1

            reader, writer = await _connect(proxy)
            writer.write(b"c")
            assert await reader.readexactly(1) == b"c"
            proxy.outage("reset", 1.0)
            with pytest.raises((ConnectionError, asyncio.IncompleteReadError)):
                await reader.readexactly(1)
            assert len(await _pings(proxy, 1)) == 1  # a reset lets new connections through

    _run(body())


def test_settings_change_while_it_runs() -> None:
    async def body() -> tuple[float, float]:
        async with _link(LinkProfile(up=Direction(delay_ms=10))) as proxy:
            before = statistics.median(await _pings(proxy, 5))
            proxy.update(up=Direction(delay_ms=60))
            after = statistics.median(await _pings(proxy, 5))
            return before, after

    before, after = _run(body())
    assert 9 <= before <= 15 and 57 <= after <= 66, (before, after)


def test_bad_settings_are_refused() -> None:
    with pytest.raises(ValueError, match="rate or a trace"):
        Direction(rate_mbps=1.0, trace=Trace("t", (1,)))
    with pytest.raises(ValueError, match="loss"):
        Direction(loss=1.0)
    with pytest.raises(ValueError, match="outage mode"):
        Outage(0, 1, "explode")  # type: ignore[arg-type]


def test_the_control_commands_change_a_running_link() -> None:
    from splitexit.sim.link_cli import control

    async def body() -> tuple[dict, dict, dict, float]:
        async with _link(LinkProfile(up=Direction(delay_ms=5))) as proxy:
            changed = await control(proxy, {"set": {"up": {"delay_ms": 50, "jitter_ms": 0}}})
            rtt = statistics.median(await _pings(proxy, 3))
            outage = await control(proxy, {"outage": {"mode": "reset", "seconds": 0.1}})
            bad = await control(proxy, {"set": {"up": {"warp_factor": 9}}})
            return changed, outage, bad, rtt

    changed, outage, bad, rtt = _run(body())
    assert changed["ok"] and changed["up"]["delay_ms"] == 50 and changed["down"]["delay_ms"] == 0
    assert 48 <= rtt <= 58
    assert outage["ok"] and not bad["ok"] and "warp_factor" in bad["error"]


@pytest.mark.slow
def test_the_link_command_runs_and_takes_control_commands(tmp_path: Path, capsys) -> None:
    import json
    import subprocess
    import sys

    from splitexit.cli import main

    async def echo_server() -> None:
        server = await asyncio.start_server(_echo, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "splitexit.cli", "sim", "link", "--target", f"127.0.0.1:{port}", "--profile", "lte",
            "--control", "127.0.0.1:0", "--seconds", "20", stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        try:
            line = (await asyncio.wait_for(proc.stdout.readline(), 60)).decode()
            assert line.startswith("link 127.0.0.1:") and "control on" in line, line
            control = line.rsplit("control on ", 1)[1].strip()
            code = await asyncio.to_thread(main, ["sim", "link-ctl", control, '{"set": {"up": {"rate_mbps": 2.0}}}'])
            assert code in (0, None)
        finally:
            proc.terminate()
            await proc.wait()
            server.close()

    asyncio.run(asyncio.wait_for(echo_server(), 90))
    answer = json.loads(capsys.readouterr().out)
    assert answer["ok"] and answer["up"]["rate_mbps"] == 2.0 and answer["up"]["delay_ms"] == 35.0


# --- cross-check against the kernel's shaping -------------------------------------------
_SINK = """
import socket, sys, time
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1); s.bind((sys.argv[1], 0)); s.listen(1)
print(s.getsockname()[1], flush=True)
c, _ = s.accept(); first = last = None; total = 0
while data := c.recv(1 << 16):
    now = time.monotonic(); first = first or now; last = now; total += len(data)
print(total, last - first, flush=True)
"""


def _kernel_throughput(rate_mbps: float, nbytes: int) -> float:
    """Mbit/s of one TCP transfer between two network namespaces whose veth link is
    shaped by the kernel's token bucket filter (tbf) at `rate_mbps`."""
    import os
    import subprocess
    import sys

    tag = f"sx{os.getpid() % 100000}"
    a, b = f"{tag}a", f"{tag}b"

    def ip(*args: str) -> None:
        subprocess.run(["ip", *args], check=True, capture_output=True)

    ip("netns", "add", a)
    ip("netns", "add", b)
    try:
        ip("link", "add", f"{tag}va", "type", "veth", "peer", "name", f"{tag}vb")
        ip("link", "set", f"{tag}va", "netns", a)
        ip("link", "set", f"{tag}vb", "netns", b)
        for ns, dev, addr in ((a, f"{tag}va", "10.77.0.1/24"), (b, f"{tag}vb", "10.77.0.2/24")):
            ip("-n", ns, "addr", "add", addr, "dev", dev)
            ip("-n", ns, "link", "set", dev, "up")
            ip("-n", ns, "link", "set", "lo", "up")
        subprocess.run(["tc", "-n", a, "qdisc", "add", "dev", f"{tag}va", "root", "tbf", "rate", f"{rate_mbps}mbit",
                        "burst", "4kb", "latency", "200ms"], check=True, capture_output=True)
        sink = subprocess.Popen(["ip", "netns", "exec", b, sys.executable, "-c", _SINK, "10.77.0.2"],
                                stdout=subprocess.PIPE, text=True)
        assert sink.stdout is not None
        port = int(sink.stdout.readline())
        send = f"import socket; c = socket.create_connection(('10.77.0.2', {port})); c.sendall(b'x' * {nbytes}); c.close()"
        subprocess.run(["ip", "netns", "exec", a, sys.executable, "-c", send], check=True, timeout=60)
        total, seconds = sink.stdout.readline().split()
        sink.wait(10)
        sink.stdout.close()
        return int(total) * 8 / float(seconds) / 1e6
    finally:
        for ns in (a, b):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)


def _can_shape() -> str | None:
    import os
    import shutil

    if os.geteuid() != 0 or not shutil.which("ip") or not shutil.which("tc"):
        return "needs root, ip and tc (network namespaces and tbf)"
    return None


@pytest.mark.slow
@pytest.mark.skipif(_can_shape() is not None, reason=str(_can_shape()))
@pytest.mark.parametrize("rate_mbps", [4.0, 16.0])
def test_the_proxys_rate_agrees_with_the_kernels_token_bucket(rate_mbps: float) -> None:
    """The same transfer through the emulator on loopback and through a tbf-shaped veth
    pair between two namespaces: throughputs within 10% of each other (and of the rate)."""
    nbytes = int(rate_mbps * 1e6 / 8 * 1.5)  # a second and a half's worth
    kernel = _kernel_throughput(rate_mbps, nbytes)
    sink = Sink()

    async def body() -> float:
        async with _link(LinkProfile(up=Direction(rate_mbps=rate_mbps, burst_bytes=4096)), handler=sink) as proxy:
            _, writer = await _connect(proxy)
            writer.write(b"x" * nbytes)
            await writer.drain()
            writer.close()
            while sum(n for _, n in sink.arrivals) < nbytes:
                await asyncio.sleep(0.01)
            first, last = sink.arrivals[0][0], sink.arrivals[-1][0]
            return (nbytes - sink.arrivals[0][1]) * 8 / (last - first) / 1e6

    emulated = _run(body())
    assert abs(emulated / kernel - 1) <= 0.10, (emulated, kernel)
    assert abs(kernel / rate_mbps - 1) <= 0.10, kernel
