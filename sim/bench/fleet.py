"""`bench fleet`: how fast the virtual-time fleet simulator runs (issue 18).

It simulates the scenario of `sim/scenarios/fleet-10k.toml` (10,000 devices x 100
requests on LTE, 16 workers) and the same fleet at 100,000 devices (160 workers, the load
per worker kept), and reports each one's wall time and figures. Fidelity against the live
harness (the same scenarios run both ways) is not measured yet: `fidelity` is null and
`not_measured` says so.
"""

from __future__ import annotations

import argparse
from dataclasses import replace
from pathlib import Path
from typing import Any

from splitexit.sim.bench.common import BenchContext, log

HELP = "the virtual-time fleet simulator's wall time for 10k and 100k devices x 100 requests"
SCENARIO = Path(__file__).resolve().parents[1] / "scenarios" / "fleet-10k.toml"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--scenario", type=Path, default=SCENARIO, help="the scenario to time (default: %(default)s)")
    parser.add_argument("--scales", default="1,10", help="device counts as multiples of the scenario's (default 1,10;"
                                                         " 0.01 with --quick)")


def run(ctx: BenchContext, args: argparse.Namespace) -> dict:
    from splitexit.sim.virtual import load_scenario, plot_latency, run_timed

    base = load_scenario(args.scenario)
    scales = [float(s) for s in ("0.01" if ctx.quick and args.scales == "1,10" else args.scales).split(",")]
    runs: list[dict[str, Any]] = []
    for scale in scales:
        devices = max(1, round(base.fleet.devices * scale))
        workers = max(1, round(base.cloud.workers * scale))
        scenario = replace(base, fleet=replace(base.fleet, devices=devices), cloud=replace(base.cloud, workers=workers))
        result, wall = run_timed(scenario)
        report = {"devices": devices, "requests": devices * base.fleet.requests, "workers": workers,
                  "wall_s": round(wall, 3), **result.report(workers)}
        log(f"{devices:,} devices x {base.fleet.requests} = {report['requests']:,} requests, {workers} workers: "
            f"{wall:.2f} s; mean {report['mean_ms']} ms, p95 {report['p95_ms']} ms, "
            f"degraded {report['degraded_share']:.2%}")
        plot_latency(result, ctx.out / f"fleet-{devices}.png", title=f"{base.name} x{scale:g}: {devices:,} devices")
        runs.append(report)
    first = runs[0]
    return {"devices": first["devices"], "requests": first["requests"], "wall_s": first["wall_s"],
            "runs": runs, "scenario": base.to_dict(), "fidelity": None,
            "not_measured": ["fidelity (the live harness's runs of the same scenarios)", "sim capacity"]}
