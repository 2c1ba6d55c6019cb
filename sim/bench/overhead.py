"""`bench overhead`: what the exit heads and the policy cost next to the edge network, on
both edge engines, side by side in one run.

Per engine and batch size, timed interleaved in one process (median of repeats), one
thread each (torch's intra-op threads, ONNX Runtime's), so the ratios hold on any machine:
- `edge_ms`: the network alone, every stage and the final head, no exits (torch: the
  module; onnx: the same as one exported graph).
- `exit_ms`: every exit head on its stage's feature plus the policy's decision at each
  exit. torch: the heads called on precomputed features. onnx: the heads live inside the
  segments the agent runs (`splitexit.onnx_export`), so their cost is the segments'
  time with heads minus the same segments exported without heads; plus the policy.
- `runtime_ms`: what the edge agent really runs, `ExitRunner.run` on that engine with
  every exit evaluated and no row leaving early (β at the top of its range): heads,
  policy, the runner's row bookkeeping and, on onnx, one session call per segment;
  `runtime_ratio` is its time over `edge_ms`, minus one.

`ratio` = exit_ms / edge_ms at the worst batch size, on the engine the agent runs by
default (onnx); `ratio_torch` and `ratio_onnx` beside it. `onnx_speedup` per batch: the
network's time in torch over ONNX Runtime's.
"""

from __future__ import annotations

import argparse
import random
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np
import torch

from splitexit.policies import BoFBeta, step
from splitexit.runtime import ExitRunner
from splitexit.sim.bench.common import BenchContext, add_untrained_argument, log

HELP = "exit heads + policy time and MACs over the edge network's (ratio), torch and ONNX Runtime side by side"
ENGINES = ("torch", "onnx")
DEFAULT_ENGINE = "onnx"  # what `splitexit edge run` picks for a bundle exported with segments


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--batch-sizes", default="1,8,32,64", help="comma-separated batch sizes to time")
    parser.add_argument("--repeats", type=int, default=0,
                        help="timed repeats at batch 1 (default 300, 20 with --quick; fewer at larger batches)")
    add_untrained_argument(parser)


def _time_interleaved(calls: Mapping[str, Callable[[], object]], repeats: int) -> dict[str, list[float]]:
    """Every call's times in ms, taking turns in a shuffled order so that drift, noise and
    whatever the previous call left in the caches hit them alike (a fixed order moved the
    ONNX heads' share at batch 1 by a factor of three). One engine's calls per group: a
    60 ms torch call before a 1 ms ONNX one would leave it caches no agent sees."""
    order = random.Random(0)
    for _ in range(max(3, repeats // 10)):
        for call in calls.values():
            call()
    times: dict[str, list[float]] = {name: [] for name in calls}
    for _ in range(repeats):
        for name in order.sample(list(calls), len(calls)):
            t0 = time.perf_counter()
            calls[name]()
            times[name].append((time.perf_counter() - t0) * 1e3)
    return times


def _median(times: list[float]) -> float:
    return statistics.median(times)


def _paired(more: list[float], less: list[float]) -> float:
    """The median of per-turn differences: what `more` adds over `less`, with the drift
    between turns cancelled (a head is a few percent of a segment)."""
    return statistics.median(a - b for a, b in zip(more, less))


class _OnnxEdge:
    """The network on ONNX Runtime three ways: the plain graph, the segments with their
    heads (what the agent runs) and the same segments without heads."""

    def __init__(self, model: Any, input_shape: tuple[int, ...], workdir: Path) -> None:
        import onnxruntime as ort

        from splitexit.edge.engine import OnnxEngine
        from splitexit.onnx_export import export_edge_segments, export_plain

        last = model.num_stages - 1
        exits = (*model.exit_points, last)
        with_heads = export_edge_segments(model, last, input_shape, workdir)
        stages_only = export_edge_segments(model, last, input_shape, workdir, heads=False)
        export_plain(model, input_shape, workdir / "plain.onnx")
        # the whole network on the device: no feature at a cut to check
        self.heads = OnnxEngine(workdir, with_heads, exits=exits, input_shape=input_shape, feature_shapes={})
        self.stages = OnnxEngine(workdir, stages_only, exits=exits, input_shape=input_shape, feature_shapes={})
        self.segments = [(s.first, s.last) for s in with_heads]
        options = ort.SessionOptions()
        options.intra_op_num_threads, options.inter_op_num_threads = 1, 1
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        self.plain = ort.InferenceSession(str(workdir / "plain.onnx"), options, providers=["CPUExecutionProvider"])

    def chain(self, engine: Any, x: np.ndarray, *, head: bool) -> list[np.ndarray]:
        """Every segment in turn on all rows; the probabilities of each exit (with `head`)."""
        probs = []
        for first, last in self.segments:
            x, p = engine.advance(x, first, last, head=head, rows=None)
            if p is not None:
                probs.append(p)
        return probs


def _policy_steps(policy: BoFBeta, probs: list[np.ndarray], num_classes: int) -> object:
    """The policy's decision at every exit (all rows evaluate each one)."""
    state = policy.init_state(len(probs[0]), num_classes)
    out = None
    for k, p in enumerate(probs[:-1]):
        out, state = step(policy, k, p, state, len(probs))
    return out


def run(ctx: BenchContext, args: argparse.Namespace) -> dict:
    edge = ctx.edge()
    model = edge.model.eval()
    classes = edge.meta.model.num_classes
    costs = ctx.costs(edge)
    fitted = BoFBeta.fit(ctx.outputs(edge, "train_stats").probs)
    policy = fitted.with_beta(fitted.beta_range()[1])  # no row leaves early: every exit is evaluated
    exits = model.exit_points
    base_repeats = args.repeats or (20 if ctx.quick else 300)
    result: dict = {
        "edge_macs": costs.total_macs,
        "head_macs": [costs.exit_macs[k] for k in exits],
        "exit_macs": sum(costs.exit_macs[k] for k in exits),
        "policy": "bof_beta",
        "engine": DEFAULT_ENGINE,
        "threads": 1,
        "by_batch": {},
    }
    result["macs_ratio"] = round(result["exit_macs"] / result["edge_macs"], 5)
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(1)  # one thread each: ONNX Runtime's sessions run one intra-op thread
    try:
        with tempfile.TemporaryDirectory(prefix="splitexit-overhead-") as tmp:
            log("exporting the network as ONNX segments (with and without heads) and as one plain graph")
            onnx = _OnnxEdge(model, ctx.input_shape, Path(tmp))
            runners = {"torch": ExitRunner(model, policy, num_classes=classes),
                       "onnx": ExitRunner(onnx.heads, policy, num_classes=classes)}
            for batch in [int(b) for b in args.batch_sizes.split(",") if b.strip()]:
                repeats = max(5, base_repeats // max(1, batch // 4)) if batch > 4 else base_repeats
                result["by_batch"][str(batch)] = _measure(model, onnx, runners, policy, classes, batch,
                                                          ctx.input_shape, repeats)
    finally:
        torch.set_num_threads(previous_threads)
    # the headline figures: the worst batch size measured, per engine
    for engine in ENGINES:
        worst = max(result["by_batch"].values(), key=lambda r: r[engine]["ratio"])[engine]
        result[f"ratio_{engine}"] = worst["ratio"]
        result[f"runtime_ratio_{engine}"] = max(r[engine]["runtime_ratio"] for r in result["by_batch"].values())
    worst = max(result["by_batch"].values(), key=lambda r: r[DEFAULT_ENGINE]["ratio"])[DEFAULT_ENGINE]
    result.update(edge_ms=worst["edge_ms"], exit_ms=worst["exit_ms"], ratio=worst["ratio"],
                  runtime_ratio=result[f"runtime_ratio_{DEFAULT_ENGINE}"])
    return result


def _measure(model: Any, onnx: _OnnxEdge, runners: Mapping[str, ExitRunner], policy: BoFBeta, classes: int,
             batch: int, input_shape: tuple[int, ...], repeats: int) -> dict[str, Any]:
    exits = model.exit_points
    x = torch.randn(batch, *input_shape)
    xa = x.numpy()
    with torch.inference_mode():
        _, feats = model.forward_intermediates(x, indices=exits)
        torch_probs = [model.exit_logits(k, f).softmax(-1).numpy() for k, f in zip(exits, feats)]
        torch_probs.append(model(x).softmax(-1).numpy())
    onnx_probs = onnx.chain(onnx.heads, xa, head=True)
    for name, runner in runners.items():
        answered = runner.run(x if name == "torch" else xa).merged()
        if answered is None or bool((answered.exit_index != len(exits)).any()):
            raise RuntimeError(f"the timed {name} runner let rows leave early: it would not evaluate every exit")

    def torch_heads() -> object:
        with torch.inference_mode():
            probs = [model.exit_logits(k, f).softmax(-1).numpy() for k, f in zip(exits, feats)]
        return _policy_steps(policy, [*probs, torch_probs[-1]], classes)

    def torch_plain() -> object:
        with torch.inference_mode():
            return model(x)

    t = _time_interleaved({"edge": torch_plain, "exits": torch_heads, "runtime": lambda: runners["torch"].run(x)},
                          repeats)
    # the runner in a group of its own: it calls the segments with heads, and in the heads'
    # group it would leave those sessions warmer than the stages-only ones they are paired with
    o = _time_interleaved({"edge": lambda: onnx.plain.run(None, {"x": xa}),
                           "heads": lambda: onnx.chain(onnx.heads, xa, head=True),
                           "stages": lambda: onnx.chain(onnx.stages, xa, head=False)}, repeats)
    o.update(_time_interleaved({"runtime_edge": lambda: onnx.plain.run(None, {"x": xa}),
                                "runtime": lambda: runners["onnx"].run(xa)}, repeats))
    policy_ms = _median(_time_interleaved({"policy": lambda: _policy_steps(policy, onnx_probs, classes)},
                                          max(repeats, 200))["policy"])
    onnx_heads = max(_paired(o["heads"], o["stages"]), 0.0)
    rows = {
        "torch": _row(_median(t["edge"]), _median(t["exits"]), _median(t["runtime"])),
        "onnx": _row(_median(o["edge"]), onnx_heads + policy_ms, _median(o["runtime"])),
    }
    # the runner's overhead against the plain graph timed in its own group
    rows["onnx"]["runtime_edge_ms"] = round(_median(o["runtime_edge"]), 4)
    rows["onnx"]["runtime_ratio"] = round(_median(o["runtime"]) / _median(o["runtime_edge"]) - 1, 4)
    rows["onnx"].update(heads_ms=round(onnx_heads, 4), policy_ms=round(policy_ms, 4),
                        segments_ms=round(_median(o["stages"]), 4))
    ms = {"torch_edge": rows["torch"]["edge_ms"], "onnx_edge": rows["onnx"]["edge_ms"]}
    agree = max(float(np.abs(a - b).max()) for a, b in zip(onnx_probs, torch_probs))
    out = {**rows, "onnx_speedup": round(ms["torch_edge"] / ms["onnx_edge"], 3), "repeats": repeats,
           "onnx_vs_torch_max_prob_diff": agree}
    log(f"batch {batch}: " + "; ".join(
        f"{e} edge {r['edge_ms']:.3f} ms, exits+policy {r['exit_ms']:.3f} ms, ratio {r['ratio']:.4f}, "
        f"runner +{r['runtime_ratio']:.3f}" for e, r in rows.items()) + f"; torch/onnx edge {out['onnx_speedup']:.2f}x")
    return out


def _row(edge_ms: float, exit_ms: float, runtime_ms: float) -> dict[str, float]:
    return {"edge_ms": round(edge_ms, 4), "exit_ms": round(exit_ms, 4), "ratio": round(exit_ms / edge_ms, 4),
            "runtime_ms": round(runtime_ms, 4), "runtime_ratio": round(runtime_ms / edge_ms - 1, 4)}
