"""The live counterpart of the fleet simulator: a scenario's devices as asyncio tasks
sending real requests through the link emulator to real worker processes, so the
virtual-time model can be checked against what really happens (`fidelity`).

What is real here and what is not: the cloud tier and the links are (worker processes of
`splitexit cloud serve` with the scenario's batching settings, one `LinkProxy` per device
and worker with the scenario's RTT and uplink rate, a real split feature of the bundle's
shape in every request); the device's own compute is the scenario's model in both runs
(an input answered on the device takes `edge_ms`; an offloaded one waits `split_ms`
before it is sent), since devices are what this machine cannot be.

The virtual run gets the worker's costs as measured here, beforehand and never fitted to
the live result: a batch of b rows takes `batch_ms + row_ms * b` (its compute in the
worker's process, timed at 1 row and at a full batch on one thread) plus `request_ms`
per request in it (the worker's own handling of a request, from its throughput with
one-row batches under a closed loop; requests here carry one row, so it joins `row_ms`),
and every request `rpc_ms` besides (gRPC and the link emulator's forwarding: one
request's round trip through an unimpaired proxy to an idle worker, less the rest).
"""

from __future__ import annotations

import asyncio
import statistics
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from splitexit.sim.virtual import Scenario, VirtualResult, simulate_fleet

__all__ = ["calibrate_cloud", "fidelity", "run_live"]


def _request(edge_bundle: Any, feature: np.ndarray, request_id: str) -> Any:
    from splitexit import wire

    return wire.build_request(edge_bundle, feature, None, [f"{request_id}:0"], request_id=request_id)


def _worker_args(scenario: Scenario) -> list[str]:
    c = scenario.cloud
    return ["--max-batch", str(c.max_batch), "--max-delay-ms", str(c.max_delay_ms), "--queue-limit",
            str(c.queue_limit_rows), "--max-queue-wait-ms", str(c.max_queue_wait_ms)]


def calibrate_cloud(bundle: Path, scenario: Scenario, *, repeats: int = 30) -> dict[str, float]:
    """batch_ms, row_ms and rpc_ms of this bundle's worker on this machine (see the module doc)."""
    import torch

    from splitexit.bundle import load_bundle
    from splitexit.cloud.requests import ServiceLimits, parse_request
    from splitexit.cloud.served import load_models
    from splitexit.proto import inference_pb2 as pb

    edge = load_bundle(bundle, "edge")
    models = load_models([bundle])
    served = next(iter(models.values()))
    feature = np.random.default_rng(0).standard_normal((1, *edge.feature_shape)).astype(np.float32)
    limits = ServiceLimits(max_request_rows=max(256, scenario.cloud.max_batch))
    payload = _request(edge, feature, "calibrate").SerializeToString()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the workers run (--threads 1)
    try:
        def batch_ms(rows: int) -> float:
            parsed = [parse_request(pb.InferRequest.FromString(payload), models, limits, defer_decode=True)
                      for _ in range(rows)]
            served.run_batch(parsed)  # warm
            times = []
            for _ in range(repeats):
                started = time.perf_counter()
                served.run_batch(parsed)
                times.append(time.perf_counter() - started)
            return 1e3 * statistics.median(times)

        one, full = batch_ms(1), batch_ms(scenario.cloud.max_batch)
    finally:
        torch.set_num_threads(threads)
    row_ms = max(0.0, (full - one) / max(1, scenario.cloud.max_batch - 1))
    idle = asyncio.run(_idle_round_trip_ms(bundle, scenario, repeats))
    # The worker's own time per request beyond its batch's compute (receiving, checking and
    # answering it on the event loop, which shares the cores): from its throughput with
    # one-row batches under a closed loop, less the compute of a one-row batch.
    saturated = asyncio.run(_one_row_throughput(bundle, scenario))
    request_ms = max(0.0, 1e3 / saturated - one)
    return {"batch_ms": round(one - row_ms, 4), "row_ms": round(row_ms, 4), "request_ms": round(request_ms, 4),
            "rpc_ms": round(max(0.0, idle - one - request_ms), 4), "idle_round_trip_ms": round(idle, 4),
            "one_row_throughput": round(saturated, 1), "request_bytes": len(payload)}


async def _one_row_throughput(bundle: Path, scenario: Scenario, *, seconds: float = 3.0) -> float:
    """Requests/s a worker answers in batches of one row, kept busy by one request in
    flight per device of the scenario, each through a link emulator of its own (without
    impairments): the live run's clients and emulators share the cores with the worker,
    so they are in the measurement too."""
    from splitexit.bundle import load_bundle
    from splitexit.edge import GrpcTransport
    from splitexit.sim.link import LinkProfile, LinkProxy
    from splitexit.sim.live import WorkerProcess

    edge = load_bundle(bundle, "edge")
    feature = np.zeros((1, *edge.feature_shape), dtype=np.float32)
    one_row = replace(scenario, cloud=replace(scenario.cloud, max_batch=1, max_delay_ms=0.0,
                                              max_queue_wait_ms=60_000.0))
    lanes = scenario.fleet.devices
    async with WorkerProcess([bundle], extra=_worker_args(one_row)) as worker:
        host, port = worker.address.rsplit(":", 1)
        proxies = [LinkProxy((host, int(port)), LinkProfile()) for _ in range(lanes)]
        for proxy in proxies:
            await proxy.start()
        transports = [GrpcTransport(proxy.address) for proxy in proxies]
        loop = asyncio.get_running_loop()
        counted = 0
        measure_from = loop.time() + 1.0  # a second of warm-up
        ends = measure_from + seconds

        async def lane(k: int) -> None:
            nonlocal counted
            i = 0
            while loop.time() < ends:
                await transports[k].infer(_request(edge, feature, f"c{k}-{i}"), 10.0)
                i += 1
                if loop.time() >= measure_from:
                    counted += 1

        try:
            await asyncio.gather(*(lane(k) for k in range(lanes)))
        finally:
            for transport in transports:
                await transport.close()
            for proxy in proxies:
                await proxy.close()
    return counted / seconds


async def _idle_round_trip_ms(bundle: Path, scenario: Scenario, repeats: int) -> float:
    from splitexit.bundle import load_bundle
    from splitexit.edge import GrpcTransport
    from splitexit.sim.link import LinkProfile, LinkProxy
    from splitexit.sim.live import WorkerProcess

    edge = load_bundle(bundle, "edge")
    feature = np.zeros((1, *edge.feature_shape), dtype=np.float32)
    async with WorkerProcess([bundle], extra=_worker_args(scenario)) as worker:
        host, port = worker.address.rsplit(":", 1)
        async with LinkProxy((host, int(port)), LinkProfile()) as proxy:
            transport = GrpcTransport(proxy.address)
            times = []
            for i in range(repeats + 3):
                started = time.perf_counter()
                await transport.infer(_request(edge, feature, f"idle{i}"), 10.0)
                times.append(time.perf_counter() - started)
            await transport.close()
    return 1e3 * statistics.median(times[3:])


async def run_live(scenario: Scenario, bundle: Path) -> VirtualResult:
    """The scenario's devices live (see the module doc); the result has the virtual run's
    form, so both report the same keys."""
    from splitexit.bundle import load_bundle
    from splitexit.edge import GrpcTransport
    from splitexit.edge.transport.base import OffloadError
    from splitexit.sim.link import Direction, LinkProfile, LinkProxy, Outage
    from splitexit.sim.live import WorkerProcess
    from splitexit.sim.virtual import device_links, device_times, load_link_trace, requests, trace_offsets_ms

    fleet, cloud = scenario.fleet, scenario.cloud
    if scenario.edge.spool is not None or scenario.edge.replan is not None:  # `sim live` runs agents that do
        raise ValueError(f"{scenario.name}: the live fleet runs fixed cuts without a spool; "
                         "[edge.spool] and [edge.replan] are the simulator's (the live agent's are in `sim live`)")
    edge = load_bundle(bundle, "edge")
    feature = np.random.default_rng(1).standard_normal((1, *edge.feature_shape)).astype(np.float32)
    sent, decided, correct = requests(scenario)  # the virtual run's own requests
    shape = (fleet.devices, fleet.requests)
    sent_ms, on_device = sent.reshape(shape).copy(), decided.reshape(shape)
    edge_ms, split_ms = (t.reshape(shape) for t in device_times(scenario, len(sent)))
    # per device: its group's link, its outages, and where its trace starts (as the simulator has it)
    links: list[tuple[Any, Any, float]] = []  # (profile, link model, trace offset in s)
    for lo, hi, group, seed in device_links(scenario):
        trace = load_link_trace(group.trace) if group.trace else None
        up = Direction(trace=trace, rate_mbps=None if trace is not None else group.up_mbps,
                       delay_ms=group.rtt_ms / 2, loss=group.loss, rto_ms=group.rto_ms)
        profile = LinkProfile(up=up, down=Direction(delay_ms=group.rtt_ms / 2))
        offsets = (trace_offsets_ms(group, hi - lo, seed, trace.period_ms) / 1e3 if trace is not None
                   else np.zeros(hi - lo))
        links += [(profile, group, float(o)) for o in offsets]
    workers = [WorkerProcess([bundle], extra=_worker_args(scenario)) for _ in range(cloud.workers)]
    for w in workers:
        await w.start()
    proxies: list[LinkProxy] = []
    loop = asyncio.get_running_loop()
    # every device starts its schedule together, once every proxy is up; each proxy's clock
    # (its outages, its trace) starts at the scenario's time 0, a trace where the simulator
    # has it; a device's emulators to its workers share one link (one radio)
    setup_s = 1.0 + 0.05 * fleet.devices * len(workers)
    start = loop.time() + setup_s
    try:
        routes: list[list[Any]] = []  # per device: one proxy's transport per worker
        for d in range(fleet.devices):
            mine = []
            first: LinkProxy | None = None
            for w in workers:
                host, port = w.address.rsplit(":", 1)
                profile, group, shift = links[d]  # the proxy's clock runs `shift` ahead of the scenario's
                outages = [Outage(o.start_s + shift, o.duration_s, o.mode) for o in group.outages]
                proxy = LinkProxy((host, int(port)), profile, seed=d, outages=outages, clock_start=start - shift)
                if first is not None:
                    proxy.share_link_with(first)
                await proxy.start()
                first = first or proxy
                proxies.append(proxy)
                mine.append(GrpcTransport(proxy.address))
            routes.append(mine)
        if loop.time() > start:
            raise RuntimeError(f"setting up {len(proxies)} link emulators took over {setup_s:.1f} s")
        done_ms = np.zeros(sent_ms.shape)
        route = np.zeros(sent_ms.shape, dtype=np.int8)

        async def one(d: int, r: int) -> None:
            at = start + sent_ms[d, r] / 1e3
            await asyncio.sleep(max(0.0, at - loop.time()))
            if fleet.arrival == "closed":  # sent when it really was (the simulator finds the same times)
                sent_ms[d, r] = max(sent_ms[d, r], (loop.time() - start) * 1e3)
            if on_device[d, r]:
                done_ms[d, r], route[d, r] = sent_ms[d, r] + edge_ms[d, r], 0
                return
            await asyncio.sleep(split_ms[d, r] / 1e3)
            transport = routes[d][(d + r) % len(workers)]  # each device round robin over the workers
            try:
                await transport.infer(_request(edge, feature, f"d{d}r{r}"), cloud.timeout_ms / 1e3)
                route[d, r] = 1
            except OffloadError as exc:
                route[d, r] = 2 if exc.code in ("RESOURCE_EXHAUSTED", "UNAVAILABLE") else 3
            done_ms[d, r] = (loop.time() - start) * 1e3

        async def closed_loop(d: int) -> None:  # each request `think` after the last one's answer
            for r in range(fleet.requests):
                if r:
                    sent_ms[d, r] = done_ms[d, r - 1] + fleet.think
                await one(d, r)

        if fleet.arrival == "closed":
            await asyncio.gather(*(closed_loop(d) for d in range(fleet.devices)))
        else:
            await asyncio.gather(*(one(d, r) for d in range(fleet.devices) for r in range(fleet.requests)))
        for mine in routes:
            for transport in mine:
                await transport.close()
    finally:
        for proxy in proxies:
            await proxy.close()
        for w in workers:
            await w.stop()
    done, sent = done_ms.ravel(), sent_ms.ravel()
    return VirtualResult(sent, done, route.ravel(), 0, 0, 0.0, float(done.max() - sent.min()), correct)


def fidelity(scenario: Scenario, bundle: Path, calibration: dict[str, float] | None = None) -> dict[str, Any]:
    """The scenario run live and in virtual time with the worker's measured costs: both
    reports and the ratio (virtual over live) of mean, p95, edge share and degraded share."""
    costs = calibration or calibrate_cloud(bundle, scenario)
    virtual_scenario = replace(scenario, edge=replace(scenario.edge, feature_bytes=int(costs["request_bytes"])),
                               cloud=replace(scenario.cloud, batch_ms=costs["batch_ms"],
                                             row_ms=costs["row_ms"] + costs["request_ms"], rpc_ms=costs["rpc_ms"]))
    virtual = simulate_fleet(virtual_scenario).report(scenario.cloud.workers)
    live = asyncio.run(run_live(scenario, bundle)).report(scenario.cloud.workers)
    keys = ("mean_ms", "p95_ms", "edge_share", "degraded_share")

    def ratio(key: str) -> float | None:
        if live[key] == 0:
            return 1.0 if virtual[key] == 0 else None
        return round(virtual[key] / live[key], 3)

    return {"live": {k: live[k] for k in keys}, "virtual": {k: virtual[k] for k in keys},
            "ratio": {k: ratio(k) for k in keys}, "calibration": costs, "requests": live["requests"]}
