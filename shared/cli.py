"""The `splitexit` command line: thin wrappers over library functions.

Importing this module does not import torch (so `--help` is quick on a device); each
command imports what it needs.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
from importlib.metadata import entry_points
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Sequence

from splitexit.codec import CODECS

if TYPE_CHECKING:
    from splitexit.manifest import Manifest

EXIT_USAGE = 2
EXIT_PARTIAL = 1  # the run finished, but some inputs have no answer (each named on stderr)


class CliError(Exception):
    """A user-facing error: printed as one line, exit status 2."""


def default_cache_dir() -> Path:
    return Path(os.environ.get("SPLITEXIT_CACHE", Path.home() / ".cache" / "splitexit"))


def _int_tuple(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated stage indices like 2,4,6,8; got {text!r}")


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def _probability(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1], got {text!r}")
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1], got {value}")
    return value


def _scale(text: str) -> float:
    value = _probability(text)
    if value == 0.0:
        raise argparse.ArgumentTypeError("expected a number in (0, 1], got 0")
    return value


class DefaultsShown(argparse.HelpFormatter):
    """--help shows each option's default, unless its help already says it, or there is
    none to show (None, a flag that is off)."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        if "default" in text or action.default in (None, False, argparse.SUPPRESS) or not action.option_strings:
            return action.help
        return f"{text} (default: %(default)s)"


# --- commands ------------------------------------------------------------------------
def _model_config(args: argparse.Namespace, *, num_classes: int, in_chans: int, input_size: int = 32):
    from splitexit.models import BoFConfig, ModelConfig

    return ModelConfig(
        arch=args.arch, num_classes=num_classes, in_chans=in_chans, exit_after=args.exit_after,
        exit_head=args.exit_head, hierarchical=args.hierarchical,
        bof=BoFConfig(codewords=args.codewords, kernel=args.bof_kernel, spatial=args.bof_spatial,
                      pool_to=args.bof_pool_to or None),
        module=args.module or "", cut_after=args.cut_after or (),
        input_size=input_size if args.module else 0,
    )


def _own_network(args: argparse.Namespace) -> bool:
    """`train --module`: check the factory (and list its nodes with --list-nodes). True
    when there is nothing left to do (the nodes were listed)."""
    from splitexit.models import load_factory
    from splitexit.models.fx_cut import CutError, graph_node_names

    factory = load_factory(args.module)
    if args.arch is None:
        args.arch = args.module.rpartition(":")[2]
    if args.list_nodes:
        try:
            names = graph_node_names(factory(num_classes=10, in_chans=3))
        except CutError as exc:
            raise CliError(str(exc)) from None
        print("\n".join(names))
        return True
    if not args.cut_after:
        raise CliError("--module needs --cut-after NODE,NODE,... (the torch.fx nodes to cut after; list them "
                       "with --list-nodes)")
    if args.exit_after is None:  # an exit after every stage but the last (which gives the logits)
        args.exit_after = tuple(range(len(args.cut_after)))
    return False


def _read_policy(path: Path) -> tuple[Any, dict[str, Any]]:
    """A policy file of `splitexit calibrate`: (the policy, its JSON entry)."""
    import json

    from splitexit.policies import PolicyError, policy_from_dict

    try:
        entry = json.loads(path.read_text())
        return policy_from_dict(entry), entry
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, PolicyError, KeyError, TypeError) as exc:
        raise CliError(f"{path}: not a readable policy file ({exc})") from exc


def _evaluate_and_report(model, meta, dataset, *, split: str, out_dir: Path | None, threshold: float,
                         cache_dir: Path | None, title: str, policy: Any = None) -> None:
    from dataclasses import replace

    from splitexit.calibrate import policy_figures
    from splitexit.cost import cost_model
    from splitexit.data import Normalize
    from splitexit.evaluate import cached_exit_outputs, format_report, summarize, write_report

    data = getattr(dataset, split)
    outputs = cached_exit_outputs(model, data, Normalize(meta.mean, meta.std), cache_dir=cache_dir, tag=split)
    shape = (dataset.in_chans, dataset.image_size, dataset.image_size)
    costs = cost_model(model, shape)
    names = [f"exit@{k}" for k in model.exit_points] + ["final"]
    report = summarize(outputs, names, threshold=threshold, cumulative_macs=costs.cumulative_exit_macs(model.exit_points),
                       full_macs=costs.total_macs)
    if policy is not None:  # as the deployed runtime would run it on these outputs, in MACs
        ladder = costs.exit_ladder()
        report = replace(report, policy={"policy": policy.name, **policy_figures(policy, outputs, ladder,
                                                                                 float(ladder.net_cost[-1]))})
    print(f"{title} — {split} set, {len(data)} samples")
    print(format_report(report))
    if out_dir is not None:
        json_path, png_path = write_report(report, out_dir, title=title)
        print(f"wrote {json_path} and {png_path}")


def cmd_demo(args: argparse.Namespace) -> None:
    """Train a tiny multi-exit net on the embedded digits and report its exits."""
    from splitexit.data import load_digits
    from splitexit.models import ModelConfig
    from splitexit.train import TrainConfig, train_cached

    dataset = load_digits()
    print(f"data: scikit-learn digits, {len(dataset.train)} train / {len(dataset.val)} val / "
          f"{len(dataset.test)} test, 8x8 grey")
    model_cfg = ModelConfig(arch="resnet14_tiny", in_chans=1, exit_after=(1, 2, 3, 4, 5), exit_head="bof")
    # fp32: on this tiny network bfloat16's casts cost more than its matmuls save
    train_cfg = TrainConfig(epochs=args.epochs, batch_size=64, lr=0.05, augment_pad=1, augment_flip=False,
                            threads=args.threads, precision="fp32")
    model, meta, path = train_cached(model_cfg, train_cfg, dataset, cache_dir=args.cache_dir)
    print(f"model: {path}")
    _evaluate_and_report(model, meta, dataset, split="test", out_dir=args.out, threshold=args.threshold,
                         cache_dir=args.cache_dir, title="demo: resnet14_tiny + BoF exits on digits")


def cmd_train(args: argparse.Namespace) -> None:
    from dataclasses import replace

    from splitexit.data import load_dataset
    from splitexit.models import check_exit_after, default_exit_after
    from splitexit.train import TrainConfig, train_cached

    # every argument checked before the data set is decoded (minutes for a large archive)
    if args.freeze_backbone and args.init is None:
        raise CliError("--freeze-backbone trains exits on a trained backbone: give it with --init CHECKPOINT")
    try:
        if args.module:
            if _own_network(args):
                return
        else:
            args.arch = args.arch or "resnet20"
            if args.exit_after is None:
                args.exit_after = default_exit_after(args.arch)
            check_exit_after(args.arch, args.exit_after)
        _model_config(args, num_classes=10, in_chans=3)  # the rest of the model's settings
        train_cfg = TrainConfig(
            mode="exits" if args.freeze_backbone else "joint", epochs=args.epochs, batch_size=args.batch_size,
            lr=args.lr, weight_decay=args.weight_decay, exit_weight=args.exit_weight, distill=args.distill,
            augment_pad=args.augment_pad, threads=args.threads,
            label_smoothing=args.label_smoothing, precision=args.precision, ema=args.ema,
            exit_grad=args.exit_grad, exit_ramp=args.exit_ramp, progressive_from=args.progressive,
            alternate_flips=args.alternate_flips,
            progressive_hold=args.progressive_hold, progressive_finetune=args.progressive_finetune,
        )
    except ValueError as exc:
        raise CliError(str(exc)) from None
    dataset = load_dataset(args.data, val_size=args.val_size, cache_dir=args.cache_dir)
    try:
        model_cfg = _model_config(args, num_classes=dataset.num_classes, in_chans=dataset.in_chans,
                                  input_size=dataset.image_size)
    except ValueError as exc:
        raise CliError(str(exc)) from None
    # a mirrored digit or letter is another symbol: flips only for colour (natural) images
    flip = args.flip if args.flip is not None else dataset.in_chans == 3
    if args.alternate_flips and not flip:
        raise CliError("--alternate-flips needs flips, and this run has none (--no-flip, or grey images: a "
                       "mirrored digit is another symbol; --flip turns them on)")
    train_cfg = replace(train_cfg, augment_flip=flip)
    print(f"data: {dataset.name}, {len(dataset.train)} train / {len(dataset.val)} val / {len(dataset.test)} test, "
          f"{dataset.in_chans} channel(s){'' if flip else ', no flips'}; exits after stages {list(model_cfg.exit_after)}")
    model, meta, path = train_cached(model_cfg, train_cfg, dataset, cache_dir=args.cache_dir, init=args.init,
                                     progress=True)
    print(f"checkpoint: {path} (trained in {meta.extra.get('train_seconds', 0.0):.0f} s)")
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, args.out)
        print(f"copied to {args.out}")
    _evaluate_and_report(model, meta, dataset, split="test", out_dir=None, threshold=0.9,
                         cache_dir=args.cache_dir, title=f"{model_cfg.arch} ({model_cfg.exit_head} exits)")


def cmd_eval(args: argparse.Namespace) -> None:
    from splitexit.checkpoint import load_checkpoint
    from splitexit.data import load_dataset

    model, meta = load_checkpoint(args.checkpoint)
    dataset = load_dataset(args.data, val_size=args.val_size, cache_dir=args.cache_dir)
    if dataset.num_classes != meta.model.num_classes or dataset.in_chans != meta.model.in_chans:
        raise CliError(
            f"{args.data} has {dataset.num_classes} classes and {dataset.in_chans} channels; the checkpoint "
            f"expects {meta.model.num_classes} and {meta.model.in_chans}"
        )
    policy = _read_policy(args.policy)[0] if args.policy is not None else None
    _evaluate_and_report(model, meta, dataset, split=args.split, out_dir=args.out, threshold=args.threshold,
                         cache_dir=args.cache_dir, title=f"{meta.model.arch} ({meta.model.exit_head} exits)",
                         policy=policy)


def _name_tuple(text: str) -> tuple[str, ...]:
    names = tuple(n.strip() for n in text.split(",") if n.strip())
    if not names:
        raise argparse.ArgumentTypeError(f"expected comma-separated node names, got {text!r}")
    return names


def _budget(text: str) -> tuple[float, str]:
    """'0.5' = half the full network's MACs; '2.5ms' = 2.5 ms per sample on this machine."""
    unit = "ms" if text.strip().endswith("ms") else "macs"
    try:
        value = float(text.strip().removesuffix("ms"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a fraction of full MACs (0.5) or milliseconds (2.5ms), got {text!r}")
    if value <= 0:
        raise argparse.ArgumentTypeError(f"a budget must be positive, got {text!r}")
    return value, unit


def cmd_calibrate(args: argparse.Namespace) -> None:
    """Fit a policy on the validation split's exit outputs and write it as JSON."""
    import hashlib
    import json

    import numpy as np

    from splitexit.calibrate import FitInputs, FitOptions, describe_fit, fit_policy
    from splitexit.checkpoint import load_checkpoint
    from splitexit.cost import cost_model
    from splitexit.data import Normalize, load_dataset
    from splitexit.evaluate import cached_exit_outputs

    model, meta = load_checkpoint(args.checkpoint)
    if not model.exit_points:
        raise CliError(f"{args.checkpoint} has no exits: nothing to calibrate")
    dataset = load_dataset(args.data, val_size=args.val_size, cache_dir=args.cache_dir)
    normalize = Normalize(meta.mean, meta.std)
    val = cached_exit_outputs(model, dataset.val, normalize, cache_dir=args.cache_dir, tag="val")
    stats = None
    if args.policy == "bof_beta":  # per-exit statistics on training samples (METHODS.md §1)
        rng = np.random.default_rng(0)
        pick = np.sort(rng.permutation(len(dataset.train))[: min(5000, len(dataset.train))])
        stats = cached_exit_outputs(model, dataset.train.subset(pick), normalize, cache_dir=args.cache_dir,
                                    tag="train_stats")
    budget, unit = args.budget if args.budget is not None else (None, "macs")
    # Predictive Exit keeps time and energy in ms: it always gets a measured ladder
    measure = unit == "ms" or args.policy == "predictive"
    costs = cost_model(model, (dataset.in_chans, dataset.image_size, dataset.image_size), measure=measure)
    if args.policy == "predictive" and unit == "macs":
        unit = "ms"  # a fraction of the full network, taken in measured ms
        if budget is not None:
            budget *= float(costs.exit_ladder(unit="ms").net_cost[-1])
    ladder = costs.exit_ladder(unit=unit)
    full = float(ladder.net_cost[-1])  # the network without exit heads
    if budget is not None and unit == "macs":
        budget *= full
    options = FitOptions(budget=budget, threshold=args.threshold, patience=args.patience, beta=args.beta,
                         statistic=args.statistic, extra={k: v for k, v in (("q", args.q), ("lam", args.lam), ("l0", args.l0),
                                                 ("board", args.board)) if v is not None})
    policy = fit_policy(args.policy, FitInputs(val, ladder, stats), options)
    entry = describe_fit(policy, FitInputs(val, ladder, stats), full)
    entry["fitted"] = {
        "checkpoint": str(args.checkpoint),
        "checkpoint_sha256": hashlib.sha256(Path(args.checkpoint).read_bytes()).hexdigest(),
        "data": args.data, "split": "val", "unit": unit, "budget": budget, "full_cost": full,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_name(args.out.name + ".tmp")
    tmp.write_text(json.dumps(entry, indent=2))
    tmp.replace(args.out)  # never a half-written policy file
    v = entry["validation"]
    print(f"{args.policy}: validation accuracy {v['acc']:.4f} at {v['cost_frac']:.3f} x full "
          f"({'ms' if unit == 'ms' else 'MACs'}), exit histogram {v['exit_hist']}")
    idle = [name for name, share in zip(v["exits"][:-1], v["exit_hist"][:-1]) if share < 0.005]
    if idle:
        print(f"note: {', '.join(idle)} answer(s) under 0.5% of the validation samples under this policy: their "
              f"heads cost time for nearly nothing (another policy, budget, or a model without them may do better)")
    print(f"wrote {args.out}")


def cmd_export(args: argparse.Namespace) -> None:
    """Checkpoint + fitted policy -> a bundle directory (edge and cloud parts)."""
    from splitexit.bundle import export_bundle, read_manifest
    from splitexit.checkpoint import load_checkpoint

    model, meta = load_checkpoint(args.checkpoint)
    policy, entry = _read_policy(args.policy)
    shape = meta.extra.get("input_shape")
    if args.input_size is not None:
        shape = [meta.model.in_chans, args.input_size, args.input_size]
    if not shape:
        raise CliError(f"{args.checkpoint} does not record its input size: give --input-size")
    split = args.split if args.split is not None else (model.exit_points[-1] if model.exit_points else 0)
    large = load_checkpoint(args.large) if args.large is not None else None
    path = export_bundle(args.out, model, meta, split=split, policy=policy, input_shape=tuple(shape),
                         name=args.name or "", codec=args.codec, calibration=entry.get("validation"), large=large,
                         edge_engine=args.edge_engine, splits=args.splits or ())
    manifest = read_manifest(path)
    also = [s for s in manifest.splits if s != split]
    print(f"bundle {path}: {manifest.name} split after stage {split}"
          + (f" (also allowed: {also})" if also else "") + f", edge exits {list(manifest.edge_exits)}, "
          f"cloud exits {list(manifest.cloud_exits)}, policy {policy.name}, codec {args.codec}"
          + (f", {sum(not s.alone for s in manifest.onnx)} ONNX edge segments" if manifest.onnx else ""))
    print(f"hash {manifest.hash}")
    _note_feature_bytes(manifest)


def _note_feature_bytes(manifest: "Manifest") -> None:
    """Say when an offload sends more than the input itself would: a split that costs the
    link more than cloud-only does (the raw input as uint8; compressed it is smaller still)."""
    from splitexit.codec import encoded_bytes

    feature = encoded_bytes(manifest.codec, (1, *manifest.feature_shape))  # type: ignore[arg-type]
    raw = 1
    for d in manifest.input_shape:
        raw *= d
    if feature > raw:
        print(f"note: an offloaded row carries {feature:,} bytes ({manifest.codec} feature "
              f"{'x'.join(map(str, manifest.feature_shape))} after stage {manifest.split}), {feature / raw:.1f}x the "
              f"{raw:,}-byte raw input (less still as JPEG): a later split, a smaller codec (fp16, int8) or "
              f"cloud-only may send less (`splitexit plan` weighs it)")


def cmd_profile(args: argparse.Namespace) -> None:
    """Time every stage, exit head and the final head of a bundle's network here."""
    from splitexit.bundle import read_manifest
    from splitexit.models import build_model
    from splitexit.profile import DEVICE_CLASSES, device_class, measure_profile

    manifest = read_manifest(args.bundle)
    model = build_model(manifest.model)  # timing does not depend on the weights' values
    batches = _batch_sizes(args.batch_sizes)
    c, h, w = manifest.input_shape
    if args.as_class is not None and args.as_class not in DEVICE_CLASSES:
        raise CliError(f"unknown device class {args.as_class!r}; known: {', '.join(DEVICE_CLASSES)}")
    profile = measure_profile(model, (c, h, w), name=args.name, arch=manifest.model.arch, batch_sizes=batches,
                              threads=args.threads, repeats=args.repeats)
    if args.as_class is not None:  # this machine's times scaled to the device class
        profile = device_class(profile, args.as_class)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    profile.save(args.out)
    one = profile.at(batches[0])
    print(f"{profile.name}: {manifest.model.arch} at batch {batches[0]}: stages "
          f"{', '.join(f'{t:.3f}' for t in one.stage_ms)} ms, exits "
          f"{', '.join(f'{k}: {t:.3f}' for k, t in sorted(one.exit_ms.items()))} ms, head {one.head_ms:.3f} ms")
    print(f"{profile.source}; wrote {args.out}")


def _batch_sizes(text: str) -> list[int]:
    try:
        sizes = [int(b) for b in text.split(",") if b.strip()]
    except ValueError:
        raise CliError(f"--batch-sizes takes comma-separated integers, got {text!r}") from None
    if not sizes or min(sizes) < 1:
        raise CliError(f"--batch-sizes takes positive integers, got {text!r}")
    return sizes


# --- parser --------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    from splitexit import __version__

    parser = argparse.ArgumentParser(
        prog="splitexit", description="Edge-cloud split inference with early exits."
    )
    parser.add_argument("--version", action="version", version=f"splitexit {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument("--cache-dir", type=Path, default=default_cache_dir(),
                       help="trained models, decoded data and cached exit outputs (default: %(default)s; "
                            "env SPLITEXIT_CACHE)")
        p.add_argument("--threads", type=_positive_int, default=None, help="torch CPU threads")

    demo = sub.add_parser("demo", help="train and evaluate a small multi-exit net on the embedded digits")
    common(demo)
    demo.add_argument("--epochs", type=_positive_int, default=30)
    demo.add_argument("--threshold", type=_probability, default=0.9, help="max-prob exit threshold for the histogram")
    demo.add_argument("--out", type=Path, default=Path("runs/demo"), help="where eval.json and eval.png go")
    demo.set_defaults(func=cmd_demo)

    train = sub.add_parser("train", help="train a backbone with exits (or exits on a frozen backbone)",
                           formatter_class=DefaultsShown)
    common(train)
    train.add_argument("--data", required=True, help="'digits', an image folder / .tar.gz (split/class/file.jpg), or .npz")
    train.add_argument("--arch", default=None,
                       help="built-in backbone (resnet14_tiny, resnet20, resnet20x2, ...; default: resnet20); with "
                            "--module, the network's label")
    train.add_argument("--module", metavar="PACKAGE.MODULE:FACTORY",
                       help="a network of your own instead: FACTORY(num_classes=, in_chans=) returns an nn.Module "
                            "giving logits; it must be importable (installed, on PYTHONPATH, or in the current "
                            "folder) wherever the torch model is rebuilt (training, the cloud worker)")
    train.add_argument("--cut-after", type=_name_tuple, metavar="NODE,NODE,...",
                       help="with --module: the torch.fx nodes to cut it into stages after (--list-nodes names them)")
    train.add_argument("--list-nodes", action="store_true", help="with --module: print its torch.fx node names and stop")
    train.add_argument("--exit-after", type=_int_tuple, default=None,
                       help="comma-separated stage indices with an exit (default: every other stage from 2 to the "
                            "one before the last: 2,4,6,8 for resnet20)")
    train.add_argument("--exit-head", choices=("bof", "pool"), default="bof",
                       help="bof: Bag-of-Features exits (Passalis et al.); pool: average pooling and a linear layer")
    train.add_argument("--codewords", type=_positive_int, default=64, help="BoF codewords per exit")
    train.add_argument("--bof-kernel", choices=("logistic", "rbf"), default="logistic",
                       help="BoF similarity of a feature to a codeword")
    train.add_argument("--bof-spatial", choices=("global", "2x2"), default="global",
                       help="one histogram per map, or one per quadrant")
    train.add_argument("--bof-pool-to", type=int, default=8, help="pool maps to this side before the codebook; 0 = off")
    train.add_argument("--hierarchical", action="store_true", help="BoF histograms added along depth, shared classifier")
    train.add_argument("--epochs", type=_positive_int, default=30, help="passes over the training split")
    train.add_argument("--batch-size", type=_positive_int, default=128, help="images per SGD step")
    train.add_argument("--lr", type=float, default=0.1, help="peak learning rate (SGD, Nesterov momentum)")
    train.add_argument("--weight-decay", type=float, default=5e-4, help="L2 weight decay")
    train.add_argument("--exit-weight", type=float, default=0.5, help="weight of the exits' losses beside the final head's")
    train.add_argument("--distill", type=_probability, default=0.5, help="share of each exit's loss distilled from the final head")
    train.add_argument("--exit-grad", type=_probability, default=1.0,
                       help="share of the exits' gradient that reaches the layers below them (default 1: all)")
    train.add_argument("--exit-ramp", type=_probability, default=0.0,
                       help="share of training over which the exits' weight grows from 0 to --exit-weight "
                            "(SDN's schedule: 1); default 0: the full weight from the first step")
    train.add_argument("--augment-pad", type=int, default=4, help="random crops from images padded by this many pixels")
    flips = train.add_mutually_exclusive_group()
    flips.add_argument("--flip", dest="flip", action="store_const", const=True, default=None,
                       help="random horizontal flips (default: only for 3-channel images; a mirrored digit is "
                            "another symbol)")
    flips.add_argument("--no-flip", dest="flip", action="store_const", const=False, help="no random flips")
    train.add_argument("--alternate-flips", action="store_true",
                       help="flip a random half of the images in the first epoch, then each image in every other "
                            "epoch (both views in any two epochs in a row)")
    train.add_argument("--label-smoothing", type=_probability, default=0.0, help="label smoothing of the losses")
    train.add_argument("--ema", type=float, default=0.0,
                       help="decay of a moving average of the weights (e.g. 0.999); the average is the trained "
                            "model. 0 (default) = off")
    train.add_argument("--progressive", type=_scale, default=1.0,
                       help="progressive resizing: the first epochs train on images downscaled to this share of "
                            "their side (e.g. 0.5), growing to full size; 1 (default) = off")
    train.add_argument("--progressive-hold", type=_probability, default=0.4,
                       help="share of the epochs held at the smallest size")
    train.add_argument("--progressive-finetune", type=_probability, default=0.25,
                       help="share of the epochs, the last ones, at full size")
    train.add_argument("--precision", choices=("auto", "bf16", "fp32"), default="auto",
                       help="bf16: bfloat16 autocast, fp32 weights; auto (default): bf16 where the CPU computes it "
                            "natively (AVX-512 BF16, AMX), else fp32. Tiny networks (8x8 digits) train faster in fp32")
    train.add_argument("--val-size", type=_positive_int, default=5000,
                       help="training images held out for validation (calibration uses them)")
    train.add_argument("--init", type=Path, help="start from this checkpoint's backbone")
    train.add_argument("--freeze-backbone", action="store_true", help="train the exits only (needs --init)")
    train.add_argument("--out", type=Path, help="also copy the checkpoint here")
    train.set_defaults(func=cmd_train)

    ev = sub.add_parser("eval", help="per-exit accuracy, oracle and exit histogram of a checkpoint",
                     formatter_class=DefaultsShown)
    common(ev)
    ev.add_argument("checkpoint", type=Path)
    ev.add_argument("--data", required=True, help="the data set the checkpoint was trained on")
    ev.add_argument("--split", choices=("test", "val"), default="test")
    ev.add_argument("--val-size", type=_positive_int, default=5000)
    ev.add_argument("--threshold", type=_probability, default=0.9,
                    help="the max-prob rule shown beside the exits, as the deployed maxprob policy runs it "
                         "(default: %(default)s)")
    ev.add_argument("--policy", type=Path, help="a policy file from `splitexit calibrate`: its accuracy and cost "
                                                "on this split, as the deployed system answers")
    ev.add_argument("--out", type=Path, default=Path("runs/eval"), help="where eval.json and eval.png go")
    ev.set_defaults(func=cmd_eval)

    cal = sub.add_parser("calibrate", help="fit an exit policy on validation outputs (to a budget or a setting)",
                      formatter_class=DefaultsShown)
    common(cal)
    cal.add_argument("checkpoint", type=Path, help="a trained multi-exit checkpoint (.safetensors)")
    cal.add_argument("--data", required=True, help="the data set it was trained on (its validation split is used)")
    cal.add_argument("--val-size", type=_positive_int, default=5000)
    cal.add_argument("--policy", required=True,
                     choices=("maxprob", "entropy", "patience", "bof_beta", "msdnet_budget", "eenet", "bolukbasi",
                              "predictive", "oracle"))
    cal.add_argument("--budget", type=_budget, help="average cost per sample: fraction of full MACs (0.5) or ms (2.5ms)")
    cal.add_argument("--threshold", type=float, help="maxprob / entropy threshold")
    cal.add_argument("--patience", type=int, help="patience: exits that must agree, minus one")
    cal.add_argument("--beta", type=float, help="bof_beta's beta")
    cal.add_argument("--statistic", choices=("maxprob", "margin", "maxprob_std"), default="maxprob",
                     help="bof_beta's per-exit statistic")
    cal.add_argument("--q", type=float, help="msdnet_budget: the geometric exit distribution's ratio")
    cal.add_argument("--lambda", dest="lam", type=float, help="bolukbasi: cost weight lambda")
    cal.add_argument("--l0", type=int, help="predictive: the first exit evaluated")
    cal.add_argument("--board", help="predictive: DVFS board (jetson-tx2-gpu, jetson-tx2-cpu, rk3399-a72, rk3399-gpu)")
    cal.add_argument("--out", type=Path, default=Path("runs/policy.json"), help="where the fitted policy goes")
    cal.set_defaults(func=cmd_calibrate)

    exp = sub.add_parser("export", help="write a bundle: edge and cloud weights, policy, manifest with hash",
                      formatter_class=DefaultsShown)
    common(exp)
    exp.add_argument("checkpoint", type=Path)
    exp.add_argument("--policy", type=Path, required=True, help="a policy file from `splitexit calibrate`")
    exp.add_argument("--split", type=int, help="stage index the edge runs through (default: the last exit's stage)")
    exp.add_argument("--splits", type=_int_tuple, metavar="S,S,...",
                     help="further split points the bundle allows (the edge agent may move its cut among them, "
                          "`edge run --replan`); the last stage index means every stage on the device")
    exp.add_argument("--codec", choices=CODECS, default="fp32")
    exp.add_argument("--edge-engine", choices=("torch", "onnx"), default="onnx",
                     help="onnx (default): also write the edge part as ONNX segments, run by ONNX Runtime "
                          "without torch on the device; torch: the safetensors weights only")
    exp.add_argument("--large", type=Path, help="the cascade's larger network (a checkpoint), served by the cloud")
    exp.add_argument("--name", help="model name on the wire (default: the architecture)")
    exp.add_argument("--input-size", type=_positive_int, help="input side in pixels, if the checkpoint lacks it")
    exp.add_argument("--out", type=Path, required=True, help="bundle directory to write")
    exp.set_defaults(func=cmd_export)

    prof = sub.add_parser("profile", help="time each stage and exit head of a bundle's network on this device")
    common(prof)
    prof.add_argument("bundle", type=Path)
    prof.add_argument("--name", default="this-device", help="the device's name in the profile")
    prof.add_argument("--batch-sizes", default="1", help="comma-separated batch sizes to time (default: 1)")
    prof.add_argument("--repeats", type=_positive_int, default=20, help="timed calls per piece (median)")
    prof.add_argument("--as", dest="as_class", metavar="CLASS",
                      help="scale the times measured here to a device class (rpi4, jetson-nano: published ratios)")
    prof.add_argument("--out", type=Path, default=Path("runs/device.json"), help="where the profile goes")
    prof.set_defaults(func=cmd_profile)

    # The other parts (sim: `bench`, later edge, cloud) add their commands through entry
    # points, so this module never imports them (shared imports neither edge, cloud nor sim).
    for command in sorted(entry_points(group="splitexit.commands"), key=lambda ep: ep.name):
        try:
            register = command.load()
        except ImportError as exc:  # a torch-free edge install: `splitexit edge` works, the rest says why not
            _unavailable(sub, command.name, exc)
            continue
        register(sub, common)
    return parser


def _unavailable(sub: argparse._SubParsersAction, name: str, exc: ImportError) -> None:
    """A subcommand whose part cannot be imported here (e.g. torch is not installed on an
    edge device): it is listed, and running it says what is missing."""
    missing = exc.name or str(exc)
    message = (f"'splitexit {name}' needs {missing}, which this install lacks "
               "(the edge extra has only the edge agent: pip install 'splitexit[full]')")

    def refuse(args: argparse.Namespace) -> int:
        raise CliError(message)

    p = sub.add_parser(name, help=f"(unavailable here: needs {missing})", add_help=False)
    p.add_argument("rest", nargs=argparse.REMAINDER)
    p.set_defaults(func=refuse)


def _set_torch_threads(threads: int) -> None:
    """`--threads` for the commands that run torch; an edge install without torch has none to set."""
    try:
        import torch
    except ImportError:
        return
    torch.set_num_threads(threads)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    func: Callable[[argparse.Namespace], int | None] = args.func  # an exit status, None for 0
    try:
        if getattr(args, "threads", None):
            _set_torch_threads(args.threads)
        code = func(args)
    except CliError as exc:
        print(f"splitexit: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except (ValueError, OSError) as exc:  # DataError and CheckpointError are ValueErrors
        print(f"splitexit: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except ModuleNotFoundError as exc:  # a part of the full install missing (an edge install has no torch)
        print(f"splitexit: error: this command needs {exc.name or exc}, which this install lacks "
              "(the edge extra runs `splitexit edge` only: pip install 'splitexit[full]')", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("splitexit: interrupted", file=sys.stderr)
        return 130
    return code or 0


if __name__ == "__main__":
    sys.exit(main())
