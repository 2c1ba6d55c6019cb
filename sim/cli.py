"""`splitexit sim ...`: the simulation harness's commands: the main job's demo, the link
emulator and its control."""

from __future__ import annotations

import argparse
from typing import Callable

from splitexit.sim import demo, link_cli

__all__ = ["register"]


def register(sub: argparse._SubParsersAction, common: Callable[[argparse.ArgumentParser], None]) -> None:
    sim = sub.add_parser("sim", help="the simulation harness: the whole system through emulated links")
    commands = sim.add_subparsers(dest="sim", required=True, metavar="COMMAND")
    p = commands.add_parser("demo", help="the main job: every strategy on the digits through an emulated link")
    common(p)
    demo.add_arguments(p)
    p.set_defaults(func=demo.cmd_demo)
    link_cli.register_into(commands, common)
