"""`splitexit sim ...`: the simulation harness's commands: the main job's demo, the link
emulator and its control."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any, Callable

from splitexit.sim import demo, link_cli

__all__ = ["register"]


def cmd_virtual(args: Any) -> None:
    from splitexit.sim.virtual import cmd_virtual as run

    run(args)


def cmd_capacity(args: Any) -> None:
    from splitexit.sim.virtual import cmd_capacity as run

    run(args)


def cmd_live(args: Any) -> None:
    from splitexit.cli import CliError
    from splitexit.sim.harness import load_live_scenario, run_live_scenario

    try:
        scenario = load_live_scenario(args.scenario)
    except ValueError as exc:
        raise CliError(str(exc)) from None
    run_live_scenario(scenario, cache_dir=Path(args.cache_dir), out=args.out)
    print(f"wrote {args.out / 'live.json'} and {args.out / 'live.png'}")


def register(sub: argparse._SubParsersAction, common: Callable[[argparse.ArgumentParser], None]) -> None:
    sim = sub.add_parser("sim", help="the simulation harness: the whole system through emulated links")
    commands = sim.add_subparsers(dest="sim", required=True, metavar="COMMAND")
    p = commands.add_parser("demo", help="the main job: every strategy on the digits through an emulated link")
    common(p)
    demo.add_arguments(p)
    p.set_defaults(func=demo.cmd_demo)
    link_cli.register_into(commands, common)
    live = commands.add_parser("live", help="the live harness: real workers and edge agents through emulated links, "
                                            "with a timeline of link changes, outages and worker failures")
    common(live)
    live.add_argument("scenario", type=Path, help="a live scenario TOML file ([model], [device], [agents], [link], "
                                                  "[workers], [[events]]; see sim/scenarios/live-*.toml)")
    live.add_argument("--out", type=Path, default=Path("runs/live"), help="where live.json, live.png and traces go")
    live.set_defaults(func=cmd_live)
    v = commands.add_parser("virtual", help="the fleet simulator: a scenario's devices, links and workers in "
                                           "virtual time (thousands of devices in seconds)")
    v.add_argument("scenario", type=Path, help="a scenario TOML file ([fleet], [edge], [link], [cloud])")
    v.add_argument("--seed", type=int, help="override the scenario's seed")
    v.add_argument("--out", type=Path, default=Path("runs/virtual"), help="where virtual.json and virtual.png go")
    v.set_defaults(func=cmd_virtual)
    c = commands.add_parser("capacity", help="the fewest workers that keep a scenario's p99 latency and degraded "
                                             "share under targets (fleet simulator)")
    c.add_argument("scenario", type=Path, help="a scenario TOML file (its [cloud] workers is what is sized)")
    c.add_argument("--p99-ms", type=float, required=True, help="the p99 latency target (ms)")
    c.add_argument("--max-degraded", type=float, default=0.01,
                   help="the largest share of degraded answers allowed (default: %(default)s)")
    c.add_argument("--out", type=Path, default=Path("runs/capacity"), help="where capacity.json and capacity.png go")
    c.set_defaults(func=cmd_capacity)
