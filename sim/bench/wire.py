"""`bench wire`: what each feature codec costs on the wire and in accuracy, through the
real path.

The reference edge network is exported as a bundle cut after `--split` (default: its last
exit) with a policy fitted on the validation split. A real cloud worker (grpc.aio, the
`splitexit.cloud` server) serves it on 127.0.0.1 from its own event loop thread, and for
each codec an `EdgeAgent` with a `GrpcTransport` runs the whole test split through it:
the edge's exits answer what they can, the rest goes over gRPC as features in that codec.
Every request is counted as it leaves the agent (feature bytes, whole-request bytes, rows).

Per codec: `bytes_per_sample` (feature bytes per offloaded sample: the encoded tensor
message, quantization parameters included), the same per input sample, whole-request
bytes (policy state and ids too), `acc`, `agreement` with the whole network run in this
process under the same policy (ExitRunner on the trained network), the offload rate and
degraded answers (must be 0). Beside them: the test images as PNG and as JPEG (quality
90), what a cloud-only strategy would send per sample.
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from splitexit import wire
from splitexit.cloud.server import ServerConfig
from splitexit.cloud.served import load_models
from splitexit.codec import CODECS, encoded_bytes
from splitexit.edge import AgentConfig, EdgeAgent, GrpcTransport
from splitexit.edge.results import Answer
from splitexit.proto import inference_pb2 as pb
from splitexit.sim.bench.common import BenchContext, log
from splitexit.sim.bench.serving import (SplitBundle, WorkerThread, add_bundle_arguments, reference_answers,
                                         split_bundle)

HELP = "bytes per sample and accuracy of each feature codec through the real edge -> gRPC -> cloud path"
JPEG_QUALITY = 90
FP32_AGREEMENT = 0.999  # fp32 is lossless on the wire: only batch-order float noise may differ


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_bundle_arguments(parser)
    parser.add_argument("--chunk", type=int, default=256, help="images per EdgeAgent.infer call (default: %(default)s)")


@dataclass
class _Tally:
    """What left the agent through one transport (mutable: counted as requests go out)."""

    requests: int = 0
    rows: int = 0
    request_bytes: int = 0  # whole InferRequests: feature, policy state, ids, edge exit infos
    feature_bytes: int = 0  # the feature's Tensor message: data, shape, quantization
    data_bytes: int = 0  # the feature's data field alone


class CountingTransport:
    """A Transport that counts every request on its way to the wrapped one."""

    def __init__(self, inner: GrpcTransport, tally: _Tally) -> None:
        self.inner = inner
        self.tally = tally
        self.name = inner.name

    async def infer(self, request: pb.InferRequest, timeout: float) -> pb.InferResponse:
        t = self.tally
        t.requests += 1
        t.rows += len(request.sample_ids)
        t.request_bytes += request.ByteSize()
        if request.HasField("feature"):
            t.feature_bytes += request.feature.ByteSize()
            t.data_bytes += len(request.feature.data)
        return await self.inner.infer(request, timeout)

    async def model_info(self, timeout: float) -> pb.ModelInfo:
        return await self.inner.model_info(timeout)

    async def health(self, timeout: float) -> str:
        return await self.inner.health(timeout)

    async def close(self) -> None:
        await self.inner.close()


@dataclass(frozen=True)
class CodecRun:
    codec: str
    answers: list[Answer]
    tally: _Tally


async def _run_codec(bundle: SplitBundle, address: str, codec: str, images: np.ndarray, chunk: int) -> CodecRun:
    tally = _Tally()
    transport = CountingTransport(GrpcTransport(address), tally)
    # a generous timeout: a loaded machine must not turn slow answers into degraded ones
    config = AgentConfig(codec=codec, request_timeout_ms=120_000.0)
    answers: list[Answer] = []
    async with EdgeAgent(bundle.path, transport, config=config) as agent:
        for start in range(0, len(images), chunk):
            batch = images[start:start + chunk]
            answers += await agent.infer(batch, [str(start + i) for i in range(len(batch))])
    return CodecRun(codec, answers, tally)


def input_bytes(images: np.ndarray) -> dict[str, float]:
    """Mean bytes per test image as PNG and as JPEG: what a cloud-only strategy sends."""
    png = wire.encode_raw_input(images, "png")
    jpeg = wire.encode_raw_input(images, "jpeg", quality=JPEG_QUALITY)
    return {"input_png_bytes": round(float(np.mean([len(b) for b in png])), 1),
            "input_jpeg_bytes": round(float(np.mean([len(b) for b in jpeg])), 1),
            "input_raw_bytes": int(np.prod(images.shape[1:]))}


def _codec_entry(run: CodecRun, labels: np.ndarray, ref_labels: np.ndarray, ref_exits: np.ndarray) -> dict:
    n = len(labels)
    got = np.array([a.label for a in run.answers])
    exits = np.array([a.exit for a in run.answers])
    routes = [a.route for a in run.answers]
    t = run.tally
    offloaded = max(t.rows, 1)
    reasons: dict[str, int] = {}
    for a in run.answers:
        if a.route == "degraded":
            reasons[a.reason or "?"] = reasons.get(a.reason or "?", 0) + 1
    return {
        "bytes_per_sample": round(t.feature_bytes / offloaded, 1),
        "bytes_per_input_sample": round(t.feature_bytes / n, 1),
        "data_bytes_per_sample": round(t.data_bytes / offloaded, 1),
        "request_bytes_per_sample": round(t.request_bytes / offloaded, 1),
        "request_bytes_per_input_sample": round(t.request_bytes / n, 1),
        "acc": round(float((got == labels).mean()), 5),
        "agreement": round(float((got == ref_labels).mean()), 5),
        "exit_agreement": round(float((exits == ref_exits).mean()), 5),
        "offload_rate": round(t.rows / n, 4),
        "offloaded": t.rows,
        "requests": t.requests,
        "routes": {r: routes.count(r) for r in ("edge", "cloud", "degraded")},
        "degraded": routes.count("degraded"),
        "degraded_reasons": reasons,
    }


def run(ctx: BenchContext, args: argparse.Namespace) -> dict:
    test = ctx.dataset.test
    with tempfile.TemporaryDirectory(prefix="splitexit-wire-") as tmp:
        bundle = split_bundle(ctx, Path(tmp), split=args.split, policy=args.policy, budget=args.budget)
        summary = bundle.summary()
        feature_shape = tuple(summary["feature_shape"])
        log(f"bundle cut after stage {bundle.split}: feature {list(feature_shape)} per sample")
        ref_labels, ref_exits = reference_answers(bundle, test)
        runs: dict[str, CodecRun] = {}
        config = ServerConfig(host="127.0.0.1", port=0, drain_grace_s=1.0)
        with WorkerThread(config, load_models([bundle.path])) as worker:
            log(f"cloud worker on {worker.address} (own event loop thread)")
            for codec in CODECS:
                runs[codec] = asyncio.run(_run_codec(bundle, worker.address, codec, test.images, args.chunk))
                log(f"  {codec}: {runs[codec].tally.requests} requests, {runs[codec].tally.rows} rows offloaded")
    result: dict = {
        **summary,
        "samples": len(test),
        "reference_acc": round(float((ref_labels == test.labels).mean()), 5),
        "fp32_feature_bytes": encoded_bytes("fp32", (1, *feature_shape)),
        "encoded_bytes": {c: encoded_bytes(c, (1, *feature_shape)) for c in CODECS},  # per row, 1-row request
        **input_bytes(test.images),
        "jpeg_quality": JPEG_QUALITY,
        "codecs": {c: _codec_entry(r, test.labels, ref_labels, ref_exits) for c, r in runs.items()},
    }
    codecs = result["codecs"]
    result["int8_acc_delta_points"] = round(100 * (codecs["int8"]["acc"] - codecs["fp32"]["acc"]), 3)
    result["int8_bytes_ratio"] = round(codecs["fp32"]["bytes_per_sample"] / codecs["int8"]["bytes_per_sample"], 3)
    result["fp32_agreement_ok"] = codecs["fp32"]["agreement"] >= FP32_AGREEMENT
    result["degraded_total"] = sum(c["degraded"] for c in codecs.values())
    log(f"offload rate {codecs['fp32']['offload_rate']:.3f}; input PNG {result['input_png_bytes']:.0f} B, "
        f"JPEG q{JPEG_QUALITY} {result['input_jpeg_bytes']:.0f} B per image")
    for name, c in codecs.items():
        log(f"{name:>16}: {c['bytes_per_sample']:9.1f} B per offloaded sample ({c['bytes_per_input_sample']:.1f} per "
            f"input), acc {c['acc']:.4f}, agreement {c['agreement']:.4f}, degraded {c['degraded']}")
    log(f"int8 vs fp32: {result['int8_acc_delta_points']:+.2f} points, {result['int8_bytes_ratio']:.2f}x fewer bytes")
    if not result["fp32_agreement_ok"]:
        log(f"WARNING: fp32 agreement {codecs['fp32']['agreement']:.4f} < {FP32_AGREEMENT}")
    if result["degraded_total"]:
        log(f"WARNING: {result['degraded_total']} degraded answers (expected 0)")
    plot(ctx, result)
    return result


def plot(ctx: BenchContext, result: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    codecs = result["codecs"]
    names = [*codecs, "PNG input", f"JPEG q{JPEG_QUALITY} input"]
    per_offloaded = [codecs[c]["bytes_per_sample"] for c in codecs] + [result["input_png_bytes"],
                                                                        result["input_jpeg_bytes"]]
    per_input = [codecs[c]["bytes_per_input_sample"] for c in codecs] + [result["input_png_bytes"],
                                                                          result["input_jpeg_bytes"]]
    x = np.arange(len(names))
    fig, ax = plt.subplots(figsize=(8, 4.5))
    ax.bar(x - 0.2, per_offloaded, 0.4, label="per offloaded sample", color="tab:blue")
    ax.bar(x + 0.2, per_input, 0.4, label="per input sample (edge exits send nothing)", color="tab:orange")
    for i, c in enumerate(codecs):
        ax.annotate(f"acc {codecs[c]['acc']:.3f}", (x[i] - 0.2, per_offloaded[i]), ha="center", va="bottom",
                    fontsize=7)
    ax.set_xticks(x, names, rotation=15)
    ax.set_ylabel("bytes")
    ax.set_title(f"feature bytes after stage {result['split']} per codec vs compressed input")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(ctx.out / "wire.png", dpi=120)
    plt.close(fig)
