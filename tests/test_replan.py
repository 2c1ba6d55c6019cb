"""Bundles with several split points, and the edge agent moving its cut among them.

- A bundle exported with several splits holds the edge stages up to the deepest and the
  cloud stages after the shallowest; the real worker takes features at each, and the
  answers at every split equal the whole network's (torch and ONNX edges alike).
- A split the bundle does not allow is refused on both sides with one clear error.
- `SplitChooser` picks the split the cost model says for a link, moves when the link
  changes, and does not flap on a noisy but steady one.
- Through an emulated link whose bandwidth drops mid-run, the real agent moves its cut
  within 3 s, and nothing is lost.
"""

from __future__ import annotations

import asyncio
import json
import random
import time
from contextlib import asynccontextmanager
from pathlib import Path
from typing import AsyncIterator

import numpy as np
import pytest

from splitexit.bundle import export_bundle, load_bundle, manifest_hash
from splitexit.cloud.server import CloudServer, ServerConfig, build_server
from splitexit.cloud.served import load_models
from splitexit.edge import AgentConfig, EdgeAgent, GrpcTransport
from splitexit.edge.replan import ReplanConfig, SplitChooser
from splitexit.manifest import BundleError, read_manifest
from splitexit.plan import DeviceTimes
from splitexit.policies import MaxProb
from splitexit.sim.link import Direction, LinkProfile, LinkProxy

import splitexit_tests_edge_support as S  # noqa: E402  (registered by conftest.py)

pytestmark = pytest.mark.loopback

LAST = 6  # resnet14_tiny: stages 0..6, exits after 1..5, the final head after 6
SPLITS = (1, 3, LAST)


@pytest.fixture(scope="module")
def policy(tiny_net, tiny_batch):
    return MaxProb(S.exit_thresholds(tiny_net[0], tiny_batch[1]))


@pytest.fixture(scope="module")
def bundle(tiny_net, policy, tmp_path_factory) -> Path:
    model, meta = tiny_net
    return export_bundle(tmp_path_factory.mktemp("multi") / "b", model, meta, split=1, splits=SPLITS, policy=policy,
                         input_shape=S.SHAPE, name="tiny", edge_engine="onnx")


@asynccontextmanager
async def _worker(path: Path) -> AsyncIterator[CloudServer]:
    server = build_server(ServerConfig(host="127.0.0.1", port=0, drain_grace_s=1.0), load_models([path]))
    await server.start()
    try:
        yield server
    finally:
        await server.stop()


def test_a_bundle_of_several_splits_holds_the_stages_each_side_needs(bundle: Path, tiny_net) -> None:
    manifest = read_manifest(bundle)
    assert manifest.splits == SPLITS and manifest.split == 1 and manifest.cloud_splits == (1, 3)
    assert set(manifest.feature_shapes) == {1, 3}
    edge, cloud = load_bundle(bundle, "edge"), load_bundle(bundle, "cloud")
    model = tiny_net[0]
    # the edge holds the whole network (a split at the last stage), the cloud stages 2..
    assert set(edge.model.state_dict()) == set(model.state_dict())
    cloud_keys = {k for k in load_bundle(bundle, "cloud").model.state_dict()}
    assert cloud_keys == set(model.state_dict())  # built whole; only stages after split 1 are loaded
    for key, value in model.state_dict().items():
        if key.startswith(("stages.2", "stages.6", "head")):
            assert (cloud.model.state_dict()[key] == value).all(), key


@pytest.mark.parametrize("engine", ["onnx", "torch"])
def test_every_split_answers_as_the_whole_network(bundle: Path, tiny_net, tiny_batch, policy, engine: str) -> None:
    model, _ = tiny_net
    images, x = tiny_batch
    want = S.reference(model, policy, x, [*model.exit_points, LAST])

    async def go():
        async with _worker(bundle) as server:
            async with EdgeAgent(bundle, GrpcTransport(server.address), config=AgentConfig(engine=engine)) as agent:
                out = {}
                for split in SPLITS:
                    agent.split = split
                    out[split] = await agent.infer(images)
                return out

    answers = asyncio.run(asyncio.wait_for(go(), 60))
    for split, got in answers.items():
        assert [(a.label, a.exit) for a in got] == want, split
        assert not any(a.degraded for a in got), split
        routes = {a.route for a in got}
        assert routes == ({"edge"} if split == LAST else {"edge", "cloud"}), (split, routes)
    # deeper cuts leave more rows on the device
    on_device = [sum(a.route == "edge" for a in answers[s]) for s in SPLITS]
    assert on_device == sorted(on_device) and on_device[-1] == len(images)


def test_a_split_the_bundle_does_not_allow_is_refused(bundle: Path, tiny_net, tiny_batch, policy, tmp_path) -> None:
    from splitexit import wire
    from splitexit.cloud.errors import RequestError
    from splitexit.cloud.requests import ServiceLimits, parse_request

    model, meta = tiny_net
    models = load_models([bundle])
    edge = load_bundle(bundle, "edge")
    feature = np.zeros((1, *read_manifest(bundle).feature_shapes[3]), dtype=np.float32)
    request = wire.build_request(edge, feature=feature, sample_ids=["a"], split=2)  # no split 2 in this bundle
    with pytest.raises(RequestError) as err:
        parse_request(request, models, ServiceLimits())
    assert err.value.code == "NOT_FOUND" and "served: [1, 3]" in str(err.value)
    agent = EdgeAgent(bundle, None)
    agent.split = 2
    with pytest.raises(ValueError, match=r"split 2 is not one of the bundle's \[1, 3, 6\]"):
        asyncio.run(agent.infer(tiny_batch[0][:2]))
    with pytest.raises(BundleError, match="splits must be stage indices in 0..6"):
        export_bundle(tmp_path / "bad", model, meta, split=1, splits=(7,), policy=policy, input_shape=S.SHAPE)
    data = json.loads((bundle / "manifest.json").read_text())
    data["splits"] = [3, 6]  # not holding `split`
    data["hash"] = manifest_hash(data)
    bad = tmp_path / "tampered"
    bad.mkdir()
    (bad / "manifest.json").write_text(json.dumps(data))
    with pytest.raises(BundleError, match=r"must be ascending, distinct and hold split 1"):
        read_manifest(bad)


# --- the chooser, on a hand-made device and links ----------------------------------------
# Six stages of 10 ms on the device, features of 4,000 / 1,000 bytes at splits 1 / 3:
# with a fast link the shallow cut wins, with a slow one the device keeps everything.
DEVICE = DeviceTimes(stage_ms=(10.0,) * 6, exit_ms={k: 1.0 for k in range(1, 5)}, head_ms=1.0)
ON_DEVICE = 5  # this hand-made network's last stage


class _Manifest:
    exits = (1, 2, 3, 4, 5)
    split = 1
    splits = (1, 3, 5)
    cloud_splits = (1, 3)
    feature_shapes = {1: (1000,), 3: (250,)}  # fp32: 4,000 and 1,000 bytes


def _chooser(**config) -> SplitChooser:
    return SplitChooser(_Manifest(), ReplanConfig(device=DEVICE, every_s=0.0, **config), "fp32")


def _feed(chooser: SplitChooser, mbps: float, rtt_ms: float, n: int, rng: random.Random, noise: float = 0.0) -> list[int]:
    """n offloads of alternating sizes over a link, each followed by a re-plan."""
    chosen = []
    for i in range(n):
        size = (4000, 1000)[i % 2]
        ms = (rtt_ms + size * 8 / (mbps * 1e3)) * (1 + noise * rng.uniform(-1, 1))
        chooser.link.observe(size, ms / 1e3)
        chosen.append(chooser.replan())
    return chosen


def test_the_chooser_cuts_where_the_cost_model_says_and_moves_when_the_link_drops() -> None:
    rng = random.Random(0)
    chooser = _chooser()
    assert _feed(chooser, 100.0, 2.0, 30, rng)[-1] == 1  # fast: ship the feature early
    chosen = _feed(chooser, 0.2, 2.0, 30, rng)  # 4,000 bytes now cost 160 ms: keep it on the device
    assert chosen[-1] == ON_DEVICE
    moved = chosen.index(ON_DEVICE)
    assert moved <= 10, chosen  # within ten offloads of the drop (window 10, patience 3)
    assert _feed(chooser, 100.0, 2.0, 40, rng)[-1] == 1  # and back


def test_the_chooser_does_not_flap_on_a_noisy_steady_link() -> None:
    rng = random.Random(1)
    # 8 Mbit/s: split 1 expects 54.3 ms a row, the device 61 ms: close, and the noise is +-30%
    chooser = _chooser()
    chosen = _feed(chooser, 8.0, 5.0, 400, rng, noise=0.3)
    changes = sum(a != b for a, b in zip(chosen, chosen[1:]))
    assert changes <= 2, changes


def test_the_chooser_probes_the_link_while_everything_stays_on_the_device() -> None:
    chooser = SplitChooser(_Manifest(), ReplanConfig(device=DEVICE, every_s=0.0, probe_s=0.05), "fp32")
    chooser.split = ON_DEVICE
    assert chooser.split_for_batch() == 3  # a probe at once: the deepest cut that crosses the link
    assert chooser.split_for_batch() == ON_DEVICE
    time.sleep(0.06)
    assert chooser.split_for_batch() == 3 and chooser.split_for_batch() == ON_DEVICE
    # cut where the offloads are all of one size, it probes the cut whose size differs most
    chooser.split = 3
    for _ in range(5):
        chooser.link.observe(1000, 0.01)
    time.sleep(0.06)
    assert not chooser.link.varied() and chooser.link.estimate() is None  # RTT and bandwidth not told apart
    assert chooser.split_for_batch() == 1 and chooser.split_for_batch() == 3
    chooser.link.observe(4000, 0.02)
    time.sleep(0.06)
    assert chooser.link.varied() and chooser.split_for_batch() == chooser.split  # no probe needed now


def test_batches_rarer_than_probes_still_measure_the_plans_own_split() -> None:
    """A batch every 2 s with probes due every second: the batches alternate between a
    probe and the plan's split (before, every one was a probe and the link was never
    measured where the plan cuts). The chooser runs on the clock it is given."""
    now = [0.0]
    chooser = SplitChooser(_Manifest(), ReplanConfig(device=DEVICE, every_s=0.0, probe_s=1.0), "fp32",
                           clock=lambda: now[0])
    chosen = []
    for i in range(6):
        now[0] = 2.0 * i
        chosen.append(chooser.split_for_batch())
    assert chosen == [3, 1, 3, 1, 3, 1], chosen


def test_offloads_that_run_out_of_time_move_the_plan_to_the_device() -> None:
    """An offload with no answer within its timeout is a lower bound on the round trip:
    after a few, with no answer at all yet, the plan keeps every row on the device; the
    first answered offload lifts the bound."""
    chooser = _chooser()
    assert chooser.link.estimate() is None
    for _ in range(3):
        chooser.link.observe_timeout(2.0)
        chooser.replan()
    assert chooser.split == ON_DEVICE
    estimate = chooser.link.estimate()
    assert estimate is not None and estimate.rtt_ms == 2000.0
    rng = random.Random(0)
    _feed(chooser, 100.0, 2.0, 2, rng)  # answered again, quickly
    estimate = chooser.link.estimate()
    assert estimate is not None and estimate.rtt_ms < 10.0


def test_the_prior_sets_the_start_and_a_hopeless_link_is_probed_rarely() -> None:
    from splitexit.plan import LinkEstimate

    def chooser(rtt_ms: float) -> SplitChooser:
        prior = LinkEstimate(up_mbps=100.0, rtt_ms=rtt_ms)
        return SplitChooser(_Manifest(), ReplanConfig(device=DEVICE, every_s=0.0, probe_s=0.05, prior=prior), "fp32")

    fast = chooser(1.0)
    assert fast.replan() == 1  # the prior's best: ship early
    far = chooser(500.0)  # no uplink however fast pays for a 500 ms round trip: the device keeps all
    assert far.split_for_batch() == ON_DEVICE
    time.sleep(0.06)
    assert far.split_for_batch() == ON_DEVICE  # a probe is due every 0.05 s, but 10x rarer here
    time.sleep(0.5)
    assert far.split_for_batch() == 3 and far.split_for_batch() == ON_DEVICE
    assert all(e.up_mbps is None for e in far.history)  # the prior is not a measurement


def test_a_device_profile_of_another_network_is_refused() -> None:
    with pytest.raises(ValueError, match="the device profile has 4 stages, the bundle's network 6"):
        SplitChooser(_Manifest(), ReplanConfig(device=DeviceTimes(stage_ms=(1.0,) * 4, exit_ms={}, head_ms=1.0)), "fp32")


# --- the real agent through a link whose bandwidth drops ----------------------------------
@pytest.mark.slow
def test_the_agent_moves_its_cut_within_3_s_of_a_bandwidth_drop(bundle: Path, tiny_batch) -> None:
    images, _ = tiny_batch
    # the device's stages take 20 ms (padded by the profile's times, not measured here);
    # 16 Mbit/s: a 4-row shallow cut's 2 KB cost ~1 ms; at 0.1 Mbit/s ~170 ms: stay on the device
    device = DeviceTimes(stage_ms=(20.0,) * 7, exit_ms={k: 0.5 for k in range(1, 6)}, head_ms=0.5)
    fast = LinkProfile(up=Direction(rate_mbps=16.0, burst_bytes=3000, delay_ms=5), down=Direction(delay_ms=5))
    config = AgentConfig(replan=ReplanConfig(device=device, every_s=0.05, probe_s=0.5), codec="fp32")

    async def go():
        async with _worker(bundle) as server:
            host, port = server.address.rsplit(":", 1)
            async with LinkProxy((host, int(port)), fast) as proxy:
                async with EdgeAgent(bundle, GrpcTransport(proxy.address), config=config) as agent:
                    timeline, t0, dropped = [], time.monotonic(), None
                    while time.monotonic() - t0 < 9:
                        if dropped is None and time.monotonic() - t0 > 3:
                            proxy.update(up=Direction(rate_mbps=0.1, burst_bytes=1500, delay_ms=5))
                            dropped = time.monotonic() - t0
                        answers = await agent.infer(images[:4])
                        timeline.append((time.monotonic() - t0, agent.chooser.split, len(answers)))
                    return timeline, dropped

    timeline, dropped = asyncio.run(asyncio.wait_for(go(), 60))
    assert sum(n for _, _, n in timeline) == 4 * len(timeline)  # an answer for every row
    before = [s for t, s, _ in timeline if 1.5 < t < dropped]
    assert before and set(before) == {1}, timeline
    moved = next((t for t, s, _ in timeline if t > dropped and s == LAST), None)
    assert moved is not None and moved - dropped <= 3.0, (dropped, moved)
    after = [s for t, s, _ in timeline if t > moved + 0.5]
    assert after and after.count(LAST) / len(after) > 0.8, after  # probes aside, it stays


def test_the_agent_keeps_answering_quickly_from_the_device_when_the_link_goes_silent(bundle: Path, tiny_batch) -> None:
    """A blackhole on the link: the re-planning agent's offloads run out of time (300 ms
    each), it takes that as the link's round trip and moves its cut to the device within a
    few batches, so later batches are answered at the device's pace (probes aside), not
    each after a time-out; every row is answered."""
    images, _ = tiny_batch
    device = DeviceTimes(stage_ms=(5.0,) * 7, exit_ms={k: 0.5 for k in range(1, 6)}, head_ms=0.5)
    config = AgentConfig(replan=ReplanConfig(device=device, every_s=0.05, probe_s=0.5), codec="fp32",
                         request_timeout_ms=300.0)

    async def go():
        async with _worker(bundle) as server:
            host, port = server.address.rsplit(":", 1)
            async with LinkProxy((host, int(port)), LinkProfile.symmetric(rtt_ms=4.0)) as proxy:
                async with EdgeAgent(bundle, GrpcTransport(proxy.address), config=config) as agent:
                    timeline, t0, silent = [], time.monotonic(), None
                    while time.monotonic() - t0 < 6:
                        if silent is None and time.monotonic() - t0 > 1.5:
                            proxy.outage("blackhole", 60.0)
                            silent = time.monotonic() - t0
                        started = time.monotonic()
                        answers = await agent.infer(images[:4])
                        timeline.append((started - t0, time.monotonic() - started, agent.chooser.split, len(answers)))
                    return timeline, silent

    timeline, silent = asyncio.run(asyncio.wait_for(go(), 60))
    assert sum(n for *_, n in timeline) == 4 * len(timeline)  # an answer for every row
    assert any(s != LAST for t, _, s, _ in timeline if t < silent)  # offloading while the link answers
    moved = next((t for t, _, s, _ in timeline if t > silent and s == LAST), None)
    assert moved is not None and moved - silent <= 2.0, (silent, moved, timeline)
    after = [took for t, took, _, _ in timeline if t > moved]
    assert len(after) >= 10 and sorted(after)[len(after) // 2] < 0.1, after  # the median batch: no time-out


@pytest.mark.slow
def test_edge_run_replans_from_the_command_line(bundle: Path, tiny_batch, tmp_path: Path, capsys) -> None:
    from splitexit.cli import main
    from splitexit.edge.trace import read_trace

    images, _ = tiny_batch
    np.save(tmp_path / "x.npy", images)
    profile = tmp_path / "device.json"
    assert main(["profile", str(bundle), "--as", "rpi4", "--repeats", "3", "--out", str(profile)]) == 0
    base = ["edge", "run", str(bundle), "--input", str(tmp_path / "x.npy"), "--batch-size", "4"]
    # refusals first, before any answer
    assert main([*base, "--out", str(tmp_path / "a.jsonl"), "--replan"]) == 2
    assert "--replan needs --device-profile" in capsys.readouterr().err
    assert main([*base, "--out", str(tmp_path / "a.jsonl"), "--split", "2"]) == 2
    assert "--split 2: the bundle allows [1, 3, 6]" in capsys.readouterr().err
    with S.cloud_worker(bundle) as address:
        out, trace = tmp_path / "r.jsonl", tmp_path / "t.msgpack"
        assert main([*base, "--out", str(out), "--worker", address, "--replan", "--device-profile", str(profile),
                     "--trace", str(trace)]) == 0
    answers = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(answers) == len(images) and not any(a["route"] == "degraded" for a in answers)
    records = list(read_trace(trace))
    # every batch records its cut and the plan (whether the link was estimated yet depends
    # on how many offloads of two sizes this short run saw: not asserted)
    assert records and all(r["split"] in SPLITS and r["plan"]["split"] in SPLITS for r in records)
