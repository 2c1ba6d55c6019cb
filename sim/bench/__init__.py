"""`splitexit bench NAME`: the benchmarks of BENCH.md. Each writes NAME.json (and plots)
into --out; `--quick` runs the same code on the embedded digits in seconds."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Callable

from splitexit.sim.bench import e2e, faults, fleet, models, overhead, replan, serve, tradeoff, train, wire
from splitexit.sim.bench.common import BenchContext

# name -> module with HELP, add_arguments(parser) and run(ctx, args) -> dict
BENCHES = {"models": models, "tradeoff": tradeoff, "overhead": overhead, "wire": wire, "serve": serve, "train": train,
           "faults": faults, "e2e": e2e, "fleet": fleet, "replan": replan}


def register(sub: argparse._SubParsersAction, common: Callable[[argparse.ArgumentParser], None]) -> None:
    bench = sub.add_parser("bench", help="run a benchmark (BENCH.md): NAME.json and plots into --out")
    names = bench.add_subparsers(dest="bench", required=True, metavar="NAME")
    for name, module in BENCHES.items():
        p = names.add_parser(name, help=module.HELP)
        common(p)
        p.add_argument("--out", type=Path, default=Path("runs/bench"), help="where NAME.json and plots go")
        p.add_argument("--quick", action="store_true", help="seconds, on the embedded digits (CI)")
        p.add_argument("--data", help="data set (default: ../shared/data/cifar10-jpg.tar.gz; digits with --quick)")
        module.add_arguments(p)
        p.set_defaults(func=lambda args, name=name: run(name, args))


def run(name: str, args: argparse.Namespace) -> None:
    started = time.perf_counter()
    ctx = BenchContext.from_args(args)
    result = BENCHES[name].run(ctx, args)
    result["bench"] = name
    result["quick"] = bool(args.quick)
    if ctx.untrained:
        result["weights"] = "untrained (initial weights of the recipe's edge network: timing only)"
    # a bench whose own figure is a wall time (fleet: the simulator's) keeps it as `wall_s`
    result.setdefault("wall_s", round(time.perf_counter() - started, 1))
    result["bench_wall_s"] = round(time.perf_counter() - started, 1)
    result["machine"] = ctx.machine()
    path = ctx.out / f"{name}.json"
    path.write_text(json.dumps(result, indent=2))
    print(f"wrote {path} ({result['bench_wall_s']} s)")
