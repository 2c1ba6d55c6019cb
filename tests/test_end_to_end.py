"""The real edge agent against the real cloud worker, with no stand-in on either side:
in one process through the worker's plain handler (`InProcessTransport` over
`SplitInferenceServicer.handle`), and over gRPC on loopback. Split answers must equal the
whole model's under the same policy, a cascade's must come from its larger network, and a
worker's refusal must come back as a degraded answer that says why."""

from __future__ import annotations

import asyncio
from contextlib import asynccontextmanager
from dataclasses import replace
from pathlib import Path
from typing import AsyncIterator

import numpy as np
import pytest
import torch

from splitexit.bundle import export_bundle
from splitexit.cloud.server import CloudServer, ServerConfig, build_server
from splitexit.cloud.served import load_models, model_info
from splitexit.edge import AgentConfig, EdgeAgent, GrpcTransport, InProcessTransport
from splitexit.edge.transport import Transport
from splitexit.models import ModelConfig, build_model
from splitexit.policies import MaxProb, Patience
from splitexit.policies.predictive import Predictive
from splitexit.sim.link import Direction, LinkProfile, LinkProxy
from splitexit.wire import larger_network_name

import splitexit_tests_edge_support as S  # noqa: E402  (registered by conftest.py)

pytestmark = pytest.mark.loopback

N = 40
LARGE = ModelConfig(arch="resnet14_tiny", in_chans=1, exit_after=())


@pytest.fixture(scope="module")
def tiny():
    """(model, meta, images, the model's input for them)."""
    model, meta = S.tiny_model()
    return (model, meta, *S.batch(meta, N))


def _policy(name: str, model, x: torch.Tensor):
    if name == "maxprob":
        return MaxProb(S.exit_thresholds(model, x))
    if name == "patience":
        return Patience(1)
    return Predictive(step_ms=(1.0,) * 6, threshold=S.median_threshold(model, x), l0=1)  # skips heads


@asynccontextmanager
async def _worker(*bundles: Path) -> AsyncIterator[CloudServer]:
    server = build_server(ServerConfig(host="127.0.0.1", port=0, drain_grace_s=1.0), load_models(bundles))
    await server.start()
    try:
        yield server
    finally:
        await server.stop()


def _transport(server: CloudServer, kind: str) -> Transport:
    if kind == "grpc":
        return GrpcTransport(server.address)
    servicer = server.servicer
    return InProcessTransport(servicer.handle, pass_deadline=True,
                              model_info=model_info(servicer.models, servicer.limits, servicer.worker_id))


def _answers(bundles: tuple[Path, ...], edge_bundle: Path, images: np.ndarray, kind: str, **config):
    async def go():
        async with _worker(*bundles) as server:
            async with EdgeAgent(edge_bundle, _transport(server, kind), config=AgentConfig(**config)) as agent:
                return await agent.infer(images, [f"s{i}" for i in range(len(images))]), server

    return asyncio.run(asyncio.wait_for(go(), 60))


@pytest.mark.parametrize("kind", ["inprocess", "grpc"])
@pytest.mark.parametrize("policy_name", ["maxprob", "patience", "predictive"])
def test_split_answers_equal_the_whole_models(tiny, tmp_path: Path, kind: str, policy_name: str) -> None:
    model, meta, images, x = tiny
    policy = _policy(policy_name, model, x)
    path = S.export(tmp_path, model, meta, policy, split=2)
    answers, server = _answers((path,), path, images, kind)
    want = S.reference(model, policy, x, [*model.exit_points, model.num_stages - 1])
    assert [(a.label, a.exit) for a in answers] == want
    assert [a.sample_id for a in answers] == [f"s{i}" for i in range(N)]
    assert all(a.reason is None and not a.degraded for a in answers)
    routes = [a.route for a in answers]
    assert "cloud" in routes and (policy_name != "maxprob" or "edge" in routes), routes  # both halves answer
    cloud_rows = sum(r == "cloud" for r in routes)
    assert server.metrics.value("splitexit_rows_total", {"model": "tiny"}) == cloud_rows


@pytest.mark.parametrize("kind", ["inprocess", "grpc"])
def test_a_cascade_sends_raw_input_to_the_larger_network(tiny, tmp_path: Path, kind: str) -> None:
    model, meta, images, x = tiny
    thresholds = S.exit_thresholds(model, x)
    torch.manual_seed(7)
    large = build_model(LARGE).eval()  # same mean/std as the edge network: the same x
    policy = MaxProb((*thresholds, 0.0))  # the ladder's last exit: the larger network's final head
    path = export_bundle(tmp_path / "cascade", model, meta, split=2, policy=policy, input_shape=S.SHAPE,
                         name="cascade", large=(large, replace(meta, model=LARGE)))
    answers, _ = _answers((path,), path, images, kind)
    by_large = [a for a in answers if a.network == larger_network_name("cascade")]
    assert by_large, "no row reached the larger network"
    with torch.no_grad():
        want = large(x).argmax(-1)
    for a in by_large:
        assert a.route == "cloud" and not a.degraded
        assert a.label == int(want[int(a.sample_id[1:])])


def test_a_worker_that_serves_another_bundle_gets_degraded_answers_that_say_why(tiny, tmp_path: Path) -> None:
    model, meta, images, x = tiny
    served = S.export(tmp_path, model, meta, MaxProb(S.exit_thresholds(model, x)), split=2, name="tiny")
    retrained = S.tiny_model(seed=3)[0]  # the same model name, other weights: another bundle hash
    other = S.export(tmp_path / "other", retrained, meta, MaxProb(S.exit_thresholds(retrained, x)), split=2,
                     name="tiny")
    answers, _ = _answers((served,), other, images, "grpc")
    offloaded = [a for a in answers if a.route != "edge"]
    assert offloaded and all(a.degraded and a.reason for a in offloaded)
    assert {a.reason for a in offloaded} <= {"failed_precondition", "no_worker", "mismatch"}, {a.reason for a in offloaded}


@pytest.mark.slow
def test_through_an_emulated_link_an_outage_turns_into_degraded_answers_and_nothing_is_lost(
        tiny, tmp_path: Path) -> None:
    model, meta, images, x = tiny
    policy = MaxProb(S.exit_thresholds(model, x))
    path = S.export(tmp_path, model, meta, policy, split=2)
    want = S.reference(model, policy, x, [*model.exit_points, model.num_stages - 1])
    ids = [f"s{i}" for i in range(N)]

    async def go():
        async with _worker(path) as server:
            host, port = server.address.rsplit(":", 1)
            link = LinkProfile.symmetric(rtt_ms=40, rate_mbps=20.0)
            async with LinkProxy((host, int(port)), link) as proxy:
                config = AgentConfig(request_timeout_ms=500)
                async with EdgeAgent(path, GrpcTransport(proxy.address), config=config) as agent:
                    before = await agent.infer(images, ids)
                    outage = proxy.outage("blackhole", 2.0)
                    during = await agent.infer(images, ids)  # each offload times out after 500 ms
                    await asyncio.sleep(outage.end_s - proxy.now_s())
                    after = await agent.infer(images, ids)
                    return before, during, after, proxy.counters

    before, during, after, counters = asyncio.run(asyncio.wait_for(go(), 60))
    for answers in (before, during, after):
        assert [a.sample_id for a in answers] == ids  # one answer per input, every time
    assert [(a.label, a.exit) for a in before] == want and not any(a.degraded for a in before)
    offloaded = [a for a in during if a.route != "edge"]
    assert offloaded and all(a.degraded and a.reason == "deadline_exceeded" for a in offloaded)
    assert [(a.label, a.exit) for a in after] == want and not any(a.degraded for a in after)
    assert counters.bytes_up > 0 and counters.connections >= 1


def test_the_agent_estimates_its_uplink_from_its_own_offloads(tiny, tmp_path: Path) -> None:
    model, meta, images, x = tiny
    path = S.export(tmp_path, model, meta, MaxProb(2.0, fallback=False), split=2)  # every row offloaded

    async def go():
        async with _worker(path) as server:
            host, port = server.address.rsplit(":", 1)
            link = LinkProfile(up=Direction(rate_mbps=4.0, burst_bytes=1500, delay_ms=20), down=Direction(delay_ms=20))
            async with LinkProxy((host, int(port)), link) as proxy:
                async with EdgeAgent(path, GrpcTransport(proxy.address)) as agent:
                    for rows in (1, 2, 8, 20, 40, 4, 30):  # the first also sets the connection up: not counted
                        await agent.infer(images[:rows])
                    return agent.link.estimate()

    estimate = asyncio.run(asyncio.wait_for(go(), 60))
    assert estimate is not None
    assert 4.0 * 0.7 <= estimate.up_mbps <= 4.0 * 1.3, estimate
    assert 40 * 0.7 <= estimate.rtt_ms <= 40 * 2, estimate  # the worker and the agent add their own ms
