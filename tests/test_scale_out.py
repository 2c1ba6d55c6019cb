"""Scale-out on loopback, standing in for a headless Kubernetes Service: worker processes
on 127.0.0.1, .2, .3 (and later .4) behind one DNS name that a DNS server we control
(dnslib) answers, and an edge agent that resolves it (`dns://SERVER/NAME:PORT`, round
robin). Workers are drained and killed mid-run and removed from the name, as Kubernetes
removes a terminating pod's endpoint; a worker added mid-run must get traffic within the
workers' max connection age (they close connections that old, so clients re-resolve)."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import socket
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Iterator

import numpy as np
import pytest

import splitexit_tests_edge_support as S  # registered by conftest.py
from splitexit.policies import MaxProb

pytestmark = pytest.mark.slow

NAME = "workers.splitexit.test"
CONNECTION_AGE_S = 2.0


class _Names:
    """The DNS server: A records of NAME, whatever `addresses` holds now (TTL 0)."""

    def __init__(self) -> None:
        from dnslib.server import DNSLogger, DNSServer

        self.addresses: list[str] = []
        self.server = DNSServer(self, port=0, address="127.0.0.1",
                                logger=DNSLogger(log="-request,-reply,-truncated,-error,-recv,-send,-data"))
        self.port = self.server.server.server_address[1]

    def resolve(self, request, handler):  # dnslib's resolver interface
        from dnslib import QTYPE, RR, A

        reply = request.reply()
        if str(request.q.qname).rstrip(".") == NAME and request.q.qtype == QTYPE.A:
            for address in list(self.addresses):
                reply.add_answer(RR(request.q.qname, QTYPE.A, rdata=A(address), ttl=0))
        return reply


@contextlib.contextmanager
def _dns() -> Iterator[_Names]:
    names = _Names()
    names.server.start_thread()
    try:
        yield names
    finally:
        names.server.stop()
        names.server.server.server_close()


def _free_port() -> int:
    """A port free on 127.0.0.1 (the workers share it, each on its own loopback address)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class _Worker:
    def __init__(self, bundles: list[Path], host: str, port: int, worker_id: str) -> None:
        self.host, self.worker_id = host, worker_id
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "splitexit.cli", "cloud", "serve", *map(str, bundles), "--host", host,
             "--port", str(port), "--no-advertise", "--grace", "2", "--threads", "1", "--worker-id", worker_id,
             "--max-connection-age", str(CONNECTION_AGE_S)],
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)

    def wait_serving(self) -> None:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        assert " on " in line, f"{self.worker_id} did not start: {line!r}"

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        if self.proc.stdout is not None:
            self.proc.stdout.close()


class _Feeder:
    """An edge agent sending a batch every `interval_s`; every answer kept with its time."""

    def __init__(self, agent, images: np.ndarray, rows: int = 4, interval_s: float = 0.05) -> None:
        self.agent, self.images, self.rows, self.interval_s = agent, images, rows, interval_s
        self.sent = 0
        self.answers: list[tuple[float, str, bool, str | None]] = []  # (time, worker, degraded, why degraded)
        self.labels: list[int] = []  # in the order the inputs were sent
        self._stop = asyncio.Event()

    async def run(self) -> None:
        i = 0
        while not self._stop.is_set():
            batch = self.images[(i * self.rows) % len(self.images):][: self.rows]
            i += 1
            self.sent += len(batch)
            for a in await self.agent.infer(batch):
                self.answers.append((time.monotonic(), a.worker or "", a.degraded, a.reason))
                self.labels.append(a.label)
            await asyncio.sleep(self.interval_s)

    def stop(self) -> None:
        self._stop.set()

    def workers_since(self, t: float) -> Counter[str]:
        return Counter(w for when, w, degraded, _ in self.answers if when >= t and not degraded)


async def _until(predicate, timeout: float) -> bool:
    ends = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > ends:
            return False
        await asyncio.sleep(0.05)
    return True


def _bundle(tmp_path: Path, name: str, seed: int) -> Path:
    model, meta = S.tiny_model(seed)
    # no early exit: every row crosses to the cloud, so each answer names a worker
    return S.export(tmp_path, model, meta, MaxProb(2.0, fallback=False), split=2, name=name)


def test_a_dns_name_spreads_load_and_follows_workers_as_they_come_and_go(tmp_path: Path) -> None:
    from splitexit.edge import AgentConfig, EdgeAgent, GrpcConfig, GrpcTransport

    bundle = _bundle(tmp_path, "tiny", 0)
    port = _free_port()
    with _dns() as names:
        workers = [_Worker([bundle], f"127.0.0.{i}", port, f"w{i}") for i in (1, 2, 3)]
        try:
            for w in workers:
                w.wait_serving()
            names.addresses = [w.host for w in workers]

            async def scenario() -> dict:
                transport = GrpcTransport(f"dns://127.0.0.1:{names.port}/{NAME}:{port}", GrpcConfig(lb_policy="round_robin"))
                async with EdgeAgent(bundle, transport, config=AgentConfig(request_timeout_ms=5000)) as agent:
                    feeder = _Feeder(agent, S.images(64))
                    task = asyncio.ensure_future(feeder.run())
                    t0 = time.monotonic()
                    spread = await _until(lambda: len(feeder.workers_since(t0)) == 3, 15)
                    await asyncio.sleep(1.0)
                    first = feeder.workers_since(t0)
                    # w2 drained (SIGTERM), w3 killed (SIGKILL); both leave the name at once
                    names.addresses = ["127.0.0.1"]
                    await asyncio.to_thread(workers[1].stop, signal.SIGTERM)
                    workers[2].proc.kill()
                    t_gone = time.monotonic()
                    await asyncio.sleep(1.5)
                    after_loss = feeder.workers_since(t_gone + 0.5)
                    w4 = _Worker([bundle], "127.0.0.4", port, "w4")
                    workers.append(w4)
                    await asyncio.to_thread(w4.wait_serving)
                    names.addresses = ["127.0.0.1", "127.0.0.4"]
                    t_added = time.monotonic()
                    reached = await _until(lambda: feeder.workers_since(t_added)["w4"] > 0, CONNECTION_AGE_S + 8)
                    found_s = time.monotonic() - t_added
                    await asyncio.sleep(1.0)
                    feeder.stop()
                    await task
                    return {"spread": spread, "first": first, "after_loss": after_loss, "reached": reached,
                            "found_s": found_s, "sent": feeder.sent, "answers": feeder.answers}

            got = asyncio.run(scenario())
        finally:
            for w in workers:
                w.stop(signal.SIGKILL)
    assert got["spread"], f"load never reached all three workers: {got['first']}"
    first = got["first"]
    total = sum(first.values())
    assert all(first[w] >= total / 6 for w in ("w1", "w2", "w3")), first  # each about a third
    assert set(got["after_loss"]) == {"w1"}, got["after_loss"]  # the one left carries the load
    assert got["reached"], f"w4 got no traffic within {CONNECTION_AGE_S + 8:.0f} s of joining the name"
    answers = got["answers"]
    assert len(answers) == got["sent"], "an input was lost"
    degraded = [a for a in answers if a[2]]
    assert not degraded, f"{len(degraded)} answers degraded: {degraded[:3]}"
    print(f"w4 answered {got['found_s']:.1f} s after joining; first spread {dict(first)}")


def _reference_labels(bundle: Path, images: np.ndarray) -> list[int]:
    """Labels of the whole network of `bundle` in this process (every row to its final head)."""
    import torch

    from splitexit.bundle import load_whole
    from splitexit.data import Normalize

    whole = load_whole(bundle)
    with torch.inference_mode():
        logits = whole.model(Normalize(whole.mean, whole.std)(torch.from_numpy(images)))
    return logits.argmax(-1).tolist()


def test_a_rolling_bundle_upgrade_drops_no_request_and_never_mixes_bundles(tmp_path: Path) -> None:
    """Workers of bundle A are replaced by workers serving A and B; the edges then move to B;
    then the A+B workers are replaced by B-only ones. No request fails, and every answer is
    its own bundle's (each agent's labels equal its bundle's whole network, row by row)."""
    from splitexit.edge import AgentConfig, EdgeAgent, GrpcConfig, GrpcTransport

    old, new = _bundle(tmp_path, "tiny", 0), _bundle(tmp_path / "new", "tiny", 1)
    images = S.images(64)
    expected = {"old": _reference_labels(old, images), "new": _reference_labels(new, images)}
    assert expected["old"] != expected["new"], "the two bundles must answer differently to tell them apart"
    port = _free_port()
    workers: list[_Worker] = []

    def start(bundles: list[Path], hosts: list[int]) -> list[_Worker]:
        started = [_Worker(bundles, f"127.0.0.{h}", port, f"w{h}") for h in hosts]
        for w in started:
            w.wait_serving()
        workers.extend(started)
        return started

    def drain(leaving: list[_Worker]) -> None:
        for w in leaving:
            w.proc.send_signal(signal.SIGTERM)
        for w in leaving:
            w.stop()

    seen: dict[str, bool] = {}
    with _dns() as names:
        try:
            first = start([old], [1, 2])
            names.addresses = [w.host for w in first]

            async def scenario() -> dict:
                def agent(bundle: Path) -> EdgeAgent:
                    target = f"dns://127.0.0.1:{names.port}/{NAME}:{port}"
                    return EdgeAgent(bundle, GrpcTransport(target, GrpcConfig(lb_policy="round_robin")),
                                     config=AgentConfig(request_timeout_ms=5000))

                async with agent(old) as edge_old, agent(new) as edge_new:
                    feed_old = _Feeder(edge_old, images)
                    run_old = asyncio.ensure_future(feed_old.run())
                    await asyncio.sleep(1.0)
                    # 1. workers serving both bundles join; the old ones drain and leave the name
                    both = await asyncio.to_thread(start, [old, new], [3, 4])
                    names.addresses = [w.host for w in first + both]
                    # The old workers leave only once the edge has seen the new ones, as a rollout
                    # waits for them; a fixed wait of one connection age is not enough: gRPC jitters
                    # the age by 10% and re-resolves a name at most once a second.
                    joined = time.monotonic()
                    seen["both"] = await _until(lambda: {"w3", "w4"} <= set(feed_old.workers_since(joined)), 15)
                    names.addresses = [w.host for w in both]
                    await asyncio.to_thread(drain, first)
                    # 2. the edges move to the new bundle
                    feed_new = _Feeder(edge_new, images)
                    run_new = asyncio.ensure_future(feed_new.run())
                    await asyncio.sleep(1.5)
                    feed_old.stop()
                    await run_old
                    # 3. workers of the new bundle only replace the A+B ones
                    last = await asyncio.to_thread(start, [new], [5])
                    names.addresses = [w.host for w in both + last]
                    joined = time.monotonic()
                    seen["last"] = await _until(lambda: feed_new.workers_since(joined)["w5"] > 0, 15)
                    names.addresses = [w.host for w in last]
                    await asyncio.to_thread(drain, both)
                    await asyncio.sleep(1.5)
                    feed_new.stop()
                    await run_new
                    return {"old": feed_old, "new": feed_new}

            feeds = asyncio.run(scenario())
        finally:
            for w in workers:
                w.stop(signal.SIGKILL)
    assert seen == {"both": True, "last": True}, f"the edge never reached the workers that joined: {seen}"
    for side, feed in feeds.items():
        assert len(feed.answers) == feed.sent > 0, f"{side}: an input was lost"
        degraded = [a for a in feed.answers if a[2]]
        assert not degraded, f"{side}: {len(degraded)} requests failed over to the edge: {degraded[:3]}"
    # labels in the order sent (each batch's answers in input order): the feeder cycles the images
    for side, feed in feeds.items():
        want = [expected[side][(i * 4 + j) % len(images)] for i in range(feed.sent // 4) for j in range(4)]
        assert feed.labels == want, f"{side}: an answer from the other bundle"
    served = {side: Counter(a[1] for a in feed.answers) for side, feed in feeds.items()}
    assert set(served["old"]) <= {"w1", "w2", "w3", "w4"} and {"w3", "w4"} & set(served["old"]), served
    assert set(served["new"]) <= {"w3", "w4", "w5"} and served["new"]["w5"] > 0, served
