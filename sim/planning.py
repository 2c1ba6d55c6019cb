"""`splitexit plan BUNDLE --link LINK --device PROFILE`: where to cut the bundle's network
and how to route, for a link and a device (the planner of `splitexit.plan` fed with
measurements).

What it measures, on the data set given (default: the embedded digits' validation split):
every exit's outputs of the bundle's network (trained weights), and from them how each
policy setting answers: the bundle's own policy, and max-prob thresholds from 0.5 to
0.99 as alternatives. Costs: the device's times from its profile, the worker's from
`--cloud` (or measured here), the features' bytes in the bundle's codec at every cut, the
input as JPEG at `--jpeg-quality` for cloud-only. It prints the ranked table with the
reason for the choice and writes it as JSON.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable

import numpy as np

from splitexit.cli import CliError

__all__ = ["MAXPROB_SWEEP", "cut_bytes", "exit_behaviour", "jpeg_bytes", "register"]

# the final head answers the rows no exit took (no SDN fallback), so high q tends to the full network
MAXPROB_SWEEP = (0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99)


# The linear uplink power model of Huang et al., "A Close Examination of Performance and
# Power Characteristics of 4G LTE Networks", MobiSys 2012, Table 4 (P = alpha_u * uplink
# Mbit/s + beta, mW), by the kind of link. The figures as AT&T's ARO tool and public
# Neurosurgeon-style and fog-simulator code quote them (they agree); not checked here
# against the paper's own text. The radio's tail after a transfer is not counted.
RADIO_POWER: dict[str, tuple[float, float]] = {
    "lte": (438.39, 1288.04),
    "wifi": (283.17, 132.86),
    "3g": (868.98, 817.88),
}


def _pair(text: str) -> tuple[float, float]:
    try:
        a, b = (float(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected two numbers like 6.4,2.7; got {text!r}") from None
    if a < 0 or b < 0:
        raise argparse.ArgumentTypeError(f"expected numbers >= 0, got {text!r}")
    return a, b


def energy_model(args: argparse.Namespace, link_kind: str) -> Any:
    """--objective energy's EnergyModel from --device-power and --radio-power (or the link's kind)."""
    from splitexit.plan import EnergyModel

    if args.objective != "energy":
        return None
    if args.device_power is None:
        raise CliError("--objective energy needs --device-power BUSY_W,IDLE_W (the device's own figures)")
    radio, source = args.radio_power, "--radio-power"
    if radio is None:
        kind = next((k for k in RADIO_POWER if k in link_kind.lower()), None)
        if kind is None:
            raise CliError(f"no radio power known for the link {link_kind!r}: give --radio-power ALPHA,BETA")
        radio, source = RADIO_POWER[kind], f"{kind} radio of Huang et al., MobiSys 2012"
    busy, idle = args.device_power
    return EnergyModel(busy_w=busy, idle_w=idle, radio_alpha_mw_per_mbps=radio[0], radio_beta_mw=radio[1],
                       source=f"device {busy} W busy, {idle} W idle (given); radio: {source}")


def register(sub: argparse._SubParsersAction, common: Callable[[argparse.ArgumentParser], None]) -> None:
    p = sub.add_parser("plan", help="rank routes and split points of a bundle for a link and a device")
    common(p)
    p.add_argument("bundle", type=Path)
    p.add_argument("--link", required=True,
                   help="a link profile (3g, lte, wifi, 3g-webpagetest, 3g-slow, cable, fios) or a Mahimahi trace "
                        "file, or ARCHIVE.tar.gz:TRACE (its mean capacity is planned for)")
    p.add_argument("--rtt-ms", type=float, help="round trip time (default: the profile's; 50 ms for a trace)")
    p.add_argument("--device", type=Path, help="the device's profile (`splitexit profile`); default: measured here")
    p.add_argument("--cloud", type=Path, help="the worker's profile; default: measured here")
    p.add_argument("--data", default="digits", help="data set whose validation split is measured (default: digits)")
    p.add_argument("--accuracy-floor", type=float, help="the least accuracy a plan may have")
    p.add_argument("--latency-target", type=float, help="ms: the most accurate plan that meets it")
    p.add_argument("--objective", choices=("latency", "energy"), default="latency",
                   help="what is minimized: ms per input, or the device's mJ per input (energy needs "
                        "--device-power; the radio's power comes from --radio-power or the link's kind)")
    p.add_argument("--device-power", type=_pair, metavar="BUSY_W,IDLE_W",
                   help="the device's power while computing and while waiting (measure yours)")
    p.add_argument("--radio-power", type=_pair, metavar="ALPHA_MW_PER_MBPS,BETA_MW",
                   help="the radio's power while sending: beta + alpha x uplink Mbit/s (default: the link's kind "
                        f"in Huang et al., MobiSys 2012: {', '.join(RADIO_POWER)})")
    p.add_argument("--jpeg-quality", type=int, default=90, help="cloud-only: the input sent as JPEG at this quality")
    p.add_argument("--out", type=Path, default=Path("runs/plan.json"))
    p.set_defaults(func=cmd_plan)


def exit_behaviour(policy: Any, setting: str, outputs: Any, ladder: Any) -> Any:
    """How `policy` answers `outputs` (every exit's probabilities over a set): the share of
    inputs answered at each exit of `ladder` and their accuracy."""
    from splitexit.plan import ExitBehaviour
    from splitexit.policies import simulate

    out = simulate(policy, outputs.probs, ladder, outputs.labels)
    share = np.bincount(out.exit_index, minlength=ladder.num_exits) / len(out.exit_index)
    return ExitBehaviour(setting=setting, share=tuple(float(x) for x in share), acc=out.acc)


def cut_bytes(model: Any, input_shape: tuple[int, int, int], codec: str) -> list[float]:
    """Bytes per input crossing the link when cut after each stage, in `codec`."""
    import torch

    from splitexit.codec import encoded_bytes

    with torch.inference_mode():
        _, feats = model.forward_intermediates(torch.zeros(1, *input_shape))
    return [float(encoded_bytes(codec, (1, *f.shape[1:]))) for f in feats]  # type: ignore[arg-type]


def jpeg_bytes(images: np.ndarray, quality: int = 90) -> float:
    """Mean bytes of `images` as the JPEGs a device would send for cloud-only."""
    from splitexit import wire

    return float(np.mean([len(b) for b in wire.encode_raw_input(images, "jpeg", quality=quality)]))


def link_estimate(profile: Any) -> Any:
    """The planner's view of an emulated link: its rates (a trace's mean) and RTT."""
    from splitexit.plan import LinkEstimate

    def mbps(direction: Any) -> float | None:
        return direction.trace.mean_mbps if direction.trace is not None else direction.rate_mbps

    return LinkEstimate(up_mbps=mbps(profile.up), down_mbps=mbps(profile.down),
                        rtt_ms=profile.up.delay_ms + profile.down.delay_ms)


def _link(args: argparse.Namespace) -> tuple[Any, str]:
    from splitexit.plan import LinkEstimate
    from splitexit.sim.link import PROFILES, load_trace

    spec: str = args.link
    if spec in PROFILES:
        estimate = link_estimate(PROFILES[spec])
        return (estimate if args.rtt_ms is None else replace(estimate, rtt_ms=args.rtt_ms)), spec
    archive, _, member = spec.partition(".tar.gz:")
    try:
        trace = load_trace(archive + ".tar.gz", member) if member else load_trace(spec)
    except (OSError, ValueError) as exc:
        raise CliError(f"--link {spec}: not a link profile ({', '.join(PROFILES)}) nor a readable trace ({exc})") from None
    rtt = 50.0 if args.rtt_ms is None else args.rtt_ms
    return LinkEstimate(up_mbps=trace.mean_mbps, rtt_ms=rtt), f"{trace.name} (mean {trace.mean_mbps:.2f} Mbit/s)"


def cmd_plan(args: argparse.Namespace) -> None:
    from splitexit.bundle import load_whole
    from splitexit.cost import cost_model
    from splitexit.data import Normalize, load_dataset
    from splitexit.evaluate import cached_exit_outputs
    from splitexit.plan import plan
    from splitexit.policies import MaxProb
    from splitexit.profile import load_profile, measure_profile

    if args.accuracy_floor is not None and args.latency_target is not None:
        raise CliError("give --accuracy-floor or --latency-target, not both")
    link, link_name = _link(args)
    energy = energy_model(args, link_name)  # checked before anything is measured
    bundle = load_whole(args.bundle)
    if bundle.large is not None:
        raise CliError(f"{args.bundle} is a cascade: planning its larger network is not supported yet")
    model, manifest = bundle.model.eval(), bundle.manifest
    c, h, w = manifest.input_shape
    dataset = load_dataset(args.data, cache_dir=args.cache_dir)
    outputs = cached_exit_outputs(model, dataset.val, Normalize(bundle.mean, bundle.std), cache_dir=args.cache_dir,
                                  tag="plan-val")
    costs = cost_model(model, (c, h, w))
    ladder = costs.exit_ladder()

    behaviours = [exit_behaviour(bundle.policy, f"bundle's {bundle.policy.name}", outputs, ladder)]
    behaviours += [exit_behaviour(MaxProb(q, fallback=False), f"maxprob q={q}", outputs, ladder) for q in MAXPROB_SWEEP]
    full_acc = float(outputs.correct()[-1].mean())

    def times(path: Path | None, name: str) -> Any:
        if path is not None:
            profile = load_profile(path)
            if profile.arch != manifest.model.arch:
                raise CliError(f"{path} profiles {profile.arch}, the bundle's network is {manifest.model.arch}")
        else:
            profile = measure_profile(model, (c, h, w), name=name, arch=manifest.model.arch, threads=args.threads)
        return profile, profile.at(1)

    device_profile, device = times(args.device, "this machine (as the device)")
    cloud_profile, cloud = times(args.cloud, "this machine (as the worker)")
    feature_bytes = cut_bytes(model, (c, h, w), bundle.codec)
    input_bytes = jpeg_bytes(dataset.val.images[:200], args.jpeg_quality)

    ranked = plan(device=device, cloud=cloud, link=link, exits=model.exit_points, behaviours=behaviours,
                  full_acc=full_acc, feature_bytes=feature_bytes, input_bytes=input_bytes,
                  accuracy_floor=args.accuracy_floor, latency_target_ms=args.latency_target,
                  energy=energy, objective=args.objective)
    best = ranked[0]
    least = "the least energy" if args.objective == "energy" else "the fastest"
    if args.latency_target is not None:
        why = (f"the most accurate plan expected within {args.latency_target:g} ms" if best.expected_ms <= args.latency_target
               else f"no plan is expected within {args.latency_target:g} ms: the fastest")
    elif args.accuracy_floor is not None:
        why = (f"{least} plan with accuracy >= {args.accuracy_floor:g}" if best.acc >= args.accuracy_floor
               else f"no plan reaches accuracy {args.accuracy_floor:g}: {least}")
    else:
        why = f"{least} plan (no accuracy floor given)"
    print(f"link {link_name}: up {link.up_mbps or 0:.2f} Mbit/s, RTT {link.rtt_ms:.0f} ms; device: "
          f"{device_profile.name} ({device_profile.source}); worker: {cloud_profile.name}")
    print(f"measured on {len(outputs.labels)} validation inputs of {dataset.name}; full network accuracy {full_acc:.4f}")
    if energy is not None:
        print(f"energy: {energy.source}; no radio tail counted")
    print(_table(ranked))
    print(f"choice: {best.describe()}, expected {best.expected_ms:.2f} ms"
          + (f" and {best.energy_mj:.2f} mJ" if best.energy_mj is not None else "")
          + f" per input at accuracy {best.acc:.4f}: {why}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({
        "bundle": str(args.bundle), "hash": bundle.hash, "link": link_name, "up_mbps": link.up_mbps,
        "rtt_ms": link.rtt_ms, "device": device_profile.to_dict(), "cloud": cloud_profile.to_dict(),
        "data": dataset.name, "full_acc": full_acc, "feature_bytes": feature_bytes, "input_bytes": input_bytes,
        "objective": args.objective, "energy": None if energy is None else energy.source,
        "choice": {"plan": best.describe(), "why": why},
        "candidates": [{"plan": c.describe(), "route": c.route, "split": c.split, "setting": c.setting,
                        "expected_ms": c.expected_ms, "acc": c.acc, "bytes_up": c.bytes_up, "on_device": c.on_device,
                        "energy_mj": c.energy_mj} for c in ranked],
    }, indent=2))
    print(f"wrote {args.out}")


def _table(ranked: list[Any], rows: int = 12) -> str:
    """The best `rows` candidates, and every static route wherever it ranks."""
    shown = ranked[:rows] + [c for c in ranked[rows:] if c.route in ("edge_only", "cloud_only", "split")]
    energy = any(c.energy_mj is not None for c in ranked)
    lines = [f"{'rank':>4}  {'plan':<52} {'ms':>9} {'acc':>7} {'bytes up':>9} {'device':>7}"
             + (f" {'mJ':>8}" if energy else "")]
    for c in shown:
        lines.append(f"{ranked.index(c) + 1:>4}  {c.describe()[:52]:<52} {c.expected_ms:>9.2f} {c.acc:>7.4f} "
                     f"{c.bytes_up:>9.0f} {c.on_device:>7.2f}"
                     + (f" {c.energy_mj:>8.2f}" if c.energy_mj is not None else ""))
    return "\n".join(lines)
