"""Test-only helpers for the edge tests: a tiny exported bundle, a cloud tail handler that
runs `ExitRunner` on the cloud part (decoding requests with `splitexit.wire`), and the
reference answers of the whole model run in one process.

Loaded by path from the tests (pytest runs with --import-mode=importlib, so `tests` is
not importable as a package).
"""

from __future__ import annotations

import asyncio
import contextlib
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from splitexit import wire
from splitexit.bundle import export_bundle, load_bundle
from splitexit.checkpoint import CheckpointMeta
from splitexit.codec import CodecError, decode
from splitexit.models import ModelConfig, build_model
from splitexit.proto import inference_pb2 as pb
from splitexit.runtime import ExitRunner, RowState

CONFIG = ModelConfig(arch="resnet14_tiny", in_chans=1, exit_after=(1, 2, 3, 4, 5))
SHAPE = (1, 8, 8)
CLASSES = tuple(f"c{i}" for i in range(10))


def tiny_model(seed: int = 0):
    torch.manual_seed(seed)
    model = build_model(CONFIG).eval()
    with torch.no_grad():  # sharpen the random heads so that rows leave at different exits
        for p in model.parameters():
            p.mul_(1.5)
    meta = CheckpointMeta(model=CONFIG, mean=(0.5,), std=(0.25,), classes=CLASSES)
    return model, meta


def median_threshold(model, x: torch.Tensor) -> float:
    with torch.no_grad():
        conf = torch.stack([z.softmax(-1).max(-1).values for z in model.forward_exits(x)])
    return float(conf[:-1].median())


def exit_thresholds(model, x: torch.Tensor, q: float = 0.7) -> tuple[float, ...]:
    """Per-exit max-prob thresholds that let about 1 - q of the rows reaching each exit leave."""
    with torch.no_grad():
        conf = torch.stack([z.softmax(-1).max(-1).values for z in model.forward_exits(x)])
    return tuple(float(c.quantile(q)) for c in conf)


def export(tmp_path: Path, model, meta, policy, *, split: int = 2, codec: str = "fp32", name: str = "tiny",
           large=None) -> Path:
    return export_bundle(tmp_path / f"bundle-{name}-{split}-{codec}", model, meta, split=split, policy=policy,
                         input_shape=SHAPE, codec=codec, name=name, large=large)


def images(n: int, seed: int = 1) -> np.ndarray:
    """uint8 images [n, 8, 8, 1]."""
    return np.random.default_rng(seed).integers(0, 256, size=(n, 8, 8, 1), dtype=np.uint8)


def batch(meta, n: int) -> tuple[np.ndarray, torch.Tensor]:
    """n images (uint8 [n, 8, 8, 1]) and the network's input for them (normalized with meta)."""
    from splitexit.data import Normalize

    pixels = images(n)
    return pixels, Normalize(meta.mean, meta.std)(torch.from_numpy(pixels))


def reference(model, policy, x: torch.Tensor, exits: list[int]) -> list[tuple[int, int]]:
    """(label, exit stage) per row of the whole model under `policy`, in one process."""
    result = ExitRunner(model, policy, num_classes=len(CLASSES)).run(x)
    merged = result.merged()
    out: list[tuple[int, int]] = [(-1, -1)] * len(x)
    for row, probs, k in zip(merged.rows.tolist(), merged.probs, merged.exit_index.tolist()):
        out[row] = (int(probs.argmax()), exits[k])
    return out


class StatusError(Exception):
    """What a handler raises to answer with a gRPC status (the transport maps `.code`)."""

    def __init__(self, code: str, message: str = "") -> None:
        super().__init__(message or code)
        self.code = code


@dataclass
class TailHandler:
    """A cloud worker's Infer in one process: validates like a worker would and runs the
    tail of the cloud part with the edge's policy state."""

    bundle_path: Path
    worker_id: str = "tail"
    fail: str | None = None  # a status code name to answer every call with
    delay_s: float = 0.0
    calls: int = 0
    rows: int = 0
    requests: list[pb.InferRequest] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.bundle = load_bundle(self.bundle_path, "cloud")
        self.runner = ExitRunner(self.bundle.model, self.bundle.policy, num_classes=len(self.bundle.classes),
                                 network=self.bundle.network)
        self.spec = wire.state_spec(self.runner)
        self.exits = list(self.bundle.manifest.exits)

    def model_info(self, *, bundle_hash: str | None = None) -> pb.ModelInfo:
        b = self.bundle
        spec = pb.ModelSpec(name=b.name, bundle_hash=bundle_hash or b.hash, arch=b.manifest.model.arch,
                            splits=[pb.SplitPoint(split=b.split, feature_shape=b.feature_shape)],
                            input_shape=b.input_shape, classes=b.classes,
                            codecs=["fp32", "fp16", "int8", "int8-per-channel"], raw_formats=["png", "u8"])
        return pb.ModelInfo(protocol_version=1, models=[spec], worker_id=self.worker_id,
                            limits=pb.Limits(max_message_bytes=4 << 20, max_batch_rows=64))

    async def __call__(self, request: pb.InferRequest) -> pb.InferResponse:
        self.calls += 1
        if self.delay_s:
            await asyncio.sleep(self.delay_s)
        if self.fail:
            raise StatusError(self.fail, f"test worker answers {self.fail}")
        if request.bundle_hash != self.bundle.hash:
            raise StatusError("FAILED_PRECONDITION", "bundle hash mismatch")
        self.requests.append(request)
        self.rows += len(request.sample_ids)
        n = len(request.sample_ids)
        if not request.HasField("feature"):  # raw input: a stand-in for the larger network
            decoded = wire.decode_raw_input(request.raw_input.format, request.raw_input.items, self.bundle.input_shape)
            rows = [pb.RowResult(sample_id=s, label=int(decoded[i].sum()) % 10, exit_index=0,
                                 network=wire.larger_network_name(self.bundle.name), confidence=1.0)
                    for i, s in enumerate(request.sample_ids)]
            return pb.InferResponse(request_id=request.request_id, rows=rows, worker_id=self.worker_id)
        try:
            feature = torch.from_numpy(decode(request.feature, expect_shape=self.bundle.feature_shape))
            entries = wire.decode_policy_state(request.policy_state, self.spec, rows=n)
            state = RowState.from_wire(entries, self.runner.initial_state(n))
        except (CodecError, wire.WireError) as exc:
            raise StatusError("INVALID_ARGUMENT", str(exc)) from None
        result = self.runner.run(feature, start=self.bundle.split + 1, state=state, rows=np.arange(n))
        merged = result.merged()
        by_row = {}
        for row, probs, k in zip(merged.rows.tolist(), merged.probs, merged.exit_index.tolist()):
            by_row[row] = pb.RowResult(sample_id=request.sample_ids[row], label=int(probs.argmax()),
                                       exit_index=self.exits[k], network=self.bundle.name,
                                       confidence=float(probs.max()))
        return pb.InferResponse(request_id=request.request_id, rows=[by_row[i] for i in range(n)],
                                worker_id=self.worker_id, timing=pb.ServerTiming(batch_size=n))


@contextlib.contextmanager
def cloud_worker(bundle: Path, *extra: str, env: dict[str, str] | None = None,
                 cwd: Path | None = None) -> Iterator[str]:
    """`splitexit cloud serve BUNDLE` in a process of its own on 127.0.0.1 (any free port,
    no mDNS); yields its address once it serves, stops it (SIGTERM) after."""
    proc = subprocess.Popen([sys.executable, "-m", "splitexit.cli", "cloud", "serve", str(bundle), "--host",
                             "127.0.0.1", "--port", "0", "--no-advertise", "--grace", "1", *extra],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=cwd)
    try:
        assert proc.stdout is not None and proc.stderr is not None
        line = proc.stdout.readline()
        if " on " not in line:
            proc.kill()
            raise AssertionError(f"the worker did not start: {line!r} {proc.stderr.read()[-2000:]}")
        yield line.split(" on ", 1)[1].split()[0]
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        for stream in (proc.stdout, proc.stderr):
            if stream is not None:
                stream.close()
