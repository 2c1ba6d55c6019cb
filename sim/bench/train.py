"""`bench train`: how long the reference networks take to train, and how well they come out.

For the edge network (jointly with its exits) and the cloud network: the recipe's run
(trained once, then cached: `train_s` is that run's time), its test accuracy per exit, and,
measured side by side in this run on fresh copies of the networks, one epoch of the schedule
it replaced in fp32 and one epoch of the new schedule in its own precision at each image size
it trains at (progressive resizing). The speed-up is the ratio of the two schedules' times
built from those epochs (`time_ratio`), so it does not depend on how busy the machine was
when the cached run trained. `--compare-fp32` also trains the edge
recipe in fp32 end to end (cached), for bfloat16 vs fp32 accuracy on the same schedule.
"""

from __future__ import annotations

import argparse
from collections import Counter
from dataclasses import replace

from splitexit.models import ModelConfig, build_model
from splitexit.reference import Trained
from splitexit.sim.bench.common import BenchContext, log
from splitexit.train import TrainConfig, fit, input_size, resolve_precision, train_cached

HELP = "training time of the reference networks, new recipe over the old one in fp32 (side by side)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--compare-fp32", action="store_true",
                        help="also train the edge recipe in fp32 end to end (cached) for accuracy side by side")


def _epoch_seconds(ctx: BenchContext, model_cfg: ModelConfig, train_cfg: TrainConfig) -> float:
    """One epoch (the training steps and the validation pass) of `train_cfg` on a fresh network."""
    model = build_model(model_cfg)
    reports = fit(model, ctx.dataset, replace(train_cfg, epochs=1, threads=ctx.threads))
    return reports[0].seconds


def _epoch_seconds_at(ctx: BenchContext, model_cfg: ModelConfig, train_cfg: TrainConfig, side: int) -> float:
    """One epoch of `train_cfg` on images of side `side` (progressive resizing's sizes)."""
    # a one-epoch schedule that starts at `side` is an epoch at that side
    return _epoch_seconds(ctx, model_cfg, replace(train_cfg, progressive_from=side / ctx.dataset.image_size))


def _accuracy(ctx: BenchContext, trained: Trained) -> list[float]:
    return [round(float(a), 4) for a in ctx.outputs(trained, "test").correct().mean(1)]


def _network(ctx: BenchContext, name: str, model_cfg: ModelConfig, train_cfg: TrainConfig) -> dict:
    log(f"{name} network: {model_cfg.arch}, {train_cfg.epochs} epochs (trains once, then cached)")
    trained = Trained(*train_cached(model_cfg, replace(train_cfg, threads=ctx.threads), ctx.dataset,
                                    cache_dir=ctx.cache_dir, progress=True))
    legacy = ctx.recipe.legacy(name)
    precision = resolve_precision(train_cfg.precision)
    log(f"{name}: one epoch of the old schedule in fp32, then one of the new in {precision} (side by side)")
    fp32_epoch = _epoch_seconds(ctx, model_cfg, replace(legacy, precision="fp32"))
    epochs_by_side = Counter(input_size(e, ctx.dataset.image_size, train_cfg) for e in range(train_cfg.epochs))
    by_side = {side: _epoch_seconds_at(ctx, model_cfg, train_cfg, side) for side in sorted(epochs_by_side)}
    new_schedule_s = sum(n * by_side[side] for side, n in epochs_by_side.items())
    new_epoch = new_schedule_s / train_cfg.epochs  # the mean over the schedule's image sizes
    train_s = float(trained.meta.extra.get("train_seconds", 0.0))
    acc = _accuracy(ctx, trained)
    row = {
        "arch": model_cfg.arch,
        "epochs": train_cfg.epochs,
        "precision": precision,
        "label_smoothing": train_cfg.label_smoothing,
        "train_s": round(train_s, 1),
        "s_per_epoch": round(train_s / train_cfg.epochs, 2),
        "acc": acc,
        "final_acc": acc[-1],
        "fp32_s_per_epoch": round(fp32_epoch, 4),
        "new_s_per_epoch_now": round(new_epoch, 4),
        # progressive resizing: the epochs at each image side, and one epoch's time at it now
        "epochs_by_side": {str(side): n for side, n in sorted(epochs_by_side.items())},
        "s_per_epoch_by_side": {str(side): round(t, 4) for side, t in by_side.items()},
        "legacy_epochs": legacy.epochs,
        "legacy_train_s_est": round(legacy.epochs * fp32_epoch, 1),
        # both epochs timed in this run: the ratio of whole trainings, new over old
        "time_ratio": round(train_cfg.epochs * new_epoch / (legacy.epochs * fp32_epoch), 3),
        # the cached run's own time over the old schedule's estimate from this run
        "time_ratio_cached": round(train_s / (legacy.epochs * fp32_epoch), 3),
    }
    log(f"{name}: test acc per exit {acc}; {train_cfg.epochs} epochs in {train_s:.0f} s ({precision}); "
        f"old schedule {legacy.epochs} x {fp32_epoch:.1f} s fp32; time ratio {row['time_ratio']:.3f}")
    return row


def _fp32_run(ctx: BenchContext, model_cfg: ModelConfig, train_cfg: TrainConfig) -> dict:
    cfg = replace(train_cfg, precision="fp32", threads=ctx.threads)
    log(f"edge recipe in fp32 end to end, {cfg.epochs} epochs (trains once, then cached)")
    trained = Trained(*train_cached(model_cfg, cfg, ctx.dataset, cache_dir=ctx.cache_dir, progress=True))
    train_s = float(trained.meta.extra.get("train_seconds", 0.0))
    acc = _accuracy(ctx, trained)
    return {"precision": "fp32", "epochs": cfg.epochs, "train_s": round(train_s, 1),
            "s_per_epoch": round(train_s / cfg.epochs, 2), "acc": acc, "final_acc": acc[-1]}


def run(ctx: BenchContext, args: argparse.Namespace) -> dict:
    rec = ctx.recipe
    result: dict = {
        "edge": _network(ctx, "edge", rec.edge_model, rec.edge_joint_train()),
        "cloud": _network(ctx, "cloud", rec.cloud_model, rec.cloud_train),
    }
    if args.compare_fp32:
        result["edge"]["fp32_run"] = _fp32_run(ctx, rec.edge_model, rec.edge_joint_train())
    _plot(ctx, result)
    return result


def _plot(ctx: BenchContext, result: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    names = ["edge", "cloud"]
    old = [result[n]["legacy_train_s_est"] / 60 for n in names]
    new = [result[n]["epochs"] * result[n]["new_s_per_epoch_now"] / 60 for n in names]
    xs = range(len(names))
    left.bar([x - 0.2 for x in xs], old, width=0.4, label="old schedule, fp32")
    bars = left.bar([x + 0.2 for x in xs], new, width=0.4, label="new schedule")
    for bar, n in zip(bars, names):
        left.annotate(f"x{result[n]['time_ratio']:.2f}", (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                      ha="center", va="bottom", fontsize=9)
    left.set_xticks(list(xs), [f"{n}\n{result[n]['arch']}" for n in names])
    left.set_ylabel("training time (min, epochs timed in this run)")
    left.legend(fontsize=8)
    left.set_title("training time, new over old")
    edge = result["edge"]
    exits = list(range(1, len(edge["acc"]) + 1))
    right.plot(exits, edge["acc"], "o-", label=f"edge, {edge['precision']}, {edge['epochs']} epochs")
    if "fp32_run" in edge:
        right.plot(exits, edge["fp32_run"]["acc"], "s--", label=f"edge, fp32, {edge['epochs']} epochs")
    right.axhline(result["cloud"]["final_acc"], color="black", linestyle="-.",
                  label=f"cloud {result['cloud']['arch']} {result['cloud']['final_acc']:.3f}")
    for x, a in zip(exits, edge["acc"]):
        right.annotate(f"{a:.3f}", (x, a), textcoords="offset points", xytext=(0, 6), ha="center", fontsize=8)
    right.set_xticks(exits, [f"exit {k}" for k in exits[:-1]] + ["final"])
    right.set_ylabel("test accuracy")
    right.legend(fontsize=8, loc="lower right")
    right.set_title("edge network's exits")
    fig.tight_layout()
    fig.savefig(ctx.out / "train.png", dpi=120)
    plt.close(fig)
