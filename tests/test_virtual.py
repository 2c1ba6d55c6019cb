"""The virtual-time fleet simulator (splitexit.sim.virtual): queueing theory, Little's law,
determinism, the batcher's admission rules, and the scenario file's errors."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from splitexit.policies import MaxProb
from splitexit.sim.virtual import CloudModel, EdgeModel, FleetModel, LinkModel, Scenario, VirtualResult, simulate_fleet

UNBOUNDED = dict(queue_limit_rows=10**9, max_queue_wait_ms=1e12, timeout_ms=1e12)


def _md1(seed: int, rho: float, service_ms: float = 10.0, requests: int = 300_000) -> Scenario:
    """One Poisson source, one worker serving one request at a time in `service_ms`."""
    return Scenario(seed=seed, fleet=FleetModel(devices=1, requests=requests, rate_hz=rho / service_ms * 1000),
                    cloud=CloudModel(workers=1, max_batch=1, max_delay_ms=0, batch_ms=service_ms, row_ms=0,
                                     **UNBOUNDED))


def test_an_md1_queue_waits_as_the_closed_form_says() -> None:
    """M/D/1: mean wait in queue = rho * D / (2 (1 - rho)); within 2% over 4 seeds of 300k."""
    rho, service = 0.5, 10.0
    waits = [simulate_fleet(_md1(seed, rho, service)).latency_ms.mean() - service for seed in range(4)]
    want = rho * service / (2 * (1 - rho))
    assert abs(np.mean(waits) / want - 1) < 0.02, (np.mean(waits), want)


def test_littles_law_holds_on_a_run() -> None:
    """L = lambda W: the mean number of requests in the system, sampled at random times,
    equals the arrival rate times the mean time in the system."""
    result = simulate_fleet(Scenario(seed=3, fleet=FleetModel(devices=50, requests=400, rate_hz=4.0),
                                     edge=EdgeModel(on_device_share=0.3, edge_ms=8, split_ms=5, feature_bytes=4096),
                                     link=LinkModel(rtt_ms=40, up_mbps=10),
                                     cloud=CloudModel(workers=2, batch_ms=4, row_ms=0.5)))
    start, end = np.percentile(result.sent_ms, 10), np.percentile(result.sent_ms, 90)  # steady state
    probes = np.random.default_rng(0).uniform(start, end, 4000)
    sent, done = np.sort(result.sent_ms), np.sort(result.done_ms)
    in_system = np.searchsorted(sent, probes, side="right") - np.searchsorted(done, probes, side="right")
    inside = (result.sent_ms >= start) & (result.sent_ms <= end)
    rate = inside.sum() / (end - start)
    assert in_system.mean() == pytest.approx(rate * result.latency_ms[inside].mean(), rel=0.05)


def test_the_same_scenario_and_seed_give_the_same_result_bit_for_bit() -> None:
    scenario = Scenario(seed=7, fleet=FleetModel(devices=200, requests=50, rate_hz=2.0),
                        edge=EdgeModel(on_device_share=0.5, edge_ms=10, split_ms=6, feature_bytes=2048),
                        link=LinkModel(rtt_ms=70, up_mbps=5.85), cloud=CloudModel(workers=2, batch_ms=5, row_ms=1))
    a, b = simulate_fleet(scenario), simulate_fleet(scenario)
    assert a.report(2) == b.report(2)
    assert a.done_ms.tobytes() == b.done_ms.tobytes() and a.route.tobytes() == b.route.tobytes()
    other = simulate_fleet(replace(scenario, seed=8))
    assert other.done_ms.tobytes() != a.done_ms.tobytes()


def test_overload_is_refused_at_once_and_what_is_accepted_is_answered_in_time() -> None:
    """Offered 3x one worker's capacity: the batcher's admission by expected wait refuses
    the excess at once (degraded on the device), the queue stays within its wait limit,
    and nothing is computed past its deadline."""
    cloud = CloudModel(workers=1, max_batch=8, max_delay_ms=2, batch_ms=8, row_ms=1, max_queue_wait_ms=100,
                       timeout_ms=1000)
    capacity_hz = 8 / (cloud.batch_time_ms(8) / 1000)  # rows per second with full batches
    result = simulate_fleet(Scenario(seed=1, fleet=FleetModel(devices=30, requests=300, rate_hz=3 * capacity_hz / 30),
                                     cloud=cloud))
    report = result.report(1)
    assert 0.55 < report["degraded_share"] < 0.75 and report["late"] == 0, report
    answered = result.route == 1
    assert result.latency_ms[answered].max() <= 100 + cloud.batch_time_ms(8) * 2, report
    assert report["utilisation"] > 0.9 and report["mean_batch"] > 7.5, report


def test_scenario_files_refuse_unknown_keys_and_bad_values() -> None:
    ok = Scenario.from_dict({"name": "x", "seed": 2, "fleet": {"devices": 3}, "cloud": {"workers": 2}})
    assert ok.fleet.devices == 3 and ok.cloud.workers == 2 and ok.seed == 2
    with pytest.raises(ValueError, match=r"\[cloud\]: unknown keys \['worker'\]"):
        Scenario.from_dict({"cloud": {"worker": 2}})
    with pytest.raises(ValueError, match="unknown scenario keys"):
        Scenario.from_dict({"fleat": {}})
    with pytest.raises(ValueError, match="workers"):
        Scenario.from_dict({"cloud": {"workers": 0}})


def test_sim_virtual_runs_a_scenario_file_and_refuses_a_bad_one(tmp_path, capsys) -> None:
    import json

    from splitexit.cli import main

    scenario = tmp_path / "small.toml"
    scenario.write_text('seed = 1\n[fleet]\ndevices = 20\nrequests = 10\n[edge]\non_device_share = 0.5\n'
                        'edge_ms = 5.0\n[link]\nrtt_ms = 30.0\n[cloud]\nworkers = 1\n')
    assert main(["sim", "virtual", str(scenario), "--out", str(tmp_path / "out")]) == 0
    report = json.loads((tmp_path / "out" / "virtual.json").read_text())
    assert report["requests"] == 200 and 0.3 < report["edge_share"] < 0.7 and report["scenario"]["seed"] == 1
    assert (tmp_path / "out" / "virtual.png").stat().st_size > 1000
    capsys.readouterr()
    (tmp_path / "bad.toml").write_text("[cloud]\nworkers = 'many'\n")
    assert main(["sim", "virtual", str(tmp_path / "bad.toml")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "bad.toml" in err[0], err


def test_bench_fleet_quick_reports_its_wall_time(quick_bench) -> None:
    result = quick_bench("fleet")
    assert result["devices"] == 100 and result["requests"] == 100 * 100 and result["wall_s"] < 30
    assert result["fidelity"] is None and "not_measured" in result


@pytest.mark.slow
def test_a_scenario_runs_live_through_real_workers_and_links_beside_its_virtual_run(tmp_path) -> None:
    """fleet_live: the scenario's devices send real requests through link emulators to a
    worker process; the virtual run uses the worker's costs measured beforehand. Same
    draws both ways (the same inputs answered on the device), every request answered."""
    import splitexit_tests_edge_support as S
    from splitexit.policies import MaxProb
    from splitexit.sim.fleet_live import fidelity

    model, meta = S.tiny_model()
    bundle = S.export(tmp_path, model, meta, MaxProb(2.0, fallback=False), split=2)
    scenario = Scenario(seed=2, fleet=FleetModel(devices=3, requests=12, rate_hz=8.0),
                        edge=EdgeModel(on_device_share=0.4, edge_ms=5.0, split_ms=2.0),
                        link=LinkModel(rtt_ms=60.0, up_mbps=20.0,  # one device nearer, in a group of its own
                                       groups=({"devices": 1, "rtt_ms": 20.0, "up_mbps": 20.0},)),
                        cloud=CloudModel(workers=1))
    result = fidelity(scenario, bundle)
    live, virtual = result["live"], result["virtual"]
    assert result["requests"] == 36 and live["edge_share"] == virtual["edge_share"] > 0
    assert live["degraded_share"] == virtual["degraded_share"] == 0
    # an RTT of 60 ms dominates both; the rest is the measured worker and gRPC costs
    assert 0.7 < result["ratio"]["mean_ms"] < 1.4, result
    assert result["calibration"]["rpc_ms"] >= 0 and result["calibration"]["request_bytes"] > 0


def test_sim_capacity_finds_the_fewest_workers_and_one_fewer_misses(tmp_path, capsys) -> None:
    """Replayed through the simulator, the answer meets the targets and one worker fewer does not."""
    import json
    from dataclasses import replace

    from splitexit.cli import main
    from splitexit.sim.virtual import fewest_workers

    scenario = Scenario(seed=0, fleet=FleetModel(devices=400, requests=20, rate_hz=10.0),
                        edge=EdgeModel(on_device_share=0.5, edge_ms=5.0, split_ms=2.0),
                        link=LinkModel(rtt_ms=20.0), cloud=CloudModel(workers=1, batch_ms=4.0, row_ms=1.0))
    answer, tried = fewest_workers(scenario, p99_ms=120.0, max_degraded=0.01)
    assert answer > 1 and answer - 1 in tried

    def report(workers: int) -> dict:
        return simulate_fleet(replace(scenario, cloud=replace(scenario.cloud, workers=workers))).report(workers)

    meets, misses = report(answer), report(answer - 1)
    assert meets["p99_ms"] <= 120 and meets["degraded_share"] <= 0.01
    assert misses["p99_ms"] > 120 or misses["degraded_share"] > 0.01
    path = tmp_path / "s.toml"
    path.write_text("[fleet]\ndevices = 400\nrequests = 20\nrate_hz = 10.0\n[edge]\non_device_share = 0.5\n"
                    "edge_ms = 5.0\nsplit_ms = 2.0\n[link]\nrtt_ms = 20.0\n[cloud]\nbatch_ms = 4.0\nrow_ms = 1.0\n")
    assert main(["sim", "capacity", str(path), "--p99-ms", "120", "--out", str(tmp_path / "cap")]) == 0
    assert json.loads((tmp_path / "cap" / "capacity.json").read_text())["workers"] == answer
    assert (tmp_path / "cap" / "capacity.png").stat().st_size > 1000
    capsys.readouterr()
    assert main(["sim", "capacity", str(path), "--p99-ms", "1"]) == 2  # below what the link alone takes
    assert "do not keep p99 <= 1 ms" in capsys.readouterr().err


def test_a_blackhole_holds_what_crosses_and_a_refusal_answers_on_the_device_at_once() -> None:
    """A 2 s blackhole from t = 1 s: offloads sent meanwhile cross when it ends (answered if
    their deadline allows, else degraded at it); a refusing outage degrades them at once."""
    from splitexit.sim.link import Outage

    def run(mode: str, timeout_ms: float):
        return simulate_fleet(Scenario(seed=4, fleet=FleetModel(devices=20, requests=40, rate_hz=10.0),
                                       link=LinkModel(rtt_ms=10.0, outages=(Outage(1.0, 2.0, mode),)),
                                       cloud=CloudModel(workers=2, timeout_ms=timeout_ms)))

    inside = lambda r: (r.sent_ms >= 1000) & (r.sent_ms < 3000)  # noqa: E731
    patient = run("blackhole", 5000.0)
    held = inside(patient)
    assert (patient.route[held] == 1).all() and (patient.done_ms[held] >= 3000).all()  # through at the end
    clear = (patient.sent_ms < 950) | (patient.sent_ms >= 3500)  # not inside it, nor behind its backlog
    assert (patient.route == 1).all() and patient.latency_ms[clear].max() < 100
    hurried = run("blackhole", 500.0)
    late = inside(hurried) & (hurried.sent_ms < 2500)  # their deadline comes before the end
    assert (hurried.route[late] == 3).all() and np.allclose(hurried.latency_ms[late], 500.0)
    refused = run("refuse", 5000.0)
    assert (refused.route[inside(refused)] == 2).all() and refused.latency_ms[inside(refused)].max() < 1e-9
    scenario = Scenario.from_dict({"link": {"rtt_ms": 10.0, "outages": [{"start_s": 1.0, "duration_s": 2.0}]}})
    assert scenario.link.outages == (Outage(1.0, 2.0, "blackhole"),)


@pytest.mark.slow
def test_the_simulated_batcher_forms_the_real_batchers_batches() -> None:
    """The same arrival sequence through the real `cloud.batcher.Batcher` (a compute of a
    fixed 30 ms, in real time) and through the simulator's queue: the same requests are
    batched together."""
    import asyncio
    import time
    from concurrent.futures import ThreadPoolExecutor

    from splitexit.cloud.batcher import Batcher, BatcherConfig
    from splitexit.sim.virtual import _cloud

    compute_ms, max_batch, delay_ms = 30.0, 4, 10.0
    cloud = CloudModel(workers=1, max_batch=max_batch, max_delay_ms=delay_ms, batch_ms=compute_ms, row_ms=0.0,
                       **UNBOUNDED)

    def simulate(arrive: np.ndarray) -> np.ndarray:
        answered, how, *_ = _cloud(arrive, np.full(len(arrive), np.inf), cloud)
        assert (how == 1).all()
        return answered

    # a sequence whose arrivals all fall at least 3 ms from every simulated batch start, so
    # that asyncio's timing (~1 ms) decides nothing (the first of a fixed series that does)
    for seed in range(2000):
        gaps = np.random.default_rng(seed).choice([4.0, 6.0, 9.0, 25.0, 60.0], size=30,
                                                  p=[0.35, 0.3, 0.2, 0.1, 0.05])
        arrive = np.cumsum(gaps)  # ms
        starts = np.unique(simulate(arrive)) - compute_ms
        if np.abs(arrive[:, None] - starts[None, :]).min() >= 3.0:
            break
    else:
        raise AssertionError("no clean sequence among 2000 seeds")

    def real_batches() -> list[list[int]]:
        calls: list[list[int]] = []

        def run_batch(key, payloads):
            time.sleep(compute_ms / 1000)
            calls.append(list(payloads))
            return list(payloads)

        async def body() -> None:
            with ThreadPoolExecutor(max_workers=1) as executor:
                batcher = Batcher(BatcherConfig(max_batch=max_batch, max_queue_delay_ms=delay_ms,
                                                max_queue_wait_ms=600_000, queue_limit_rows=10_000,
                                                queue_limit_requests=10_000), run_batch, executor=executor)
                loop = asyncio.get_running_loop()
                start = loop.time() + 0.05

                async def one(i: int) -> None:
                    await asyncio.sleep(max(0.0, start + arrive[i] / 1000 - loop.time()))
                    await batcher.submit("k", i, rows=1)

                await asyncio.gather(*(one(i) for i in range(len(arrive))))
                await batcher.close()

        asyncio.run(body())
        return calls

    simulated: dict[float, list[int]] = {}
    for i, t in enumerate(simulate(arrive).tolist()):
        simulated.setdefault(t, []).append(i)
    want = [simulated[t] for t in sorted(simulated)]
    # a run on a loaded machine can wake 3 ms late (seen once while a training held both
    # cores); a different rule would differ on every run, so three tries tell them apart
    tries = []
    for _ in range(3):
        tries.append(real_batches())
        if tries[-1] == want:
            break
    assert tries[-1] == want, (tries, want)


def test_the_network_can_decide_which_inputs_stay_on_the_device(tmp_path, monkeypatch) -> None:
    """[edge] bundle: the bundle's own policy over the digits' test inputs decides which
    requests are answered on the device, and the report carries the answers' accuracy:
    the policy's own on those inputs."""
    import splitexit_tests_edge_support as S
    from splitexit.sim.virtual import network_decisions

    monkeypatch.setenv("SPLITEXIT_CACHE", str(tmp_path / "cache"))
    model, meta = S.tiny_model()
    _, x = S.batch(meta, 64)
    bundle = S.export(tmp_path, model, meta, MaxProb(S.exit_thresholds(model, x)), split=2)
    decided, right = network_decisions(bundle, "digits")
    assert len(decided) == 360 and 0 < decided.mean() < 1
    scenario = Scenario(fleet=FleetModel(devices=36, requests=10), edge=EdgeModel(bundle=str(bundle), edge_ms=2.0),
                        link=LinkModel(rtt_ms=20.0))
    report = simulate_fleet(scenario).report(1)
    assert report["edge_share"] == pytest.approx(decided.mean(), abs=1e-5)
    assert report["acc"] == pytest.approx(right.mean(), abs=1e-5)


def test_the_autoscaler_adds_workers_under_load_and_removes_them_after_its_stabilization_window() -> None:
    """Load for 3 workers on 1: the HPA rules add workers at its syncs (serving after the
    pod start time) until the utilisation is near its target, and the refusals of the
    last third of the run are far fewer than the first's. Six workers on a light load fall
    to the minimum, but not before the stabilization window has passed."""
    from splitexit.sim.virtual import Autoscale

    cloud = CloudModel(workers=1, max_batch=8, max_delay_ms=2, batch_ms=8, row_ms=1, max_queue_wait_ms=200,
                       autoscale=Autoscale(min_workers=1, max_workers=8, target=0.6, sync_s=10, stabilization_s=60,
                                           start_s=5))
    capacity_hz = 8 / (cloud.batch_time_ms(8) / 1000)
    busy = Scenario(seed=2, fleet=FleetModel(devices=100, requests=600, rate_hz=3 * capacity_hz / 100), cloud=cloud)
    result = simulate_fleet(busy)
    counts = [c for _, c in result.workers]
    assert counts[0] == 1 and max(counts) >= 4, result.workers
    first = result.sent_ms < result.sent_ms.max() / 3
    last = result.sent_ms > 2 * result.sent_ms.max() / 3
    assert (result.route[first] == 2).mean() > 0.3 and (result.route[last] == 2).mean() < 0.05
    fixed = simulate_fleet(Scenario(seed=2, fleet=busy.fleet, cloud=replace(cloud, autoscale=None)))
    assert len(fixed.workers) == 1 and (fixed.route == 2).mean() > 0.5  # one worker throughout refuses most
    assert Scenario.from_dict({"cloud": {"autoscale": {"max_workers": 4}}}).cloud.autoscale == Autoscale(max_workers=4)
    light = simulate_fleet(Scenario(seed=2, fleet=FleetModel(devices=10, requests=200, rate_hz=1.0),
                                    cloud=replace(cloud, workers=6)))
    assert light.workers[0] == (0.0, 6) and light.workers[-1][1] == 1, light.workers
    assert light.workers[1][0] >= 60, light.workers  # none left before the 60 s window


def test_a_trace_uplink_carries_features_as_the_link_emulator_does(tmp_path) -> None:
    """One device's features through a trace: the simulator's departure times equal the
    link emulator's bottleneck's, send after send (idle gaps lose opportunities, a backlog
    goes on from the first unused one, opportunities sharing a millisecond included)."""
    from splitexit.sim.link import Direction, _Bottleneck, parse_trace
    from splitexit.sim.virtual import _uplink

    rng = np.random.default_rng(0)
    times = np.sort(rng.integers(0, 400, size=300))  # bursts: several opportunities per ms
    path = tmp_path / "bursty.up"
    path.write_text("\n".join(map(str, [*times, 400])) + "\n")
    link = LinkModel(trace=str(path), trace_phase="aligned")
    ready = np.cumsum(rng.exponential(20.0, 200))
    sends = rng.random(200) < 0.7
    got = _uplink(ready, sends, np.full(200, 5000.0), np.zeros(200, dtype=np.int64), 1, link, seed=0)
    neck, direction = _Bottleneck(0.0), Direction(trace=parse_trace(path.read_text(), "bursty"))
    free = -np.inf
    for t, s, g in zip(ready, sends, got):
        if not s:
            continue
        start = max(t, free)  # the simulator queues a device's features; the emulator gets them in turn
        want = 1e3 * neck.depart(start / 1e3, 5000, direction)
        assert g == pytest.approx(want, abs=1e-6), (t, start)
        free = g


def test_traces_in_scenarios_load_and_are_seeded() -> None:
    base = {"fleet": {"devices": 50, "requests": 30, "rate_hz": 2.0},
            "edge": {"on_device_share": 0.4, "edge_ms": 5, "split_ms": 3, "feature_bytes": 8192},
            "link": {"rtt_ms": 70, "trace": "TMobile-LTE-short.up"}}
    try:
        one = simulate_fleet(Scenario.from_dict(base))
    except (OSError, ValueError) as exc:
        pytest.skip(f"the cellular traces beside the project are missing: {exc}")
    again = simulate_fleet(Scenario.from_dict(base))
    assert np.array_equal(one.done_ms, again.done_ms)
    aligned = simulate_fleet(Scenario.from_dict({**base, "link": {**base["link"], "trace_phase": "aligned"}}))
    assert not np.array_equal(one.done_ms, aligned.done_ms)  # devices at their own points of the trace
    with pytest.raises(ValueError, match="up_mbps or a trace, not both"):
        Scenario.from_dict({**base, "link": {"trace": "x", "up_mbps": 5}})


def test_a_failed_worker_loses_its_batch_a_drained_one_nothing_and_a_started_one_serves() -> None:
    base = Scenario(seed=1, fleet=FleetModel(devices=20, requests=100, rate_hz=5.0),
                    edge=EdgeModel(split_ms=2.0), link=LinkModel(rtt_ms=10.0),
                    cloud=CloudModel(workers=2, batch_ms=20.0, row_ms=1.0, max_batch=8))
    steady = simulate_fleet(base)
    assert steady.report(2)["degraded_share"] == 0

    def run(*events: dict) -> tuple[VirtualResult, np.ndarray]:
        result = simulate_fleet(replace(base, cloud=replace(base.cloud, events=events)))
        sent_s = result.sent_ms / 1e3
        return result, sent_s

    # both workers fail at 5 s and one starts again at 10 s
    failed, sent_s = run({"at_s": 5, "kind": "fail", "count": 2}, {"at_s": 10, "kind": "start"})
    degraded = failed.route >= 2
    assert degraded[(sent_s > 5.5) & (sent_s < 9.5)].all()  # nobody serves: answered on the device at once
    assert not degraded[(sent_s > 11) & (sent_s < 15)].any()  # one worker is enough for this load
    lost = degraded & (sent_s < 5)  # in the failed workers' batches
    assert 0 < lost.sum() <= 16 and (failed.done_ms[lost] <= 5000 + base.link.rtt_ms + 1).all()
    assert [w for _, w in failed.workers] == [2, 0, 1]
    # a drain loses nothing
    drained, _ = run({"at_s": 5, "kind": "drain"})
    assert drained.report(2)["degraded_share"] == 0 and [w for _, w in drained.workers] == [2, 1]
    with pytest.raises(ValueError, match="kind fail, drain or start"):
        Scenario.from_dict({"cloud": {"events": [{"at_s": 1, "kind": "explode"}]}})


def test_a_regional_outage_hits_its_group_only() -> None:
    from splitexit.sim.link import Outage

    scenario = Scenario.from_dict({
        "fleet": {"devices": 30, "requests": 40, "rate_hz": 4.0},
        "edge": {"on_device_share": 0.2, "edge_ms": 5, "split_ms": 2, "feature_bytes": 4000},
        "link": {"rtt_ms": 40, "up_mbps": 10, "groups": [
            {"devices": 10, "rtt_ms": 80, "up_mbps": 5, "outages": [{"start_s": 3, "duration_s": 3, "mode": "refuse"}]},
            {"devices": 5, "rtt_ms": 10, "up_mbps": 50}]},
        "cloud": {"workers": 2}})
    result = simulate_fleet(scenario)
    device = np.repeat(np.arange(30), 40)
    degraded = result.route >= 2
    region = device < 10
    assert degraded[region].sum() > 0 and degraded[~region].sum() == 0
    offloaded = result.route == 1
    latency = result.latency_ms
    near, far = (device >= 10) & (device < 15) & offloaded, region & offloaded
    assert latency[near].mean() + 60 < latency[far].mean()  # 10 ms against 80 ms of RTT, slower uplink
    assert isinstance(scenario.link.groups[0].outages[0], Outage)
    with pytest.raises(ValueError, match=r"groups\]\] hold 40 devices, the fleet 30"):
        simulate_fleet(Scenario.from_dict({"fleet": {"devices": 30}, "link": {"groups": [{"devices": 40}]}}))


def test_device_times_come_from_a_device_profile_and_energy_is_counted(tmp_path, monkeypatch) -> None:
    """[edge] profile: each input's device time is the profile's time of the stages and
    heads it runs (so inputs leaving early are quick); [edge.energy]: the mean mJ per
    request, computing at the busy power, sending at the radio's, waiting at idle."""
    import splitexit_tests_edge_support as S
    from splitexit.plan import DeviceTimes
    from splitexit.profile import DeviceProfile
    from splitexit.sim.virtual import network_exits, device_times

    monkeypatch.setenv("SPLITEXIT_CACHE", str(tmp_path / "cache"))
    model, meta = S.tiny_model()
    _, x = S.batch(meta, 64)
    bundle = S.export(tmp_path, model, meta, MaxProb(S.exit_thresholds(model, x)), split=2)
    # stages of 10 ms, exit heads of 1 ms: an input answered at stage k took 10 (k + 1) + its heads
    times = DeviceTimes(stage_ms=(10.0,) * 7, exit_ms={k: 1.0 for k in range(1, 6)}, head_ms=2.0)
    profile = DeviceProfile(name="hand-made", source="a test", arch="resnet14_tiny", threads=1, times={1: times})
    profile.save(tmp_path / "device.json")
    edge = EdgeModel(bundle=str(bundle), profile=str(tmp_path / "device.json"), feature_bytes=2000)
    scenario = Scenario(fleet=FleetModel(devices=36, requests=10), edge=edge, link=LinkModel(rtt_ms=20.0, up_mbps=8))
    edge_ms, split_ms = device_times(scenario, 360)
    stages, split, _ = network_exits(str(bundle), "digits")
    heads = np.asarray([len([k for k in range(1, 6) if k <= s]) for s in stages]) * 1.0
    want = 10.0 * (stages + 1) + heads + np.where(stages == 6, 2.0, 0.0)
    assert np.allclose(edge_ms, want) and np.allclose(split_ms, 30.0 + 2.0)  # stages 0-2, heads 1 and 2
    plain = simulate_fleet(scenario).report(1)
    assert "energy_mj" not in plain
    powered = replace(scenario, edge=replace(edge, energy={"busy_w": 2.0, "idle_w": 0.5, "radio_alpha_mw_per_mbps": 0.0,
                                                           "radio_beta_mw": 1000.0}))
    result = simulate_fleet(powered)
    on = result.route == 0
    assert np.allclose(result.energy_mj[on], 2.0 * edge_ms[on])
    # offloaded: 32 ms computing (64 mJ), 2 ms sending 2,000 B at 8 Mbit/s (2 mJ), the rest waiting
    off = result.route == 1
    waited = result.done_ms[off] - (result.sent_ms[off] + 32.0 + 2.0)
    assert np.allclose(result.energy_mj[off], 64.0 + 2.0 + 0.5 * waited)
    with pytest.raises(ValueError, match=r"\[edge.energy\]"):
        EdgeModel(energy={"busy": 1.0})
    # a board of splitexit.energy at its top clock stands for the device's processor
    from splitexit.energy import get_board

    board = get_board("rk3399-a72")
    on_board = simulate_fleet(replace(scenario, edge=replace(edge, energy={
        "board": "rk3399-a72", "radio_alpha_mw_per_mbps": 0.0, "radio_beta_mw": 1000.0})))
    on = on_board.route == 0
    assert np.allclose(on_board.energy_mj[on], board.power(board.f_max) * edge_ms[on])
    with pytest.raises(ValueError, match=r"\[edge.energy\]: unknown board 'abacus'"):
        EdgeModel(energy={"board": "abacus", "radio_alpha_mw_per_mbps": 0.0, "radio_beta_mw": 0.0})


def test_loss_stalls_a_request_once_with_the_tcp_segment_probability() -> None:
    base = Scenario(seed=4, fleet=FleetModel(devices=200, requests=100, rate_hz=1.0),
                    edge=EdgeModel(split_ms=1.0, feature_bytes=14600), link=LinkModel(rtt_ms=20.0),
                    cloud=CloudModel(workers=8, batch_ms=1.0, row_ms=0.1))
    clean = simulate_fleet(base)
    lossy = simulate_fleet(replace(base, link=LinkModel(rtt_ms=20.0, loss=0.01, rto_ms=200.0)))
    extra = lossy.latency_ms - clean.latency_ms
    stalled = extra > 150
    want = 1 - 0.99 ** 10  # ten segments of 1,460 bytes
    assert abs(stalled.mean() - want) < 0.01, (stalled.mean(), want)
    assert np.allclose(extra[stalled], 200.0, atol=5.0) and np.allclose(extra[~stalled], 0.0, atol=5.0)


def test_bursts_send_several_requests_at_once_at_the_same_mean_rate() -> None:
    from splitexit.sim.virtual import requests

    scenario = Scenario(seed=5, fleet=FleetModel(devices=100, requests=400, rate_hz=2.0, arrival="bursts", burst=4))
    sent = requests(scenario)[0].reshape(100, 400)
    assert (sent[:, 1::4] == sent[:, 0::4]).all() and (sent[:, 3::4] == sent[:, 0::4]).all()
    rate = 400 / (sent[:, -1] / 1e3)
    assert abs(rate.mean() / 2.0 - 1) < 0.05, rate.mean()


def test_the_shipped_fleet_scenarios_load_and_run_small() -> None:
    """Every sim/scenarios/fleet-*.toml loads and runs, cut to 5 requests per device and
    few devices (its groups' and a few more; the regions scenario's traces are read from
    beside the project)."""
    from pathlib import Path

    from splitexit.sim.virtual import load_scenario

    paths = sorted((Path(__file__).resolve().parents[1] / "sim" / "scenarios").glob("fleet-*.toml"))
    assert len(paths) >= 3
    for path in paths:
        scenario = load_scenario(path)
        groups = sum(g.devices for g in scenario.link.groups)
        small = replace(scenario, fleet=replace(scenario.fleet, devices=max(groups + 5, 10), requests=5))
        report = simulate_fleet(small).report(small.cloud.workers)
        assert report["requests"] == small.fleet.devices * 5, path


def test_a_closed_loop_sends_each_request_think_ms_after_the_last_answer() -> None:
    """Every request but a device's first leaves exactly think_ms after the previous
    answer; with one worker serving one row at a time and no think time, N devices keep
    it busy (the machine-repairman model at N = 3: throughput one per service time)."""
    scenario = Scenario(seed=6, fleet=FleetModel(devices=3, requests=200, arrival="closed", think_ms=0.0),
                        edge=EdgeModel(split_ms=0.0), link=LinkModel(rtt_ms=0.0),
                        cloud=CloudModel(workers=1, max_batch=1, max_delay_ms=0.0, batch_ms=10.0, row_ms=0.0,
                                         **UNBOUNDED))
    result = simulate_fleet(scenario)
    sent, done = result.sent_ms.reshape(3, 200), result.done_ms.reshape(3, 200)
    assert np.array_equal(sent[:, 1:], done[:, :-1])
    span = done.max() - sent[:, 1].min()
    assert abs(3 * 199 * 10.0 / span - 1) < 0.01  # the worker never idles
    thinking = replace(scenario, fleet=replace(scenario.fleet, think_ms=25.0))
    result = simulate_fleet(thinking)
    sent, done = result.sent_ms.reshape(3, 200), result.done_ms.reshape(3, 200)
    assert np.allclose(sent[:, 1:] - done[:, :-1], 25.0)


def test_a_closed_loop_runs_live_as_in_virtual_time(tmp_path) -> None:
    """fleet_live in a closed loop: each device's next request leaves think_ms after its
    last answer, live as in the simulator, and the two agree on the mean latency."""
    import splitexit_tests_edge_support as S
    from splitexit.sim.fleet_live import fidelity

    model, meta = S.tiny_model()
    bundle = S.export(tmp_path, model, meta, MaxProb(2.0, fallback=False), split=2)
    scenario = Scenario(seed=3, fleet=FleetModel(devices=3, requests=10, arrival="closed", think_ms=50.0),
                        edge=EdgeModel(on_device_share=0.3, edge_ms=5.0, split_ms=2.0),
                        link=LinkModel(rtt_ms=40.0, up_mbps=20.0), cloud=CloudModel(workers=1))
    result = fidelity(scenario, bundle)
    assert result["requests"] == 30 and result["live"]["degraded_share"] == 0
    assert 0.7 < result["ratio"]["mean_ms"] < 1.4, result


def test_failed_offloads_are_spooled_and_refined_after_the_outage() -> None:
    """[edge.spool]: requests refused during a 10 s outage are answered degraded, kept,
    and resent by the devices' refine runs (every 5 s): a run during the outage stops at
    its first resend (refused again), the first run after it refines every entry, one
    resend after another; nothing is left in the spool."""
    from splitexit.sim.link import Outage

    outage = Outage(start_s=10.0, duration_s=10.0, mode="refuse")
    scenario = Scenario(fleet=FleetModel(devices=4, requests=100, rate_hz=2.0, arrival="periodic"),
                        edge=EdgeModel(feature_bytes=4000, spool={"refine_every_s": 5.0}),
                        link=LinkModel(rtt_ms=20.0, up_mbps=10.0, outages=(outage,)), cloud=CloudModel(workers=1))
    result = simulate_fleet(scenario)
    report = result.report(1)
    assert report["refused"] == 80 and report["spooled"] == 80  # 10 s x 2 requests/s x 4 devices
    assert report["refined"] == 80 and report["left_in_spool"] == 0
    done, route = result.resent_done, result.resent_route
    assert done is not None and route is not None
    failed = route == 2
    assert report["resends"] == 80 + failed.sum() and 1 <= failed.sum() <= 8  # at most 2 runs per device in the outage
    assert (done[failed] < 20_000).all() and (done[~failed] >= 20_000).all()  # refined only once the link is back
    assert report["refine_delay_mean_s"] > 0
    # without a spool the same run refines nothing, and its answers are the same
    plain = simulate_fleet(replace(scenario, edge=EdgeModel(feature_bytes=4000)))
    assert "spooled" not in plain.report(1) and np.array_equal(plain.route, result.route)


def test_spool_settings_are_checked() -> None:
    with pytest.raises(ValueError, match=r"\[edge.spool\]: unknown keys \['every_s'\]"):
        EdgeModel(spool={"every_s": 5.0})
    with pytest.raises(ValueError, match="must be > 0"):
        EdgeModel(spool={"refine_every_s": 0.0})


def test_the_live_fleet_refuses_what_only_the_simulator_models(tmp_path) -> None:
    """A scenario with a spool or re-planning is refused by the live fleet at once (its
    devices send fixed cuts without a spool), not run without them."""
    import asyncio

    from splitexit.sim.fleet_live import run_live

    spooled = Scenario(edge=EdgeModel(feature_bytes=100, spool={"refine_every_s": 5.0}))
    with pytest.raises(ValueError, match=r"\[edge.spool\] and \[edge.replan\] are the simulator's"):
        asyncio.run(run_live(spooled, tmp_path / "no-bundle"))
