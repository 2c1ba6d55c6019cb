"""`bench models`: the reference networks themselves: per-exit test accuracy of the edge
network, the larger cloud network, and BoF vs pooling exit heads at every block of the
frozen edge backbone, with training time and MACs."""

from __future__ import annotations

import argparse

import numpy as np

from splitexit.sim.bench.common import BenchContext, log

HELP = "reference models: per-exit accuracy, BoF vs pooling heads, training time"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    pass


def _summary(ctx: BenchContext, trained) -> dict:
    test = ctx.outputs(trained, "test")
    costs = ctx.costs(trained)
    extra = trained.meta.extra
    exits = trained.model.exit_points
    return {
        "arch": trained.meta.model.arch,
        "exit_head": trained.meta.model.exit_head if exits else None,
        "exit_after": list(exits),
        "exit_acc": [round(float(a), 4) for a in test.correct().mean(1)],
        "final_acc": round(float(test.correct()[-1].mean()), 4),
        "oracle_acc": round(float(test.correct().any(0).mean()), 4),
        "macs": costs.total_macs,
        "head_macs": [costs.exit_macs[k] for k in exits],
        "train_seconds": round(float(extra.get("train_seconds", 0.0)), 1),
        "epochs": len(extra.get("history", [])),
        "train_mode": extra.get("train", {}).get("mode"),
    }


def run(ctx: BenchContext, args: argparse.Namespace) -> dict:
    edge = ctx.edge()
    # the edge network is its backbone (trained alone) plus exits trained on it frozen
    backbone = ctx.recipe.train_backbone(ctx.dataset, ctx.cache_dir, threads=ctx.threads)
    result = {"edge": _summary(ctx, edge), "edge_backbone": _summary(ctx, backbone)}
    result["edge"]["train_seconds_total"] = round(result["edge"]["train_seconds"]
                                                  + result["edge_backbone"]["train_seconds"], 1)
    log(f"edge: final {result['edge']['final_acc']:.4f}, exits {result['edge']['exit_acc']}")
    result["cloud"] = _summary(ctx, ctx.cloud())
    log(f"cloud: final {result['cloud']['final_acc']:.4f}")
    heads = {}
    for kind in ("bof", "pool"):
        log(f"{kind} exit heads at blocks {list(ctx.recipe.head_exits)} on the frozen edge backbone")
        heads[kind] = _summary(ctx, ctx.recipe.train_heads(ctx.dataset, ctx.cache_dir, kind, threads=ctx.threads))
        log(f"{kind}: exits {heads[kind]['exit_acc'][:-1]}")
    result["heads"] = heads
    _plot(ctx, result)
    return result


def _plot(ctx: BenchContext, result: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for kind, style in (("bof", "o-"), ("pool", "s--")):
        h = result["heads"][kind]
        ax.plot(h["exit_after"], h["exit_acc"][:-1], style, label=f"{kind} heads (frozen backbone)")
    e = result["edge"]
    ax.plot(e["exit_after"], e["exit_acc"][:-1], "^:", label="edge network's exits (BoF)")
    ax.axhline(e["final_acc"], color="gray", linestyle="--", label=f"edge final {e['final_acc']:.3f}")
    ax.axhline(result["cloud"]["final_acc"], color="black", linestyle="-.",
               label=f"cloud {result['cloud']['arch']} {result['cloud']['final_acc']:.3f}")
    ax.set_xlabel("exit after block")
    ax.set_ylabel("test accuracy")
    ax.set_ylim(0, 1) if ctx.quick else ax.set_ylim(max(0.0, float(np.min(result["heads"]["pool"]["exit_acc"])) - 0.1), 1)
    ax.legend(fontsize=8, loc="lower right")
    ax.set_title("per-exit accuracy: BoF vs pooling exit heads")
    fig.tight_layout()
    fig.savefig(ctx.out / "models.png", dpi=120)
    plt.close(fig)
