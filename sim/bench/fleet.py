"""`bench fleet`: how fast the virtual-time fleet simulator runs (issue 18).

It simulates the scenario of `sim/scenarios/fleet-10k.toml` (10,000 devices x 100
requests on LTE, 16 workers) and the same fleet at 100,000 devices (160 workers, the load
per worker kept), and reports each one's wall time and figures. With `--fidelity` it
also runs `fidelity_scenarios()` live (worker processes of the reference tail, a link
emulator per device and worker: `splitexit.sim.fleet_live`) and in virtual time with the
worker's costs measured beforehand, and reports each figure's ratio; `fidelity` is the
mean of the mean-latency ratios (null without `--fidelity`).
"""

from __future__ import annotations

import argparse
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from splitexit.cli import CliError
from splitexit.sim.bench.common import BenchContext, log

HELP = "the virtual-time fleet simulator's wall time for 10k and 100k devices x 100 requests"
SCENARIO = Path(__file__).resolve().parents[1] / "scenarios" / "fleet-10k.toml"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--scenario", type=Path, default=SCENARIO, help="the scenario to time (default: %(default)s)")
    parser.add_argument("--scales", default="1,10", help="device counts as multiples of the scenario's (default 1,10;"
                                                         " 0.01 with --quick)")
    parser.add_argument("--fidelity", action="store_true",
                        help="also run the fidelity scenarios live (worker processes, link emulators) and in virtual time "
                             "on the reference tail, and compare (a few minutes)")
    parser.add_argument("--only", metavar="NAME,...", help="with --fidelity: just these scenarios")


def run(ctx: BenchContext, args: argparse.Namespace) -> dict:
    from splitexit.sim.virtual import load_scenario, plot_latency, run_timed

    base = load_scenario(args.scenario)
    scales = [float(s) for s in ("0.01" if ctx.quick and args.scales == "1,10" else args.scales).split(",")]
    runs: list[dict[str, Any]] = []
    for scale in scales:
        devices = max(1, round(base.fleet.devices * scale))
        workers = max(1, round(base.cloud.workers * scale))
        scenario = replace(base, fleet=replace(base.fleet, devices=devices), cloud=replace(base.cloud, workers=workers))
        simulated, wall = run_timed(scenario)
        report = {"devices": devices, "requests": devices * base.fleet.requests, "workers": workers,
                  "wall_s": round(wall, 3), **simulated.report(workers)}
        log(f"{devices:,} devices x {base.fleet.requests} = {report['requests']:,} requests, {workers} workers: "
            f"{wall:.2f} s; mean {report['mean_ms']} ms, p95 {report['p95_ms']} ms, "
            f"degraded {report['degraded_share']:.2%}")
        plot_latency(simulated, ctx.out / f"fleet-{devices}.png", title=f"{base.name} x{scale:g}: {devices:,} devices")
        runs.append(report)
    first = runs[0]
    result: dict[str, Any] = {"devices": first["devices"], "requests": first["requests"], "wall_s": first["wall_s"],
                              "runs": runs, "scenario": base.to_dict(), "fidelity": None,
                              "not_measured": ["sim capacity", "traces, outages and autoscaling in the simulator"]}
    if args.fidelity:
        result["scenarios"] = _fidelity(ctx, args.only.split(",") if args.only else None)
        ratios = [r for f in result["scenarios"].values() for r in (f["ratio"]["mean_ms"],) if r is not None]
        result["fidelity"] = round(float(np.mean(ratios)), 3) if ratios else None
    else:
        result["not_measured"].insert(0, "fidelity (bench fleet --fidelity)")
    return result


def fidelity_scenarios() -> dict[str, Any]:
    """The scenarios run both ways: devices on LTE with one worker (open and closed loop),
    more devices on Wi-Fi with two (and the same through a 2 s outage of every link),
    devices on a real LTE trace with two workers and an outage, and one worker offered
    more than it can serve (batches of one row)."""
    from splitexit.sim.link import Outage
    from splitexit.sim.virtual import CloudModel, EdgeModel, FleetModel, LinkModel, Scenario

    edge = EdgeModel(on_device_share=0.5, edge_ms=10.0, split_ms=5.0)
    cloud = CloudModel(workers=1, max_batch=32, max_delay_ms=2.0)
    return {
        "8-lte-1-worker": Scenario(name="8-lte-1-worker", fleet=FleetModel(devices=8, requests=40, rate_hz=5.0),
                                   edge=edge, link=LinkModel(rtt_ms=70.0, up_mbps=5.85), cloud=cloud),
        "8-lte-closed-loop": Scenario(name="8-lte-closed-loop",
                                      fleet=FleetModel(devices=8, requests=30, arrival="closed", think_ms=150.0),
                                      edge=edge, link=LinkModel(rtt_ms=70.0, up_mbps=5.85), cloud=cloud),
        "16-wifi-2-workers": Scenario(name="16-wifi-2-workers", fleet=FleetModel(devices=16, requests=30, rate_hz=4.0),
                                      edge=edge, link=LinkModel(rtt_ms=28.0, up_mbps=18.88),
                                      cloud=replace(cloud, workers=2)),
        "16-wifi-2-workers-outage": Scenario(
            name="16-wifi-2-workers-outage", fleet=FleetModel(devices=16, requests=30, rate_hz=4.0), edge=edge,
            link=LinkModel(rtt_ms=28.0, up_mbps=18.88, outages=(Outage(2.0, 2.0, "blackhole"),)),
            cloud=replace(cloud, workers=2, timeout_ms=1000.0)),
        "16-trace-2-workers-outage": Scenario(
            name="16-trace-2-workers-outage", fleet=FleetModel(devices=16, requests=30, rate_hz=4.0), edge=edge,
            link=LinkModel(rtt_ms=70.0, trace="TMobile-LTE-short.up", outages=(Outage(3.0, 2.0, "blackhole"),)),
            cloud=replace(cloud, workers=2, timeout_ms=1000.0)),
        "overloaded-worker": Scenario(name="overloaded-worker", fleet=FleetModel(devices=12, requests=60, rate_hz=40.0),
                                      edge=EdgeModel(on_device_share=0.0, split_ms=2.0),
                                      link=LinkModel(rtt_ms=10.0, up_mbps=100.0),
                                      cloud=replace(cloud, max_batch=1, max_delay_ms=0.0, max_queue_wait_ms=50.0,
                                                    timeout_ms=1000.0)),
    }


def _fidelity(ctx: BenchContext, only: list[str] | None = None) -> dict[str, Any]:
    """Each scenario live and virtual on the reference tail (the serve bench's split)."""
    from splitexit.bundle import export_bundle
    from splitexit.policies import MaxProb
    from splitexit.sim.bench.serving import last_stages_split
    from splitexit.sim.fleet_live import calibrate_cloud, fidelity

    trained = ctx.edge()
    bundle = export_bundle(ctx.out / "fleet" / "bundle", trained.model.eval(), trained.meta,
                           split=last_stages_split(trained), policy=MaxProb(2.0, fallback=False),
                           input_shape=ctx.input_shape, name=trained.meta.model.arch)
    scenarios = fidelity_scenarios()
    if only:
        unknown = sorted(set(only) - set(scenarios))
        if unknown:
            raise CliError(f"--only: unknown scenario {unknown[0]!r}; known: {', '.join(scenarios)}")
        scenarios = {name: scenarios[name] for name in only}
    out = {}
    for name, scenario in scenarios.items():
        # measured for each scenario: its devices' clients and link emulators share the cores
        costs = calibrate_cloud(bundle, scenario)
        log(f"{name}: worker costs measured: {costs}")
        result = fidelity(scenario, bundle, costs)
        log(f"{name}: live {result['live']}, virtual {result['virtual']}, virtual/live {result['ratio']}")
        out[name] = result
    return out
