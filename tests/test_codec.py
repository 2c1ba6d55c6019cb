"""Feature codec: round trips within analytic bounds, byte counts, every rejection path,
and a fuzz that may only ever raise CodecError."""

from __future__ import annotations

import math
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from google.protobuf.message import DecodeError

from splitexit.codec import (
    CODECS,
    CodecError,
    EncodedTensor,
    Quantization,
    decode,
    encode,
    encoded_bytes,
)
from splitexit.proto import inference_pb2 as pb

FEATURE = (8, 5, 5)  # one sample's [C, H, W]


def _feature(batch: int = 4, *, relu: bool = True) -> torch.Tensor:
    x = torch.randn(batch, *FEATURE) * 3  # [B, C, H, W]
    return x.relu() if relu else x


def _tensor_msg(dtype: int, shape: list[int], data: bytes, quant: pb.Quantization | None = None) -> pb.Tensor:
    msg = pb.Tensor(dtype=dtype, shape=shape, data=data)
    if quant is not None:
        msg.quant.CopyFrom(quant)
    return msg


def _uint8_msg(**quant: object) -> pb.Tensor:
    """A valid-looking [2, 3] uint8 tensor with the given quantization fields."""
    fields: dict[str, object] = {"scheme": pb.QUANT_SCHEME_PER_TENSOR, "scale": [0.1], "zero_point": [0]}
    fields.update(quant)
    return _tensor_msg(pb.DTYPE_UINT8, [2, 3], bytes(range(6)), pb.Quantization(**fields))


# --- round trips -----------------------------------------------------------------------


@pytest.mark.parametrize("via_proto", [False, True])
@pytest.mark.parametrize("shape", [(3,), (2, 7), (4, *FEATURE), (1, 2, 3, 4, 5)])
def test_fp32_round_trip_is_exact(shape: tuple[int, ...], via_proto: bool) -> None:
    x = torch.randn(*shape)
    enc = encode(x, "fp32")
    wire = pb.Tensor.FromString(enc.to_proto().SerializeToString()) if via_proto else enc
    y = decode(wire)
    assert y.dtype == np.float32 and y.shape == x.shape
    assert np.array_equal(y, x)


def test_encode_accepts_views_grad_and_other_float_dtypes() -> None:
    base = torch.randn(6, 4, 3, 3)
    view = base.transpose(2, 3)  # non-contiguous
    assert np.array_equal(decode(encode(view)), view.contiguous())
    leaf = torch.randn(2, 3, requires_grad=True)
    assert np.array_equal(decode(encode(leaf)), leaf.detach())
    as64 = torch.randn(2, 3, dtype=torch.float64)
    assert np.array_equal(decode(encode(as64)), as64.float())


def test_decoded_tensor_is_writable_and_owned() -> None:
    enc = encode(torch.ones(2, 3))
    y = decode(enc)
    y += 1  # would fail on a read-only buffer
    assert np.array_equal(decode(enc), torch.ones(2, 3))


def test_fp16_round_trip_within_half_precision_bound() -> None:
    x = torch.cat([torch.randn(4, 64) * 100, torch.randn(4, 64) * 1e-6])  # normal and subnormal
    y = torch.from_numpy(decode(encode(x, "fp16").to_proto()))
    # round-to-nearest with an 11-bit significand; subnormals have a fixed step of 2**-24
    bound = x.abs() * 2.0**-11 + 2.0**-25
    assert bool(((y - x).abs() <= bound).all())


@pytest.mark.parametrize("relu", [True, False])
def test_int8_per_tensor_within_half_a_step(relu: bool) -> None:
    x = _feature(relu=relu)
    enc = encode(x, "int8")
    assert enc.dtype == "uint8" and enc.quant is not None and enc.quant.scheme == "per_tensor"
    y = torch.from_numpy(decode(enc.to_proto()))
    scale = enc.quant.scale[0]
    assert math.isclose(scale, (float(x.max().clamp(min=0)) - float(x.min().clamp(max=0))) / 255, rel_tol=1e-6)
    assert float((y - x).abs().max()) <= scale * (0.5 + 1e-4)
    assert bool((y[x == 0] == 0).all()), "zero must stay exactly zero"


def test_int8_per_channel_within_half_a_step_per_channel() -> None:
    x = _feature(relu=False)
    enc = encode(x, "int8-per-channel")
    assert enc.quant is not None and enc.quant.axis == 1 and len(enc.quant.scale) == FEATURE[0]
    y = torch.from_numpy(decode(enc.to_proto()))
    err = (y - x).abs().amax(dim=(0, 2, 3))  # [C]
    scale = torch.tensor(enc.quant.scale)
    assert bool((err <= scale * (0.5 + 1e-4)).all())


def test_int8_constant_and_all_zero_tensors() -> None:
    for x in (torch.zeros(3, 4), torch.full((3, 4), -2.5), torch.full((3, 4), 7.0)):
        for codec in ("int8", "int8-per-channel"):
            enc = encode(x, codec)
            y = torch.from_numpy(decode(enc))
            assert float((y - x).abs().max()) <= enc.quant.scale[0] * 0.5 + 1e-6  # type: ignore[union-attr]


def test_per_channel_beats_per_tensor_on_channels_of_different_ranges() -> None:
    ranges = torch.logspace(-3, 2, FEATURE[0])  # channel c spans ~[0, ranges[c]]
    x = torch.rand(4, *FEATURE) * ranges[None, :, None, None]
    err_tensor = (torch.from_numpy(decode(encode(x, "int8"))) - x).abs().amax(dim=(0, 2, 3))
    err_channel = (torch.from_numpy(decode(encode(x, "int8-per-channel"))) - x).abs().amax(dim=(0, 2, 3))
    span = x.amax(dim=(0, 2, 3))  # [C]
    # per-channel: every channel keeps 8 bits of its own range ...
    assert bool((err_channel <= span * (0.5 / 255) * 1.001).all())
    # ... per-tensor: the smallest channel falls below one step and is mostly lost
    assert float(err_tensor[0]) > 0.5 * float(span[0])
    assert bool((err_channel <= err_tensor + 1e-9).all())


# --- byte counts -----------------------------------------------------------------------


def test_byte_counts() -> None:
    shape = (4, *FEATURE)
    fp32 = encoded_bytes("fp32", shape)
    assert fp32 == 4 * math.prod(shape)
    assert encoded_bytes("fp16", shape) == fp32 // 2
    assert encoded_bytes("int8", shape) == fp32 // 4 + 8  # + one scale and zero point
    assert encoded_bytes("int8-per-channel", shape) == fp32 // 4 + 8 * FEATURE[0]
    x = _feature()
    for codec in CODECS:
        enc = encode(x, codec)
        assert enc.codec == codec
        assert enc.nbytes == encoded_bytes(codec, shape)
        n_params = len(enc.quant.scale) if enc.quant else 0
        wire = len(enc.to_proto().SerializeToString())
        # scales are 4 bytes on the wire, zero points 1-2 byte varints, plus a little framing
        assert len(enc.data) + 4 * n_params <= wire <= enc.nbytes + 32


def test_encoded_bytes_rejects_bad_arguments() -> None:
    with pytest.raises(CodecError, match="unknown codec"):
        encoded_bytes("int4", (1, 2))  # type: ignore[arg-type]
    with pytest.raises(CodecError, match="dimensions >= 1"):
        encoded_bytes("fp32", (0, 2))
    with pytest.raises(CodecError, match="channel axis"):
        encoded_bytes("int8-per-channel", (5,))


# --- decoding other senders' tensors ---------------------------------------------------


def test_decodes_symmetric_int8() -> None:
    q = np.arange(-128, 128, dtype=np.int8).reshape(2, 128)
    msg = _tensor_msg(
        pb.DTYPE_INT8,
        [2, 128],
        q.tobytes(),
        pb.Quantization(scheme=pb.QUANT_SCHEME_PER_TENSOR, scale=[0.5], zero_point=[0]),
    )
    y = decode(msg)
    assert np.array_equal(y, q.astype(np.float32) * 0.5)


def test_empty_quant_message_with_scheme_none_is_plain_float() -> None:
    msg = encode(torch.ones(1, 2)).to_proto()
    msg.quant.SetInParent()  # present but NONE and empty: as if absent
    assert np.array_equal(decode(msg), torch.ones(1, 2))


# --- rejections ------------------------------------------------------------------------


F32_2x2 = np.ones((2, 2), np.float32).tobytes()


@pytest.mark.parametrize(
    ("msg", "match"),
    [
        (_tensor_msg(99, [2, 2], F32_2x2), "unknown dtype enum value 99"),
        (_tensor_msg(pb.DTYPE_UNSPECIFIED, [2, 2], F32_2x2), "dtype is not set"),
        (_tensor_msg(pb.DTYPE_FLOAT32, [2, -2], F32_2x2), "dimension -2"),
        (_tensor_msg(pb.DTYPE_FLOAT32, [0, 2], b""), "dimension 0"),
        (_tensor_msg(pb.DTYPE_FLOAT32, [2, 2**40], F32_2x2), "dimension 1099511627776"),
        (_tensor_msg(pb.DTYPE_FLOAT32, [], F32_2x2), "rank 0"),
        (_tensor_msg(pb.DTYPE_FLOAT32, [1] * 9, F32_2x2), "rank 9"),
        (_tensor_msg(pb.DTYPE_FLOAT32, [2, 3], F32_2x2), "truncated: shape \\[2, 3\\] of float32 needs 24 bytes, got 16"),
        (_tensor_msg(pb.DTYPE_FLOAT32, [2, 2], F32_2x2[:-1]), "truncated"),
        (_tensor_msg(pb.DTYPE_FLOAT32, [2, 2], F32_2x2 + b"\0"), "too long"),
        (_tensor_msg(pb.DTYPE_FLOAT16, [2, 2], F32_2x2), "too long"),
        (_tensor_msg(pb.DTYPE_FLOAT32, [1, 2], np.array([1, np.nan], np.float32).tobytes()), "1 NaN/inf .* index 1"),
        (_tensor_msg(pb.DTYPE_FLOAT16, [2], np.array([np.inf, 0], np.float16).tobytes()), "NaN/inf values in float16"),
        (
            _tensor_msg(pb.DTYPE_FLOAT32, [2, 2], F32_2x2, pb.Quantization(scheme=pb.QUANT_SCHEME_PER_TENSOR)),
            "quantization",
        ),
        (_tensor_msg(pb.DTYPE_UINT8, [2, 2], bytes(4)), "uint8 data needs quantization"),
        (_uint8_msg(scale=[0.0]), "finite and > 0"),
        (_uint8_msg(scale=[-0.1]), "finite and > 0"),
        (_uint8_msg(scale=[math.nan]), "finite and > 0"),
        (_uint8_msg(scale=[math.inf]), "finite and > 0"),
        (_uint8_msg(scale=[]), "no scale"),
        (_uint8_msg(scale=[0.1, 0.2], zero_point=[0, 0]), "needs 1 scale, got 2"),
        (_uint8_msg(zero_point=[]), "1 scales but 0 zero points"),
        (_uint8_msg(zero_point=[256]), "zero point 256 out of range \\[0, 255\\]"),
        (_uint8_msg(zero_point=[-1]), "zero point -1 out of range"),
        (_uint8_msg(axis=1), "per_tensor quantization has no axis"),
        (_uint8_msg(scheme=7), "unknown quantization scheme enum value 7"),
        (_uint8_msg(scheme=pb.QUANT_SCHEME_NONE), "given with scheme NONE"),
        (_uint8_msg(scheme=pb.QUANT_SCHEME_PER_CHANNEL, axis=1, scale=[0.1] * 2, zero_point=[0] * 2), "needs 3 scales"),
        (_uint8_msg(scheme=pb.QUANT_SCHEME_PER_CHANNEL, axis=2, scale=[0.1] * 3, zero_point=[0] * 3), "axis 2 out"),
        (_uint8_msg(scheme=pb.QUANT_SCHEME_PER_CHANNEL, axis=-1, scale=[0.1] * 3, zero_point=[0] * 3), "axis must"),
        (_uint8_msg(scale=[1e38]), "overflows float32 when dequantized"),
        (
            _tensor_msg(
                pb.DTYPE_INT8, [1], b"\0", pb.Quantization(scheme=pb.QUANT_SCHEME_PER_TENSOR, scale=[1], zero_point=[128])
            ),
            "zero point 128 out of range \\[-128, 127\\]",
        ),
    ],
)
def test_decode_rejects(msg: pb.Tensor, match: str) -> None:
    with pytest.raises(CodecError, match=match):
        decode(msg)
    # and after a trip through bytes, as a server receives it
    with pytest.raises(CodecError, match=match):
        decode(pb.Tensor.FromString(msg.SerializeToString()))


def test_import_needs_neither_torch_nor_protobuf() -> None:
    # a planner calls encoded_bytes on a device without paying for torch or protobuf
    code = (
        "import sys; from splitexit.codec import encoded_bytes; encoded_bytes('int8', (1, 2)); "
        "print('torch' in sys.modules, 'google.protobuf' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "False"]


def test_codec_error_is_a_value_error() -> None:
    assert issubclass(CodecError, ValueError)


def test_decode_checks_the_callers_expectations() -> None:
    enc = encode(_feature(batch=3), "int8")
    assert decode(enc, expect_shape=FEATURE, codecs={"int8"}, max_bytes=len(enc.data)).shape == (3, *FEATURE)
    with pytest.raises(CodecError, match=r"feature shape \[8, 5, 5\] \(batch of 3\) .* expected \[8, 4, 4\]"):
        decode(enc, expect_shape=(8, 4, 4))
    with pytest.raises(CodecError, match="limit is 10"):
        decode(enc.to_proto(), max_bytes=10)
    with pytest.raises(CodecError, match="codec int8 not accepted here; accepted: fp16, fp32"):
        decode(enc, codecs=("fp32", "fp16"))


def test_decode_rejects_things_that_are_not_tensors() -> None:
    for thing in ("not a tensor", None, pb.InferRequest()):
        with pytest.raises(CodecError, match="expected"):
            decode(thing)  # type: ignore[arg-type]


def test_encoded_tensor_validates_at_construction() -> None:
    with pytest.raises(CodecError, match="unknown dtype 'float64'"):
        EncodedTensor(dtype="float64", shape=(1,), data=bytes(8))  # type: ignore[arg-type]
    with pytest.raises(CodecError, match="data must be bytes"):
        EncodedTensor(dtype="uint8", shape=(1,), data=bytearray(1))  # type: ignore[arg-type]
    with pytest.raises(CodecError, match="non-integer dimension"):
        EncodedTensor(dtype="float32", shape=(1.0,), data=bytes(4))  # type: ignore[arg-type]
    with pytest.raises(CodecError, match="unknown quantization scheme 'log'"):
        Quantization(scheme="log", scale=(1.0,), zero_point=(0,))  # type: ignore[arg-type]
    with pytest.raises(CodecError, match="underflows float32"):
        Quantization(scheme="per_tensor", scale=(1e-50,), zero_point=(0,))
    with pytest.raises(CodecError, match="exceeds the float32 range"):
        Quantization(scheme="per_tensor", scale=(1e300,), zero_point=(0,))
    with pytest.raises(CodecError, match="not an integer"):
        Quantization(scheme="per_tensor", scale=(1.0,), zero_point=(0.5,))  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("x", "codec", "match"),
    [
        (torch.tensor([1.0, float("nan")]), "fp32", "1 NaN/inf values"),
        (torch.tensor([[1.0, float("inf")]]), "int8", "NaN/inf"),
        (torch.tensor([1, 2]), "fp32", "floating-point"),
        (torch.tensor([7e4]), "fp16", "exceeds float16's range"),
        (torch.ones(2, 2), "bf16", "unknown codec 'bf16'"),
        (torch.ones(4), "int8-per-channel", "channel axis"),
        (torch.ones(0, 3), "fp32", "no empty dims"),
        (torch.tensor(1.0), "fp32", "rank 1"),
        ([1.0, 2.0], "fp32", "expected an array or a torch.Tensor"),
        (np.ones(3, np.int64), "fp32", "floating-point"),
    ],
)
def test_encode_rejects(x: torch.Tensor, codec: str, match: str) -> None:
    with pytest.raises(CodecError, match=match):
        encode(x, codec)  # type: ignore[arg-type]


# --- fuzz ------------------------------------------------------------------------------

_INTERESTING_INTS = [0, 1, 2, 3, 4, 5, 7, 8, 127, 128, 255, 256, -1, -128, -129, 2**31 - 1, -(2**31)]
_INTERESTING_FLOATS = [0.0, -0.0, 1e-45, 1e-38, 0.1, 1.0, 1e30, 1e38, -1.0, math.nan, math.inf, -math.inf]


def _mutate_fields(msg: pb.Tensor, rng: np.random.Generator) -> None:
    """Set one field of `msg` to a random, often hostile, value."""
    pick = lambda seq: seq[int(rng.integers(len(seq)))]  # noqa: E731
    choice = int(rng.integers(9))
    if choice == 0:
        msg.dtype = pick(_INTERESTING_INTS)
    elif choice == 1:
        del msg.shape[:]
        msg.shape.extend(pick(_INTERESTING_INTS + [2**40, -(2**62)]) for _ in range(int(rng.integers(0, 10))))
    elif choice == 2:
        i = int(rng.integers(max(len(msg.shape), 1)))
        if msg.shape:
            msg.shape[i] = pick(_INTERESTING_INTS)
    elif choice == 3:
        cut = int(rng.integers(len(msg.data) + 1))
        msg.data = msg.data[:cut] if rng.random() < 0.5 else msg.data + bytes(cut % 7 + 1)
    elif choice == 4:  # random bytes in the payload: NaN/inf patterns for floats
        data = bytearray(msg.data)
        for _ in range(int(rng.integers(1, 4))):
            if data:
                data[int(rng.integers(len(data)))] = int(rng.integers(256))
        msg.data = bytes(data)
    elif choice == 5:
        msg.quant.scheme = pick(_INTERESTING_INTS)
    elif choice == 6:
        msg.quant.axis = pick(_INTERESTING_INTS)
    elif choice == 7:
        msg.quant.scale.extend([pick(_INTERESTING_FLOATS)] * int(rng.integers(0, 3)))
        if msg.quant.scale:
            msg.quant.scale[int(rng.integers(len(msg.quant.scale)))] = pick(_INTERESTING_FLOATS)
    else:
        msg.quant.zero_point.append(pick(_INTERESTING_INTS))
        msg.quant.zero_point[int(rng.integers(len(msg.quant.zero_point)))] = pick(_INTERESTING_INTS)


def test_fuzz_raises_only_codec_error() -> None:
    rng = np.random.default_rng(0)
    seeds = [
        encode(torch.randn(*shape) * 10, codec).to_proto().SerializeToString()
        for shape in [(1,), (2, 3), (2, 3, 2, 2), (1, 4, 1, 3)]
        for codec in (CODECS if len(shape) > 1 else ("fp32", "fp16", "int8"))
    ]
    outcomes = {"decoded": 0, "rejected": 0, "unparseable": 0}
    start = time.perf_counter()
    for i in range(3000):
        raw = seeds[i % len(seeds)]
        if i % 3 == 0:  # damage the serialized bytes, as a broken peer or link would
            data = bytearray(raw)
            for _ in range(int(rng.integers(1, 5))):
                data[int(rng.integers(len(data)))] = int(rng.integers(256))
            if rng.random() < 0.3:
                data = data[: int(rng.integers(len(data) + 1))]
            try:
                msg = pb.Tensor.FromString(bytes(data))
            except DecodeError:
                outcomes["unparseable"] += 1
                continue
        else:
            msg = pb.Tensor.FromString(raw)
            for _ in range(int(rng.integers(1, 4))):
                _mutate_fields(msg, rng)
        try:
            y = decode(msg)
        except CodecError:
            outcomes["rejected"] += 1
            continue
        outcomes["decoded"] += 1
        assert y.dtype == np.float32 and tuple(y.shape) == tuple(msg.shape)
        assert bool(np.isfinite(y).all())
    elapsed = time.perf_counter() - start
    assert outcomes["rejected"] > 1000 and outcomes["decoded"] > 100, outcomes
    assert elapsed < 10, f"fuzz took {elapsed:.1f} s"  # ~1 s on an idle core
