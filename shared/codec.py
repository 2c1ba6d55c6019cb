"""Feature codec: a batch of features [B, ...] <-> the wire's `Tensor {dtype, shape, data, quant}`.

Codecs (the names ModelSpec.codecs lists and bundles/planners use):

| codec              | wire dtype | bytes per element | parameters                        |
|--------------------|------------|-------------------|-----------------------------------|
| `fp32`             | FLOAT32    | 4                 | none                              |
| `fp16`             | FLOAT16    | 2                 | none                              |
| `int8`             | UINT8      | 1                 | 1 scale + 1 zero point            |
| `int8-per-channel` | UINT8      | 1                 | 1 scale + 1 zero point per axis-1 |

8-bit codecs are asymmetric uint8: real = scale * (q - zero_point), with the range
[min(x, 0), max(x, 0)] mapped onto 0..255 and zero_point chosen so that 0.0 is exact
(zero padding and ReLU zeros stay zero). Split points mostly sit after a ReLU, where a
symmetric int8 code would leave its 128 negative levels unused; asymmetric uint8 uses all
256. The error is at most scale / 2 per element. The decoder also accepts INT8 data
(zero_point in [-128, 127]; symmetric is zero_point = 0), which other senders may prefer.

Bytes are little-endian in row-major order, never pickle. Decoding always returns a
float32 array (the tail runs in float32) and validates strictly: anything malformed
raises `CodecError` (a ValueError) with a message a client can be shown, so a server maps
it to INVALID_ARGUMENT and never crashes on it.

`EncodedTensor` is the plain, grpc-free form; `to_proto` / `from_proto` convert to and from
`splitexit.proto.inference_pb2.Tensor` (protobuf only). The codec is numpy: it takes torch
tensors too (as arrays) but never imports torch, so the torch-free edge encodes with it; the
generated protobuf module is imported only where used.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, Collection, Literal, Sequence, get_args

import numpy as np

from splitexit.arrays import to_numpy

if TYPE_CHECKING:  # protobuf only where a tensor is converted
    from splitexit.proto import inference_pb2

__all__ = [
    "CODECS",
    "CodecError",
    "CodecName",
    "DTypeName",
    "EncodedTensor",
    "MAX_DIM",
    "MAX_RANK",
    "Quantization",
    "decode",
    "encode",
    "encoded_bytes",
]

CodecName = Literal["fp32", "fp16", "int8", "int8-per-channel"]
DTypeName = Literal["float32", "float16", "int8", "uint8"]
SchemeName = Literal["per_tensor", "per_channel"]

CODECS: tuple[CodecName, ...] = get_args(CodecName)

# Limits that make an absurd header fail with a clear message before any arithmetic.
MAX_RANK = 8
MAX_DIM = 2**31 - 1

# Little-endian numpy dtypes of the wire, and the zero-point range of each 8-bit dtype.
_NP_DTYPE: MappingProxyType[str, str] = MappingProxyType(
    {"float32": "<f4", "float16": "<f2", "int8": "i1", "uint8": "u1"}
)
_ITEMSIZE: MappingProxyType[str, int] = MappingProxyType({"float32": 4, "float16": 2, "int8": 1, "uint8": 1})
_ZERO_POINT_RANGE: MappingProxyType[str, tuple[int, int]] = MappingProxyType(
    {"int8": (-128, 127), "uint8": (0, 255)}
)
_FLOAT16_MAX = 65504.0
_FLOAT32_MAX = float(np.finfo(np.float32).max)  # a Python float: comparing with it never casts
# One scale and one zero point, as counted by `encoded_bytes` (both 4-byte fields).
_PARAM_BYTES = 8


class CodecError(ValueError):
    """A tensor that cannot be encoded, or a wire tensor that is malformed."""


def _fmt(shape: Sequence[int]) -> str:
    return "[" + ", ".join(str(d) for d in shape) + "]"


@dataclass(frozen=True, kw_only=True)
class Quantization:
    """Affine quantization parameters: real = scale * (q - zero_point).

    `scale` values are stored as float32-representable floats (what the wire carries),
    so a round trip through protobuf changes nothing.
    """

    scheme: SchemeName
    scale: tuple[float, ...]
    zero_point: tuple[int, ...]
    axis: int = 0  # per_channel: the axis of the tensor's shape the parameters run along

    def __post_init__(self) -> None:
        if self.scheme not in ("per_tensor", "per_channel"):
            raise CodecError(f"unknown quantization scheme {self.scheme!r}; expected per_tensor or per_channel")
        scale = tuple(self.scale)
        zero_point = tuple(self.zero_point)
        if not scale:
            raise CodecError("quantization has no scale")
        if len(zero_point) != len(scale):
            raise CodecError(f"{len(scale)} scales but {len(zero_point)} zero points")
        if self.scheme == "per_tensor":
            if len(scale) != 1:
                raise CodecError(f"per_tensor quantization needs 1 scale, got {len(scale)}")
            if self.axis != 0:
                raise CodecError(f"per_tensor quantization has no axis, got axis={self.axis}")
        elif isinstance(self.axis, bool) or not isinstance(self.axis, int) or self.axis < 0:
            raise CodecError(f"per_channel axis must be an int >= 0, got {self.axis!r}")
        for i, s in enumerate(scale):
            # Checked as a Python float first: casting a huge value to float32 would warn.
            number = isinstance(s, (int, float, np.floating)) and not isinstance(s, bool)
            if not number or not math.isfinite(s) or s <= 0:
                raise CodecError(f"scale[{i}] = {s!r}: scales must be finite and > 0")
            if s > _FLOAT32_MAX:
                raise CodecError(f"scale[{i}] = {s!r} exceeds the float32 range")
        scale32 = tuple(float(v) for v in np.asarray(scale, dtype=np.float32))
        if min(scale32) <= 0:  # a tiny positive scale that rounds to 0 in float32
            raise CodecError(f"scale {min(scale)!r} underflows float32 to 0")
        for i, z in enumerate(zero_point):
            if isinstance(z, bool) or not isinstance(z, (int, np.integer)):
                raise CodecError(f"zero_point[{i}] = {z!r} is not an integer")
        object.__setattr__(self, "scale", scale32)
        object.__setattr__(self, "zero_point", tuple(int(z) for z in zero_point))


@dataclass(frozen=True, kw_only=True)
class EncodedTensor:
    """A tensor as the wire carries it. Constructing one validates its structure."""

    dtype: DTypeName
    shape: tuple[int, ...]  # batch first, e.g. [B, C, H, W]
    data: bytes = field(repr=False)  # little-endian, row-major
    quant: Quantization | None = None  # required for int8/uint8, None for floats

    def __post_init__(self) -> None:
        if self.dtype not in _ITEMSIZE:
            raise CodecError(f"unknown dtype {self.dtype!r}; expected one of {', '.join(_ITEMSIZE)}")
        shape = tuple(self.shape)
        if not 1 <= len(shape) <= MAX_RANK:
            raise CodecError(f"shape {_fmt(shape)} has rank {len(shape)}; expected 1..{MAX_RANK} (batch first)")
        for d in shape:
            if isinstance(d, bool) or not isinstance(d, (int, np.integer)):
                raise CodecError(f"shape {shape!r} has a non-integer dimension")
            if not 1 <= d <= MAX_DIM:
                raise CodecError(f"shape {_fmt(shape)} has dimension {d}; every dimension must be 1..{MAX_DIM}")
        shape = tuple(int(d) for d in shape)
        object.__setattr__(self, "shape", shape)
        if not isinstance(self.data, bytes):
            raise CodecError(f"data must be bytes, got {type(self.data).__name__}")
        expected = math.prod(shape) * _ITEMSIZE[self.dtype]
        if len(self.data) != expected:
            what = "truncated" if len(self.data) < expected else "too long"
            raise CodecError(
                f"data {what}: shape {_fmt(shape)} of {self.dtype} needs {expected} bytes, got {len(self.data)}"
            )
        if self.dtype in ("float32", "float16"):
            if self.quant is not None:
                raise CodecError(f"{self.dtype} data must not carry quantization parameters")
            return
        q = self.quant
        if q is None:
            raise CodecError(f"{self.dtype} data needs quantization parameters (scale, zero point)")
        if q.scheme == "per_channel":
            if q.axis >= len(shape):
                raise CodecError(f"per_channel axis {q.axis} out of range for shape {_fmt(shape)}")
            if len(q.scale) != shape[q.axis]:
                raise CodecError(
                    f"per_channel quantization along axis {q.axis} of shape {_fmt(shape)} needs "
                    f"{shape[q.axis]} scales, got {len(q.scale)}"
                )
        lo, hi = _ZERO_POINT_RANGE[self.dtype]
        bad = [z for z in q.zero_point if not lo <= z <= hi]
        if bad:
            raise CodecError(f"zero point {bad[0]} out of range [{lo}, {hi}] for {self.dtype}")

    @property
    def codec(self) -> CodecName:
        """The codec name of this encoding (INT8 and UINT8 data share the 8-bit names)."""
        if self.quant is None:
            return "fp32" if self.dtype == "float32" else "fp16"
        return "int8" if self.quant.scheme == "per_tensor" else "int8-per-channel"

    @property
    def nbytes(self) -> int:
        """Payload bytes: data plus quantization parameters (see `encoded_bytes`)."""
        return len(self.data) + (_PARAM_BYTES * len(self.quant.scale) if self.quant else 0)

    def to_proto(self) -> "inference_pb2.Tensor":
        from splitexit.proto import inference_pb2 as pb

        msg = pb.Tensor(dtype="DTYPE_" + self.dtype.upper(), shape=self.shape, data=self.data)  # enum by name
        if self.quant is not None:
            msg.quant.CopyFrom(
                pb.Quantization(
                    scheme="QUANT_SCHEME_" + self.quant.scheme.upper(),
                    axis=self.quant.axis,
                    scale=self.quant.scale,
                    zero_point=self.quant.zero_point,
                )
            )
        return msg

    @classmethod
    def from_proto(cls, msg: "inference_pb2.Tensor") -> EncodedTensor:
        """Validate a received `Tensor` message; raises CodecError when it is malformed."""
        from splitexit.proto import inference_pb2 as pb

        if not isinstance(msg, pb.Tensor):
            raise CodecError(f"expected a splitexit.v1.Tensor message, got {type(msg).__name__}")
        # proto3 enums are open: a newer or broken sender may put any integer here.
        try:
            dtype_name = pb.DType.Name(msg.dtype)
        except ValueError:
            raise CodecError(f"unknown dtype enum value {msg.dtype}") from None
        if msg.dtype == pb.DTYPE_UNSPECIFIED:
            raise CodecError("tensor dtype is not set")
        if len(msg.shape) > MAX_RANK:  # before copying a huge repeated field
            raise CodecError(f"shape has rank {len(msg.shape)}; expected 1..{MAX_RANK} (batch first)")
        quant: Quantization | None = None
        if msg.HasField("quant"):
            q = msg.quant
            try:
                scheme_name = pb.QuantScheme.Name(q.scheme)
            except ValueError:
                raise CodecError(f"unknown quantization scheme enum value {q.scheme}") from None
            if q.scheme == pb.QUANT_SCHEME_NONE:
                if q.scale or q.zero_point or q.axis:
                    raise CodecError("quantization parameters given with scheme NONE")
            else:
                if len(q.scale) > MAX_DIM or len(q.zero_point) > MAX_DIM:
                    raise CodecError("too many quantization parameters")
                quant = Quantization(
                    scheme=scheme_name.removeprefix("QUANT_SCHEME_").lower(),  # type: ignore[arg-type]
                    axis=q.axis,
                    scale=tuple(q.scale),
                    zero_point=tuple(q.zero_point),
                )
        return cls(
            dtype=dtype_name.removeprefix("DTYPE_").lower(),  # type: ignore[arg-type]
            shape=tuple(msg.shape),
            data=bytes(msg.data),
            quant=quant,
        )


def encoded_bytes(codec: CodecName, shape: Sequence[int]) -> int:
    """Payload bytes of a tensor of `shape` (batch first, e.g. [B, C, H, W]) under `codec`.

    Data plus 8 bytes per (scale, zero point) pair: per-channel runs along axis 1, so its
    parameters are shared by the B rows. Protobuf framing (tags, lengths, the shape) adds
    a few dozen bytes per message on top, and zero points travel as 1-2 byte varints, so
    this is the cost model's number, within a small constant of the message size.
    """
    shape = tuple(int(d) for d in shape)
    if any(d < 1 for d in shape) or not shape:
        raise CodecError(f"shape {_fmt(shape)} must have rank >= 1 and dimensions >= 1")
    n = math.prod(shape)
    if codec == "fp32":
        return 4 * n
    if codec == "fp16":
        return 2 * n
    if codec == "int8":
        return n + _PARAM_BYTES
    if codec == "int8-per-channel":
        if len(shape) < 2:
            raise CodecError(f"int8-per-channel needs a channel axis (rank >= 2), got shape {_fmt(shape)}")
        return n + _PARAM_BYTES * shape[1]
    raise CodecError(f"unknown codec {codec!r}; expected one of {', '.join(CODECS)}")


def as_array(x: Any) -> np.ndarray:
    """A CPU array of `x`: a numpy array as it is, a torch tensor's values (a view where it
    can be), without importing torch here (the torch-free edge encodes numpy arrays)."""
    x = to_numpy(x)
    if not isinstance(x, np.ndarray):
        raise CodecError(f"expected an array or a torch.Tensor, got {type(x).__name__}")
    return x


def encode(x: Any, codec: CodecName = "fp32") -> EncodedTensor:
    """Encode a batch of features `x` [B, ...] (a float numpy array or torch tensor).

    Raises CodecError for an unknown codec, an empty or non-float tensor, NaN/inf values,
    values beyond float16's range with `fp16`, or a rank < 2 tensor with
    `int8-per-channel` (the channels are axis 1).
    """
    if codec not in CODECS:
        raise CodecError(f"unknown codec {codec!r}; expected one of {', '.join(CODECS)}")
    a = as_array(x)
    if a.dtype.kind != "f":
        raise CodecError(f"expected a floating-point tensor, got {a.dtype}")
    if not 1 <= a.ndim <= MAX_RANK or a.size == 0:
        raise CodecError(
            f"cannot encode shape {_fmt(a.shape)}: need rank 1..{MAX_RANK} (batch first), no empty dims"
        )
    a = np.ascontiguousarray(a, dtype=np.float32)  # [B, ...]
    finite = np.isfinite(a)
    if not finite.all():
        raise CodecError(f"cannot encode {int((~finite).sum())} NaN/inf values (of {a.size})")
    shape = tuple(a.shape)
    if codec == "fp32":
        return EncodedTensor(dtype="float32", shape=shape, data=a.astype("<f4", copy=False).tobytes())
    if codec == "fp16":
        big = float(np.abs(a).max())
        if big > _FLOAT16_MAX:
            raise CodecError(
                f"|x| up to {big:.4g} exceeds float16's range ({_FLOAT16_MAX:g}); use fp32 or int8"
            )
        return EncodedTensor(dtype="float16", shape=shape, data=a.astype("<f2").tobytes())
    if codec == "int8":
        q, scale, zero_point = _quantize_uint8(a.reshape(1, -1))  # one "channel": the whole tensor
        quant = Quantization(scheme="per_tensor", scale=scale, zero_point=zero_point)
        return EncodedTensor(dtype="uint8", shape=shape, data=q.tobytes(), quant=quant)
    # int8-per-channel, channels on axis 1
    if a.ndim < 2:
        raise CodecError(f"int8-per-channel needs a channel axis (rank >= 2), got shape {_fmt(shape)}")
    channels = shape[1]
    per_channel = np.swapaxes(a, 0, 1).reshape(channels, -1)  # [C, B*H*W]
    q, scale, zero_point = _quantize_uint8(per_channel)
    q = np.ascontiguousarray(np.swapaxes(q.reshape(channels, shape[0], *shape[2:]), 0, 1))  # back to [B, C, ...]
    quant = Quantization(scheme="per_channel", axis=1, scale=scale, zero_point=zero_point)
    return EncodedTensor(dtype="uint8", shape=shape, data=q.tobytes(), quant=quant)


def _quantize_uint8(rows: np.ndarray) -> tuple[np.ndarray, tuple[float, ...], tuple[int, ...]]:
    """Asymmetric uint8 quantization of each row of `rows` [R, N] (float32) with its own range."""
    lo = np.minimum(rows.min(axis=1), 0).astype(np.float64)  # [R]; the range always holds 0.0 ...
    hi = np.maximum(rows.max(axis=1), 0).astype(np.float64)  # ... so zero padding stays exact
    # In float64: hi - lo overflows float32 for values near its limits.
    scale = ((hi - lo) / 255).astype(np.float32)
    scale = np.where(scale > 0, scale, np.float32(1.0))  # constant rows: any scale works
    zero_point = np.clip(np.round(-lo / scale.astype(np.float64)), 0, 255)  # [R]; lo <= 0, so in 0..255
    q = np.clip(np.round(rows / scale[:, None]) + zero_point.astype(np.float32)[:, None], 0, 255).astype(np.uint8)
    return q, tuple(scale.tolist()), tuple(int(z) for z in zero_point.tolist())


def decode(
    tensor: "EncodedTensor | inference_pb2.Tensor",
    *,
    expect_shape: Sequence[int] | None = None,
    codecs: Collection[str] | None = None,
    max_bytes: int | None = None,
) -> np.ndarray:
    """Validate and decode a wire tensor into a float32 array [B, ...] (writable, owned).

    expect_shape: the shape without the batch dimension that the caller can run (a split
        point's feature shape); anything else is refused.
    codecs: the codec names the caller accepts (default: all of CODECS).
    max_bytes: the most data bytes the caller accepts, checked before anything else.

    Raises CodecError with a message fit to send back to the client.
    """
    data = getattr(tensor, "data", None)
    if not isinstance(data, bytes):
        raise CodecError(f"expected an EncodedTensor or a Tensor message, got {type(tensor).__name__}")
    if max_bytes is not None and len(data) > max_bytes:
        raise CodecError(f"tensor data is {len(data)} bytes; the limit is {max_bytes}")
    t = tensor if isinstance(tensor, EncodedTensor) else EncodedTensor.from_proto(tensor)
    if codecs is not None and t.codec not in codecs:
        raise CodecError(f"codec {t.codec} not accepted here; accepted: {', '.join(sorted(codecs))}")
    if expect_shape is not None and t.shape[1:] != tuple(expect_shape):
        raise CodecError(
            f"feature shape {_fmt(t.shape[1:])} (batch of {t.shape[0]}) does not match the expected "
            f"{_fmt(expect_shape)}"
        )
    raw = np.frombuffer(t.data, dtype=_NP_DTYPE[t.dtype]).reshape(t.shape)
    if t.quant is None:
        out = raw.astype(np.float32)  # a native, writable copy
        finite = np.isfinite(out)
        if not finite.all():
            first = int(np.flatnonzero(~finite)[0])
            raise CodecError(
                f"{int((~finite).sum())} NaN/inf values in {t.dtype} data (first at flat index {first})"
            )
        return out
    q = t.quant
    # Parameters shaped to broadcast along their axis: [1, C, 1, 1] for per-channel axis 1.
    param_shape = [1] * len(t.shape)
    if q.scheme == "per_channel":
        param_shape[q.axis] = t.shape[q.axis]
    scale = np.asarray(q.scale, dtype=np.float32).reshape(param_shape)
    zero_point = np.asarray(q.zero_point, dtype=np.float32).reshape(param_shape)
    with np.errstate(over="ignore"):  # overflow is reported below, as a CodecError
        out = (raw.astype(np.float32) - zero_point) * scale  # q - zp is exact in float32
    if not np.isfinite(out).all():
        raise CodecError(f"scale up to {max(q.scale):.4g} overflows float32 when dequantized")
    return out

