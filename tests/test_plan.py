"""The split planner on hand-made profiles where the right answer is known, and the
online re-planner on noisy links."""

from __future__ import annotations

import math
import random

import pytest

from splitexit.plan import (Candidate, DeviceTimes, EnergyModel, ExitBehaviour, LinkEstimate, LinkEstimator,
                            Replanner, expected_mj, expected_ms, plan)

# four stages, exits after stages 0 and 2; the device is 10x slower than the cloud
DEVICE = DeviceTimes(stage_ms=(10.0, 10.0, 10.0, 10.0), exit_ms={0: 1.0, 2: 1.0}, head_ms=1.0)
CLOUD = DeviceTimes(stage_ms=(1.0, 1.0, 1.0, 1.0), exit_ms={0: 0.1, 2: 0.1}, head_ms=0.1)
EXITS = (0, 2)
FEATURES = (8000.0, 8000.0, 2000.0, 500.0)  # bytes per input when cut after each stage
INPUT = 3000.0  # a compressed input
HALF_EARLY = ExitBehaviour(setting="maxprob q=0.8", share=(0.5, 0.25, 0.25), acc=0.90)
ALL_LATE = ExitBehaviour(setting="maxprob q=1.0", share=(0.0, 0.0, 1.0), acc=0.92)


def _plan(link: LinkEstimate, **kwargs) -> list[Candidate]:
    return plan(device=DEVICE, cloud=CLOUD, link=link, exits=EXITS, behaviours=[HALF_EARLY, ALL_LATE],
                full_acc=0.92, feature_bytes=FEATURES, input_bytes=INPUT, **kwargs)


def test_the_expected_latency_is_the_formula_by_hand() -> None:
    link = LinkEstimate(up_mbps=8.0, rtt_ms=20.0)  # 1 byte = 1 µs up
    ms, local = expected_ms(DEVICE, CLOUD, link, EXITS, HALF_EARLY, 1, FEATURES[1])
    # half answer at exit 0 on the device: stage 0 + its head = 11 ms
    # the rest: stages 0-1 + head 0 = 21 ms, 8000 B = 8 ms + 20 ms RTT + 64 B answer... (no downlink limit)
    # then exit 2 in the cloud: stage 2 + head = 1.1 ms; the final head: stages 2-3 + head 2 + final = 2.2 ms
    offload = 21 + 8 + 20
    want = 0.5 * 11 + 0.25 * (offload + 1.1) + 0.25 * (offload + 2.2)
    assert ms == pytest.approx(want) and local == 0.5


def test_the_expected_energy_is_the_formula_by_hand() -> None:
    link = LinkEstimate(up_mbps=8.0, rtt_ms=20.0)
    energy = EnergyModel(busy_w=5.0, idle_w=1.0, radio_alpha_mw_per_mbps=100.0, radio_beta_mw=1000.0)
    mj = expected_mj(energy, DEVICE, CLOUD, link, EXITS, HALF_EARLY, 1, FEATURES[1])
    # computing at 5 W; sending 8 ms at 1 W + 0.1 W/Mbit/s x 8 = 1.8 W; waiting (RTT, the worker) at 1 W
    want = 0.5 * 11 * 5 + 0.25 * (21 * 5 + 8 * 1.8 + (20 + 1.1) * 1) + 0.25 * (21 * 5 + 8 * 1.8 + (20 + 2.2) * 1)
    assert mj == pytest.approx(want)


def test_the_energy_objective_can_choose_otherwise_than_latency() -> None:
    # a fast link and a worker 10x faster: latency favours the cloud (7.5 ms against the
    # device's 24); but a frugal processor (0.5 W) and a radio that draws 20 W while sending
    # make the device's own exits cheaper in energy (12 mJ against 48)
    link = LinkEstimate(up_mbps=10.0, rtt_ms=1.0)
    hungry = EnergyModel(busy_w=0.5, idle_w=0.1, radio_alpha_mw_per_mbps=0.0, radio_beta_mw=20000.0)
    fastest = _plan(link)[0]
    frugal = _plan(link, energy=hungry, objective="energy")[0]
    assert fastest.on_device < 1 and frugal.on_device == 1.0
    assert frugal.energy_mj == min(c.energy_mj for c in _plan(link, energy=hungry))
    with pytest.raises(ValueError, match="needs an EnergyModel"):
        _plan(link, objective="energy")


def test_an_infinitely_fast_free_link_sends_everything_to_the_cloud() -> None:
    best = _plan(LinkEstimate(up_mbps=math.inf, rtt_ms=0.0))[0]
    assert best.route == "cloud_only" and best.expected_ms == pytest.approx(CLOUD.backbone_ms())


def test_without_a_link_the_device_answers_everything() -> None:
    ranked = _plan(LinkEstimate(up_mbps=None))
    assert ranked[0].route == "edge_exits" and ranked[0].setting == HALF_EARLY.setting
    assert all(math.isinf(c.expected_ms) for c in ranked if c.route in ("cloud_only", "split", "adaptive")
               if c.on_device < 1)
    exact = _plan(LinkEstimate(up_mbps=0.0), accuracy_floor=0.92)[0]  # no accuracy to spare: no exits
    assert exact.route in ("edge_only", "edge_exits") and exact.acc == 0.92


def test_a_slow_uplink_keeps_the_cut_late_and_the_early_exits_on_the_device() -> None:
    best = _plan(LinkEstimate(up_mbps=0.5, rtt_ms=100.0))[0]
    assert best.route in ("adaptive", "edge_exits")
    assert best.split is None or FEATURES[best.split] <= 2000.0  # never ships the big early features
    assert best.on_device >= 0.5


def test_a_latency_target_takes_the_most_accurate_plan_that_meets_it() -> None:
    link = LinkEstimate(up_mbps=8.0, rtt_ms=20.0)
    ranked = _plan(link, latency_target_ms=30.0)
    assert ranked[0].expected_ms <= 30.0
    meeting = [c for c in ranked if c.expected_ms <= 30.0]
    assert ranked[0].acc == max(c.acc for c in meeting)


def test_the_estimator_finds_the_links_bandwidth_and_rtt() -> None:
    rng = random.Random(0)
    estimator = LinkEstimator()
    for _ in range(50):
        size = rng.choice([20_000, 50_000])
        seconds = (size * 8 / 4e6) + 0.030 + rng.uniform(0, 0.004)  # 4 Mbit/s, 30 ms RTT, noise
        estimator.observe(size, seconds, server_ms=2.0)
    got = estimator.estimate()
    assert got is not None and got.up_mbps == pytest.approx(4.0, rel=0.1)
    assert got.rtt_ms == pytest.approx(28.0, abs=4.0)


def test_replanning_does_not_flap_on_a_noisy_steady_link_and_moves_on_a_real_change() -> None:
    rng = random.Random(1)
    replanner = Replanner()
    naive, last = 0, None
    for _ in range(200):  # where cloud-only and the device with exits cost about the same
        noisy = LinkEstimate(up_mbps=2.0 * rng.uniform(0.9, 1.1), rtt_ms=8.0 * rng.uniform(0.8, 1.2))
        ranked = _plan(noisy)
        naive, last = naive + (ranked[0].describe() != last), ranked[0].describe()
        replanner.update(ranked)
    assert naive > 20  # always taking the best of the moment would flap
    assert replanner.changes <= 2, replanner.changes
    before = replanner.current
    for step in range(replanner.patience):
        replanner.update(_plan(LinkEstimate(up_mbps=None)))  # the link is gone
    assert replanner.current is not before and replanner.current.on_device == 1.0


def test_bad_inputs_are_refused() -> None:
    with pytest.raises(ValueError, match="sum to 1"):
        ExitBehaviour(setting="x", share=(0.5, 0.2), acc=0.9)
    with pytest.raises(ValueError, match="non-negative"):
        DeviceTimes(stage_ms=(-1.0,), exit_ms={}, head_ms=0.0)
    with pytest.raises(ValueError, match="same network"):
        plan(device=DEVICE, cloud=DeviceTimes(stage_ms=(1.0,), exit_ms={}, head_ms=0.1), link=LinkEstimate(up_mbps=1),
             exits=EXITS, behaviours=[], full_acc=0.9, feature_bytes=FEATURES, input_bytes=INPUT)
