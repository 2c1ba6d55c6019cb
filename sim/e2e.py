"""One end-to-end comparison of the strategies for a network, a device and a link: what
`splitexit sim demo` shows on the digits and `splitexit bench e2e` measures on CIFAR-10.

1. `make_plan`: the planner (`splitexit.plan`) ranks every route from the network's
   validation outputs, the device's and the worker's measured times and the link. Its
   first choice starts `adaptive` (whatever route wins: on the device with exits, the
   input to the cloud, or a cut with or without exits); the best cut without exits is
   `fixed_split` (Neurosurgeon's).
2. `run_local`: the device's own strategies (`edge_only`, and `edge_exits` with the exit
   setting of the best plan that has exits), no link.
3. `run_linked`: bundles for the linked strategies, a real worker process serving them, an
   emulated link per strategy (`splitexit.sim.link`), every input answered one at a time
   (`cloud_only`: the input as JPEG, every stage in the worker). `adaptive` is the edge
   agent re-planning online (`--replan`) over a bundle that allows a cut after every exit
   and on the device, starting from the plan's cut with the plan's link as its prior; when
   the plan sends the input itself (cloud-only, a route the agent cannot move from), it
   runs as `cloud_only` does.

The device is this machine padded to a device class's times (`pad_to_profile`); the
worker is this machine.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["E2EPlan", "make_plan", "ordered", "run_linked", "run_local", "table", "trace_link"]

# names of the strategies (BENCH.md's `e2e` keys), in the order they are run
LOCAL = ("edge_only", "edge_exits")
LINKED = ("cloud_only", "fixed_split", "adaptive")


@dataclass(frozen=True)
class E2EPlan:
    ranked: list[Any]  # splitexit.plan.Candidate, best first
    fixed_split: Any  # the best cut without exits
    adaptive: Any  # the planner's first choice (any route)
    adaptive_policy: Any  # its exit policy (no early exit for a route without exits)
    exits_policy: Any  # the exit setting of the best plan with exits (edge_exits runs it)
    full_acc: float  # the full network's validation accuracy
    replan: Any  # the agent's ReplanConfig for adaptive (None: the plan sends the input, cloud-only)


def trace_link(archive: Path, name: str, rtt_ms: float) -> Any:
    """A link replaying the Mahimahi traces `name`.up and `name`.down of `archive`, with
    `rtt_ms` of propagation delay (a capacity trace records no RTT: the caller states it)."""
    from splitexit.sim.link import Direction, LinkProfile, load_trace

    up, down = (load_trace(archive, f"{name}.{d}") for d in ("up", "down"))
    return LinkProfile(up=Direction(trace=up, delay_ms=rtt_ms / 2), down=Direction(trace=down, delay_ms=rtt_ms / 2))


def make_plan(model: Any, input_shape: tuple[int, int, int], val: Any, measured: Any, device: Any,
              link_profile: Any, input_bytes: float, overhead_ms: dict[str, float] | None = None) -> E2EPlan:
    """The planner's choice for this device and link. `val`: the network's exit outputs on
    validation data; `measured`: this machine's profile (the worker's times); `device`:
    the device's profile; `input_bytes`: an input's mean size as the JPEG cloud-only sends;
    `overhead_ms`: each route's own cost beyond the model (`calibrate_overheads`)."""
    from splitexit.cost import cost_model
    from splitexit.edge.replan import ReplanConfig
    from splitexit.plan import plan
    from splitexit.policies import MaxProb
    from splitexit.sim.planning import MAXPROB_SWEEP, cut_bytes, exit_behaviour, link_estimate

    ladder = cost_model(model, input_shape).exit_ladder()
    settings = {f"maxprob q={q}": MaxProb(q, fallback=False) for q in MAXPROB_SWEEP}
    behaviours = [exit_behaviour(policy, name, val, ladder) for name, policy in settings.items()]
    full_acc = float(val.correct()[-1].mean())
    ranked = plan(device=device.at(1), cloud=measured.at(1), link=link_estimate(link_profile), exits=model.exit_points,
                  behaviours=behaviours, full_acc=full_acc, feature_bytes=cut_bytes(model, input_shape, "fp32"),
                  input_bytes=input_bytes, accuracy_floor=full_acc - 0.005, overhead_ms=overhead_ms)
    split = next(c for c in ranked if c.route == "split")
    exits_setting = next(c.setting for c in ranked if c.setting is not None)
    chosen = ranked[0]
    policy = settings[chosen.setting] if chosen.setting is not None else MaxProb(2.0, fallback=False)
    share = next((b.share for b in behaviours if b.setting == chosen.setting), (0.0,) * len(model.exit_points) + (1.0,))
    replan = None if chosen.route == "cloud_only" else ReplanConfig(
        device=device.at(1), cloud=measured.at(1), share=share, prior=link_estimate(link_profile),
        overhead_ms=overhead_ms)
    return E2EPlan(ranked, split, chosen, policy, settings[exits_setting], full_acc, replan)


async def calibrate_overheads(model: Any, meta: Any, input_shape: tuple[int, int, int], images: np.ndarray,
                              x: Any, measured: Any, device: Any, workdir: Path, *, inputs: int = 30) -> dict[str, float]:
    """What each kind of route costs per input beyond the planner's cost model, measured
    here as each strategy runs (the device padded to its profile, a real worker process,
    a link emulator without impairments): the mean time less the model's for an ideal
    link. "edge": the network on the device (the runner, no exits); "cloud_only": the input
    as JPEG to the worker (encoding, gRPC, decoding); "split": every row cut after a
    middle stage and offloaded through the edge agent. Measured before any link's figure
    and never fitted to one."""
    import math

    from splitexit.bundle import export_bundle, load_bundle, load_whole
    from splitexit.edge import AgentConfig
    from splitexit.plan import ExitBehaviour, LinkEstimate, expected_ms
    from splitexit.policies import MaxProb
    from splitexit.runtime import ExitRunner
    from splitexit.sim import live
    from splitexit.sim.link import LinkProfile, LinkProxy

    never = MaxProb(2.0, fallback=False)
    n = min(inputs, len(images))
    times, cloud = device.at(1), measured.at(1)
    middle = model.num_stages // 2
    ideal = LinkEstimate(up_mbps=math.inf, rtt_ms=0.0)
    no_exits = ExitBehaviour(setting="no exits", share=(0.0,) * len(model.exit_points) + (1.0,), acc=0.0)
    padded = live.pad_to_profile(model, device)
    local = live.run_local(ExitRunner(padded, never, num_classes=len(meta.classes)), x[:n], exits=False)
    over = {"edge": float(np.mean([r.latency_ms for r in local])) - times.backbone_ms()}
    paths = {"cloud_only": export_bundle(workdir / "calibrate-cloud", model, meta, split=model.num_stages - 2,
                                         policy=never, input_shape=input_shape, name=f"{meta.model.arch}-calibrate-c"),
             "split": export_bundle(workdir / "calibrate-split", model, meta, split=middle, policy=never,
                                    input_shape=input_shape, name=f"{meta.model.arch}-calibrate-s")}
    async with live.WorkerProcess(list(paths.values())) as worker:
        host, port = worker.address.rsplit(":", 1)
        async with LinkProxy((host, int(port)), LinkProfile()) as proxy:
            records = await live.run_cloud_only(load_whole(paths["cloud_only"]), proxy.address, images[:n])
            over["cloud_only"] = float(np.mean([r.latency_ms for r in records])) - cloud.backbone_ms()
            edge = load_bundle(paths["split"], "edge")
            edge = replace(edge, model=live.pad_to_profile(edge.model, device))
            records = await live.run_edge_agent(edge, proxy.address, images[:n], config=AgentConfig())
            model_ms = expected_ms(times, cloud, ideal, model.exit_points, no_exits, middle, 0.0)[0]
            over["split"] = float(np.mean([r.latency_ms for r in records])) - model_ms
    return {k: round(max(0.0, v), 3) for k, v in over.items()}


def run_local(model: Any, x: Any, labels: np.ndarray, chosen: E2EPlan, device: Any, num_classes: int) -> list[Any]:
    """`edge_only` and `edge_exits` on the device (padded to its profile), one input at a time."""
    from splitexit.policies import MaxProb
    from splitexit.runtime import ExitRunner
    from splitexit.sim import live

    padded = live.pad_to_profile(model, device)
    never = MaxProb(2.0, fallback=False)
    out = [
        live.summarize("edge_only", live.run_local(ExitRunner(padded, never, num_classes=num_classes), x, exits=False),
                       labels, plan="every stage on the device, no exits"),
        live.summarize("edge_exits", live.run_local(ExitRunner(padded, chosen.exits_policy,
                                                               num_classes=num_classes), x),
                       labels, plan=f"every stage on the device, maxprob q={chosen.exits_policy.threshold}"),
    ]
    return out


async def run_linked(model: Any, meta: Any, input_shape: tuple[int, int, int], images: np.ndarray,
                     labels: np.ndarray, chosen: E2EPlan, device: Any, link_profile: Any, workdir: Path,
                     *, progress: Any = print) -> list[Any]:
    """`cloud_only`, `fixed_split` and `adaptive` through a real worker process and an
    emulated link each, one input at a time."""
    from splitexit.bundle import export_bundle, load_bundle, load_whole
    from splitexit.edge import AgentConfig
    from splitexit.policies import MaxProb
    from splitexit.sim import live
    from splitexit.sim.harness import export_planned
    from splitexit.sim.link import LinkProxy

    never = MaxProb(2.0, fallback=False)
    name = meta.model.arch
    split, adaptive = chosen.fixed_split, chosen.adaptive
    paths = {
        "cloud_only": export_bundle(workdir / "cloud", model, meta, split=model.num_stages - 2, policy=never,
                                    input_shape=input_shape, name=f"{name}-cloud"),
        "fixed_split": export_bundle(workdir / "split", model, meta, split=split.split or 0, policy=never,
                                     input_shape=input_shape, name=f"{name}-split"),
    }
    configs = {"fixed_split": AgentConfig(request_timeout_ms=30_000)}
    if chosen.replan is not None:  # re-planned online among a cut after every exit and the device, from the plan's
        paths["adaptive"], _ = export_planned(workdir / "adaptive", model, meta, input_shape, chosen.adaptive_policy,
                                              "fp32", chosen.replan, [chosen.replan.prior])
        configs["adaptive"] = AgentConfig(request_timeout_ms=30_000, codec="fp32", replan=chosen.replan)
    plans = {"cloud_only": "the input as JPEG (q=90), every stage in the worker",
             "fixed_split": f"cut after stage {split.split}, no exits",
             "adaptive": f"the plan: {adaptive.describe()}" + (", re-planned online" if chosen.replan else "")}
    results = []
    cloud_bundle = load_whole(paths["cloud_only"])
    async with live.WorkerProcess(list(paths.values())) as worker:
        host, port = worker.address.rsplit(":", 1)
        for strategy in LINKED:
            async with LinkProxy((host, int(port)), link_profile) as proxy:
                if strategy not in configs:  # cloud-only, or adaptive when the plan sends the input
                    records = await live.run_cloud_only(cloud_bundle, proxy.address, images)
                else:
                    edge = load_bundle(paths[strategy], "edge")
                    edge = replace(edge, model=live.pad_to_profile(edge.model, device))
                    records = await live.run_edge_agent(edge, proxy.address, images, config=configs[strategy])
                bytes_up = proxy.counters.bytes_up
            results.append(live.summarize(strategy, records, labels, bytes_up=bytes_up, plan=plans[strategy]))
            progress(f"   {strategy}: done ({len(records)} inputs)")
    return results


def ordered(results: list[Any]) -> list[Any]:
    """The strategies in the report's order (BENCH.md's)."""
    order = [*LOCAL, *LINKED]
    return sorted(results, key=lambda r: order.index(r.name))


def table(results: list[Any]) -> str:
    lines = [f"   {'strategy':<11} {'acc':>7} {'mean ms':>8} {'p95 ms':>8} {'device':>7} {'bytes up':>9}  plan"]
    for r in results:
        lines.append(f"   {r.name:<11} {r.acc:>7.4f} {r.mean_ms:>8.2f} {r.p95_ms:>8.2f} {r.on_device:>7.2f} "
                     f"{r.bytes_up:>9.0f}  {r.plan}")
    return "\n".join(lines)
