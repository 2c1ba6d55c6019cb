"""Discovery on 127.0.0.1 only: a browsed worker whose TXT lists our bundle hash is
proposed to the pool, confirmed by health + GetModelInfo over gRPC and used; others are
ignored, and a worker that says goodbye leaves the pool."""

from __future__ import annotations

import asyncio
import socket
import threading
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from splitexit.edge import DiscoveryBrowser, DiscoveryConfig, EdgeAgent, WorkerPool, txt_lists_hash
from splitexit.edge.discovery import parse_static
from splitexit.policies import MaxProb
from splitexit.proto import inference_pb2_grpc as pb_grpc


import splitexit_tests_edge_support as S  # noqa: E402  (registered by conftest.py)

pytestmark = pytest.mark.loopback  # servers on 127.0.0.1 only
TYPE = "_splitexit._tcp.local."


class Servicer(pb_grpc.SplitInferenceServicer):
    def __init__(self, handler) -> None:
        self.handler = handler

    async def Infer(self, request, context):
        return await self.handler(request)

    async def GetModelInfo(self, request, context):
        return self.handler.model_info()


def test_txt_matching_and_static_addresses() -> None:
    h = "ab" * 32
    assert txt_lists_hash({b"hashes": f"{'cd' * 32},{h}".encode()}, h)
    assert txt_lists_hash({"models": f"tiny={h.upper()};other=1"}, h)
    assert not txt_lists_hash({"hash": h[:-1]}, h) and not txt_lists_hash({"x": None}, h)
    # the cloud advertiser's format; another protocol version is ruled out
    cloud_txt = {"proto": "1", "models": "tiny", "hash.tiny": f"{'cd' * 32},{h}", "split.tiny": "2,2", "tls": "0"}
    assert txt_lists_hash(cloud_txt, h)
    assert not txt_lists_hash({**cloud_txt, "proto": "2"}, h)
    assert parse_static(["10.0.0.1:50051", "dns:///workers.svc:50051", "[::1]:7", "dns://10.96.0.10:53/w.svc:9"]) == [
        "10.0.0.1:50051", "dns:///workers.svc:50051", "[::1]:7", "dns://10.96.0.10:53/w.svc:9"]
    for bad in ("nohost", "host:", "host:99999", ":80", "dns://10.0.0.1:53", "dns:///w.svc"):
        with pytest.raises(ValueError, match="bad worker address"):
            parse_static([bad])
    with pytest.raises(ValueError, match="_tcp.local."):
        DiscoveryConfig(service_type="_x._udp.local.")


@pytest.mark.slow
def test_browse_confirm_and_use_a_worker_on_loopback(tmp_path: Path) -> None:
    from zeroconf import IPVersion
    from zeroconf.asyncio import AsyncServiceInfo, AsyncZeroconf

    model, meta = S.tiny_model()
    images = S.images(16)
    path = S.export(tmp_path, model, meta, MaxProb(0.99))  # most rows go to the cloud
    bundle_hash = S.load_bundle(path, "edge").hash
    handler = S.TailHandler(path)
    threads_before = set(threading.enumerate())

    async def run():
        server = grpc.aio.server()
        pb_grpc.add_SplitInferenceServicer_to_server(Servicer(handler), server)
        health_servicer = health.aio.HealthServicer()
        await health_servicer.set("", health_pb2.HealthCheckResponse.SERVING)
        health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        advertiser = AsyncZeroconf(interfaces=["127.0.0.1"], ip_version=IPVersion.V4Only)
        loopback = socket.inet_aton("127.0.0.1")
        ours = AsyncServiceInfo(TYPE, f"w1.{TYPE}", addresses=[loopback], port=port, server="w1.local.",
                                properties={"proto": "1", "hashes": f"{'0' * 64},{bundle_hash}"})
        theirs = AsyncServiceInfo(TYPE, f"w2.{TYPE}", addresses=[loopback], port=port + 1, server="w2.local.",
                                  properties={"proto": "1", "hashes": "1" * 64})
        pool = WorkerPool(bundle_hash=bundle_hash)
        browser = DiscoveryBrowser(pool, config=DiscoveryConfig(interfaces=("127.0.0.1",)))
        agent = EdgeAgent(path, pool)
        try:
            await advertiser.async_register_service(ours)
            await advertiser.async_register_service(theirs)
            await browser.start()
            assert await browser.wait_for(lambda b: len(b.found) == 2, 10.0), browser.found
            assert [w.key for w in pool.workers()] == [f"127.0.0.1:{port}"]
            assert {w.name: w.matches for w in browser.found.values()} == {f"w1.{TYPE}": True, f"w2.{TYPE}": False}
            answers = await agent.infer(images)
            assert "cloud" in {a.route for a in answers} and "degraded" not in {a.route for a in answers}
            assert pool.workers()[0].state == "up"
            await advertiser.async_unregister_service(ours)
            assert await browser.wait_for(lambda b: f"w1.{TYPE}" not in b.found, 10.0)
            assert pool.workers() == []
        finally:
            await agent.close()
            await browser.close()
            await advertiser.async_close()
            await server.stop(None)

    asyncio.run(run())
    leftover = [t for t in set(threading.enumerate()) - threads_before if t.is_alive() and "zeroconf" in t.name.lower()]
    assert leftover == []
