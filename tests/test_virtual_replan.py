"""Online re-planning inside the fleet simulator (`[edge.replan]`, splitexit.sim.virtual_replan).

- Each device cuts where the agent's own chooser would: at a cloud split on a fast link,
  on the device (the last stage) on a link too slow to win, probing now and then.
- A bandwidth drop (a trace that falls from 12 Mbit/s to 1 packet a second) moves every
  device's cut to the device within a few seconds, and the run settles: the cuts of the
  result are what the devices choose given that result's answers.
- The same scenario gives the same result; bad settings give one clear error each.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from splitexit.bundle import export_bundle
from splitexit.plan import DeviceTimes
from splitexit.policies import MaxProb
from splitexit.profile import DeviceProfile
from splitexit.sim.virtual import CloudModel, EdgeModel, FleetModel, LinkModel, Scenario, simulate_fleet

import splitexit_tests_edge_support as S  # noqa: E402  (registered by conftest.py)

LAST = 6  # resnet14_tiny: stages 0..6
DROP_S = 20.0


@pytest.fixture(scope="module")
def setup(tiny_net, tiny_batch, tmp_path_factory) -> dict[str, Path]:
    """A bundle cut at 1, 3 or on the device; a device of 10 ms stages; a trace that drops."""
    model, meta = tiny_net
    tmp = tmp_path_factory.mktemp("vreplan")
    bundle = export_bundle(tmp / "b", model, meta, split=1, splits=(1, 3, LAST), input_shape=S.SHAPE, name="tiny",
                           policy=MaxProb(S.exit_thresholds(model, tiny_batch[1])))
    times = DeviceTimes(stage_ms=(10.0,) * 7, exit_ms={k: 1.0 for k in range(1, 6)}, head_ms=2.0)
    DeviceProfile(name="hand-made", source="a test", arch="resnet14_tiny", threads=1,
                  times={1: times}).save(tmp / "device.json")
    # one 1,500-byte opportunity per ms (12 Mbit/s) until DROP_S, then one a second
    ticks = [*range(1, int(DROP_S * 1000) + 1), *range(int(DROP_S * 1000) + 1000, 80_001, 1000)]
    (tmp / "drop.up").write_text("\n".join(map(str, ticks)) + "\n")
    one_split = export_bundle(tmp / "one", model, meta, split=1, input_shape=S.SHAPE, name="tiny",
                              policy=MaxProb(S.exit_thresholds(model, tiny_batch[1])))
    return {"bundle": bundle, "profile": tmp / "device.json", "trace": tmp / "drop.up", "one_split": one_split}


def _scenario(setup: dict[str, Path], link: LinkModel, devices: int = 4, requests: int = 200, rate_hz: float = 5.0,
              **replan: float) -> Scenario:
    edge = EdgeModel(bundle=str(setup["bundle"]), profile=str(setup["profile"]), replan=replan)
    return Scenario(fleet=FleetModel(devices=devices, requests=requests, rate_hz=rate_hz, arrival="periodic"),
                    edge=edge, link=link, cloud=CloudModel(workers=2))


@pytest.fixture(autouse=True)
def _cache(tmp_path_factory, monkeypatch) -> None:
    monkeypatch.setenv("SPLITEXIT_CACHE", str(tmp_path_factory.getbasetemp() / "vreplan-cache"))


def test_devices_cut_at_a_cloud_split_on_a_fast_link_and_on_the_device_on_a_slow_one(setup) -> None:
    fast = simulate_fleet(_scenario(setup, LinkModel(rtt_ms=2.0, up_mbps=1000.0)))
    report = fast.report(2)
    assert fast.split is not None and report["split_shares"].get(str(LAST), 0.0) == 0.0
    assert report["cloud_share"] > 0.5
    # a link far too slow: every device moves to the device once it has measured it, and
    # then only probes cross it (rarely: no cut could win at this RTT). Once a second (the
    # chooser must not probe every batch) and five times a second (the features queue on
    # the uplink until offloads run out of time: a time-out counts as a lower bound on the
    # round trip, or the devices would never learn the link and keep offloading)
    for rate_hz in (1.0, 5.0):
        slow = simulate_fleet(_scenario(setup, LinkModel(rtt_ms=400.0, up_mbps=0.05), rate_hz=rate_hz))
        assert slow.split is not None
        late, late_s = slow.split.reshape(4, 200)[:, 100:], slow.sent_ms.reshape(4, 200)[:, 100:] / 1e3
        assert (late == LAST).mean() > 0.85, (rate_hz, np.unique(late, return_counts=True))
        for d in range(4):  # probes: one every probe_s x hopeless_backoff = 10 s
            assert np.diff(late_s[d][late[d] != LAST]).min() >= 9.9
        assert slow.report(2)["plan_changes"] >= 4  # each device left the bundle's split once


def test_a_bandwidth_drop_moves_every_device_to_the_device_within_seconds(setup) -> None:
    scenario = _scenario(setup, LinkModel(rtt_ms=20.0, trace=str(setup["trace"]), trace_phase="aligned"))
    result = simulate_fleet(scenario)
    assert result.split is not None
    split, sent_s = result.split.reshape(4, 200), result.sent_ms.reshape(4, 200) / 1e3
    before = split[:, (sent_s[0] > 5) & (sent_s[0] < DROP_S)]
    assert (before != LAST).mean() > 0.9  # offloading while the link is fast
    for d in range(4):
        after = sent_s[d] > DROP_S
        moved = sent_s[d][after][np.argmax(split[d][after] == LAST)]
        assert moved - DROP_S < 8.0, (d, moved)
        settled, settled_s = split[d][sent_s[d] > moved + 2], sent_s[d][sent_s[d] > moved + 2]
        assert (settled == LAST).mean() > 0.75, np.unique(settled, return_counts=True)
        assert np.diff(settled_s[settled != LAST]).min() >= 0.99  # only probes, one a second
    # settled: the cuts of the result are what the devices choose from its own answers
    from splitexit.sim.virtual_replan import DevicePlanners

    again = DevicePlanners(scenario).cuts(result.sent_ms, result)
    assert np.array_equal(again.split, result.split)


def test_the_same_scenario_gives_the_same_replanned_result(setup) -> None:
    scenario = _scenario(setup, LinkModel(rtt_ms=30.0, trace="TMobile-LTE-short.up"), devices=6, requests=60)
    a, b = simulate_fleet(scenario), simulate_fleet(scenario)
    assert np.array_equal(a.done_ms, b.done_ms) and np.array_equal(a.split, b.split)  # type: ignore[arg-type]
    other = simulate_fleet(replace(scenario, seed=1))
    assert not np.array_equal(a.done_ms, other.done_ms)


def test_replanning_settings_are_checked(setup) -> None:
    with pytest.raises(ValueError, match="give bundle and profile"):
        EdgeModel(bundle=str(setup["bundle"]), replan={})
    with pytest.raises(ValueError, match=r"unknown keys \['margins'\]"):
        EdgeModel(bundle=str(setup["bundle"]), profile=str(setup["profile"]), replan={"margins": 0.2})
    with pytest.raises(ValueError, match="margin in"):
        simulate_fleet(_scenario(setup, LinkModel(rtt_ms=2.0), requests=5, margin=2.0))
    one = Scenario(edge=EdgeModel(bundle=str(setup["one_split"]), profile=str(setup["profile"]), replan={}))
    with pytest.raises(ValueError, match="allows one split .* --splits"):
        simulate_fleet(one)
