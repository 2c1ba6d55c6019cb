"""The head of an edge bundle run on a batch, and the offloads it leaves (runs in a
worker thread, off the event loop): inputs normalized, stages 0..split and their exits
run (`ExitRunner` on the bundle's engine: ONNX Runtime segments or eager torch), each
undecided row's own fallback answer noted, and the rows to offload packed into
`InferRequest`s within the worker's limits (features, with a cascade's raw input; raw
input alone for rows escalated on the edge). Torch-free unless the engine is torch's."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, Callable, Sequence

import numpy as np

from splitexit.arrays import to_numpy
from splitexit.codec import encoded_bytes
from splitexit.edge.config import REQUEST_OVERHEAD, AgentConfig
from splitexit.edge.transport import OffloadError
from splitexit.proto import inference_pb2 as pb

if TYPE_CHECKING:
    from splitexit.manifest import Bundle
    from splitexit.runtime import Engine, RowState
    from splitexit.wire import WireError

__all__ = ["EdgeHead", "Offload", "Prepared"]

log = logging.getLogger(__name__)


@dataclass
class Offload:
    """One InferRequest of a batch, and what the agent needs to answer its rows without it."""

    request: pb.InferRequest | None  # None when it could not be built (see error)
    kind: str  # "feature" | "raw"
    positions: list[int]  # rows of the batch, in request order
    error: OffloadError | None = None  # known before sending: answer the rows locally
    record: dict[str, Any] = field(default_factory=dict)


@dataclass
class Prepared:
    """The head's outcome for a batch (computed off the event loop)."""

    edge: list[tuple[int, int, np.ndarray, int]]  # (position, ladder exit, probs, evaluated)
    fallback: dict[int, tuple[int, np.ndarray | None, float]]  # position -> (ladder exit, probs, conf)
    evaluated: list[int]
    offloads: list[Offload]
    prepare_ms: float
    head_ms: float
    encode_ms: float


class EdgeHead:
    """The bundle's head with its policy, run by `engine` (default: torch on the bundle's
    model). `limits()` gives (rows, bytes) per request: the configured ones, lowered by
    what the worker advertises."""

    def __init__(self, bundle: "Bundle", config: AgentConfig, limits: Callable[[], tuple[int, int]],
                 engine: "Engine | None" = None) -> None:
        from splitexit.runtime import ExitRunner

        self.bundle = bundle
        self.config = config
        self.codec = config.codec or bundle.codec
        self._limits = limits
        if engine is None:
            from splitexit.runtime import TorchEngine

            engine = TorchEngine(bundle.model)
        self.engine: Engine = engine
        self.runner = ExitRunner(engine, bundle.policy, num_classes=len(bundle.classes), network=bundle.network)
        c = len(bundle.mean)
        self._mean = np.asarray(bundle.mean, dtype=np.float32).reshape(1, c, 1, 1)
        self._std = np.asarray(bundle.std, dtype=np.float32).reshape(1, c, 1, 1)
        self.exit_stages: tuple[int, ...] = bundle.manifest.exits
        cascade = any(network != 0 for network in bundle.network)
        self._raw_with_features = cascade if config.raw_with_features is None else config.raw_with_features

    def _inputs(self, inputs: Any) -> tuple[np.ndarray, np.ndarray | None]:
        """Normalized float32 inputs [B, C, H, W] and, when given as images, uint8 [B, H, W, C]."""
        c, h, w = self.bundle.input_shape
        if isinstance(inputs, (list, tuple)):
            if not inputs:
                raise ValueError("no inputs")
            inputs = np.stack([np.asarray(i) for i in inputs])
        inputs = to_numpy(inputs)  # a torch tensor: its values
        if not isinstance(inputs, np.ndarray):
            raise ValueError(f"inputs must be a tensor, an array or a list of images, got {type(inputs).__name__}")
        if inputs.dtype == np.uint8:
            images = inputs[..., None] if inputs.ndim == 3 and c == 1 else inputs
            if images.ndim != 4 or images.shape[1:] != (h, w, c):
                raise ValueError(f"uint8 images must be [B, {h}, {w}, {c}], got {list(inputs.shape)}")
            images = np.ascontiguousarray(images)
            return self._normalize(images), images
        if inputs.dtype.kind == "f":
            x = np.ascontiguousarray(inputs, dtype=np.float32)
            if x.ndim != 4 or tuple(x.shape[1:]) != (c, h, w):
                raise ValueError(f"float inputs must be [B, {c}, {h}, {w}], got {list(x.shape)}")
            if not bool(np.isfinite(x).all()):
                raise ValueError("inputs hold NaN/inf values")
            return x, None
        raise ValueError(f"inputs must be uint8 images or float tensors, got {inputs.dtype}")

    def _normalize(self, images: np.ndarray) -> np.ndarray:
        """uint8 [B, H, W, C] -> float32 [B, C, H, W] with the bundle's mean/std (the
        arithmetic of `splitexit.data.Normalize`, in numpy)."""
        x = images.transpose(0, 3, 1, 2).astype(np.float32) / np.float32(255.0)
        return np.ascontiguousarray((x - self._mean) / self._std)

    def _to_images(self, x: np.ndarray) -> np.ndarray:
        """Undo the normalization of float inputs (for a cascade's raw input)."""
        pixels = np.clip(np.round((x * self._std + self._mean) * 255.0), 0, 255).astype(np.uint8)
        return np.ascontiguousarray(pixels.transpose(0, 2, 3, 1))

    def _chunks(self, row_bytes: Sequence[int]) -> list[list[int]]:
        """Consecutive row groups within the row and byte limits per request (a row over
        the byte limit alone goes in a group of its own, refused at build time)."""
        max_rows, max_bytes = self._limits()
        budget = max_bytes - REQUEST_OVERHEAD
        groups: list[list[int]] = []
        current: list[int] = []
        size = 0
        for i, b in enumerate(row_bytes):
            if current and (len(current) >= max_rows or size + b > budget or b > budget):
                groups.append(current)
                current, size = [], 0
            current.append(i)
            size += b
        if current:
            groups.append(current)
        return groups

    def prepare(self, inputs: Any, ids: Sequence[str], split: int | None = None) -> Prepared:
        """Run the head on a batch, cut after `split` (one of the bundle's splits; default
        its first)."""
        from splitexit import wire

        split = self.bundle.split if split is None else split
        if split not in self.bundle.splits:
            raise ValueError(f"split {split} is not one of the bundle's {list(self.bundle.splits)}")
        t0 = time.perf_counter()
        x, images = self._inputs(inputs)
        if len(ids) != len(x):
            raise ValueError(f"{len(ids)} sample ids for {len(x)} inputs")
        t1 = time.perf_counter()
        result = self.runner.run(self.engine.from_array(x), stop=split)
        t2 = time.perf_counter()
        evaluated = [0] * len(x)
        edge = []
        for a in result.answered:
            for pos, probs, k, n in zip(a.rows.tolist(), a.probs, a.exit_index.tolist(), a.evaluated.tolist()):
                edge.append((pos, k, probs, n))
                evaluated[pos] = n
        fallback: dict[int, tuple[int, np.ndarray | None, float]] = {}
        offloads: list[Offload] = []
        pending = result.pending
        if pending is not None:
            state = pending.state
            missing = np.flatnonzero(state.best_exit < 0)
            if len(missing) and split in self.exit_stages:
                # No exit ran on these rows yet (a policy that skips heads): the exit at the
                # split can still answer from the feature, should the cloud fail.
                probs = self.engine.exit_probs(split, self.engine.take(pending.feature, missing))
                # a copy: what the cloud receives stays what the edge's exits evaluated
                state = replace(state, best_probs=state.best_probs.copy(), best_conf=state.best_conf.copy(),
                                best_exit=state.best_exit.copy())
                state.best_probs[missing] = probs
                state.best_conf[missing] = probs.max(-1)
                state.best_exit[missing] = self.exit_stages.index(split)
            rows = pending.rows.tolist()
            self._note_fallbacks(rows, state, fallback, evaluated)
            per_row = encoded_bytes(self.codec, (1, *pending.feature.shape[1:]))  # type: ignore[arg-type]
            raw = self._raw_items(x, images, pending.rows) if self._raw_with_features else None
            if isinstance(raw, wire.WireError):  # the features still go; escalations will be degraded
                log.warning("raw input for the larger network not sent: %s", raw)
                raw = None
            row_bytes = [per_row + (len(raw[j]) + 16 if raw is not None else 0) for j in range(len(rows))]
            for group in self._chunks(row_bytes):
                index = np.asarray(group)
                with_raw = {} if raw is None else {"raw_items": [raw[g] for g in group],
                                                   "raw_format": self.config.raw_format}
                offloads.append(self._build(
                    "feature", [rows[g] for g in group], group_bytes=sum(row_bytes[g] for g in group),
                    feature=self.engine.take(pending.feature, index), state=pending.state.take(index),
                    sample_ids=[ids[rows[g]] for g in group], codec=self.codec, split=split, **with_raw))
        escalate = result.escalate
        if escalate is not None:
            rows = escalate.rows.tolist()
            self._note_fallbacks(rows, escalate.state, fallback, evaluated)
            items = self._raw_items(x, images, escalate.rows)
            if isinstance(items, wire.WireError):
                error = OffloadError("INVALID_ARGUMENT", str(items), reason="encode_failed")
                offloads.append(Offload(None, "raw", rows, error=error))
                items = ()
            for group in self._chunks([len(item) + 16 for item in items]):
                sub = np.asarray(group)
                offloads.append(self._build(
                    "raw", [rows[g] for g in group], group_bytes=sum(len(items[g]) + 16 for g in group),
                    feature=None, state=escalate.state.take(sub),
                    sample_ids=[ids[rows[g]] for g in group], raw_items=[items[g] for g in group],
                    raw_format=self.config.raw_format))
        t3 = time.perf_counter()
        return Prepared(edge, fallback, evaluated, offloads, (t1 - t0) * 1e3, (t2 - t1) * 1e3, (t3 - t2) * 1e3)

    def _raw_items(self, x: np.ndarray, images: np.ndarray | None,
                   rows: np.ndarray) -> "tuple[bytes, ...] | WireError":
        """These rows' input encoded for RawInput (the images as given, or the normalized
        input turned back into pixels), or why it cannot be."""
        from splitexit import wire

        pixels = images[rows] if images is not None else self._to_images(x[rows])
        try:
            return wire.encode_raw_input(pixels, self.config.raw_format)
        except wire.WireError as exc:
            return exc

    @staticmethod
    def _note_fallbacks(rows: list[int], state: "RowState", fallback: dict[int, tuple[int, Any, float]],
                        evaluated: list[int]) -> None:
        """Each offloaded row's own answer, should the cloud fail (its best exit so far), and
        the exit heads it evaluated on the edge."""
        best_exit, best_conf, done = state.best_exit.tolist(), state.best_conf.tolist(), state.evaluated.tolist()
        for j, pos in enumerate(rows):
            fallback[pos] = (best_exit[j], state.best_probs[j] if best_exit[j] >= 0 else None, best_conf[j])
            evaluated[pos] = done[j]

    def _build(self, kind: str, positions: list[int], *, group_bytes: int, **request: Any) -> Offload:
        """An offload for these rows, or one that answers them locally when no valid
        request can be made (too large for a message, a feature fp16 cannot hold)."""
        from splitexit import wire

        _, max_bytes = self._limits()
        if group_bytes > max_bytes - REQUEST_OVERHEAD:
            error = OffloadError("INVALID_ARGUMENT", f"a row needs {group_bytes} bytes, over the {max_bytes} "
                                 "byte message limit", reason="too_large")
            return Offload(None, kind, positions, error=error)
        try:
            message = wire.build_request(self.bundle, want_probabilities=self.config.want_probabilities,
                                         top_k=self.config.top_k, **request)
        except wire.WireError as exc:
            return Offload(None, kind, positions,
                            error=OffloadError("INVALID_ARGUMENT", str(exc), reason="encode_failed"))
        return Offload(message, kind, positions)
