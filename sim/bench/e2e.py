"""`bench e2e`: every strategy, end to end, for each link and device profile (BENCH.md).

For each device profile (a device class: this machine's measured times times a published
factor, `splitexit.profile.DEVICE_CLASSES`) and each link (METHODS.md's profiles, and real
cellular traces replayed from ../shared/data/cellular-traces.tar.gz), the planner picks the
cuts and the exit policy (`splitexit.sim.e2e.make_plan`), and `edge_only`, `edge_exits`,
`cloud_only`, `fixed_split` and `adaptive` each answer the same test inputs one at a time:
the device's strategies on this machine padded to the device's times, the others through
a real worker process and the link emulator. Keys `LINK/DEVICE`. The device strategies do
not use the link: they run once per device and are shared by its links.

A trace records capacity only: its RTT is stated here (`TRACE_RTT_MS`: LTE traces get
METHODS.md's LTE RTT, the 3G ones (EVDO, UMTS) its 3G RTT).
"""

from __future__ import annotations

import argparse
import asyncio
from pathlib import Path
from typing import Any

import numpy as np

from splitexit.cli import CliError
from splitexit.sim.bench.common import BenchContext, log

HELP = "every strategy end to end for each link (profiles and real traces) and device profile"
TRACES = Path("../shared/data/cellular-traces.tar.gz")
TRACE_RTT_MS = {"LTE": 70.0, "EVDO": 300.0, "UMTS": 300.0}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--links", default="3g,lte,wifi,trace:TMobile-LTE-short,trace:Verizon-EVDO-driving",
                        help="link profiles (splitexit.sim.link.PROFILES) and trace:NAME of the traces archive")
    parser.add_argument("--devices", default="rpi4,jetson-nano", help="device classes (splitexit.profile)")
    parser.add_argument("--inputs", type=int, default=0, help="test inputs per strategy (default 200; 24 with --quick)")
    parser.add_argument("--traces", type=Path, default=TRACES, help="the Mahimahi traces archive")
    parser.add_argument("--base-profile", type=Path, metavar="FILE",
                        help="this machine's profile of the network (`splitexit profile`) to derive the devices from, "
                             "fixed across runs (default: measured at the start; device times are it times ~14-16, "
                             "so its noise shows)")


def _link(name: str, traces: Path) -> Any:
    from splitexit.sim.e2e import trace_link
    from splitexit.sim.link import PROFILES

    if name in PROFILES:
        return PROFILES[name]
    if name.startswith("trace:"):
        trace = name.removeprefix("trace:")
        rtt = next((ms for kind, ms in TRACE_RTT_MS.items() if kind in trace), None)
        if rtt is None:
            raise CliError(f"no RTT known for trace {trace!r} (one of {', '.join(TRACE_RTT_MS)} in its name)")
        try:
            return trace_link(traces, trace, rtt)
        except (OSError, ValueError) as exc:
            raise CliError(f"trace {trace!r}: {exc}") from None
    raise CliError(f"unknown link {name!r}: one of {', '.join(PROFILES)}, or trace:NAME")


def run(ctx: BenchContext, args: argparse.Namespace) -> dict:
    import torch

    from splitexit.data import Normalize
    from splitexit.profile import DEVICE_CLASSES, device_class, load_profile, measure_profile
    from splitexit.sim import e2e
    from splitexit.sim.planning import jpeg_bytes

    links = {name: _link(name, args.traces) for name in args.links.split(",") if name.strip()}
    devices = [d for d in args.devices.split(",") if d.strip()]
    unknown = [d for d in devices if d not in DEVICE_CLASSES]
    if unknown:
        raise CliError(f"unknown device {unknown[0]!r}; choose from {', '.join(DEVICE_CLASSES)}")
    torch.set_num_threads(1)  # the device and the worker each get one core of the two
    trained = ctx.edge()
    model, meta = trained.model.eval(), trained.meta
    shape = ctx.input_shape
    count = args.inputs or (24 if ctx.quick else 200)
    test = ctx.dataset.test.subset(np.arange(min(count, len(ctx.dataset.test))))
    x = Normalize(meta.mean, meta.std)(torch.from_numpy(test.images))
    val = ctx.outputs(trained, "val")
    if args.base_profile is not None:
        measured = load_profile(args.base_profile)
    else:
        measured = measure_profile(model, shape, name="this machine", arch=meta.model.arch, threads=1, repeats=50)
        measured.save(ctx.out / "e2e_base_profile.json")  # reusable with --base-profile
    input_bytes = jpeg_bytes(ctx.dataset.val.images[:200])
    with torch.inference_mode():
        full_acc = float((model(x).argmax(-1).numpy() == test.labels).mean())
    profiles: dict[str, Any] = {}
    sources: dict[str, str] = {}
    overheads: dict[str, dict[str, float]] = {}
    for device_name in devices:
        device = device_class(measured, device_name)
        sources[device_name] = device.source
        local: dict[str, list[Any]] = {}  # by the exit setting the plan chose: the device's runs need no link
        overheads[device_name] = asyncio.run(e2e.calibrate_overheads(model, meta, shape, test.images, x, measured,
                                                                     device, ctx.out / "e2e" / "calibrate"))
        log(f"{device_name}: each route's own ms per input beyond the cost model, on an ideal link: "
            f"{overheads[device_name]}")
        for link_name, link in links.items():
            key = f"{link_name}/{device_name}"
            chosen = e2e.make_plan(model, shape, val, measured, device, link, input_bytes, overheads[device_name])
            log(f"{key}: the plan {chosen.adaptive.describe()}; fixed split after stage {chosen.fixed_split.split}; "
                f"{len(test)} inputs per strategy")
            setting = str(chosen.exits_policy.threshold)  # what the device's edge_exits runs
            if setting not in local:
                local[setting] = e2e.run_local(model, x, test.labels, chosen, device, len(meta.classes))
            linked = asyncio.run(e2e.run_linked(model, meta, shape, test.images, test.labels, chosen, device, link,
                                                ctx.out / "e2e" / key.replace("/", "_").replace(":", "_"),
                                                progress=log))
            results = e2e.ordered([*local[setting], *linked])
            log(f"{key}:\n{e2e.table(results)}")
            profiles[key] = {r.name: r.row() for r in results}
            profiles[key]["plan"] = [{"plan": c.describe(), "expected_ms": round(c.expected_ms, 3)}
                                     for c in chosen.ranked[:5]]
    result = {"profiles": profiles, "full_acc": full_acc, "inputs": len(test),
              "base_profile_ms": round(measured.at(1).backbone_ms(), 3),
              "devices": sources, "links": list(links), "trace_rtt_ms": TRACE_RTT_MS, "overhead_ms": overheads}
    _plot(profiles, ctx.out / "e2e.png", meta.model.arch)
    (ctx.out / "e2e_table.txt").write_text(_markdown(profiles))
    return result


def _markdown(profiles: dict[str, Any]) -> str:
    lines = ["| link/device | strategy | acc | mean ms | p95 ms | on device | bytes up |", "|---|---|---|---|---|---|---|"]
    for key, rows in profiles.items():
        for name, r in rows.items():
            if name != "plan":
                lines.append(f"| {key} | {name} | {r['acc']:.4f} | {r['mean_ms']:.1f} | {r['p95_ms']:.1f} | "
                             f"{r['on_device']:.2f} | {r['bytes_up']:.0f} |")
    return "\n".join(lines) + "\n"


def _plot(profiles: dict[str, Any], path: Path, arch: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = list(profiles)
    strategies = [s for s in next(iter(profiles.values())) if s != "plan"]
    fig, ax = plt.subplots(figsize=(max(7.0, 1.3 * len(keys)), 4.2))
    width = 0.8 / len(strategies)
    for i, name in enumerate(strategies):
        means = [profiles[k][name]["mean_ms"] for k in keys]
        p95 = [profiles[k][name]["p95_ms"] for k in keys]
        xs = np.arange(len(keys)) + i * width
        ax.bar(xs, means, width, label=name)
        ax.plot(xs, p95, "k_", markersize=8)
    ax.set_xticks(np.arange(len(keys)) + 0.4 - width / 2, keys, rotation=20, fontsize=7)
    ax.set_yscale("log")
    ax.set_ylabel("ms per input (bar: mean, dash: p95; log)")
    ax.set_title(f"{arch}: each strategy end to end per link/device (worker: this machine)", fontsize=9)
    # below the axes: inside, it covers the bars of some link or other
    fig.legend(*ax.get_legend_handles_labels(), loc="lower center", fontsize=7, ncol=len(strategies))
    fig.tight_layout(rect=(0, 0.07, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)
