"""The edge agent: head + exits on the device, the rest offloaded, an answer for every row.

One `infer` call takes a batch through the bundle's head with `ExitRunner` (real compute
skipping): rows the policy lets exit are answered at once; the pending rows' features
(with their policy state) go to a cloud worker in `InferRequest`s built by
`splitexit.wire`; rows a cascade policy escalates ship their raw input instead. Whatever
the cloud cannot answer in time (unreachable, overloaded, draining, mismatched, too slow,
a malformed answer) is answered with the row's most confident local exit, flagged
`degraded` with the reason, and may be spooled to refine later. Every input gets exactly
one final answer; `refine` yields later updates to degraded ones.

`EdgeAgent` is asyncio-based; `SyncEdgeAgent` runs one in a private event loop thread.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import threading
import time
import uuid
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, AsyncIterator, Sequence

import numpy as np

from splitexit.codec import CODECS, encoded_bytes
from splitexit.edge.results import Answer
from splitexit.edge.spool import Spool
from splitexit.edge.trace import TRACE_VERSION, TraceWriter
from splitexit.edge.transport import OffloadError, Transport
from splitexit.proto import inference_pb2 as pb
from splitexit.status import status_name

if TYPE_CHECKING:
    import torch

    from splitexit.bundle import Bundle
    from splitexit.runtime import RowState
    from splitexit.wire import WireError

__all__ = ["AgentConfig", "EdgeAgent", "SyncEdgeAgent"]

log = logging.getLogger(__name__)

# Framing and per-request fields on top of the feature bytes: headroom below a worker's
# message limit when packing rows into requests.
_REQUEST_OVERHEAD = 64 * 1024
# Codes after which refining a spooled entry can never succeed: it is dropped.
_PERMANENT = frozenset({"INVALID_ARGUMENT", "NOT_FOUND", "FAILED_PRECONDITION", "UNIMPLEMENTED"})


@dataclass(frozen=True, kw_only=True)
class AgentConfig:
    """How the agent offloads. Times in milliseconds."""

    codec: str | None = None  # feature codec; None = the bundle's
    # End-to-end budget per `infer` call: each offload's deadline is what is left of it
    # after the edge's own work. None = no budget (offloads get request_timeout_ms).
    latency_budget_ms: float | None = None
    # Upper bound of one offload even under a larger budget: a worker that takes longer is
    # treated as gone.
    request_timeout_ms: float = 5000.0
    # Below this much budget left there is no point in a round trip: answer locally.
    min_offload_ms: float = 1.0
    max_batch_rows: int = 256  # rows per InferRequest (a worker's advertised limit may lower it)
    max_message_bytes: int = 64 * 1024 * 1024  # per InferRequest (likewise)
    raw_format: str = "png"  # RawInput format for escalated rows: png (lossless), jpeg, u8
    # A cascade's rows that reach the cloud may be sent on to its larger network by a cloud
    # exit, which runs on their raw input: send it with their feature. None = when the
    # bundle's ladder ends in a larger network; False saves the bytes (such rows are then
    # answered degraded, with the best exit they evaluated).
    raw_with_features: bool | None = None
    want_probabilities: bool = False
    top_k: int = 0  # with want_probabilities: classes per row, 0 = all
    refine_timeout_ms: float = 10_000.0  # per spooled request resent by `refine`
    # Run the head in a worker thread (torch releases the GIL): the event loop keeps
    # serving answers and other requests meanwhile.
    compute_in_thread: bool = True

    def __post_init__(self) -> None:
        if self.codec is not None and self.codec not in CODECS:
            raise ValueError(f"unknown codec {self.codec!r}; choose one of {', '.join(CODECS)}")
        if self.latency_budget_ms is not None and not self.latency_budget_ms > 0:
            raise ValueError(f"latency_budget_ms must be > 0, got {self.latency_budget_ms}")
        for name in ("request_timeout_ms", "refine_timeout_ms"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0")
        if self.min_offload_ms < 0:
            raise ValueError("min_offload_ms must be >= 0")
        if self.max_batch_rows < 1 or self.max_message_bytes < 2 * _REQUEST_OVERHEAD:
            raise ValueError(f"max_batch_rows must be >= 1 and max_message_bytes >= {2 * _REQUEST_OVERHEAD}")
        if self.raw_format not in ("png", "jpeg", "u8"):
            raise ValueError(f"unknown raw format {self.raw_format!r}; choose png, jpeg or u8")
        if self.top_k < 0:
            raise ValueError("top_k must be >= 0")


@dataclass
class _Offload:
    """One InferRequest of a batch, and what the agent needs to answer its rows without it."""

    request: pb.InferRequest | None  # None when it could not be built (see error)
    kind: str  # "feature" | "raw"
    positions: list[int]  # rows of the batch, in request order
    error: OffloadError | None = None  # known before sending: answer the rows locally
    record: dict[str, Any] = field(default_factory=dict)


@dataclass
class _Prepared:
    """The head's outcome for a batch (computed off the event loop)."""

    edge: list[tuple[int, int, "torch.Tensor", int]]  # (position, ladder exit, probs, evaluated)
    fallback: dict[int, tuple[int, "torch.Tensor | None", float]]  # position -> (ladder exit, probs, conf)
    evaluated: list[int]
    offloads: list[_Offload]
    prepare_ms: float
    head_ms: float
    encode_ms: float


class EdgeAgent:
    """Runs the head of an edge bundle and offloads through a `Transport`.

    bundle: an edge bundle (`load_bundle(path, "edge")`) or its path.
    transport: a GrpcTransport, WorkerPool, InProcessTransport...; None = offline (every
        pending row is answered locally, degraded with reason "no_worker"). The agent
        closes it in `close`.
    spool: a directory (or Spool) to keep failed offloads in for `refine`.
    trace: a file (or TraceWriter) for one msgpack record per `infer` call.
    """

    def __init__(self, bundle: "Bundle | str | Path", transport: Transport | None = None, *,
                 config: AgentConfig | None = None, spool: Spool | str | Path | None = None,
                 trace: TraceWriter | str | Path | None = None) -> None:
        from splitexit.bundle import Bundle, load_bundle
        from splitexit.runtime import ExitRunner

        if not isinstance(bundle, Bundle):
            bundle = load_bundle(bundle, "edge")
        if bundle.part != "edge":
            raise ValueError(f"the edge agent needs the edge part of a bundle, got the {bundle.part} part")
        self.bundle = bundle
        self.config = config or AgentConfig()
        self.transport = transport
        self.codec = self.config.codec or bundle.codec
        self.spool = Spool(spool) if isinstance(spool, (str, Path)) else spool
        self.trace = TraceWriter(trace) if isinstance(trace, (str, Path)) else trace
        self.runner = ExitRunner(bundle.model, bundle.policy, num_classes=len(bundle.classes), network=bundle.network)
        self.exit_stages: tuple[int, ...] = bundle.manifest.exits
        self._fallback_exit = bundle.split if bundle.split in bundle.model.exit_points else None
        cascade = any(network != 0 for network in bundle.network)
        self._raw_with_features = cascade if self.config.raw_with_features is None else self.config.raw_with_features
        self._seq = 0

    # --- helpers -----------------------------------------------------------------------
    async def _compute(self, fn: Any, *args: Any) -> Any:
        if self.config.compute_in_thread:
            return await asyncio.to_thread(fn, *args)
        return fn(*args)

    def _stage(self, ladder_exit: int) -> int:
        return self.exit_stages[ladder_exit] if 0 <= ladder_exit < len(self.exit_stages) else -1

    def _class_name(self, label: int) -> str | None:
        return self.bundle.classes[label] if 0 <= label < len(self.bundle.classes) else None

    def _limits(self) -> tuple[int, int]:
        rows, size = self.config.max_batch_rows, self.config.max_message_bytes
        advertised = getattr(self.transport, "limits", None)
        if isinstance(advertised, tuple) and len(advertised) == 2:
            size, rows = min(size, advertised[0] or size), min(rows, advertised[1] or rows)
        return rows, size

    def _inputs(self, inputs: Any) -> tuple["torch.Tensor", np.ndarray | None]:
        """Normalized float inputs [B, C, H, W] and, when given as images, uint8 [B, H, W, C]."""
        import torch

        from splitexit.data import Normalize

        c, h, w = self.bundle.input_shape
        if isinstance(inputs, (list, tuple)):
            if not inputs:
                raise ValueError("no inputs")
            inputs = np.stack([np.asarray(i) for i in inputs])
        if isinstance(inputs, torch.Tensor):
            if inputs.dtype == torch.uint8:
                inputs = inputs.cpu().numpy()
            else:
                x = inputs.detach().cpu().float()
                if tuple(x.shape[1:]) != (c, h, w) or x.dim() != 4:
                    raise ValueError(f"float inputs must be [B, {c}, {h}, {w}], got {list(x.shape)}")
                if not bool(torch.isfinite(x).all()):
                    raise ValueError("inputs hold NaN/inf values")
                return x.contiguous(), None
        if not isinstance(inputs, np.ndarray):
            raise ValueError(f"inputs must be a tensor, an array or a list of images, got {type(inputs).__name__}")
        if inputs.dtype == np.uint8:
            images = inputs[..., None] if inputs.ndim == 3 and c == 1 else inputs
            if images.ndim != 4 or images.shape[1:] != (h, w, c):
                raise ValueError(f"uint8 images must be [B, {h}, {w}, {c}], got {list(inputs.shape)}")
            images = np.ascontiguousarray(images)
            return Normalize(self.bundle.mean, self.bundle.std)(torch.from_numpy(images)), images
        if inputs.dtype.kind == "f":
            return self._inputs(torch.from_numpy(np.ascontiguousarray(inputs, dtype=np.float32)))
        raise ValueError(f"inputs must be uint8 images or float tensors, got {inputs.dtype}")

    def _to_images(self, x: "torch.Tensor") -> np.ndarray:
        """Undo the normalization of float inputs (for a cascade's raw input)."""
        import torch

        mean = torch.tensor(self.bundle.mean).view(1, -1, 1, 1)
        std = torch.tensor(self.bundle.std).view(1, -1, 1, 1)
        pixels = ((x * std + mean) * 255.0).round().clamp(0, 255).to(torch.uint8)
        return pixels.permute(0, 2, 3, 1).contiguous().numpy()

    def _chunks(self, row_bytes: Sequence[int]) -> list[list[int]]:
        """Consecutive row groups within the row and byte limits per request (a row over
        the byte limit alone goes in a group of its own, refused at build time)."""
        max_rows, max_bytes = self._limits()
        budget = max_bytes - _REQUEST_OVERHEAD
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

    # --- the head (runs in a worker thread) ----------------------------------------------
    def _prepare(self, inputs: Any, ids: Sequence[str]) -> _Prepared:
        import torch

        from splitexit import wire

        t0 = time.perf_counter()
        x, images = self._inputs(inputs)
        if len(ids) != len(x):
            raise ValueError(f"{len(ids)} sample ids for {len(x)} inputs")
        t1 = time.perf_counter()
        result = self.runner.run(x, stop=self.bundle.split)
        t2 = time.perf_counter()
        evaluated = [0] * len(x)
        edge = []
        for a in result.answered:
            for pos, probs, k, n in zip(a.rows.tolist(), a.probs, a.exit_index.tolist(), a.evaluated.tolist()):
                edge.append((pos, k, probs, n))
                evaluated[pos] = n
        fallback: dict[int, tuple[int, torch.Tensor | None, float]] = {}
        offloads: list[_Offload] = []
        pending = result.pending
        if pending is not None:
            state = pending.state
            missing = torch.nonzero(state.best_exit < 0).flatten()
            if len(missing) and self._fallback_exit is not None:
                # No exit ran on these rows yet (a policy that skips heads): the exit at the
                # split can still answer from the feature, should the cloud fail.
                with torch.inference_mode():
                    logits = self.bundle.model.exit_logits(self._fallback_exit, pending.feature[missing])
                probs = logits.float().softmax(-1)
                # a copy: what the cloud receives stays what the edge's exits evaluated
                state = replace(state, best_probs=state.best_probs.clone(), best_conf=state.best_conf.clone(),
                                best_exit=state.best_exit.clone())
                state.best_probs[missing] = probs
                state.best_conf[missing] = probs.max(-1).values
                state.best_exit[missing] = self.exit_stages.index(self._fallback_exit)
            rows = pending.rows.tolist()
            self._note_fallbacks(rows, state, fallback, evaluated)
            per_row = encoded_bytes(self.codec, (1, *pending.feature.shape[1:]))  # type: ignore[arg-type]
            raw = self._raw_items(x, images, pending.rows) if self._raw_with_features else None
            if isinstance(raw, wire.WireError):  # the features still go; escalations will be degraded
                log.warning("raw input for the larger network not sent: %s", raw)
                raw = None
            row_bytes = [per_row + (len(raw[j]) + 16 if raw is not None else 0) for j in range(len(rows))]
            for group in self._chunks(row_bytes):
                index = torch.tensor(group)
                with_raw = {} if raw is None else {"raw_items": [raw[g] for g in group],
                                                   "raw_format": self.config.raw_format}
                offloads.append(self._build(
                    "feature", [rows[g] for g in group], group_bytes=sum(row_bytes[g] for g in group),
                    feature=pending.feature[index], state=pending.state.take(index),
                    sample_ids=[ids[rows[g]] for g in group], codec=self.codec, **with_raw))
        escalate = result.escalate
        if escalate is not None:
            rows = escalate.rows.tolist()
            index = escalate.rows
            self._note_fallbacks(rows, escalate.state, fallback, evaluated)
            items = self._raw_items(x, images, index)
            if isinstance(items, wire.WireError):
                error = OffloadError("INVALID_ARGUMENT", str(items), reason="encode_failed")
                offloads.append(_Offload(None, "raw", rows, error=error))
                items = ()
            for group in self._chunks([len(item) + 16 for item in items]):
                sub = torch.tensor(group)
                offloads.append(self._build(
                    "raw", [rows[g] for g in group], group_bytes=sum(len(items[g]) + 16 for g in group),
                    feature=None, state=escalate.state.take(sub),
                    sample_ids=[ids[rows[g]] for g in group], raw_items=[items[g] for g in group],
                    raw_format=self.config.raw_format))
        t3 = time.perf_counter()
        return _Prepared(edge, fallback, evaluated, offloads, (t1 - t0) * 1e3, (t2 - t1) * 1e3, (t3 - t2) * 1e3)

    def _raw_items(self, x: "torch.Tensor", images: np.ndarray | None,
                   rows: "torch.Tensor") -> "tuple[bytes, ...] | WireError":
        """These rows' input encoded for RawInput (the images as given, or the normalized
        input turned back into pixels), or why it cannot be."""
        from splitexit import wire

        pixels = images[rows.numpy()] if images is not None else self._to_images(x[rows])
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

    def _build(self, kind: str, positions: list[int], *, group_bytes: int, **request: Any) -> _Offload:
        """An offload for these rows, or one that answers them locally when no valid
        request can be made (too large for a message, a feature fp16 cannot hold)."""
        from splitexit import wire

        _, max_bytes = self._limits()
        if group_bytes > max_bytes - _REQUEST_OVERHEAD:
            error = OffloadError("INVALID_ARGUMENT", f"a row needs {group_bytes} bytes, over the {max_bytes} "
                                 "byte message limit", reason="too_large")
            return _Offload(None, kind, positions, error=error)
        try:
            message = wire.build_request(self.bundle, want_probabilities=self.config.want_probabilities,
                                         top_k=self.config.top_k, **request)
        except wire.WireError as exc:
            return _Offload(None, kind, positions,
                            error=OffloadError("INVALID_ARGUMENT", str(exc), reason="encode_failed"))
        return _Offload(message, kind, positions)

    # --- answers -----------------------------------------------------------------------
    def _edge_answer(self, sample_id: str, k: int, probs: "torch.Tensor", latency_ms: float) -> Answer:
        conf, label = probs.max(-1)
        return Answer(sample_id=sample_id, label=int(label), class_name=self._class_name(int(label)),
                      confidence=float(conf), exit=self._stage(k), network=self.bundle.name, route="edge",
                      latency_ms=latency_ms, top_k=self._top_k(probs))

    def _top_k(self, probs: "torch.Tensor") -> tuple[tuple[int, float], ...]:
        if not self.config.want_probabilities:
            return ()
        k = self.config.top_k or len(probs)
        values, index = probs.topk(min(k, len(probs)))
        return tuple(zip(index.tolist(), values.tolist()))

    def _degraded(self, sample_id: str, fallback: tuple[int, "torch.Tensor | None", float], reason: str,
                  latency_ms: float, *, spooled: bool) -> Answer:
        k, probs, _ = fallback
        if probs is None:  # no exit could run on this row on the edge: nothing to answer with
            return Answer(sample_id=sample_id, label=-1, class_name=None, confidence=0.0, exit=-1,
                          network=self.bundle.name, route="degraded", reason=reason, latency_ms=latency_ms,
                          spooled=spooled)
        conf, label = probs.max(-1)
        return Answer(sample_id=sample_id, label=int(label), class_name=self._class_name(int(label)),
                      confidence=float(conf), exit=self._stage(k), network=self.bundle.name, route="degraded",
                      reason=reason, latency_ms=latency_ms, spooled=spooled, top_k=self._top_k(probs))

    def _cloud_answers(self, request: pb.InferRequest, response: pb.InferResponse, latency_ms: float,
                       worker: str, *, update: bool = False) -> list[Answer]:
        """Answers from a response; raises OffloadError when it does not answer the request."""
        from splitexit import wire

        try:
            parsed = wire.parse_response(response, request, num_classes=len(self.bundle.classes))
        except wire.WireError as exc:
            raise OffloadError("INTERNAL", f"malformed answer: {exc}", reason="bad_response", worker=worker) from None
        if parsed.error is not None:
            code, message = parsed.error
            raise OffloadError(_code_name(code), message, worker=worker)
        return [Answer(sample_id=r.sample_id, label=r.label, class_name=self._class_name(r.label),
                       confidence=r.confidence, exit=r.exit_index, network=r.network or self.bundle.name,
                       route="degraded" if r.degraded else "cloud", reason="worker_degraded" if r.degraded else None,
                       latency_ms=latency_ms, worker=worker, update=update, top_k=r.top_k)
                for r in parsed.rows]

    # --- the API -----------------------------------------------------------------------
    async def infer(self, inputs: Any, sample_ids: Sequence[str] | None = None, *,
                    budget_ms: float | None = None) -> list[Answer]:
        """Answers for a batch, in input order. `inputs`: uint8 images [B, H, W, C] (numpy
        or torch, or a list of [H, W, C] arrays) or normalized float inputs [B, C, H, W].
        `budget_ms` overrides the configured latency budget for this call."""
        answers: dict[int, Answer] = {}
        async for position, answer in self.stream(inputs, sample_ids, budget_ms=budget_ms):
            answers[position] = answer
        return [answers[i] for i in range(len(answers))]

    async def stream(self, inputs: Any, sample_ids: Sequence[str] | None = None, *,
                     budget_ms: float | None = None) -> AsyncIterator[tuple[int, Answer]]:
        """(position in the batch, answer) as each becomes known: edge exits first, then the
        cloud's or the degraded answers. Exactly one answer per input row."""
        t0 = time.perf_counter()
        started = time.time()
        batch_id = uuid.uuid4().hex
        n = len(inputs)
        if sample_ids is None:
            ids = [f"{self._seq + i}" for i in range(n)]
        else:
            ids = [str(s) for s in sample_ids]
        self._seq += n
        prepared: _Prepared = await self._compute(self._prepare, inputs, ids)
        budget = budget_ms if budget_ms is not None else self.config.latency_budget_ms
        route = {"edge": 0, "cloud": 0, "degraded": 0}
        reasons: dict[str, int] = {}
        exit_hist: dict[str, int] = {}
        workers: set[str] = set()
        answered: set[int] = set()

        def elapsed_ms() -> float:
            return (time.perf_counter() - t0) * 1e3

        def note(position: int, answer: Answer) -> tuple[int, Answer]:
            assert position not in answered, f"row {position} answered twice"
            answered.add(position)
            route[answer.route] += 1
            if answer.reason and answer.route == "degraded":
                reasons[answer.reason] = reasons.get(answer.reason, 0) + 1
            if answer.worker:
                workers.add(answer.worker)
            return position, answer

        now = elapsed_ms()
        for pos, k, probs, _ in prepared.edge:
            key = str(self._stage(k))
            exit_hist[key] = exit_hist.get(key, 0) + 1
            yield note(pos, self._edge_answer(ids[pos], k, probs, now))

        offload_start = time.perf_counter()
        tasks = [asyncio.ensure_future(self._offload(o, budget, t0)) for o in prepared.offloads]
        try:
            for done in asyncio.as_completed(tasks):
                offload, result = await done
                if isinstance(result, OffloadError):
                    spooled = await self._spool(offload, result)
                    latency = elapsed_ms()
                    for pos in offload.positions:
                        yield note(pos, self._degraded(ids[pos], prepared.fallback[pos], result.reason, latency,
                                                       spooled=spooled))
                else:
                    for pos, answer in zip(offload.positions, result):
                        yield note(pos, answer)
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        assert len(answered) == n, f"{n - len(answered)} rows left unanswered"  # the promise of this class
        offload_ms = (time.perf_counter() - offload_start) * 1e3 if tasks else 0.0
        if self.trace is not None:
            self.trace.write({
                "v": TRACE_VERSION, "request_id": batch_id, "t": started, "rows": n,
                "exits_evaluated": prepared.evaluated, "exit_hist": exit_hist, "route": route, "reasons": reasons,
                "bytes_up": sum(o.record.get("bytes_up", 0) for o in prepared.offloads),
                "bytes_down": sum(o.record.get("bytes_down", 0) for o in prepared.offloads),
                "timings_ms": {"prepare": round(prepared.prepare_ms, 3), "head": round(prepared.head_ms, 3),
                               "encode": round(prepared.encode_ms, 3), "offload": round(offload_ms, 3),
                               "total": round(elapsed_ms(), 3)},
                "workers": sorted(workers), "offloads": [o.record for o in prepared.offloads],
            })

    async def _offload(self, offload: _Offload, budget_ms: float | None,
                       t0: float) -> tuple[_Offload, list[Answer] | OffloadError]:
        request = offload.request
        record = offload.record
        record.update(request_id=request.request_id if request is not None else None, kind=offload.kind,
                      rows=len(offload.positions), worker=None, status="OK", bytes_up=0, bytes_down=0, rtt_ms=0.0)
        timeout_ms = self.config.request_timeout_ms
        budget_left_ms = None if budget_ms is None else budget_ms - (time.perf_counter() - t0) * 1e3
        # the latency budget, not the request timeout, sets the deadline
        budget_bound = budget_left_ms is not None and budget_left_ms < timeout_ms
        if budget_left_ms is not None and budget_bound:
            timeout_ms = budget_left_ms
        if request is None:
            assert offload.error is not None
            error = offload.error
        elif self.transport is None:
            error = OffloadError("UNAVAILABLE", "no cloud worker configured", reason="no_worker")
        elif timeout_ms < self.config.min_offload_ms:
            error = OffloadError("DEADLINE_EXCEEDED", "the latency budget was spent on the edge",
                                 reason="latency_budget")
        else:
            sent = time.perf_counter()
            record["bytes_up"] = request.ByteSize()
            try:
                response = await self.transport.infer(request, timeout_ms / 1e3)
                rtt = (time.perf_counter() - sent) * 1e3
                worker = response.worker_id or getattr(self.transport, "name", "")
                record.update(worker=worker, bytes_down=response.ByteSize(), rtt_ms=round(rtt, 3),
                              queue_ms=round(response.timing.queue_ms, 3),
                              compute_ms=round(response.timing.compute_ms, 3),
                              batch_size=response.timing.batch_size)
                return offload, self._cloud_answers(request, response, (time.perf_counter() - t0) * 1e3, worker)
            except Exception as exc:  # foreign transports too: a row must never go unanswered
                error = OffloadError.from_exception(exc)
                if budget_bound and error.code == "DEADLINE_EXCEEDED":  # what really happened
                    error = OffloadError(error.code, error.message, reason="latency_budget", worker=error.worker)
                record["rtt_ms"] = round((time.perf_counter() - sent) * 1e3, 3)
                record["worker"] = error.worker or None
        record.update(status=error.code, reason=error.reason, error=error.message[:200])
        return offload, error

    async def _spool(self, offload: _Offload, error: OffloadError) -> bool:
        if self.spool is None or offload.request is None:
            return False
        try:
            await asyncio.to_thread(self.spool.put, offload.request, reason=error.reason)
        except OSError as exc:  # a full disk must not cost the answer
            log.warning("could not spool request %s: %s", offload.request.request_id, exc)
            return False
        offload.record["spooled"] = True
        return True

    async def refine(self) -> AsyncIterator[Answer]:
        """Resend spooled requests and yield their answers (update=True), oldest first.
        Stops at the first request the cloud still cannot answer (it stays spooled);
        entries that can never be answered (another bundle, refused as invalid) are
        dropped with a warning."""
        if self.spool is None:
            raise ValueError("this agent has no spool to refine")
        entries = await asyncio.to_thread(self.spool.entries)
        try:
            for entry in entries:
                if entry.bundle_hash != self.bundle.hash:
                    log.warning("spooled request %s is for bundle %s, not %s: left in the spool",
                                entry.request_id, entry.bundle_hash[:12], self.bundle.hash[:12])
                    continue
                request = entry.message()
                if self.transport is None:
                    return
                sent = time.perf_counter()
                try:
                    response = await self.transport.infer(request, self.config.refine_timeout_ms / 1e3)
                    worker = response.worker_id or getattr(self.transport, "name", "")
                    answers = self._cloud_answers(request, response, (time.perf_counter() - sent) * 1e3, worker,
                                                  update=True)
                except OffloadError as exc:
                    if exc.code in _PERMANENT or exc.reason == "bad_response":
                        log.warning("dropping spooled request %s: %s", entry.request_id, exc)
                        await asyncio.to_thread(self.spool.done, [entry.request_id], outcome="dropped")
                        continue
                    return
                for answer in answers:
                    yield answer
                await asyncio.to_thread(self.spool.done, [entry.request_id])
        finally:
            await asyncio.to_thread(self.spool.compact)

    async def close(self) -> None:
        if self.transport is not None:
            await self.transport.close()
        if self.trace is not None:
            self.trace.close()

    async def __aenter__(self) -> "EdgeAgent":
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


def _code_name(number: int) -> str:
    return status_name(number) or "UNKNOWN"


class SyncEdgeAgent:
    """A blocking facade over `EdgeAgent`: it owns an event loop in a background thread,
    so it also works where another loop is running (a notebook, a GUI).

    Build transports for it as usual: gRPC channels are created lazily in its loop.
    """

    def __init__(self, bundle: "Bundle | str | Path", transport: Transport | None = None, **kwargs: Any) -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="splitexit-edge", daemon=True)
        self._thread.start()
        try:
            self.agent = EdgeAgent(bundle, transport, **kwargs)
        except BaseException:
            self._stop()
            raise

    def _run(self, coro: Any, timeout: float | None = None) -> Any:
        future = asyncio.run_coroutine_threadsafe(coro, self._loop)
        try:
            return future.result(timeout)
        except concurrent.futures.TimeoutError:
            future.cancel()
            raise

    def infer(self, inputs: Any, sample_ids: Sequence[str] | None = None, *,
              budget_ms: float | None = None) -> list[Answer]:
        return self._run(self.agent.infer(inputs, sample_ids, budget_ms=budget_ms))

    def refine(self) -> list[Answer]:
        async def collect() -> list[Answer]:
            return [a async for a in self.agent.refine()]

        return self._run(collect())

    def run_coroutine(self, coro: Any) -> Any:
        """Run any coroutine in the agent's loop (e.g. `pool.probe()`)."""
        return self._run(coro)

    def _stop(self) -> None:
        if self._loop.is_closed():
            return
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)
        self._loop.close()

    def close(self) -> None:
        if self._loop.is_closed():
            return
        try:
            self._run(self.agent.close(), timeout=10)
        finally:
            self._stop()

    def __enter__(self) -> "SyncEdgeAgent":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
