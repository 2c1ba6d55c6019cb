"""An InferRequest checked and decoded in one pass: every check DESIGN.md lists, in order,
each failure a `RequestError` with its gRPC code name and a message for the client.

- `parse_request(request, models, limits)`: the checks of the request's structure, and
  (unless deferred) its feature and policy state decoded into a `Parsed`.
- `decode_bodies(model, parsed)`: the deferred bodies of a batch, decoded in the compute
  thread, together where they can be.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Hashable, Mapping, Sequence

import torch

from splitexit.cloud.errors import RequestError
from splitexit.codec import CodecError, EncodedTensor, decode
from splitexit.proto import inference_pb2 as pb
from splitexit.runtime import RowState
from splitexit.wire import (BEST_CONF, BEST_EXIT, BEST_PROBS, EVALUATED, NEXT_EXIT, StateError,
                            decode_policy_state)

if TYPE_CHECKING:
    from splitexit.cloud.served import ServedModel

__all__ = ["Body", "Parsed", "ServiceLimits", "decode_bodies", "parse_request"]


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



@dataclass(frozen=True, kw_only=True, eq=False)
class Parsed:
    """A validated request, ready for the batcher."""

    model: "ServedModel"
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
    split: int = -1  # the stage the feature is the output of; -1: the run starts from the raw input

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


def _feature_header(tensor: pb.Tensor, rows: int, limits: ServiceLimits) -> EncodedTensor:
    """The cheap structural checks of a feature, before any value is decoded: its size
    first, then dtype, shape, byte count and quantization, and one row per sample id."""
    try:
        if len(tensor.data) > limits.max_message_bytes:
            raise CodecError(f"tensor data is {len(tensor.data)} bytes; the limit is {limits.max_message_bytes}")
        header = EncodedTensor.from_proto(tensor)
    except CodecError as exc:
        raise RequestError("INVALID_ARGUMENT", f"feature: {exc}") from None
    if header.shape[0] != rows:
        raise RequestError("INVALID_ARGUMENT", f"{rows} sample_ids for a feature of {header.shape[0]} rows")
    return header


def _decode_feature(tensor: EncodedTensor, model: "ServedModel", split: int) -> torch.Tensor:
    """A feature whose header was checked (`_feature_header`), decoded: the model's shape
    at `split`, finite values."""
    try:
        return torch.from_numpy(decode(tensor, expect_shape=model.bundle.manifest.feature_shapes[split]))
    except CodecError as exc:
        raise RequestError("INVALID_ARGUMENT", f"feature: {exc}") from None


def _decode_state(received: "Mapping[str, EncodedTensor | pb.Tensor]", model: ServedModel, rows: int, *,
                  split: int) -> RowState:
    """The policy state of `rows` rows arriving after stage `split` (-1: raw input):
    decoded and checked, or fresh when none was sent."""
    if not received:
        return model.fresh_state(rows, split=split)
    try:
        entries = decode_policy_state(received, model.spec, rows=rows)
    except StateError as exc:
        raise RequestError("INVALID_ARGUMENT", str(exc)) from None
    # optional entries left out: the worker's own start values
    state = RowState.from_wire(entries, model.runner.initial_state(rows))
    _check_runtime_state(state, model, split=split)
    return state


def _check_runtime_state(state: RowState, model: ServedModel, *, split: int) -> None:
    """The runtime's entries of received state hold values it can use (the messages name
    them as on the wire)."""
    lo = model.first_cloud(split)
    hi = model.runner.num_exits - 1
    nxt = state.next_exit
    if len(nxt) and not bool(((nxt >= lo) & (nxt <= hi)).all()):
        bad = int(nxt[(nxt < lo) | (nxt > hi)][0])
        raise RequestError("INVALID_ARGUMENT", f"policy state {NEXT_EXIT} = {bad}: the next exit must be a ladder "
                                               f"index in {lo}..{hi} on this side of split {split}")
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
    header = feature = None
    if has_feature:
        if request.split not in model.splits:
            raise RequestError("NOT_FOUND", f"split point {request.split} is not served for model {model.name}; "
                                            f"served: {list(model.splits)}")
        header = _feature_header(request.feature, rows, limits)
    if len(request.edge_exits) not in (0, rows):
        raise RequestError("INVALID_ARGUMENT", f"{len(request.edge_exits)} edge_exits for {rows} rows (0 or one per row)")
    if header is not None:
        if defer_decode and not has_raw:
            batch_key = (model.name, model.hash, "feature", request.split, request.feature.dtype, header.shape[1:])
            return Parsed(model=model, request_id=request.request_id, sample_ids=tuple(request.sample_ids), rows=rows,
                          feature=None, state=None, key=batch_key, want_probabilities=request.want_probabilities,
                          top_k=request.top_k, body=Body(header, request.policy_state), split=request.split)
        feature = _decode_feature(header, model, request.split)
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
    split = -1 if raw_start else request.split
    state = _decode_state(request.policy_state, model, rows, split=split)
    # Raw input alone runs this network from stage 0 (edge weights needed), except for rows
    # already bound for the larger network (an edge-side escalation), which go straight there.
    if raw_start and not model.can_start_raw and not bool((state.next_exit >= model.own_exits).all()):
        raise RequestError("FAILED_PRECONDITION", f"this worker has no edge weights for {model.name}: it cannot "
                                                  f"run it from raw input; send the feature at a split "
                                                  f"of {list(model.splits)}")
    if feature is None:
        key: Hashable = (model.name, model.hash, "raw")
    else:
        key = (model.name, model.hash, "feature", request.split, request.feature.dtype, tuple(feature.shape[1:]))
    return Parsed(model=model, request_id=request.request_id, sample_ids=tuple(request.sample_ids), rows=rows,
                  feature=feature, state=state, key=key, raw_format=raw_format, raw_items=raw_items,
                  want_probabilities=request.want_probabilities, top_k=request.top_k, split=split)


def decode_bodies(model: "ServedModel", items: Sequence[Parsed]) -> list[Parsed | RequestError]:
    """Decode the deferred feature and policy state of `items` (those with a body).

    Why here and together: decoding is many small numpy/torch calls per request; on
    the event loop it held the GIL between every RPC. Bodies of one batch share a key
    (same feature dtype and shape), so they decode as one tensor per entry. When that
    merged decode fails, each body is decoded alone: the error goes to the request at
    fault, with the message an eager `parse_request` gives."""
    out: list[Parsed | RequestError] = list(items)
    deferred = [i for i, item in enumerate(items) if item.body is not None]
    merged = _decode_merged(model, [items[i] for i in deferred]) if len(deferred) > 1 else None
    for j, i in enumerate(deferred):
        out[i] = merged[j] if merged is not None else _decode_one(model, items[i])
    return out


def _decode_one(model: "ServedModel", item: Parsed) -> Parsed | RequestError:
    assert item.body is not None
    try:
        feature = _decode_feature(item.body.feature, model, item.split)
        state = _decode_state(item.body.policy_state, model, item.rows, split=item.split)
    except RequestError as exc:
        return exc
    return replace(item, feature=feature, state=state, body=None)


def _decode_merged(model: "ServedModel", items: Sequence[Parsed]) -> list[Parsed] | None:
    """One decode per entry for all of `items`, or None when any check fails or the
    state cannot be merged (differing names or layouts). Features that cannot be
    merged (each int8 request has its own quantization) decode one by one."""
    bodies = [item.body for item in items if item.body is not None]
    split = items[0].split  # one batching key: one split
    counts = [item.rows for item in items]
    total = sum(counts)
    try:
        try:
            features = _decode_feature(_concat([b.feature for b in bodies], total), model, split).split(counts)
        except _Unmergeable:
            features = tuple(_decode_feature(b.feature, model, split) for b in bodies)
        names = set(bodies[0].policy_state)
        if any(set(b.policy_state) != names for b in bodies):
            return None
        received = {name: _concat([EncodedTensor.from_proto(b.policy_state[name]) for b in bodies], total)
                    for name in names}
        state = _decode_state(received, model, total, split=split)
    except (RequestError, CodecError, _Unmergeable):
        return None
    return [replace(item, feature=features[j], state=piece, body=None)
            for j, (item, piece) in enumerate(zip(items, state.split(counts)))]
