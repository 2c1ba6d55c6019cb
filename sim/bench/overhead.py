"""`bench overhead`: what the exit heads and the policy cost next to the edge network.

`edge_ms` is the edge network alone (every stage and the final head, no exits) on a batch;
`exit_ms` is every exit head on its stage's feature plus the policy's decision at each
exit, on the same batch. Both are timed interleaved in one process (median of repeats), so
the ratio holds on any machine.

`runtime_ms` is what the edge agent really runs: `ExitRunner.run` with every exit evaluated
and no row leaving early (β at the top of its range), so heads, policy and the runner's row
bookkeeping together; `runtime_ratio` is its time over the plain network's, minus one.
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Callable, Mapping

import torch

from splitexit.policies import BoFBeta, step
from splitexit.runtime import ExitRunner
from splitexit.sim.bench.common import BenchContext, add_untrained_argument, log

HELP = "exit heads + policy time and MACs over the edge network's (ratio)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--batch-sizes", default="1,32", help="comma-separated batch sizes to time")
    parser.add_argument("--repeats", type=int, default=0, help="timed repeats (default 200, 20 with --quick)")
    add_untrained_argument(parser)


def _time_interleaved(calls: Mapping[str, Callable[[], object]], repeats: int) -> dict[str, float]:
    """Median ms of each call, taking turns so drift and noise hit them alike."""
    for _ in range(max(3, repeats // 10)):
        for call in calls.values():
            call()
    times: dict[str, list[float]] = {name: [] for name in calls}
    for _ in range(repeats):
        for name, call in calls.items():
            t0 = time.perf_counter()
            call()
            times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(t) * 1e3 for name, t in times.items()}


def run(ctx: BenchContext, args: argparse.Namespace) -> dict:
    edge = ctx.edge()
    model = edge.model.eval()
    costs = ctx.costs(edge)
    policy = BoFBeta.fit(ctx.outputs(edge, "train_stats").probs)
    runner = ExitRunner(model, policy.with_beta(policy.beta_range()[1]), num_classes=edge.meta.model.num_classes)
    exits = model.exit_points
    repeats = args.repeats or (20 if ctx.quick else 200)
    result: dict = {
        "edge_macs": costs.total_macs,
        "head_macs": [costs.exit_macs[k] for k in exits],
        "exit_macs": sum(costs.exit_macs[k] for k in exits),
        "policy": "bof_beta",
        "repeats": repeats,
        "by_batch": {},
    }
    result["macs_ratio"] = round(result["exit_macs"] / result["edge_macs"], 5)
    for batch in [int(b) for b in args.batch_sizes.split(",") if b.strip()]:
        x = torch.randn(batch, *ctx.input_shape)
        with torch.inference_mode():
            _, feats = model.forward_intermediates(x, indices=exits)

            def backbone() -> object:
                return model(x)

            def heads_and_policy() -> object:
                state = policy.init_state(batch, edge.meta.model.num_classes)
                out = None
                for i, k in enumerate(exits):
                    probs = model.exit_logits(k, feats[i]).softmax(-1).numpy()
                    out, state = step(policy, i, probs, state, len(exits) + 1)
                return out

            answered = runner.run(x).merged()
            if answered is None or bool((answered.exit_index != len(exits)).any()):
                raise RuntimeError("the timed runner let rows leave early: it would not evaluate every exit")
            ms = _time_interleaved({"edge": backbone, "exits": heads_and_policy, "runtime": lambda: runner.run(x)},
                                   repeats)
        edge_ms, exit_ms, runtime_ms = ms["edge"], ms["exits"], ms["runtime"]
        result["by_batch"][str(batch)] = {"edge_ms": round(edge_ms, 4), "exit_ms": round(exit_ms, 4),
                                          "ratio": round(exit_ms / edge_ms, 4), "runtime_ms": round(runtime_ms, 4),
                                          "runtime_ratio": round(runtime_ms / edge_ms - 1, 4)}
        log(f"batch {batch}: edge {edge_ms:.3f} ms, exit heads + policy {exit_ms:.3f} ms, "
            f"ratio {exit_ms / edge_ms:.4f}; the exit runner {runtime_ms:.3f} ms (+{runtime_ms / edge_ms - 1:.3f})")
    # the headline figure: the worst batch size measured
    worst = max(result["by_batch"].values(), key=lambda r: r["ratio"])
    result.update(edge_ms=worst["edge_ms"], exit_ms=worst["exit_ms"], ratio=worst["ratio"],
                  runtime_ratio=worst["runtime_ratio"])
    return result
