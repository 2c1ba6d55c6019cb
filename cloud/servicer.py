"""The `SplitInference` servicer: validates requests, batches them, runs the tail.

The logic lives in plain functions and classes that work without a server:
- `ServedModel.load(path)`: a cloud bundle ready to serve (tail runner, state spec,
  optional edge weights for raw-input-only requests, the cascade's larger network).
- `parse_request(request, models, limits)`: every check DESIGN.md lists, in order, each
  failure a `RequestError` with its gRPC code name and a message for the client.
- `ServedModel.run_batch(parsed_requests)`: one tail call for a batch, answers per request
  (runs in the batcher's compute thread).
`SplitInferenceServicer` only connects them to gRPC (status codes, deadlines, streams).

How a row is answered (see also `splitexit.wire` for the formats):
1. With a feature: the tail runs from `split + 1`, resuming the policy from
   `policy_state` (empty state = the policy starts fresh at the first cloud exit).
   Without one (raw input only; needs the bundle's edge weights on this worker): the
   whole network runs from stage 0 on the decoded input, normalized with the bundle's
   mean/std.
2. A row the policy sends to the cascade's larger network (RunResult.escalate, or a
   NEXT_EXIT that already names it) runs that network on its decoded raw input, when the
   request carries one, normalized with the larger network's mean/std; the policy then
   decides at the ladder's last exit (the larger network's final head) as in an unsplit
   run. Without raw input the row is answered with the most confident exit it evaluated
   (the edge's too when it sent the BEST_* state), flagged `degraded`; a row that
   arrives already bound for the larger network without raw input runs this network's
   remaining exits first, also flagged `degraded`.
3. RowResult.exit_index is the stage index of the answering exit in RowResult.network
   (the model name, or `splitexit.wire.larger_network_name(model)`).

A batch that fails as a whole is re-run request by request, so one bad request (e.g. a
policy state whose values the policy cannot use) fails alone and never its batch-mates.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, AsyncIterator, Hashable, Mapping, Sequence

import grpc
import torch
from google.protobuf.message import DecodeError

from splitexit.bundle import Bundle, BundleError, load_bundle, on_edge
from splitexit.cloud.answers import AnswerCache, AnswerCacheConfig
from splitexit.cloud.batcher import BatchInfo, Batcher
from splitexit.cloud.errors import RequestError
from splitexit.codec import CODECS, CodecError, EncodedTensor, decode
from splitexit.policies import PolicyError, step
from splitexit.proto import PROTOCOL_VERSION
from splitexit.proto import inference_pb2 as pb
from splitexit.proto import inference_pb2_grpc as pb_grpc
from splitexit.runtime import ExitRunner, RowState
from splitexit.wire import (BEST_CONF, BEST_EXIT, BEST_PROBS, EVALUATED, NEXT_EXIT, RAW_FORMATS, StateError,
                            StateField, WireError, decode_policy_state, decode_raw_input, larger_network_name,
                            state_spec)

if TYPE_CHECKING:
    from splitexit.cloud.metrics import Metrics

__all__ = [
    "Parsed",
    "ServedModel",
    "ServiceLimits",
    "SplitInferenceServicer",
    "Undecodable",
    "add_to_server",
    "load_models",
    "model_info",
    "parse_request",
]

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["SplitInference"].full_name  # "splitexit.v1.SplitInference"


@dataclass(frozen=True, kw_only=True)
class ServiceLimits:
    """What one request may be; the edge reads them from ModelInfo.limits."""

    max_message_bytes: int = 32 * 1024 * 1024  # == the server's receive limit
    max_request_rows: int = 256  # rows in one InferRequest
    max_raw_item_bytes: int = 4 * 1024 * 1024  # one encoded image
    stream_inflight: int = 64  # requests of one InferStream computed at once (backpressure beyond)

    def __post_init__(self) -> None:
        if self.max_message_bytes < 1024 or self.max_request_rows < 1 or self.max_raw_item_bytes < 1:
            raise ValueError("service limits must be positive (max_message_bytes >= 1024)")
        if self.stream_inflight < 1:
            raise ValueError("stream_inflight must be >= 1")


# --- models ------------------------------------------------------------------------------
@dataclass(eq=False)
class ServedModel:
    """A cloud bundle loaded for serving."""

    bundle: Bundle
    runner: ExitRunner
    can_start_raw: bool  # the edge weights are loaded too: raw-input-only requests work
    spec: dict[str, StateField] = field(init=False, repr=False)  # what policy_state must hold

    def __post_init__(self) -> None:
        self.spec = state_spec(self.runner)
        self.own_exits = len(self.runner.exit_stages)  # ladder exits of this network, final head included
        self.first_cloud = len(self.bundle.manifest["edge_exits"])  # ladder index of the first tail exit
        self.num_classes = len(self.bundle.classes)
        large = self.bundle.manifest.get("large") or {}
        self._mean = torch.tensor(self.bundle.mean, dtype=torch.float32).view(1, -1, 1, 1)
        self._std = torch.tensor(self.bundle.std, dtype=torch.float32).view(1, -1, 1, 1)
        self._large_mean = torch.tensor(large.get("mean", self.bundle.mean), dtype=torch.float32).view(1, -1, 1, 1)
        self._large_std = torch.tensor(large.get("std", self.bundle.std), dtype=torch.float32).view(1, -1, 1, 1)

    @property
    def name(self) -> str:
        return self.bundle.name

    @property
    def hash(self) -> str:
        return self.bundle.hash

    @property
    def raw_formats(self) -> tuple[str, ...]:
        """Raw input is of use with a larger network or with the edge weights loaded."""
        return RAW_FORMATS if (self.bundle.large is not None or self.can_start_raw) else ()

    @classmethod
    def load(cls, path: str | Path) -> "ServedModel":
        """Load the cloud part of a bundle, plus its edge weights when the directory has
        them (they let raw-input-only requests run the whole network). Raises BundleError."""
        path = Path(path)
        bundle = load_bundle(path, "cloud")
        entry = bundle.manifest.get("files", {}).get("edge")
        can_start_raw = False
        if entry is not None and (path / entry["path"]).is_file():
            # a present but corrupt edge file is an error, not a silent downgrade
            edge = load_bundle(path, "edge", expect_hash=bundle.hash)
            weights = {k: v for k, v in edge.model.state_dict().items() if on_edge(k, bundle.split)}
            bundle.model.load_state_dict(weights, strict=False)
            can_start_raw = True
        try:
            runner = ExitRunner(bundle.model, bundle.policy, num_classes=len(bundle.classes), network=bundle.network)
        except PolicyError as exc:
            raise BundleError(f"{path}: the policy does not fit the model ({exc})") from exc
        return cls(bundle, runner, can_start_raw)

    def model_spec(self) -> pb.ModelSpec:
        return pb.ModelSpec(
            name=self.name, bundle_hash=self.hash, arch=str(self.bundle.manifest["model"].get("arch", "")),
            splits=[pb.SplitPoint(split=self.bundle.split, feature_shape=self.bundle.feature_shape)],
            input_shape=self.bundle.input_shape, classes=self.bundle.classes, codecs=CODECS,
            raw_formats=self.raw_formats,
        )

    def fresh_state(self, rows: int, *, raw_start: bool) -> RowState:
        """State of rows that arrive without any: the policy starts at the first exit it
        would evaluate on this side."""
        state = self.runner.initial_state(rows)
        if not raw_start:
            state.next_exit = state.next_exit.clamp_min(self.first_cloud)
        return state

    def warm_up(self) -> None:
        """Run the tail (and the larger network) once on a dummy row: first-call costs
        (allocator, kernels, lazy init) are paid before the worker says SERVING."""
        feature = torch.zeros(1, *self.bundle.feature_shape)
        item = Parsed(model=self, request_id="warm-up", sample_ids=("0",), rows=1, feature=feature,
                      state=self.fresh_state(1, raw_start=False), key=("warm-up",))
        out = self.run_batch([item])[0]
        if isinstance(out, Exception):
            raise out
        if self.bundle.large is not None:
            with torch.inference_mode():
                self.bundle.large(torch.zeros(1, *self.bundle.input_shape))

    # -- compute (in the batcher's thread) -----------------------------------------------
    def run_batch(self, items: Sequence["Parsed"]) -> list["list[pb.RowResult] | RequestError"]:
        """Answers for a batch of parsed requests of this model (one key). Bodies left
        undecoded by `parse_request(..., defer_decode=True)` are decoded here first, a
        batch's together; a request that fails to decode fails alone. A whole-batch
        failure is retried request by request so that it fails only the request at fault."""
        decoded = self.decode_bodies(items)
        live = [i for i, d in enumerate(decoded) if isinstance(d, Parsed)]
        out: list[list[pb.RowResult] | RequestError] = [d if isinstance(d, RequestError) else [] for d in decoded]
        if live:
            for i, answer in zip(live, self._run_isolated([decoded[i] for i in live])):  # type: ignore[misc]
                out[i] = answer
        return out

    def _run_isolated(self, items: Sequence["Parsed"]) -> list["list[pb.RowResult] | RequestError"]:
        try:
            return self._run(items)
        except Exception as exc:
            if len(items) == 1:
                return [_compute_error(exc)]
        out: list[list[pb.RowResult] | RequestError] = []
        for item in items:
            try:
                out.extend(self._run([item]))
            except Exception as exc:
                out.append(_compute_error(exc))
        return out

    def decode_bodies(self, items: Sequence["Parsed"]) -> list["Parsed | RequestError"]:
        """Decode the deferred feature and policy state of `items` (those with a body).

        Why here and together: decoding is many small numpy/torch calls per request; on
        the event loop it held the GIL between every RPC. Bodies of one batch share a key
        (same feature dtype and shape), so they decode as one tensor per entry. When that
        merged decode fails, each body is decoded alone: the error goes to the request at
        fault, with the message an eager `parse_request` gives."""
        out: list[Parsed | RequestError] = list(items)
        deferred = [i for i, item in enumerate(items) if item.body is not None]
        merged = self._decode_merged([items[i] for i in deferred]) if len(deferred) > 1 else None
        for j, i in enumerate(deferred):
            out[i] = merged[j] if merged is not None else self._decode_one(items[i])
        return out

    def _decode_one(self, item: "Parsed") -> "Parsed | RequestError":
        assert item.body is not None
        try:
            feature = _decode_feature(item.body.feature, self, item.rows)
            state = _decode_state(item.body.policy_state, self, item.rows, raw_start=False)
        except RequestError as exc:
            return exc
        return replace(item, feature=feature, state=state, body=None)

    def _decode_merged(self, items: Sequence["Parsed"]) -> "list[Parsed] | None":
        """One decode per entry for all of `items`, or None when any check fails or the
        state cannot be merged (differing names or layouts). Features that cannot be
        merged (each int8 request has its own quantization) decode one by one."""
        bodies = [item.body for item in items if item.body is not None]
        counts = [item.rows for item in items]
        total = sum(counts)
        try:
            try:
                features = _decode_feature(_concat([b.feature for b in bodies], total), self, total).split(counts)
            except _Unmergeable:
                features = tuple(_decode_feature(b.feature, self, n) for b, n in zip(bodies, counts))
            names = set(bodies[0].policy_state)
            if any(set(b.policy_state) != names for b in bodies):
                return None
            received = {name: _concat([EncodedTensor.from_proto(b.policy_state[name]) for b in bodies], total)
                        for name in names}
            state = _decode_state(received, self, total, raw_start=False)
        except (RequestError, CodecError, _Unmergeable):
            return None
        return [replace(item, feature=features[j], state=piece, body=None)
                for j, (item, piece) in enumerate(zip(items, state.split(counts)))]

    def _normalize(self, images: torch.Tensor, *, large: bool) -> torch.Tensor:
        """uint8 [B, H, W, C] -> float [B, C, H, W] with the network's mean/std."""
        x = images.permute(0, 3, 1, 2).float().div_(255.0)
        return (x - self._large_mean) / self._large_std if large else (x - self._mean) / self._std

    def _raw(self, item: "Parsed", rows: Sequence[int] | None = None) -> torch.Tensor:
        items = item.raw_items or ()
        picked = items if rows is None else [items[r] for r in rows]
        return decode_raw_input(item.raw_format or "", picked, self.bundle.input_shape)

    @torch.inference_mode()
    def _run(self, items: Sequence["Parsed"]) -> list["list[pb.RowResult] | RequestError"]:
        results: list[list[pb.RowResult] | RequestError | None] = [None] * len(items)
        raw_start = items[0].feature is None  # one key: all of a batch start alike
        inputs: dict[int, torch.Tensor] = {}
        images: dict[int, torch.Tensor] = {}  # decoded raw input, reused for escalation
        for i, item in enumerate(items):
            if item.feature is not None:  # all of a batch alike (raw_start)
                inputs[i] = item.feature
                continue
            try:
                images[i] = self._raw(item)
            except WireError as exc:
                results[i] = RequestError("INVALID_ARGUMENT", str(exc))
                continue
            inputs[i] = self._normalize(images[i], large=False)
        live = [i for i in inputs]
        if not live:
            return results  # type: ignore[return-value]
        counts = torch.tensor([items[i].rows for i in live])
        owner = torch.repeat_interleave(torch.tensor(live), counts)  # [N] item index of each row
        first_row = {i: int(o) for i, o in zip(live, torch.cumsum(counts, 0) - counts)}
        x = torch.cat([inputs[i] for i in live])  # [N, ...]
        state = RowState.cat([items[i].row_state for i in live])
        n = x.shape[0]
        has_raw = torch.tensor([items[i].raw_items is not None for i in live], dtype=torch.bool).repeat_interleave(counts)

        probs = torch.zeros(n, self.num_classes)
        exit_stage = torch.full((n,), -1, dtype=torch.long)
        by_large = torch.zeros(n, dtype=torch.bool)
        degraded = torch.zeros(n, dtype=torch.bool)
        done = torch.zeros(n, dtype=torch.bool)

        # Rows whose policy already chose the larger network skip this one when they can.
        to_large = state.next_exit >= self.own_exits
        direct = to_large & has_raw
        stuck = to_large & ~has_raw  # cannot get there: run this network's exits, degraded
        state.next_exit[stuck] = self.first_cloud
        degraded |= stuck
        keep = torch.nonzero(~direct).flatten()
        escalate_rows = [torch.nonzero(direct).flatten()]
        # per-row state of escalated rows: their arrival state, or the state they left with
        esc_state = state.clone()
        if len(keep):
            start = 0 if raw_start else self.bundle.split + 1
            if len(keep) == n:  # the usual case: no copy of the batch (the runner copies the state itself)
                result = self.runner.run(x, start=start, state=state, rows=keep)
            else:
                result = self.runner.run(x[keep], start=start, state=state.take(keep), rows=keep)
            merged = result.merged()
            if merged is not None:
                probs[merged.rows] = merged.probs
                exit_stage[merged.rows] = torch.tensor(self.runner.exit_stages)[merged.exit_index]
                done[merged.rows] = True
            for pending in (result.escalate, result.pending):  # pending: nothing left to run it on
                if pending is not None and len(pending.rows):
                    escalate_rows.append(pending.rows)
                    esc_state.put(pending.rows, pending.state)
        esc = torch.cat(escalate_rows)
        if len(esc):
            with_raw = esc[has_raw[esc]]
            if len(with_raw) and self.bundle.large is not None:
                self._run_large(items, with_raw, owner, first_row, images, esc_state, results,
                                probs, exit_stage, by_large, done)
            for r in esc[~done[esc]].tolist():  # no raw input (or no larger network): best exit, degraded
                if results[int(owner[r])] is not None:  # its request already failed
                    continue
                k = int(esc_state.best_exit[r])
                if not 0 <= k < self.own_exits:
                    results[int(owner[r])] = RequestError(
                        "INTERNAL", "a row left for the larger network without any exit evaluated")
                    continue
                probs[r], exit_stage[r] = esc_state.best_probs[r], self.runner.exit_stages[k]
                degraded[r], done[r] = True, True
        return self._answers(items, live, first_row, results, probs, exit_stage, by_large, degraded)

    def _run_large(self, items, rows, owner, first_row, images, esc_state, results, probs, exit_stage, by_large,
                   done) -> None:
        """The larger network on the raw input of `rows` (all requests in one call); the
        policy then decides at the ladder's last exit, as in an unsplit run."""
        large = self.bundle.large
        assert large is not None
        xs, ok = [], []
        for i in sorted(set(owner[rows].tolist())):
            mine = rows[owner[rows] == i]
            try:
                local = (mine - first_row[i]).tolist()
                pixels = images[i][local] if i in images else self._raw(items[i], local)
            except WireError as exc:
                results[i] = RequestError("INVALID_ARGUMENT", str(exc))
                continue
            xs.append(self._normalize(pixels, large=True))
            ok.append(mine)
        if not ok:
            return
        picked = torch.cat(ok)
        out = large(torch.cat(xs)).float().softmax(-1)  # [n, C]
        k = self.runner.num_exits - 1  # the larger network's final head ends the ladder
        policy_state = {name: value[picked] for name, value in esc_state.policy.items()}
        decision, _ = step(self.runner.policy, k, out, policy_state, self.runner.num_exits)
        probs[picked] = decision.answer
        exit_stage[picked] = large.num_stages - 1
        by_large[picked] = True
        done[picked] = True

    def _answers(self, items, live, first_row, results, probs, exit_stage, by_large, degraded):
        conf, label = probs.max(-1)
        large_name = larger_network_name(self.name)
        label_l, conf_l, stage_l = label.tolist(), conf.tolist(), exit_stage.tolist()
        large_l, degraded_l = by_large.tolist(), degraded.tolist()
        for i in live:
            if results[i] is not None:
                continue
            item = items[i]
            k = self.num_classes if item.top_k <= 0 else min(item.top_k, self.num_classes)
            rows = []
            for j in range(item.rows):
                r = first_row[i] + j
                row = pb.RowResult(sample_id=item.sample_ids[j], label=label_l[r], confidence=conf_l[r],
                                   exit_index=stage_l[r], network=large_name if large_l[r] else self.name,
                                   degraded=degraded_l[r])
                if item.want_probabilities:
                    p, c = probs[r].topk(k)
                    row.top_k.extend(pb.ClassScore(class_index=ci, probability=pi)
                                     for ci, pi in zip(c.tolist(), p.tolist()))
                rows.append(row)
            results[i] = rows
        return results


def _compute_error(exc: Exception) -> RequestError:
    if isinstance(exc, RequestError):
        return exc
    if isinstance(exc, (PolicyError, IndexError, ValueError, RuntimeError)):
        # The request's structure was validated; what remains is a value the policy cannot use.
        return RequestError("INVALID_ARGUMENT", f"the exit policy cannot resume from this request's state "
                                                f"({type(exc).__name__}: {str(exc)[:200]})")
    return RequestError("INTERNAL", f"{type(exc).__name__}: {str(exc)[:200]}")


def load_models(paths: Sequence[str | Path]) -> dict[tuple[str, str], ServedModel]:
    """Served models keyed by (name, bundle hash). Raises BundleError (also for a bundle
    given twice)."""
    models: dict[tuple[str, str], ServedModel] = {}
    for path in paths:
        model = ServedModel.load(path)
        if (model.name, model.hash) in models:
            raise BundleError(f"{path}: bundle {model.name} {model.hash[:12]} is given twice")
        models[(model.name, model.hash)] = model
    return models


def model_info(models: Mapping[tuple[str, str], ServedModel], limits: ServiceLimits, worker_id: str) -> pb.ModelInfo:
    return pb.ModelInfo(
        protocol_version=PROTOCOL_VERSION,
        models=[m.model_spec() for _, m in sorted(models.items())],
        limits=pb.Limits(max_message_bytes=limits.max_message_bytes, max_batch_rows=limits.max_request_rows),
        worker_id=worker_id,
    )


# --- requests ----------------------------------------------------------------------------
@dataclass(frozen=True, kw_only=True, eq=False)
class Parsed:
    """A validated request, ready for the batcher."""

    model: ServedModel
    request_id: str
    sample_ids: tuple[str, ...]
    rows: int
    # float32 [B, *feature_shape]; None = start from the raw input (or, with a body, not yet decoded)
    feature: torch.Tensor | None
    state: RowState | None  # B rows; None while a body waits to be decoded
    key: Hashable  # the batching key
    raw_format: str | None = None
    raw_items: tuple[bytes, ...] | None = None
    want_probabilities: bool = False
    top_k: int = 0
    body: "Body | None" = None  # feature and policy state still to decode (in the compute thread)

    @property
    def row_state(self) -> RowState:
        """The decoded state (after `ServedModel.decode_bodies`)."""
        if self.state is None:
            raise RuntimeError(f"request {self.request_id}: its body was not decoded")
        return self.state


@dataclass(frozen=True)
class Body:
    """A request's feature, checked for structure (dtype, shape, size, quantization
    parameters) but not yet decoded, and its policy state as received."""

    feature: EncodedTensor
    policy_state: Mapping[str, pb.Tensor]


class _Unmergeable(Exception):
    """Wire tensors that cannot be decoded as one (their layouts differ)."""


def _concat(tensors: Sequence[EncodedTensor], rows: int) -> EncodedTensor:
    """Wire tensors of one layout (dtype, row shape, quantization) stacked along their
    first axis: row-major bytes concatenate."""
    first = tensors[0]
    same = all(t.dtype == first.dtype and t.shape[1:] == first.shape[1:] and t.quant == first.quant for t in tensors)
    if not same or (first.quant is not None and first.quant.scheme == "per_channel" and first.quant.axis == 0):
        raise _Unmergeable()
    return EncodedTensor(dtype=first.dtype, shape=(rows, *first.shape[1:]), data=b"".join(t.data for t in tensors),
                         quant=first.quant)


def _decode_feature(tensor: "EncodedTensor | pb.Tensor", model: ServedModel, rows: int, *,
                    max_bytes: int | None = None) -> torch.Tensor:
    try:
        feature = decode(tensor, expect_shape=model.bundle.feature_shape, max_bytes=max_bytes)
    except CodecError as exc:
        raise RequestError("INVALID_ARGUMENT", f"feature: {exc}") from None
    if feature.shape[0] != rows:
        raise RequestError("INVALID_ARGUMENT", f"{rows} sample_ids for a feature of {feature.shape[0]} rows")
    return feature


def _decode_state(received: "Mapping[str, EncodedTensor | pb.Tensor]", model: ServedModel, rows: int, *,
                  raw_start: bool) -> RowState:
    """The policy state of `rows` rows: decoded and checked, or fresh when none was sent."""
    if not received:
        return model.fresh_state(rows, raw_start=raw_start)
    try:
        entries = decode_policy_state(received, model.spec, rows=rows)
    except StateError as exc:
        raise RequestError("INVALID_ARGUMENT", str(exc)) from None
    # optional entries left out: the worker's own start values
    state = RowState.from_wire(entries, model.runner.initial_state(rows))
    _check_runtime_state(state, model, raw_start=raw_start)
    return state


def _check_runtime_state(state: RowState, model: ServedModel, *, raw_start: bool) -> None:
    """The runtime's entries of received state hold values it can use (the messages name
    them as on the wire)."""
    lo = 0 if raw_start else model.first_cloud
    hi = model.runner.num_exits - 1
    nxt = state.next_exit
    if len(nxt) and not bool(((nxt >= lo) & (nxt <= hi)).all()):
        bad = int(nxt[(nxt < lo) | (nxt > hi)][0])
        raise RequestError("INVALID_ARGUMENT", f"policy state {NEXT_EXIT} = {bad}: the next exit must be a ladder "
                                               f"index in {lo}..{hi} on this side of split {model.bundle.split}")
    if bool((state.evaluated < 0).any()):
        raise RequestError("INVALID_ARGUMENT", f"policy state {EVALUATED} must be >= 0")
    if not bool(((state.best_exit >= -1) & (state.best_exit < model.own_exits)).all()):
        raise RequestError("INVALID_ARGUMENT", f"policy state {BEST_EXIT} must be -1..{model.own_exits - 1}")
    if not bool(((state.best_conf >= -1) & (state.best_conf <= 1)).all()):
        raise RequestError("INVALID_ARGUMENT", f"policy state {BEST_CONF} must be in [-1, 1]")
    if not bool(((state.best_probs >= 0) & (state.best_probs <= 1)).all()):
        raise RequestError("INVALID_ARGUMENT", f"policy state {BEST_PROBS} must be probabilities in [0, 1]")


def parse_request(request: pb.InferRequest, models: Mapping[tuple[str, str], ServedModel],
                  limits: ServiceLimits, *, defer_decode: bool = False) -> Parsed:
    """Validate an InferRequest against the served models; raises RequestError.

    Order: model (NOT_FOUND), bundle hash (FAILED_PRECONDITION), rows and ids, split point
    (NOT_FOUND), feature (INVALID_ARGUMENT: dtype, shape, size, quantization, NaN/inf),
    raw input, policy state (INVALID_ARGUMENT: names, shapes, dtypes, values).

    defer_decode: for a request with a feature and no raw input, check the feature's
    structure and the rows only; its values and the policy state are decoded and checked
    by `ServedModel.run_batch` (`Parsed.body`), with the same errors. The servicer does
    this so that the event loop only reads headers (see `ServedModel.decode_bodies`).
    """
    if not request.model:
        raise RequestError("INVALID_ARGUMENT", "model is not set")
    versions = {h: m for (name, h), m in models.items() if name == request.model}
    if not versions:
        served = sorted({name for name, _ in models})
        raise RequestError("NOT_FOUND", f"model {request.model[:100]!r} is not served here; served: {served}")
    if not request.bundle_hash:
        raise RequestError("FAILED_PRECONDITION", f"bundle_hash is not set; model {request.model} is served with "
                                                  f"bundle {', '.join(h[:12] for h in versions)}")
    model = versions.get(request.bundle_hash)
    if model is None:
        raise RequestError("FAILED_PRECONDITION", f"bundle {request.bundle_hash[:64]!r} of model {request.model} is not "
                                                  f"served here (served: {', '.join(h[:12] for h in versions)}); "
                                                  f"update the edge bundle")
    rows = len(request.sample_ids)
    if rows == 0:
        raise RequestError("INVALID_ARGUMENT", "no rows: sample_ids is empty (one id per row)")
    if rows > limits.max_request_rows:
        raise RequestError("INVALID_ARGUMENT", f"{rows} rows in one request; the limit is {limits.max_request_rows} "
                                               f"(ModelInfo.limits.max_batch_rows): split the batch")
    if request.want_probabilities and request.top_k < 0:
        raise RequestError("INVALID_ARGUMENT", f"top_k must be >= 0, got {request.top_k}")
    has_feature, has_raw = request.HasField("feature"), request.HasField("raw_input")
    if not has_feature and not has_raw:
        raise RequestError("INVALID_ARGUMENT", "the request carries neither a feature nor raw input")
    feature = None
    if has_feature:
        if request.split != model.bundle.split:
            raise RequestError("NOT_FOUND", f"split point {request.split} is not served for model {model.name}; "
                                            f"served: [{model.bundle.split}]")
        if defer_decode and not has_raw:
            return _deferred(request, model, limits, rows)
        feature = _decode_feature(request.feature, model, rows, max_bytes=limits.max_message_bytes)
    if len(request.edge_exits) not in (0, rows):
        raise RequestError("INVALID_ARGUMENT", f"{len(request.edge_exits)} edge_exits for {rows} rows (0 or one per row)")
    raw_format = raw_items = None
    if has_raw:
        raw = request.raw_input
        if not model.raw_formats:
            raise RequestError("INVALID_ARGUMENT", f"model {model.name} does not take raw input here")
        if raw.format not in model.raw_formats:
            raise RequestError("INVALID_ARGUMENT", f"raw input format {raw.format[:20]!r} not accepted; accepted: "
                                                   f"{', '.join(model.raw_formats)}")
        if len(raw.items) != rows:
            raise RequestError("INVALID_ARGUMENT", f"{len(raw.items)} raw input items for {rows} rows")
        big = [i for i, item in enumerate(raw.items) if len(item) > limits.max_raw_item_bytes or not item]
        if big:
            raise RequestError("INVALID_ARGUMENT", f"raw input item {big[0]} is empty or over "
                                                   f"{limits.max_raw_item_bytes} bytes")
        raw_format, raw_items = raw.format, tuple(raw.items)
    raw_start = feature is None
    state = _decode_state(request.policy_state, model, rows, raw_start=raw_start)
    # Raw input alone runs this network from stage 0 (edge weights needed), except for rows
    # already bound for the larger network (an edge-side escalation), which go straight there.
    if raw_start and not model.can_start_raw and not bool((state.next_exit >= model.own_exits).all()):
        raise RequestError("FAILED_PRECONDITION", f"this worker has no edge weights for {model.name}: it cannot "
                                                  f"run it from raw input; send the feature at split "
                                                  f"{model.bundle.split}")
    if feature is None:
        key: Hashable = (model.name, model.hash, "raw")
    else:
        key = (model.name, model.hash, "feature", request.split, request.feature.dtype, tuple(feature.shape[1:]))
    return Parsed(model=model, request_id=request.request_id, sample_ids=tuple(request.sample_ids), rows=rows,
                  feature=feature, state=state, key=key, raw_format=raw_format, raw_items=raw_items,
                  want_probabilities=request.want_probabilities, top_k=request.top_k)


def _deferred(request: pb.InferRequest, model: ServedModel, limits: ServiceLimits, rows: int) -> Parsed:
    """A feature-only request with its body left to decode (the checks that stay here
    are the cheap structural ones, in `decode`'s order)."""
    data = request.feature.data
    try:
        if len(data) > limits.max_message_bytes:
            raise CodecError(f"tensor data is {len(data)} bytes; the limit is {limits.max_message_bytes}")
        tensor = EncodedTensor.from_proto(request.feature)  # dtype, shape, size, quantization
    except CodecError as exc:
        raise RequestError("INVALID_ARGUMENT", f"feature: {exc}") from None
    if tensor.shape[0] != rows:
        raise RequestError("INVALID_ARGUMENT", f"{rows} sample_ids for a feature of {tensor.shape[0]} rows")
    if len(request.edge_exits) not in (0, rows):
        raise RequestError("INVALID_ARGUMENT", f"{len(request.edge_exits)} edge_exits for {rows} rows (0 or one per row)")
    key = (model.name, model.hash, "feature", request.split, request.feature.dtype, tensor.shape[1:])
    return Parsed(model=model, request_id=request.request_id, sample_ids=tuple(request.sample_ids), rows=rows,
                  feature=None, state=None, key=key, want_probabilities=request.want_probabilities,
                  top_k=request.top_k, body=Body(tensor, request.policy_state))


# --- gRPC --------------------------------------------------------------------------------
@dataclass(frozen=True)
class Undecodable:
    """Bytes that are not the expected message: what our deserializer hands the handler, so
    the client gets INVALID_ARGUMENT with a reason (gRPC itself would answer UNKNOWN and
    log a traceback per bad message)."""

    type_name: str
    reason: str

    def error(self) -> RequestError:
        return RequestError("INVALID_ARGUMENT", f"the request is not a valid {self.type_name}: {self.reason[:200]}")


def _parser(message_type):
    def parse(data: bytes):
        try:
            return message_type.FromString(data)
        except DecodeError as exc:
            return Undecodable(message_type.DESCRIPTOR.full_name, str(exc))

    return parse


def add_to_server(servicer: "SplitInferenceServicer", server: grpc.aio.Server) -> None:
    """Register the servicer (as the generated add_SplitInferenceServicer_to_server does,
    with deserializers that turn undecodable bytes into INVALID_ARGUMENT)."""
    handlers = {
        "Infer": grpc.unary_unary_rpc_method_handler(
            servicer.Infer, request_deserializer=_parser(pb.InferRequest),
            response_serializer=pb.InferResponse.SerializeToString),
        "InferStream": grpc.stream_stream_rpc_method_handler(
            servicer.InferStream, request_deserializer=_parser(pb.InferRequest),
            response_serializer=pb.InferResponse.SerializeToString),
        "GetModelInfo": grpc.unary_unary_rpc_method_handler(
            servicer.GetModelInfo, request_deserializer=_parser(pb.ModelInfoRequest),
            response_serializer=pb.ModelInfo.SerializeToString),
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE_NAME, handlers),))
    server.add_registered_method_handlers(SERVICE_NAME, handlers)


def _deadline(context: grpc.aio.ServicerContext) -> float | None:
    remaining = context.time_remaining()
    return None if remaining is None else time.monotonic() + remaining


class SplitInferenceServicer(pb_grpc.SplitInferenceServicer):
    """gRPC face of the worker. `phase` is set by the server: "starting" and "draining"
    answer UNAVAILABLE, "serving" serves."""

    def __init__(self, models: Mapping[tuple[str, str], ServedModel], *, batcher: Batcher, limits: ServiceLimits,
                 worker_id: str, metrics: "Metrics | None" = None, answers: AnswerCacheConfig | None = None) -> None:
        if not models:
            raise ValueError("a worker needs at least one model")
        self.models = dict(models)
        self.batcher = batcher
        self.limits = limits
        self.worker_id = worker_id
        self.metrics = metrics
        self.phase = "starting"
        self.answers = AnswerCache(answers or AnswerCacheConfig(),
                                   on_hit=None if metrics is None else metrics.duplicates.inc)
        self._inflight = 0
        self._idle = asyncio.Event()
        self._idle.set()

    # -- plain async API (no gRPC) --------------------------------------------------------
    async def handle(self, request: "pb.InferRequest | Undecodable", deadline: float | None = None) -> pb.InferResponse:
        """Answer one InferRequest or raise RequestError. deadline: time.monotonic()."""
        arrival = time.monotonic()
        if isinstance(request, Undecodable):
            raise request.error()
        if self.phase != "serving":
            raise RequestError("UNAVAILABLE", f"the worker is {self.phase}: try another worker or retry later")
        if deadline is not None and deadline <= arrival:
            raise RequestError("DEADLINE_EXCEEDED", "the deadline passed before the request arrived")
        # headers only on the event loop: the body decodes with its batch in the compute thread
        parsed = parse_request(request, self.models, self.limits, defer_decode=True)
        if not parsed.request_id:
            return await self._compute(parsed, deadline, arrival)
        # a retry (same id, same rows) shares the first try's answer instead of computing again
        key = (parsed.request_id, parsed.model.name, parsed.model.hash, parsed.sample_ids)
        return await self.answers.answer(key, lambda: self._compute(parsed, deadline, arrival))

    async def _compute(self, parsed: Parsed, deadline: float | None, arrival: float) -> pb.InferResponse:
        self._inflight += 1
        self._idle.clear()
        try:
            rows, info = await self.batcher.submit(parsed.key, parsed, rows=parsed.rows, deadline=deadline,
                                                   arrival=arrival)
        finally:
            self._inflight -= 1
            if self._inflight == 0:
                self._idle.set()
        if self.metrics is not None:
            self.metrics.rows_answered(parsed.model.name, parsed.rows, info.queue_s)
        return self._response(parsed.request_id, rows, info)

    def _response(self, request_id: str, rows: list[pb.RowResult], info: BatchInfo) -> pb.InferResponse:
        response = pb.InferResponse(request_id=request_id, worker_id=self.worker_id,
                                    timing=pb.ServerTiming(queue_ms=1000 * info.queue_s, compute_ms=1000 * info.compute_s,
                                                           batch_size=info.batch_rows))
        response.rows.extend(rows)
        return response

    async def wait_idle(self, timeout: float) -> bool:
        """Wait until no request is in flight (or `timeout` s); True when idle."""
        try:
            await asyncio.wait_for(self._idle.wait(), timeout)
            return True
        except asyncio.TimeoutError:
            return False

    def _done(self, method: str, code: str, started: float) -> None:
        if self.metrics is not None:
            self.metrics.request_done(method, code, time.monotonic() - started)

    # -- gRPC methods ---------------------------------------------------------------------
    async def Infer(self, request: pb.InferRequest, context: grpc.aio.ServicerContext) -> pb.InferResponse:
        started, code = time.monotonic(), "OK"
        try:
            return await self.handle(request, _deadline(context))
        except RequestError as exc:
            code = exc.code
            await context.abort(grpc.StatusCode[exc.code], exc.message)
            raise  # not reached: abort raises
        except asyncio.CancelledError:
            code = "CANCELLED"
            raise
        finally:
            self._done("Infer", code, started)

    async def InferStream(self, request_iterator: AsyncIterator[pb.InferRequest],
                          context: grpc.aio.ServicerContext) -> AsyncIterator[pb.InferResponse]:
        """Each message handled as by Infer, concurrently (answers may come out of order);
        a failed request answers with InferResponse.error and the stream goes on."""
        started, code = time.monotonic(), "OK"
        deadline = _deadline(context)
        # Responses wait here until written; a slot is held from reading a request until its
        # response is written, so a client that sends without reading holds at most
        # stream_inflight requests in this worker.
        out: asyncio.Queue[pb.InferResponse | None] = asyncio.Queue()
        slots = asyncio.Semaphore(self.limits.stream_inflight)
        tasks: set[asyncio.Task[None]] = set()

        async def one(request: pb.InferRequest) -> None:
            try:
                response = await self.handle(request, deadline)
            except Exception as exc:  # every request gets an answer; a bug fails that request only
                error = exc if isinstance(exc, RequestError) else RequestError("INTERNAL", f"{type(exc).__name__}: {exc}")
                if self.metrics is not None:
                    self.metrics.stream_error(error.code)
                response = pb.InferResponse(request_id=getattr(request, "request_id", ""), worker_id=self.worker_id,
                                            error=pb.RequestError(code=grpc.StatusCode[error.code].value[0],
                                                                  message=error.message))
            out.put_nowait(response)

        async def read() -> None:
            try:
                async for request in request_iterator:
                    await slots.acquire()
                    task = asyncio.create_task(one(request))
                    tasks.add(task)
                    task.add_done_callback(tasks.discard)
                if tasks:
                    await asyncio.gather(*list(tasks), return_exceptions=True)
            finally:
                out.put_nowait(None)

        reader = asyncio.create_task(read())
        try:
            while (response := await out.get()) is not None:
                yield response
                slots.release()
            await reader  # a broken request stream surfaces here
        except asyncio.CancelledError:
            code = "CANCELLED"
            raise
        except Exception:
            code = "INTERNAL"
            raise
        finally:
            reader.cancel()
            for task in list(tasks):
                task.cancel()
            self._done("InferStream", code, started)

    async def GetModelInfo(self, request: pb.ModelInfoRequest, context: grpc.aio.ServicerContext) -> pb.ModelInfo:
        started = time.monotonic()
        if isinstance(request, Undecodable):
            self._done("GetModelInfo", "INVALID_ARGUMENT", started)
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, request.error().message)
        info = model_info(self.models, self.limits, self.worker_id)
        self._done("GetModelInfo", "OK", started)
        return info

