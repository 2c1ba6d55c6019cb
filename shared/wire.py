"""What the edge and the cloud put on the wire, in one place so the two sides never diverge.

Both the edge agent and the cloud worker import this module (it is part of the shared
core and imports neither grpc nor torch; protobuf and Pillow only where used).

Policy state (`InferRequest.policy_state`, map name -> Tensor)
-----------------------------------------------------------------
A `splitexit.runtime.RowState` after the edge's exits, flattened by `RowState.to_wire`:
the policy's entries by their names, and the runtime's as `NEXT_EXIT` ("_next_exit"),
`EVALUATED` and the optional `BEST_STATE` (names that start with "_", which policies may
not use). Every tensor is [B, ...] with the batch first, and travels like this:

| state dtype                    | on the wire                                              |
|--------------------------------|----------------------------------------------------------|
| float32, float16, bfloat16     | DTYPE_FLOAT32 [B, ...]                                   |
| int64/int32/int16/int8/uint8/bool | DTYPE_FLOAT32 [B, ...]: integers up to 2**24 in magnitude are exact in float32; larger ones are refused on both sides |
| float64                        | DTYPE_UINT8 [B, ..., 8]: the IEEE-754 little-endian bytes of each value, per-tensor quantization scale 1, zero point 0 (so the codec's dequantization yields the byte values exactly): lossless, so a split run decides exactly as an unsplit one |

The receiver knows each entry's dtype and per-row shape from the policy
(`state_spec(runner)`), casts back to it and refuses unknown names, missing required
names, wrong shapes, non-integral or out-of-range integers and NaN/inf (StateError). A
float64 entry sent as a plain FLOAT32 [B, ...] tensor is accepted too (widened; lossy).

Raw input (`InferRequest.raw_input`)
------------------------------------
One item per row, all in one format (`RAW_FORMATS`):
- "png", "jpeg": an image file; decoded with Pillow, mode "L" for 1 channel and "RGB" for
  3, and its size must equal the model's input H x W (checked before the pixels are
  decoded, so an image bomb is refused from its header).
- "u8": raw uint8 pixels in H x W x C order (exactly H*W*C bytes), the layout
  `splitexit.data.Normalize` takes; lossless and free to decode.
Decoded rows are uint8 [B, H, W, C]; the receiver normalizes them with the network's own
mean/std.

Networks and exits in answers
-----------------------------
`RowResult.exit_index` is a stage index of `RowResult.network`; the network is the model
name, or `larger_network_name(model)` for a cascade's larger network.

Requests and responses
----------------------
`build_request` makes an InferRequest from a bundle (or its hash/name/split), the rows'
features, their policy state and sample ids; `parse_response` checks an InferResponse
against that request and returns plain `InferAnswer` / `RowAnswer` objects.
"""

from __future__ import annotations

import io
import math
import uuid
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Collection, Mapping, Sequence

import numpy as np

from splitexit.arrays import to_numpy
from splitexit.codec import CodecError, CodecName, EncodedTensor, Quantization, decode, encode

if TYPE_CHECKING:
    import torch

    from splitexit.proto import inference_pb2
    from splitexit.runtime import RowState

__all__ = [
    "BEST_CONF",
    "BEST_EXIT",
    "BEST_PROBS",
    "BEST_STATE",
    "EVALUATED",
    "NEXT_EXIT",
    "RUNTIME_STATE",
    "InferAnswer",
    "MAX_EXACT_INT",
    "RAW_FORMATS",
    "RowAnswer",
    "StateError",
    "StateField",
    "WireError",
    "build_request",
    "decode_policy_state",
    "decode_raw_input",
    "edge_exit_infos",
    "encode_policy_state",
    "encode_raw_input",
    "larger_network_name",
    "parse_response",
    "state_spec",
]

# Integers travel as float32: exact up to 2**24.
MAX_EXACT_INT = 2**24
RAW_FORMATS: tuple[str, ...] = ("png", "jpeg", "u8")
# The names of RowState's runtime entries on the wire (splitexit.runtime maps its fields to them).
NEXT_EXIT, EVALUATED = "_next_exit", "_evaluated"
BEST_CONF, BEST_EXIT, BEST_PROBS = "_best_conf", "_best_exit", "_best_probs"
# Runtime entries the edge may leave out: the cloud then tracks its own best exit.
BEST_STATE: tuple[str, ...] = (BEST_CONF, BEST_EXIT, BEST_PROBS)
RUNTIME_STATE: tuple[str, ...] = (NEXT_EXIT, EVALUATED, *BEST_STATE)
_PIL_FORMAT = {"png": "PNG", "jpeg": "JPEG"}
_PIL_MODE = {1: "L", 3: "RGB"}
_BYTES_QUANT = Quantization(scheme="per_tensor", scale=(1.0,), zero_point=(0,))


class WireError(ValueError):
    """A message that does not say what it must (bad request or response)."""


class StateError(WireError):
    """Policy state that cannot be encoded, or a received one that is malformed."""


def larger_network_name(model: str) -> str:
    """RowResult.network of a row answered by `model`'s cascade larger network."""
    return f"{model}/large"


# --- policy state ------------------------------------------------------------------------
@dataclass(frozen=True, kw_only=True)
class StateField:
    """One entry of a policy's per-row state as the receiver expects it."""

    name: str
    dtype: np.dtype  # what the runner works with
    row_shape: tuple[int, ...]  # shape of one row (without the batch dimension)
    required: bool  # False for the BEST_* entries


def state_spec(runner: Any) -> dict[str, StateField]:
    """Names, dtypes and per-row shapes of an `ExitRunner`'s state (policy + runtime)."""
    reference = runner.initial_state(1).to_wire()
    return {
        name: StateField(name=name, dtype=np.dtype(value.dtype), row_shape=tuple(value.shape[1:]),
                         required=name not in BEST_STATE)
        for name, value in reference.items()
    }


def _is_integer(dtype: np.dtype) -> bool:
    return dtype.kind in "biu"


def _state_array(name: str, value: Any) -> np.ndarray:
    value = to_numpy(value)
    if not isinstance(value, np.ndarray):
        raise StateError(f"policy state {name!r} is a {type(value).__name__}, not an array")
    return value


def encode_policy_state(state: "RowState | Mapping[str, np.ndarray]", *, rows: int | None = None,
                        include_best: bool = False) -> dict[str, EncodedTensor]:
    """Per-row state -> wire tensors (see the module docstring for the format): a
    RowState, or entries already named as on the wire.

    rows: the batch size every entry must have (default: that of the first entry).
    include_best: also send the runtime's BEST_* entries (the edge's best exit so far);
        without them the cloud's degraded answer is its own best exit.
    Raises StateError for an empty entry, a batch mismatch, NaN/inf or an integer beyond
    MAX_EXACT_INT.
    """
    entries = state if isinstance(state, Mapping) else state.to_wire()
    out: dict[str, EncodedTensor] = {}
    for name, value in entries.items():
        if name in BEST_STATE and not include_best:
            continue
        value = _state_array(name, value)
        if value.ndim == 0 or value.size == 0:
            raise StateError(f"policy state {name!r} has shape {list(value.shape)}: needs [B, ...] with B >= 1")
        rows = value.shape[0] if rows is None else rows
        if value.shape[0] != rows:
            raise StateError(f"policy state {name!r} has {value.shape[0]} rows, expected {rows}")
        if value.dtype == np.float64:
            if not bool(np.isfinite(value).all()):
                raise StateError(f"policy state {name!r} holds NaN/inf")
            raw = np.ascontiguousarray(value).astype("<f8", copy=False).tobytes()
            out[name] = EncodedTensor(dtype="uint8", shape=(*value.shape, 8), data=raw, quant=_BYTES_QUANT)
            continue
        if _is_integer(value.dtype):
            value = value.astype(np.int64)
            if value.size and int(np.abs(value).max()) > MAX_EXACT_INT:
                raise StateError(f"policy state {name!r} holds integers beyond {MAX_EXACT_INT} (not exact in float32)")
        try:
            out[name] = encode(value.astype(np.float32), "fp32")
        except CodecError as exc:
            raise StateError(f"policy state {name!r}: {exc}") from exc
    return out


def decode_policy_state(received: Mapping[str, "EncodedTensor | inference_pb2.Tensor"],
                        spec: Mapping[str, StateField], *, rows: int) -> dict[str, np.ndarray]:
    """Validate and decode received policy state against `spec` (from `state_spec`).

    Returns arrays of the spec's dtypes, [rows, *row_shape] each. Entries the spec marks
    optional may be absent. Raises StateError (a ValueError) with a message fit for the
    client: unknown or missing names, wrong shape, dtype or size, NaN/inf, a non-integral
    or out-of-range value in an integer entry.
    """
    unknown = sorted(set(received) - set(spec))
    if unknown:
        raise StateError(f"unknown policy state {unknown[:4]}; this policy's state is {sorted(spec)}")
    missing = sorted(n for n, f in spec.items() if f.required and n not in received)
    if missing:
        raise StateError(f"policy state is missing {missing}")
    out: dict[str, np.ndarray] = {}
    for name, tensor in received.items():
        field_ = spec[name]
        want = (rows, *field_.row_shape)
        try:
            t = tensor if isinstance(tensor, EncodedTensor) else EncodedTensor.from_proto(tensor)
            if field_.dtype == np.float64 and t.dtype == "uint8":
                if t.shape != (*want, 8) or t.quant is None or t.quant.scale != (1.0,) or t.quant.zero_point != (0,):
                    raise StateError(f"policy state {name!r}: float64 bytes must be uint8 {list(want) + [8]} "
                                     f"with scale 1 and zero point 0, got {t.dtype} {list(t.shape)}")
                value = np.frombuffer(t.data, dtype="<f8").reshape(want).astype(np.float64)
                if not bool(np.isfinite(value).all()):
                    raise StateError(f"policy state {name!r} holds NaN/inf")
                out[name] = value
                continue
            if t.dtype != "float32":
                raise StateError(f"policy state {name!r} must be float32, got {t.dtype}")
            if t.shape != want:
                raise StateError(f"policy state {name!r} has shape {list(t.shape)}, expected {list(want)}")
            value = decode(t)  # float32, finiteness checked
        except CodecError as exc:
            raise StateError(f"policy state {name!r}: {exc}") from exc
        if _is_integer(field_.dtype):
            if not bool((value == np.round(value)).all()) or (value.size and float(np.abs(value).max()) > MAX_EXACT_INT):
                raise StateError(f"policy state {name!r} must hold integers of magnitude <= {MAX_EXACT_INT}")
            if field_.dtype == np.bool_ and not bool(((value == 0) | (value == 1)).all()):
                raise StateError(f"policy state {name!r} must hold 0 or 1")
        out[name] = value.astype(field_.dtype)
    return out


# --- raw input ---------------------------------------------------------------------------
def encode_raw_input(images: np.ndarray, fmt: str = "png", *, quality: int = 90) -> tuple[bytes, ...]:
    """uint8 images [B, H, W, C] (C = 1 or 3) -> one encoded item per row in `fmt`."""
    from PIL import Image

    if fmt not in RAW_FORMATS:
        raise WireError(f"unknown raw input format {fmt!r}; expected one of {', '.join(RAW_FORMATS)}")
    array = np.asarray(images.cpu().numpy() if hasattr(images, "cpu") else images)
    if array.dtype != np.uint8 or array.ndim != 4 or array.shape[-1] not in _PIL_MODE or 0 in array.shape:
        raise WireError(f"raw input must be uint8 [B, H, W, C] with C in (1, 3), got {array.dtype} {list(array.shape)}")
    if fmt == "u8":
        return tuple(np.ascontiguousarray(row).tobytes() for row in array)
    items = []
    for row in array:
        image = Image.fromarray(row[..., 0] if row.shape[-1] == 1 else row, _PIL_MODE[row.shape[-1]])
        buf = io.BytesIO()
        image.save(buf, format=_PIL_FORMAT[fmt], **({"quality": quality} if fmt == "jpeg" else {}))
        items.append(buf.getvalue())
    return tuple(items)


def decode_raw_input(fmt: str, items: Sequence[bytes], input_shape: Sequence[int], *,
                     formats: Collection[str] = RAW_FORMATS, max_item_bytes: int | None = None) -> np.ndarray:
    """Validate and decode RawInput items into uint8 [B, H, W, C] for an input [C, H, W].

    Raises WireError for an unaccepted format, an item that is not an image of that
    format, or one whose size or channels differ from `input_shape`.
    """
    from PIL import Image

    c, h, w = (int(d) for d in input_shape)
    if fmt not in formats:
        raise WireError(f"raw input format {fmt!r} not accepted; accepted: {', '.join(sorted(formats)) or 'none'}")
    if c not in _PIL_MODE:
        raise WireError(f"raw input needs 1 or 3 channels, the model takes {c}")
    out = np.empty((len(items), h, w, c), dtype=np.uint8)
    for i, item in enumerate(items):
        if max_item_bytes is not None and len(item) > max_item_bytes:
            raise WireError(f"raw input item {i} is {len(item)} bytes; the limit is {max_item_bytes}")
        if fmt == "u8":
            if len(item) != h * w * c:
                raise WireError(f"raw input item {i}: u8 needs {h}x{w}x{c} = {h * w * c} bytes, got {len(item)}")
            out[i] = np.frombuffer(item, dtype=np.uint8).reshape(h, w, c)
            continue
        try:
            with Image.open(io.BytesIO(item), formats=[_PIL_FORMAT[fmt]]) as image:
                if image.size != (w, h):  # from the header: no pixels decoded yet
                    raise WireError(f"raw input item {i} is {image.size[0]}x{image.size[1]}, the model takes {w}x{h}")
                pixels = np.asarray(image.convert(_PIL_MODE[c]))
        except WireError:
            raise
        except Exception as exc:  # Pillow raises many types on corrupt data; all mean "unreadable"
            raise WireError(f"raw input item {i} is not a readable {fmt} image ({type(exc).__name__})") from None
        out[i] = pixels.reshape(h, w, c)
    return out


# --- requests and responses --------------------------------------------------------------
def top_classes(probs: np.ndarray, k: int) -> tuple[tuple[int, float], ...]:
    """The k most probable (class, probability) of one row, most probable first; ties go
    to the lower class (a stable order, the same on the edge and the worker)."""
    order = np.argsort(-probs, kind="stable")[:k]
    return tuple((int(c), float(probs[c])) for c in order)



def edge_exit_infos(state: "RowState", exit_stages: Sequence[int]) -> list["inference_pb2.EdgeExitInfo"]:
    """EdgeExitInfo per row from the runtime's state after the edge ran.

    exit_stages: the stage index of each ladder exit (bundle manifest "exits").
    """
    from splitexit.proto import inference_pb2 as pb

    evaluated = state.evaluated.tolist()
    best_exit = state.best_exit.tolist()
    best_conf = state.best_conf.tolist()
    best_label = state.best_probs.argmax(-1).tolist()
    infos = []
    for n, k, conf, label in zip(evaluated, best_exit, best_conf, best_label):
        info = pb.EdgeExitInfo(exits_evaluated=int(n))
        if n > 0 and 0 <= k < len(exit_stages):
            info.best_exit, info.best_confidence, info.best_label = int(exit_stages[k]), float(conf), int(label)
        infos.append(info)
    return infos


def build_request(bundle: Any = None, feature: Any = None, state: "RowState | None" = None,
                  sample_ids: Sequence[str] = (), *, codec: CodecName | str | None = None,
                  bundle_hash: str | None = None, model: str | None = None, split: int | None = None,
                  request_id: str | None = None, include_best: bool = False, edge_exits: bool = True,
                  raw_items: Sequence[bytes] | None = None, raw_format: str = "png",
                  want_probabilities: bool = False, top_k: int = 0) -> "inference_pb2.InferRequest":
    """An InferRequest for the rows an edge runner left pending (or for raw input only).

    bundle: a loaded `splitexit.bundle.Bundle` (either part); its hash, name, split and
        codec are the defaults of bundle_hash, model, split and codec.
    feature: [B, ...] output of stage `split`, an array or a torch tensor (None: a
        raw-input-only request).
    state: the runner's per-row state for those rows (`Pending.state`); None = fresh.
        Its BEST_* entries travel with include_best.
    sample_ids: B ids (default: "0".."B-1").
    edge_exits: fill EdgeExitInfo per row from the state's best exit so far.
    raw_items: one encoded input per row (see `encode_raw_input`) in `raw_format`.
    request_id: default a fresh uuid4 hex.
    """
    from splitexit.proto import inference_pb2 as pb

    if bundle is not None:
        bundle_hash = bundle.hash if bundle_hash is None else bundle_hash
        model = bundle.name if model is None else model
        split = bundle.split if split is None else split
        codec = bundle.codec if codec is None else codec
    if not bundle_hash or not model or split is None:
        raise WireError("build_request needs a bundle, or bundle_hash, model and split")
    if feature is None and raw_items is None:
        raise WireError("a request needs a feature, raw input, or both")
    rows = feature.shape[0] if feature is not None else len(raw_items or ())
    if rows < 1:
        raise WireError("a request needs at least one row")
    ids = [str(i) for i in range(rows)] if not sample_ids else [str(s) for s in sample_ids]
    if len(ids) != rows:
        raise WireError(f"{len(ids)} sample ids for {rows} rows")
    msg = pb.InferRequest(request_id=request_id or uuid.uuid4().hex, bundle_hash=bundle_hash, model=model,
                          split=int(split), sample_ids=ids, want_probabilities=want_probabilities, top_k=int(top_k))
    if feature is not None:
        try:
            msg.feature.CopyFrom(encode(feature, codec or "fp32").to_proto())  # type: ignore[arg-type]
        except CodecError as exc:
            raise WireError(f"feature: {exc}") from exc
    if raw_items is not None:
        if len(raw_items) != rows:
            raise WireError(f"{len(raw_items)} raw input items for {rows} rows")
        msg.raw_input.format = raw_format
        msg.raw_input.items.extend(raw_items)
    if state is not None:
        for name, tensor in encode_policy_state(state, rows=rows, include_best=include_best).items():
            msg.policy_state[name].CopyFrom(tensor.to_proto())
        if edge_exits and bundle is not None:
            msg.edge_exits.extend(edge_exit_infos(state, bundle.manifest.exits))
    return msg


@dataclass(frozen=True, kw_only=True)
class RowAnswer:
    """One row's answer from the cloud."""

    sample_id: str
    label: int
    confidence: float
    exit_index: int  # stage index of the answering exit, in `network`
    network: str
    degraded: bool
    top_k: tuple[tuple[int, float], ...] = ()  # (class, probability), most probable first


@dataclass(frozen=True, kw_only=True)
class InferAnswer:
    """A parsed InferResponse. `error` is (grpc status code number, message) on a stream."""

    request_id: str
    rows: tuple[RowAnswer, ...]
    queue_ms: float
    compute_ms: float
    batch_size: int
    worker_id: str
    error: tuple[int, str] | None = None


def parse_response(msg: "inference_pb2.InferResponse", request: "inference_pb2.InferRequest | None" = None,
                   *, num_classes: int | None = None) -> InferAnswer:
    """Check an InferResponse (against its request, when given) and make it plain data.

    Raises WireError when the response does not answer the request: another request_id,
    a row count or sample ids that differ, a label outside num_classes.
    """
    if request is not None and msg.request_id != request.request_id:
        raise WireError(f"response to request {msg.request_id!r}, expected {request.request_id!r}")
    error = None
    if msg.HasField("error") and msg.error.code != 0:
        error = (int(msg.error.code), str(msg.error.message))
    rows = []
    for r in msg.rows:
        if num_classes is not None and not 0 <= r.label < num_classes:
            raise WireError(f"row {r.sample_id!r}: label {r.label} outside 0..{num_classes - 1}")
        if not math.isfinite(r.confidence):
            raise WireError(f"row {r.sample_id!r}: confidence {r.confidence}")
        rows.append(RowAnswer(sample_id=r.sample_id, label=int(r.label), confidence=float(r.confidence),
                              exit_index=int(r.exit_index), network=r.network, degraded=bool(r.degraded),
                              top_k=tuple((int(s.class_index), float(s.probability)) for s in r.top_k)))
    if request is not None and error is None:
        got = [r.sample_id for r in rows]
        if got != list(request.sample_ids):
            raise WireError(f"response rows {got[:4]}... do not answer the request's sample ids "
                            f"{list(request.sample_ids)[:4]}... ({len(got)} for {len(request.sample_ids)})")
    return InferAnswer(request_id=msg.request_id, rows=tuple(rows), queue_ms=float(msg.timing.queue_ms),
                       compute_ms=float(msg.timing.compute_ms), batch_size=int(msg.timing.batch_size),
                       worker_id=msg.worker_id, error=error)
