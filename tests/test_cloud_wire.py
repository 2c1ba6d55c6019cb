"""splitexit.wire: policy state, raw input, requests and responses as both sides build them."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from splitexit import runtime, wire
from splitexit.codec import EncodedTensor
from splitexit.models import ModelConfig, build_model
from splitexit.policies import MaxProb, Patience
from splitexit.policies.predictive import Predictive
from splitexit.proto import inference_pb2 as pb
from splitexit.runtime import ExitRunner

CONFIG = ModelConfig(arch="resnet14_tiny", in_chans=1, exit_after=(1, 2, 3, 4, 5))


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return build_model(CONFIG).eval()


def _policies():
    # float32 (maxprob), int64 (patience) and float64 (predictive) state entries
    return [MaxProb(0.5), Patience(1), Predictive(step_ms=(1.0,) * 6, threshold=0.5, l0=1)]


def test_row_state_travels_by_the_wire_schema_names(model) -> None:
    state = ExitRunner(model, Patience(1), num_classes=10).initial_state(2)
    assert set(state.to_wire()) == set(wire.RUNTIME_STATE) | set(state.policy)
    assert set(state.to_wire(include_best=False)) == {wire.NEXT_EXIT, wire.EVALUATED} | set(state.policy)
    assert all(name.startswith("_") for name in wire.RUNTIME_STATE)
    assert not any(name.startswith("_") for name in state.policy)  # no policy name can clash
    back = runtime.RowState.from_wire(state.to_wire(), ExitRunner(model, Patience(1), num_classes=10).initial_state(2))
    assert back.to_wire().keys() == state.to_wire().keys()


@pytest.mark.parametrize("policy", _policies(), ids=lambda p: p.name)
def test_policy_state_round_trips_exactly_through_protobuf(model, policy) -> None:
    runner = ExitRunner(model, policy, num_classes=10)
    # a state after the edge ran: real values of every dtype (float64 ones included)
    state = runner.run(torch.randn(6, 1, 8, 8), stop=2).pending.state
    encoded = wire.encode_policy_state(state, include_best=True)
    msg = pb.InferRequest()
    for name, tensor in encoded.items():
        msg.policy_state[name].CopyFrom(tensor.to_proto())
    msg = pb.InferRequest.FromString(msg.SerializeToString())
    decoded = wire.decode_policy_state(msg.policy_state, wire.state_spec(runner), rows=6)
    assert set(decoded) == set(state.to_wire())
    for name, value in state.to_wire().items():
        assert decoded[name].dtype == value.dtype, name
        assert np.array_equal(decoded[name], value) and decoded[name].dtype == value.dtype, name  # bit-exact, float64 too


def test_best_state_is_optional_and_left_out_by_default(model) -> None:
    runner = ExitRunner(model, MaxProb(0.5), num_classes=10)
    state = runner.initial_state(3)
    encoded = wire.encode_policy_state(state)
    assert not set(wire.BEST_STATE) & set(encoded)
    decoded = wire.decode_policy_state(encoded, wire.state_spec(runner), rows=3)
    assert set(decoded) == set(state.to_wire()) - set(wire.BEST_STATE)


def _bad_states(runner: ExitRunner) -> list[tuple[str, dict, str]]:
    good = wire.encode_policy_state(runner.initial_state(2))

    def with_(name: str, tensor: EncodedTensor | None) -> dict:
        out = dict(good)
        if tensor is None:
            out.pop(name)
        else:
            out[name] = tensor
        return out

    f32 = lambda values, shape: EncodedTensor(dtype="float32", shape=shape,  # noqa: E731
                                             data=np.asarray(values, "<f4").tobytes())
    return [
        ("unknown", {**good, "bogus": f32([0, 0], (2,))}, "unknown policy state"),
        ("missing", with_(wire.NEXT_EXIT, None), "missing"),
        ("shape", with_(wire.NEXT_EXIT, f32([1, 1, 1], (3,))), "shape"),
        ("dtype", with_(wire.NEXT_EXIT, EncodedTensor(dtype="float16", shape=(2,), data=b"\0" * 4)), "float32"),
        ("fraction", with_(wire.NEXT_EXIT, f32([1.5, 2], (2,))), "integers"),
        ("huge", with_(wire.EVALUATED, f32([1e9, 0], (2,))), "integers"),
        ("nan", with_("best_conf", f32([np.nan, 0], (2,))), "NaN"),
    ]


def test_malformed_policy_state_is_refused_with_a_clear_message(model) -> None:
    runner = ExitRunner(model, MaxProb(0.5), num_classes=10)
    spec = wire.state_spec(runner)
    for what, state, message in _bad_states(runner):
        with pytest.raises(wire.StateError, match=message):
            wire.decode_policy_state(state, spec, rows=2)
            pytest.fail(f"{what}: accepted")


def test_integers_beyond_float32_precision_are_refused_on_encode() -> None:
    with pytest.raises(wire.StateError, match="beyond"):
        wire.encode_policy_state({"x": torch.tensor([2**24 + 1])})


@pytest.mark.parametrize("fmt", wire.RAW_FORMATS)
@pytest.mark.parametrize("channels", [1, 3])
def test_raw_input_round_trip(fmt: str, channels: int) -> None:
    images = torch.randint(0, 256, (3, 8, 6, channels), dtype=torch.uint8)
    items = wire.encode_raw_input(images, fmt)
    assert len(items) == 3
    decoded = wire.decode_raw_input(fmt, items, (channels, 8, 6))
    assert decoded.shape == (3, 8, 6, channels) and decoded.dtype == np.uint8
    if fmt != "jpeg":  # lossless formats
        assert np.array_equal(decoded, images.numpy())


def test_raw_input_errors() -> None:
    images = torch.zeros(1, 8, 8, 1, dtype=torch.uint8)
    png = wire.encode_raw_input(images, "png")
    with pytest.raises(wire.WireError, match="not accepted"):
        wire.decode_raw_input("gif", png, (1, 8, 8))
    with pytest.raises(wire.WireError, match="model takes 16x16"):
        wire.decode_raw_input("png", png, (1, 16, 16))
    with pytest.raises(wire.WireError, match="not a readable png"):
        wire.decode_raw_input("png", [png[0][:20]], (1, 8, 8))
    with pytest.raises(wire.WireError, match="not a readable jpeg"):
        wire.decode_raw_input("jpeg", png, (1, 8, 8))
    with pytest.raises(wire.WireError, match="needs"):
        wire.decode_raw_input("u8", [b"\0" * 63], (1, 8, 8))


def test_build_request_and_parse_response(model) -> None:
    runner = ExitRunner(model, MaxProb(0.99), num_classes=10)
    pending = runner.run(torch.randn(4, 1, 8, 8), stop=2).pending
    req = wire.build_request(None, pending.feature, pending.state, ["a", "b", "c", "d"], codec="int8",
                             bundle_hash="h" * 64, model="m", split=2, include_best=True, want_probabilities=True)
    assert req.feature.dtype == pb.DTYPE_UINT8 and list(req.feature.shape) == [4, 8, 8, 8]
    assert set(req.policy_state) == set(pending.state.to_wire()) and req.request_id
    resp = pb.InferResponse(request_id=req.request_id, worker_id="w",
                            timing=pb.ServerTiming(queue_ms=1.0, compute_ms=2.0, batch_size=8))
    for sid in req.sample_ids:
        resp.rows.add(sample_id=sid, label=3, confidence=0.5, exit_index=5, network="m",
                      top_k=[pb.ClassScore(class_index=3, probability=0.5)])
    answer = wire.parse_response(resp, req, num_classes=10)
    assert [r.sample_id for r in answer.rows] == ["a", "b", "c", "d"]
    assert answer.batch_size == 8 and answer.rows[0].top_k == ((3, 0.5),) and answer.error is None
    del resp.rows[-1]
    with pytest.raises(wire.WireError, match="do not answer"):
        wire.parse_response(resp, req)
    with pytest.raises(wire.WireError, match="sample ids"):
        wire.build_request(None, pending.feature, None, ["a"], bundle_hash="h", model="m", split=2)
    err = pb.InferResponse(request_id=req.request_id, error=pb.RequestError(code=3, message="bad"))
    assert wire.parse_response(err, req).error == (3, "bad")
