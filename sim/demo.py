"""`splitexit sim demo`: the whole system on the embedded digits, as `make run` shows it.

1. The small digits network with its exits (trained once, then cached: `splitexit demo`'s).
2. The planner ranks every route for the device and the link from the network's validation
   outputs and the times measured here (`splitexit.plan`): the best cut without exits
   (Neurosurgeon's) and the best cut with an exit policy (adaptive).
3. Bundles for those, a real cloud worker process serving them, and for each strategy an
   emulated link (`splitexit.sim.link`) between the edge and the worker.
4. Every test input answered one at a time, end to end, by each strategy; the table
   (accuracy, mean and p95 latency, share answered on the device, bytes sent per input)
   and a plot of the latencies.

The device stands for a device class (default: a Raspberry Pi 4-class CPU, this machine's
measured times times a published factor, `splitexit.profile.DEVICE_CLASSES`): the edge's
every stage and exit head waits out the difference (`splitexit.sim.live.pad_to_profile`),
and the planner uses the same times. The worker is this machine.
"""

from __future__ import annotations

import argparse
import asyncio
import json
from pathlib import Path
from typing import Any

import numpy as np

from splitexit.cli import CliError

__all__ = ["add_arguments", "cmd_demo"]


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--link", default="wifi", help="link profile between device and worker (default: %(default)s)")
    p.add_argument("--device", default="rpi4", help="device class the edge stands for (rpi4, jetson-nano; "
                                                    "`here`: this machine unpadded; default: %(default)s)")
    p.add_argument("--epochs", type=int, default=30, help="training epochs of the digits network (cached)")
    p.add_argument("--inputs", type=int, default=0, help="test inputs per strategy (default: all)")
    p.add_argument("--out", type=Path, default=Path("runs/demo"), help="where demo.json and demo.png go")


def cmd_demo(args: argparse.Namespace) -> None:
    import torch

    from splitexit.bundle import export_bundle
    from splitexit.cost import cost_model
    from splitexit.data import Normalize, load_digits
    from splitexit.evaluate import cached_exit_outputs
    from splitexit.models import ModelConfig
    from splitexit.plan import DeviceTimes, LinkEstimate, plan
    from splitexit.policies import MaxProb
    from splitexit.profile import DEVICE_CLASSES, device_class, measure_profile
    from splitexit.sim.link import PROFILES
    from splitexit.sim.planning import MAXPROB_SWEEP, cut_bytes, exit_behaviour, jpeg_bytes
    from splitexit.train import TrainConfig, train_cached

    if args.link not in PROFILES:
        raise CliError(f"unknown link {args.link!r}; choose one of {', '.join(PROFILES)}")
    if args.device != "here" and args.device not in DEVICE_CLASSES:
        raise CliError(f"unknown device {args.device!r}; choose here or one of {', '.join(DEVICE_CLASSES)}")
    link_profile = PROFILES[args.link]
    torch.set_num_threads(1)  # the device and the worker each get one core of the two
    dataset = load_digits()
    model_cfg = ModelConfig(arch="resnet14_tiny", in_chans=1, exit_after=(1, 2, 3, 4, 5), exit_head="bof")
    train_cfg = TrainConfig(epochs=args.epochs, batch_size=64, lr=0.05, augment_pad=1, augment_flip=False,
                            precision="fp32")  # `splitexit demo`'s network: one cache entry for both
    model, meta, _ = train_cached(model_cfg, train_cfg, dataset, cache_dir=args.cache_dir)
    model.eval()
    normalize = Normalize(meta.mean, meta.std)
    c, h, w = 1, 8, 8
    print(f"1. network: {model_cfg.arch} with exits after stages {model.exit_points} (digits, {args.epochs} epochs)")

    # -- 2. the plan --------------------------------------------------------------------
    val = cached_exit_outputs(model, dataset.val, normalize, cache_dir=args.cache_dir, tag="demo-val")
    ladder = cost_model(model, (c, h, w)).exit_ladder()
    settings = {f"maxprob q={q}": MaxProb(q, fallback=False) for q in MAXPROB_SWEEP}
    behaviours = [exit_behaviour(policy, name, val, ladder) for name, policy in settings.items()]
    measured = measure_profile(model, (c, h, w), name="this machine", arch=model_cfg.arch, threads=1)
    profile = measured if args.device == "here" else device_class(measured, args.device)
    device: DeviceTimes = profile.at(1)
    link = LinkEstimate(up_mbps=link_profile.up.rate_mbps, down_mbps=link_profile.down.rate_mbps,
                        rtt_ms=link_profile.up.delay_ms + link_profile.down.delay_ms)
    feature_bytes = cut_bytes(model, (c, h, w), "fp32")
    input_bytes = jpeg_bytes(dataset.val.images[:100])
    full_acc = float(val.correct()[-1].mean())
    ranked = plan(device=device, cloud=measured.at(1), link=link, exits=model.exit_points, behaviours=behaviours,
                  full_acc=full_acc, feature_bytes=feature_bytes, input_bytes=input_bytes,
                  accuracy_floor=full_acc - 0.005)
    split = next(c for c in ranked if c.route == "split")
    adaptive = next(c for c in ranked if c.route == "adaptive")
    print(f"2. device: {profile.name} ({profile.source}); worker: this machine")
    print(f"   plan for link {args.link} (up {link.up_mbps} Mbit/s, RTT {link.rtt_ms:.0f} ms): best overall "
          f"{ranked[0].describe()} ({ranked[0].expected_ms:.2f} ms expected); best cut without exits: stage "
          f"{split.split}; {adaptive.describe()} ({adaptive.expected_ms:.2f} ms)")

    # -- 3. bundles, the worker, the links -------------------------------------------------
    args.out.mkdir(parents=True, exist_ok=True)
    bundles = args.out / "bundles"
    never = MaxProb(2.0, fallback=False)  # no early exit: the final head answers
    adaptive_policy = settings[adaptive.setting or "maxprob q=0.9"]
    last_cut = model.num_stages - 2
    paths = {
        "cloud_only": export_bundle(bundles / "cloud", model, meta, split=last_cut, policy=never, input_shape=(c, h, w),
                                    name="digits-cloud"),
        "split": export_bundle(bundles / "split", model, meta, split=split.split or 0, policy=never,
                               input_shape=(c, h, w), name="digits-split"),
        "adaptive": export_bundle(bundles / "adaptive", model, meta, split=adaptive.split or 0,
                                  policy=adaptive_policy, input_shape=(c, h, w), name="digits-adaptive"),
    }
    test = dataset.test if not args.inputs else dataset.test.subset(np.arange(min(args.inputs, len(dataset.test))))
    results = asyncio.run(_run_all(model, normalize, test, paths, link_profile, never, adaptive_policy, profile,
                                   {"split": f"cut after stage {split.split}, no exits",
                                    "adaptive": f"cut after stage {adaptive.split}, {adaptive.setting}"}))

    # -- 4. the table ------------------------------------------------------------------------
    print(f"4. {len(test)} test inputs, one at a time, through the emulated {args.link} link:")
    print(_table(results))
    print("   acc: accuracy; mean/p95: end-to-end ms per input; device: share answered on the device; "
          "bytes up: sent per input (measured at the link)")
    (args.out / "demo.json").write_text(json.dumps({
        "link": args.link, "device": {"name": profile.name, "source": profile.source}, "full_acc_val": full_acc, "inputs": len(test),
        "plan": [{"plan": c.describe(), "expected_ms": c.expected_ms, "acc": c.acc} for c in ranked[:20]],
        "strategies": {r.name: r.row() for r in results}}, indent=2))
    _plot(results, args.out / "demo.png", args.link, profile.name)
    print(f"wrote {args.out / 'demo.json'} and {args.out / 'demo.png'}")


async def _run_all(model: Any, normalize: Any, test: Any, paths: dict[str, Path], link_profile: Any, never: Any,
                   adaptive_policy: Any, profile: Any, plans: dict[str, str]) -> list[Any]:
    from dataclasses import replace

    import torch

    from splitexit.bundle import load_bundle, load_whole
    from splitexit.edge import AgentConfig
    from splitexit.runtime import ExitRunner
    from splitexit.sim.link import LinkProxy
    from splitexit.sim.live import WorkerProcess, pad_to_profile, run_cloud_only, run_edge_agent, run_local, summarize

    x = normalize(torch.from_numpy(test.images))
    device_model = pad_to_profile(model, profile)  # this machine waits out the device's slowness
    results = []
    print("3. the device's own strategies, then a worker process and an emulated link per strategy")
    results.append(summarize("edge_only", run_local(ExitRunner(device_model, never, num_classes=10), x, exits=False),
                             test.labels,
                             plan="every stage on the device, no exits"))
    results.append(summarize("edge_exits", run_local(ExitRunner(device_model, adaptive_policy, num_classes=10), x),
                             test.labels, plan="every stage on the device, the adaptive plan's exits"))
    cloud_bundle = load_whole(paths["cloud_only"])
    async with WorkerProcess(list(paths.values())) as worker:
        host, port = worker.address.rsplit(":", 1)
        for name in ("cloud_only", "split", "adaptive"):
            async with LinkProxy((host, int(port)), link_profile) as proxy:
                if name == "cloud_only":
                    records = await run_cloud_only(cloud_bundle, proxy.address, test.images)
                else:
                    edge = load_bundle(paths[name], "edge")
                    edge = replace(edge, model=pad_to_profile(edge.model, profile))
                    records = await run_edge_agent(edge, proxy.address, test.images,
                                                   config=AgentConfig(request_timeout_ms=10_000))
                bytes_up = proxy.counters.bytes_up
            results.append(summarize(name, records, test.labels, bytes_up=bytes_up,
                                     plan=plans.get(name, "the input as JPEG (q=90), every stage in the worker")))
            print(f"   {name}: done ({len(records)} inputs)")
    return results


def _table(results: list[Any]) -> str:
    lines = [f"   {'strategy':<11} {'acc':>7} {'mean ms':>8} {'p95 ms':>8} {'device':>7} {'bytes up':>9}  plan"]
    for r in results:
        lines.append(f"   {r.name:<11} {r.acc:>7.4f} {r.mean_ms:>8.2f} {r.p95_ms:>8.2f} {r.on_device:>7.2f} "
                     f"{r.bytes_up:>9.0f}  {r.plan}")
    return "\n".join(lines)


def _plot(results: list[Any], path: Path, link: str, device: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for r in results:
        ax.bar(r.name, r.mean_ms, label=f"{r.name}: acc {r.acc:.3f}")
        ax.plot([r.name], [r.p95_ms], "k_", markersize=20)
    ax.set_ylabel("ms per input (bar: mean, dash: p95)")
    ax.set_title(f"digits network, {device} device (padded), worker here, {link} link emulated", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
