"""`bench replan`: a mid-run bandwidth drop, the re-planning agent against a fixed cut.

The reference edge network is exported once with every exit's stage and the last stage as
allowed split points. Two agents answer the same stream of test inputs, one at a time at a
steady rate, through the link emulator to a real worker process, and the uplink's bandwidth
drops partway through each run:
- `fixed`: the cut the offline planner chose for the link before the drop (what a static
  deployment would keep);
- `replan`: the same start, re-planned online from its own offloads (`splitexit.edge.replan`).
The device is this machine padded to a device class's profile (fixed before the run), the
worker this machine with one thread (its profile measured here).

Reported per agent: mean and p95 latency before the drop and after it (from 3 s after the
drop, when the bar says the re-planner should have moved), the seconds from the drop to
the first move, the splits used, and that every input got one answer. The plot shows the
latencies, the split and the estimated bandwidth over time.
"""

from __future__ import annotations

import argparse
import asyncio
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from splitexit.sim.bench.common import BenchContext, log

HELP = "a mid-run bandwidth drop: the re-planning edge agent against a fixed cut"
SETTLE_S = 3.0  # after the drop, latencies are compared from here on (the bar: moved within 3 s)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", default="rpi4", help="the device class the edge is padded to (splitexit.profile)")
    parser.add_argument("--before-mbps", type=float, default=100.0, help="uplink before the drop")
    parser.add_argument("--after-mbps", type=float, default=5.0, help="uplink after the drop")
    parser.add_argument("--rtt-ms", type=float, default=4.0, help="round trip time, both phases")
    parser.add_argument("--drop-at", type=float, default=15.0, metavar="S", help="seconds into each run")
    parser.add_argument("--duration", type=float, default=40.0, metavar="S", help="length of each run")
    parser.add_argument("--rate", type=float, default=10.0, help="inputs per second (one at a time)")
    parser.add_argument("--threshold", type=float, default=0.8, help="the max-prob exit policy's threshold")
    parser.add_argument("--codec", default="fp16", help="the feature codec")
    parser.add_argument("--base-profile", type=Path, metavar="FILE",
                        help="this machine's profile of the network (`splitexit profile`), fixed across runs")


def run(ctx: BenchContext, args: argparse.Namespace) -> dict:
    import torch

    from splitexit.bundle import load_bundle
    from splitexit.edge.replan import ReplanConfig
    from splitexit.plan import LinkEstimate
    from splitexit.policies import MaxProb
    from splitexit.profile import device_class, load_profile, measure_profile
    from splitexit.sim import live
    from splitexit.sim.harness import export_planned
    from splitexit.sim.planning import exit_behaviour

    torch.set_num_threads(1)  # the device and the worker each get one core of the two
    trained = ctx.edge()
    model, meta = trained.model.eval(), trained.meta
    shape = ctx.input_shape
    measured = (load_profile(args.base_profile) if args.base_profile is not None else
                measure_profile(model, shape, name="this machine", arch=meta.model.arch, threads=1, repeats=50))
    measured.save(ctx.out / "replan_base_profile.json")
    device = device_class(measured, args.device)
    policy = MaxProb(args.threshold, fallback=False)
    val = ctx.outputs(trained, "val")
    share = exit_behaviour(policy, "validation", val, ctx.costs(trained).exit_ladder()).share
    # the agent starts from the exit shares measured on validation data, then counts its own answers
    replan = ReplanConfig(device=device.at(1), cloud=measured.at(1), share=share)

    # the offline plan for the link before the drop: where `fixed` cuts, and where both start
    links = {"before": LinkEstimate(up_mbps=args.before_mbps, rtt_ms=args.rtt_ms),
             "after": LinkEstimate(up_mbps=args.after_mbps, rtt_ms=args.rtt_ms)}
    path, ranked_per_link = export_planned(ctx.out / "replan" / "bundle", model, meta, shape, policy, args.codec,
                                           replan, list(links.values()))
    planned = dict(zip(links, ranked_per_link))
    for name, ranked in planned.items():
        log(f"planned for the link {name} the drop ({links[name].up_mbps} Mbit/s, RTT {args.rtt_ms} ms): "
            + ", ".join(f"split {c.split} {c.expected_ms:.1f} ms" for c in ranked))
    start = planned["before"][0].split
    splits = sorted({*model.exit_points, model.num_stages - 1})
    edge = load_bundle(path, "edge")
    padded = replace(edge, model=live.pad_to_profile(edge.model, device))  # this machine as the device
    test = ctx.dataset.test
    count = int(args.duration * args.rate) + 10
    images = test.images[np.arange(count) % len(test)]
    labels = test.labels[np.arange(count) % len(test)]

    runs = {}
    for mode in ("fixed", "replan"):
        log(f"{mode}: {args.duration:.0f} s at {args.rate:g} inputs/s, the uplink {args.before_mbps} -> "
            f"{args.after_mbps} Mbit/s at {args.drop_at:g} s")
        runs[mode] = asyncio.run(_run(path, padded, images, labels, args, replan if mode == "replan" else None,
                                      ctx.out / f"replan_{mode}.msgpack"))
        log(f"{mode}: {_summary(runs[mode], args)}")
    result = {
        "device": device.source, "worker": measured.name, "splits": splits, "start_split": start,
        "policy": f"maxprob q={args.threshold}", "codec": args.codec,
        "link": {"before_mbps": args.before_mbps, "after_mbps": args.after_mbps, "rtt_ms": args.rtt_ms,
                 "drop_at_s": args.drop_at, "duration_s": args.duration, "rate": args.rate},
        "planned": {name: [{"split": c.split, "expected_ms": round(c.expected_ms, 3)} for c in ranked]
                    for name, ranked in planned.items()},
        "runs": {mode: _summary(r, args) for mode, r in runs.items()},
    }
    fixed, moving = result["runs"]["fixed"], result["runs"]["replan"]
    result["p95_after_ratio"] = round(moving["after"]["p95_ms"] / fixed["after"]["p95_ms"], 3)
    result["moved_s"] = moving["moved_s"]
    _plot(runs, args, ctx.out / "replan.png", meta.model.arch, device.name)
    return result


async def _run(path: Path, padded: Any, images: np.ndarray, labels: np.ndarray, args: argparse.Namespace,
               replan: Any, trace: Path) -> dict[str, Any]:
    from splitexit.edge import AgentConfig, EdgeAgent, GrpcTransport
    from splitexit.edge.trace import read_trace
    from splitexit.sim.link import Direction, LinkProfile, LinkProxy
    from splitexit.sim.live import WorkerProcess

    def link(mbps: float) -> Direction:
        return Direction(rate_mbps=mbps, delay_ms=args.rtt_ms / 2)

    config = AgentConfig(codec=args.codec, replan=replan)
    records: list[dict[str, Any]] = []
    async with WorkerProcess([path], threads=1) as worker:
        host, port = worker.address.rsplit(":", 1)
        profile = LinkProfile(up=link(args.before_mbps), down=Direction(delay_ms=args.rtt_ms / 2))
        async with LinkProxy((host, int(port)), profile) as proxy:
            async with EdgeAgent(padded, GrpcTransport(proxy.address), config=config, trace=trace) as agent:
                await agent.infer(images[:1])  # connect, warm up: not counted
                t0 = time.monotonic()
                dropped = False
                for i in range(len(images)):
                    due = t0 + i / args.rate
                    now = time.monotonic()
                    if due > now:
                        await asyncio.sleep(due - now)
                    if now - t0 >= args.duration:
                        break
                    if not dropped and time.monotonic() - t0 >= args.drop_at:
                        proxy.update(up=link(args.after_mbps))
                        dropped = True
                    sent = time.monotonic()
                    answer = (await agent.infer(images[i: i + 1], [str(i)]))[0]
                    records.append({"t": sent - t0, "ms": (time.monotonic() - sent) * 1e3, "route": answer.route,
                                    "correct": answer.label == int(labels[i])})
    plans = [r for r in read_trace(trace)][1:]  # the warm-up call first
    for record, plan in zip(records, plans):
        record["split"] = plan["split"]  # where this input was cut (a probe's differs from the plan's)
        record["plan"] = plan.get("plan", {}).get("split", plan["split"])  # the agent's plan after it
        record["up_mbps"] = (plan.get("link") or {}).get("up_mbps")
    return {"records": records, "sent": len(records)}


def _summary(run: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    records = run["records"]
    before = [r["ms"] for r in records if 2.0 <= r["t"] < args.drop_at]
    after = [r["ms"] for r in records if r["t"] >= args.drop_at + SETTLE_S]
    moved = next((r["t"] - args.drop_at for r in records
                  if r["t"] >= args.drop_at and r["plan"] != records[0]["plan"]), None)
    probes = sum(r["split"] != r["plan"] for r in records)
    splits: dict[str, int] = {}
    for r in records:
        splits[str(r["split"])] = splits.get(str(r["split"]), 0) + 1

    def stats(ms: list[float]) -> dict[str, float]:
        return {"mean_ms": round(float(np.mean(ms)), 2), "p95_ms": round(float(np.percentile(ms, 95)), 2),
                "n": len(ms)} if ms else {"mean_ms": float("nan"), "p95_ms": float("nan"), "n": 0}

    return {"before": stats(before), "after": stats(after), "moved_s": None if moved is None else round(moved, 2),
            "splits": splits, "probes": probes, "answered": len(records), "sent": run["sent"],
            "degraded": sum(r["route"] == "degraded" for r in records),
            "acc": round(sum(r["correct"] for r in records) / max(1, len(records)), 4)}


def _plot(runs: dict[str, Any], args: argparse.Namespace, path: Path, arch: str, device: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(3, 1, figsize=(8.5, 7.5), sharex=True)
    colors = {"fixed": "tab:red", "replan": "tab:blue"}
    for mode, run in runs.items():
        rec = run["records"]
        t = np.asarray([r["t"] for r in rec])
        ms = np.asarray([r["ms"] for r in rec])
        axes[0].scatter(t, ms, s=4, alpha=0.35, color=colors[mode])
        p95 = [float(np.percentile(ms[(t > x - 2) & (t <= x)], 95)) if ((t > x - 2) & (t <= x)).any() else np.nan
               for x in t]
        axes[0].plot(t, p95, color=colors[mode], label=f"{mode}: p95 over the last 2 s")
        axes[1].step(t, [r["plan"] for r in rec], where="post", color=colors[mode], label=f"{mode}: its plan")
        probes = [(r["t"], r["split"]) for r in rec if r["split"] != r["plan"]]
        if probes:
            axes[1].plot(*zip(*probes), "|", color=colors[mode], markersize=6, label=f"{mode}: a probe's cut")
        up = [r["up_mbps"] if r["up_mbps"] is not None else np.nan for r in rec]
        if not np.isnan(up).all():  # a fixed cut's offloads are all alike: no estimate
            axes[2].plot(t, up, ".", markersize=3, color=colors[mode], label=f"{mode}: its estimate")
    true_t = [0, args.drop_at, args.drop_at, args.duration]
    axes[2].plot(true_t, [args.before_mbps, args.before_mbps, args.after_mbps, args.after_mbps], "k--",
                 label="the link's uplink")
    for ax in axes:
        ax.axvline(args.drop_at, color="grey", lw=0.8)
    axes[0].axvspan(args.drop_at, args.drop_at + SETTLE_S, color="grey", alpha=0.12, label="3 s after the drop")
    axes[0].set_yscale("log")
    axes[0].set_ylabel("ms per input (log)")
    axes[0].legend(fontsize=7, loc="upper left")
    axes[1].set_ylabel("split (stage)")
    axes[1].legend(fontsize=7)
    axes[2].set_yscale("log")
    axes[2].set_ylabel("uplink Mbit/s (log)")
    axes[2].set_xlabel("seconds")
    axes[2].legend(fontsize=7)
    axes[0].set_title(f"{arch} on a {device} device: the uplink drops {args.before_mbps:g} -> "
                      f"{args.after_mbps:g} Mbit/s at {args.drop_at:g} s (RTT {args.rtt_ms:g} ms)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
