"""`splitexit sim demo`: the whole system on the embedded digits, as `make run` shows it.

1. The small digits network with its exits (trained once, then cached: `splitexit demo`'s).
2. The planner ranks every route for the device and the link from the network's validation
   outputs and the times measured here (`splitexit.plan`): the best cut without exits
   (Neurosurgeon's) and its first choice, where the adaptive agent starts before it
   re-plans online.
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
    p.add_argument("--epochs", type=int, default=DEMO_EPOCHS, help="training epochs of the digits network (cached)")
    p.add_argument("--inputs", type=int, default=0, help="test inputs per strategy (default: all)")
    p.add_argument("--out", type=Path, default=Path("runs/demo"), help="where demo.json and demo.png go")


DEMO_EPOCHS = 30


def demo_network(cache_dir: Path, epochs: int = DEMO_EPOCHS) -> tuple[Any, Any, Any]:
    """(model, meta, dataset): the demo's digits network with five BoF exits, trained once
    and cached (`splitexit demo` and `sim live`'s recipe "demo" share the cache entry)."""
    from splitexit.data import load_digits
    from splitexit.models import ModelConfig
    from splitexit.train import TrainConfig, train_cached

    dataset = load_digits()
    model_cfg = ModelConfig(arch="resnet14_tiny", in_chans=1, exit_after=(1, 2, 3, 4, 5), exit_head="bof")
    train_cfg = TrainConfig(epochs=epochs, batch_size=64, lr=0.05, augment_pad=1, augment_flip=False,
                            precision="fp32")  # `splitexit demo`'s network: one cache entry for both
    model, meta, _ = train_cached(model_cfg, train_cfg, dataset, cache_dir=cache_dir)
    return model.eval(), meta, dataset


def cmd_demo(args: argparse.Namespace) -> None:
    import torch

    from splitexit.data import Normalize
    from splitexit.evaluate import cached_exit_outputs
    from splitexit.profile import DEVICE_CLASSES, device_class, measure_profile
    from splitexit.sim import e2e
    from splitexit.sim.link import PROFILES
    from splitexit.sim.planning import jpeg_bytes, link_estimate

    if args.link not in PROFILES:
        raise CliError(f"unknown link {args.link!r}; choose one of {', '.join(PROFILES)}")
    if args.device != "here" and args.device not in DEVICE_CLASSES:
        raise CliError(f"unknown device {args.device!r}; choose here or one of {', '.join(DEVICE_CLASSES)}")
    link_profile = PROFILES[args.link]
    torch.set_num_threads(1)  # the device and the worker each get one core of the two
    model, meta, dataset = demo_network(args.cache_dir, args.epochs)
    normalize = Normalize(meta.mean, meta.std)
    shape = (1, 8, 8)
    print(f"1. network: {meta.model.arch} with exits after stages {model.exit_points} (digits, {args.epochs} epochs)")

    # -- 2. the plan --------------------------------------------------------------------
    val = cached_exit_outputs(model, dataset.val, normalize, cache_dir=args.cache_dir, tag="demo-val")
    measured = measure_profile(model, shape, name="this machine", arch=meta.model.arch, threads=1)
    profile = measured if args.device == "here" else device_class(measured, args.device)
    test = dataset.test if not args.inputs else dataset.test.subset(np.arange(min(args.inputs, len(dataset.test))))
    args.out.mkdir(parents=True, exist_ok=True)
    overheads = asyncio.run(e2e.calibrate_overheads(model, meta, shape, test.images,
                                                    normalize(torch.from_numpy(test.images)), measured, profile,
                                                    args.out / "bundles", inputs=20))
    chosen = e2e.make_plan(model, shape, val, measured, profile, link_profile, jpeg_bytes(dataset.val.images[:100]),
                           overheads)
    link = link_estimate(link_profile)
    print(f"2. device: {profile.name} ({profile.source}); worker: this machine")
    print(f"   plan for link {args.link} (up {link.up_mbps} Mbit/s, RTT {link.rtt_ms:.0f} ms): best overall "
          f"{chosen.adaptive.describe()} ({chosen.adaptive.expected_ms:.2f} ms expected: the adaptive strategy); "
          f"best cut without exits: stage {chosen.fixed_split.split}; each route's own ms beyond the cost model, "
          f"measured on an ideal link: {overheads}")

    # -- 3. the strategies: on the device, then through a worker and an emulated link ----------
    print("3. the device's own strategies, then a worker process and an emulated link per strategy")
    results = e2e.run_local(model, normalize(torch.from_numpy(test.images)), test.labels, chosen, profile, 10)
    results = e2e.ordered(results + asyncio.run(e2e.run_linked(model, meta, shape, test.images, test.labels, chosen,
                                                               profile, link_profile, args.out / "bundles")))

    # -- 4. the table ------------------------------------------------------------------------
    print(f"4. {len(test)} test inputs, one at a time, through the emulated {args.link} link:")
    print(e2e.table(results))
    print("   acc: accuracy; mean/p95: end-to-end ms per input; device: share answered on the device; "
          "bytes up: sent per input (measured at the link)")
    (args.out / "demo.json").write_text(json.dumps({
        "link": args.link, "device": {"name": profile.name, "source": profile.source}, "full_acc_val": chosen.full_acc,
        "inputs": len(test),
        "plan": [{"plan": c.describe(), "expected_ms": c.expected_ms, "acc": c.acc} for c in chosen.ranked[:20]],
        "strategies": {r.name: r.row() for r in results}}, indent=2))
    _plot(results, args.out / "demo.png", args.link, profile.name)
    print(f"wrote {args.out / 'demo.json'} and {args.out / 'demo.png'}")


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
