"""The servicer's plain functions, without a server: request validation, batched tail runs
that decide exactly as the unsplit runner, the cascade, failure isolation, ModelInfo."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from splitexit import wire
from splitexit.bundle import export_bundle, load_bundle
from splitexit.checkpoint import CheckpointMeta
from splitexit.cloud.errors import RequestError
from splitexit.cloud.requests import ServiceLimits, parse_request
from splitexit.cloud.served import load_models, model_info
from splitexit.codec import encode
from splitexit.models import ModelConfig, build_model
from splitexit.policies import MaxProb, step
from splitexit.policies.predictive import Predictive
from splitexit.proto import PROTOCOL_VERSION
from splitexit.proto import inference_pb2 as pb
from splitexit.runtime import ExitRunner
from splitexit.wire import NEXT_EXIT

CONFIG = ModelConfig(arch="resnet14_tiny", in_chans=1, exit_after=(1, 2, 3, 4, 5))
LARGE = ModelConfig(arch="resnet14_tiny", in_chans=1, exit_after=())
SHAPE = (1, 8, 8)
SPLIT = 2
CLASSES = tuple(str(i) for i in range(10))
LIMITS = ServiceLimits(max_request_rows=16)


def _net(config: ModelConfig, seed: int, mean: float = 0.5, std: float = 0.25):
    torch.manual_seed(seed)
    model = build_model(config).eval()
    with torch.no_grad():  # sharpen the random heads so that rows leave at different exits
        for p in model.parameters():
            p.mul_(1.5)
    return model, CheckpointMeta(model=config, mean=(mean,), std=(std,), classes=CLASSES)


def _images(n: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, 256, (n, 8, 8, 1), generator=torch.Generator().manual_seed(seed), dtype=torch.uint8)


def _normalize(images: torch.Tensor, mean: float, std: float) -> torch.Tensor:
    return (images.permute(0, 3, 1, 2).float() / 255 - mean) / std


def _thresholds(model, x) -> tuple[float, ...]:
    """Per exit, so that each takes about a third of the rows that reach it: some rows
    leave on the edge, the rest reach the cloud and leave at different exits there."""
    with torch.no_grad():
        conf = torch.stack([z.softmax(-1).max(-1).values for z in model.forward_exits(x)])
    return tuple(float(q) for q in conf.quantile(0.7, dim=1))


@pytest.fixture(scope="module")
def bundles(tmp_path_factory):
    root = tmp_path_factory.mktemp("bundles")
    small, meta = _net(CONFIG, 0)
    x = _normalize(_images(64), 0.5, 0.25)
    thresholds = _thresholds(small, x)
    policy = MaxProb(thresholds)
    plain = export_bundle(root / "plain", small, meta, split=SPLIT, policy=policy, input_shape=SHAPE, name="tiny")
    large = _net(LARGE, 7, mean=0.4, std=0.3)
    cascade = export_bundle(root / "cascade", small, meta, split=SPLIT, policy=MaxProb((*thresholds, 0.0)),
                            input_shape=SHAPE, name="cascade", large=large)
    predictive = export_bundle(root / "predictive", small, meta, split=SPLIT, input_shape=SHAPE, name="pred",
                               policy=Predictive(step_ms=(1.0,) * 6, threshold=_thresholds(small, x)[2], l0=1))
    return {"plain": plain, "cascade": cascade, "predictive": predictive, "small": small, "large": large[0]}


@pytest.fixture(scope="module")
def models(bundles):
    return load_models([bundles["plain"], bundles["cascade"], bundles["predictive"]])


def _served(models, name: str):
    return next(m for (n, _), m in models.items() if n == name)


def _edge_request(path: Path, images: torch.Tensor, *, codec: str = "fp32", raw: str | None = None,
                  ids_from: int = 0, **kw) -> tuple[pb.InferRequest, torch.Tensor]:
    """What an edge agent sends for these images: the pending rows' feature and state."""
    edge = load_bundle(path, "edge")
    runner = ExitRunner(edge.model, edge.policy, num_classes=10, network=edge.network)
    head = runner.run(_normalize(images, *edge.mean, *edge.std), stop=edge.split)
    p = head.pending
    assert p is not None and len(p.rows) >= 2, "the test needs rows that reach the cloud"
    raw_items = wire.encode_raw_input(images[p.rows], raw) if raw else None
    req = wire.build_request(edge, p.feature, p.state, [str(ids_from + int(r)) for r in p.rows], codec=codec,
                             raw_items=raw_items, raw_format=raw or "png", **kw)
    return req, p.rows


def _unsplit(model, policy, x, *, network=None, large=None, large_x=None) -> dict[int, tuple[int, int, str]]:
    """row -> (label, exit stage, network) of the whole cascade run in one process."""
    runner = ExitRunner(model, policy, num_classes=10, network=network)
    result = runner.run(x)
    out = {}
    merged = result.merged()
    assert merged is not None
    for r, probs, k in zip(merged.rows.tolist(), merged.probs, merged.exit_index.tolist()):
        out[r] = (int(probs.argmax()), runner.exit_stages[k], "own")
    if result.escalate is not None:
        rows = result.escalate.rows
        with torch.no_grad():
            probs = large(large_x[torch.from_numpy(rows)]).softmax(-1).numpy()
        sub = result.escalate.state.policy
        decision, _ = step(policy, runner.num_exits - 1, probs, sub, runner.num_exits)
        for r, answer in zip(rows.tolist(), decision.answer):
            out[r] = (int(answer.argmax()), large.num_stages - 1, "large")
    return out


def _run(models, *requests: pb.InferRequest) -> list:
    parsed = [parse_request(r, models, LIMITS) for r in requests]
    assert len({p.key for p in parsed}) == 1
    return parsed[0].model.run_batch(parsed)


# --- validation --------------------------------------------------------------------------
def _mutations(req: pb.InferRequest):
    """(name, mutate(request), code, message fragment)."""

    def feature_bytes(r, data):
        r.feature.data = data

    def state(r, name, tensor):
        r.policy_state[name].CopyFrom(tensor)

    rows = len(req.sample_ids)
    def f32(values) -> pb.Tensor:  # raw, so that NaN gets through
        return pb.Tensor(dtype=pb.DTYPE_FLOAT32, shape=[len(values)], data=np.asarray(values, "<f4").tobytes())

    return [
        ("unknown model", lambda r: setattr(r, "model", "nope"), "NOT_FOUND", "not served"),
        ("no model", lambda r: setattr(r, "model", ""), "INVALID_ARGUMENT", "model is not set"),
        ("wrong hash", lambda r: setattr(r, "bundle_hash", "0" * 64), "FAILED_PRECONDITION", "not served here"),
        ("no hash", lambda r: setattr(r, "bundle_hash", ""), "FAILED_PRECONDITION", "bundle_hash is not set"),
        ("wrong split", lambda r: setattr(r, "split", SPLIT + 1), "NOT_FOUND", "split point"),
        ("no dtype", lambda r: setattr(r.feature, "dtype", 0), "INVALID_ARGUMENT", "dtype is not set"),
        ("bad dtype", lambda r: setattr(r.feature, "dtype", 42), "INVALID_ARGUMENT", "unknown dtype"),
        ("shape", lambda r: r.feature.shape.__setitem__(1, 7), "INVALID_ARGUMENT", "too long"),
        ("feature shape", lambda r: (r.feature.shape.__setitem__(1, 4), r.feature.shape.__setitem__(2, 16)),
         "INVALID_ARGUMENT", "does not match"),
        ("truncated", lambda r: feature_bytes(r, r.feature.data[:-3]), "INVALID_ARGUMENT", "truncated"),
        ("too long", lambda r: feature_bytes(r, r.feature.data + b"\0\0\0\0"), "INVALID_ARGUMENT", "too long"),
        ("nan", lambda r: feature_bytes(r, np.full(len(r.feature.data) // 4, np.nan, "<f4").tobytes()),
         "INVALID_ARGUMENT", "NaN"),
        ("inf fp16", lambda r: (setattr(r.feature, "dtype", pb.DTYPE_FLOAT16),
                                feature_bytes(r, np.full(len(r.feature.data) // 4, np.inf, "<f2").tobytes())),
         "INVALID_ARGUMENT", "NaN/inf"),
        ("uint8 without quant", lambda r: (setattr(r.feature, "dtype", pb.DTYPE_UINT8),
                                           feature_bytes(r, r.feature.data[: len(r.feature.data) // 4])),
         "INVALID_ARGUMENT", "quantization"),
        ("zero scale", lambda r: (setattr(r.feature, "dtype", pb.DTYPE_UINT8),
                                  feature_bytes(r, r.feature.data[: len(r.feature.data) // 4]),
                                  r.feature.quant.CopyFrom(pb.Quantization(scheme=1, scale=[0.0], zero_point=[0]))),
         "INVALID_ARGUMENT", "scale"),
        ("zero point range", lambda r: (setattr(r.feature, "dtype", pb.DTYPE_UINT8),
                                        feature_bytes(r, r.feature.data[: len(r.feature.data) // 4]),
                                        r.feature.quant.CopyFrom(pb.Quantization(scheme=1, scale=[0.1],
                                                                                 zero_point=[300]))),
         "INVALID_ARGUMENT", "zero point"),
        ("float with quant", lambda r: r.feature.quant.CopyFrom(pb.Quantization(scheme=1, scale=[1.0], zero_point=[0])),
         "INVALID_ARGUMENT", "must not carry"),
        ("ids < rows", lambda r: r.sample_ids.pop(), "INVALID_ARGUMENT", "sample_ids"),
        ("ids > rows", lambda r: r.sample_ids.append("x"), "INVALID_ARGUMENT", "sample_ids"),
        ("no rows", lambda r: r.ClearField("sample_ids"), "INVALID_ARGUMENT", "no rows"),
        ("too many rows", lambda r: r.sample_ids.extend(str(i) for i in range(20)), "INVALID_ARGUMENT", "limit is 16"),
        ("edge exits", lambda r: r.edge_exits.add(), "INVALID_ARGUMENT", "edge_exits"),
        ("nothing", lambda r: r.ClearField("feature"), "INVALID_ARGUMENT", "neither"),
        ("raw format", lambda r: (setattr(r.raw_input, "format", "gif"), r.raw_input.items.extend([b"x"] * rows)),
         "INVALID_ARGUMENT", "not accepted"),
        ("raw count", lambda r: (setattr(r.raw_input, "format", "png"), r.raw_input.items.append(b"x")),
         "INVALID_ARGUMENT", "raw input items"),
        ("state name", lambda r: state(r, "bogus", f32([0.0] * rows)), "INVALID_ARGUMENT", "unknown policy state"),
        ("state missing", lambda r: r.policy_state.pop(NEXT_EXIT), "INVALID_ARGUMENT", "missing"),
        ("state shape", lambda r: state(r, NEXT_EXIT, f32([3.0] * (rows + 1))), "INVALID_ARGUMENT", "shape"),
        ("state dtype", lambda r: state(r, "best_conf", encode(torch.ones(rows), "int8").to_proto()),
         "INVALID_ARGUMENT", "must be float32"),
        ("state fraction", lambda r: state(r, NEXT_EXIT, f32([2.5] * rows)), "INVALID_ARGUMENT", "integers"),
        ("state nan", lambda r: state(r, "best_conf", f32([float("nan")] * rows)), "INVALID_ARGUMENT", "NaN"),
        ("next exit on the edge", lambda r: state(r, NEXT_EXIT, f32([1.0] * rows)), "INVALID_ARGUMENT", "next exit"),
        ("next exit past the ladder", lambda r: state(r, NEXT_EXIT, f32([9.0] * rows)), "INVALID_ARGUMENT",
         "next exit"),
        ("top_k", lambda r: (setattr(r, "want_probabilities", True), setattr(r, "top_k", -1)), "INVALID_ARGUMENT",
         "top_k"),
    ]


def test_every_bad_request_is_refused_with_its_code_and_a_clear_message(bundles, models) -> None:
    good, _ = _edge_request(bundles["plain"], _images(12))
    parse_request(good, models, LIMITS)  # the unmutated request is fine
    for name, mutate, code, fragment in _mutations(good):
        bad = pb.InferRequest()
        bad.CopyFrom(good)
        mutate(bad)
        with pytest.raises(RequestError) as info:
            parse_request(bad, models, LIMITS)
            pytest.fail(f"{name}: accepted")
        assert info.value.code == code, (name, info.value)
        assert fragment in info.value.message, (name, info.value.message)


def _refusal(request: pb.InferRequest, models) -> RequestError | None:
    """The error a deferred parse gives: at parse time, or from the compute call."""
    try:
        parsed = parse_request(request, models, LIMITS, defer_decode=True)
    except RequestError as exc:
        return exc
    out = parsed.model.run_batch([parsed])[0]
    return out if isinstance(out, RequestError) else None


def test_deferred_decoding_refuses_what_eager_parsing_refuses_with_the_same_message(bundles, models) -> None:
    good, _ = _edge_request(bundles["plain"], _images(12))
    assert _refusal(good, models) is None
    for name, mutate, code, fragment in _mutations(good):
        bad = pb.InferRequest()
        bad.CopyFrom(good)
        mutate(bad)
        error = _refusal(bad, models)
        assert error is not None, f"{name}: accepted"
        assert (error.code, fragment in error.message) == (code, True), (name, error)


@pytest.mark.parametrize("codec", ["fp32", "fp16", "int8", "int8-per-channel"])
def test_deferred_bodies_decode_together_and_a_bad_one_fails_alone(bundles, models, codec: str) -> None:
    images = _images(48, seed=3)
    reqs = [_edge_request(bundles["plain"], images[16 * k: 16 * k + 16], codec=codec, ids_from=16 * k)[0]
            for k in range(3)]
    eager = _run(models, *reqs)
    deferred = [parse_request(r, models, LIMITS, defer_decode=True) for r in reqs]
    assert all(p.body is not None and p.feature is None for p in deferred)
    assert len({p.key for p in deferred}) == 1
    assert deferred[0].model.run_batch(deferred) == eager
    bad = pb.InferRequest()
    bad.CopyFrom(reqs[1])
    rows = len(bad.sample_ids)
    bad.policy_state["best_conf"].CopyFrom(pb.Tensor(dtype=pb.DTYPE_FLOAT32, shape=[rows],
                                                     data=np.full(rows, np.nan, "<f4").tobytes()))
    mixed = [parse_request(r, models, LIMITS, defer_decode=True) for r in (reqs[0], bad, reqs[2])]
    got = mixed[0].model.run_batch(mixed)
    assert isinstance(got[1], RequestError) and got[1].code == "INVALID_ARGUMENT" and "NaN" in got[1].message
    assert got[0] == eager[0] and got[2] == eager[2]


# --- compute -----------------------------------------------------------------------------
@pytest.mark.parametrize("codec", ["fp32", "fp16", "int8"])
def test_a_batch_of_requests_decides_exactly_as_the_unsplit_runner(bundles, models, codec: str) -> None:
    images = _images(48, seed=3)
    reqs = []
    for part in range(3):  # three requests of different sizes in one batch
        req, _ = _edge_request(bundles["plain"], images[16 * part: 16 * part + 16], codec=codec, ids_from=16 * part,
                               want_probabilities=True)
        reqs.append(req)
    answers = _run(models, *reqs)
    served = _served(models, "tiny")
    want = _unsplit(bundles["small"], served.bundle.policy, _normalize(images, 0.5, 0.25))
    stages = set()
    for req, rows in zip(reqs, answers):
        assert [r.sample_id for r in rows] == list(req.sample_ids)
        for row in rows:
            label, stage, _ = want[int(row.sample_id)]
            stages.add(row.exit_index)
            if codec == "fp32":  # quantized features may move a borderline row
                assert (row.label, row.exit_index) == (label, stage), row
            assert row.network == "tiny" and not row.degraded
            assert len(row.top_k) == 10 and row.top_k[0].class_index == row.label
            assert row.top_k[0].probability == pytest.approx(row.confidence)
    assert len(stages) > 1, "the test needs rows leaving at different cloud exits"


def test_rows_without_state_start_fresh_at_the_first_cloud_exit(bundles, models) -> None:
    req, rows = _edge_request(bundles["plain"], _images(16))
    req.ClearField("policy_state")
    answers = _run(models, req)[0]
    assert len(answers) == len(rows) and all(a.exit_index > SPLIT for a in answers)


def test_raw_input_only_runs_the_whole_network(bundles, models) -> None:
    images = _images(12, seed=5)
    served = _served(models, "tiny")
    req = pb.InferRequest(request_id="r", bundle_hash=served.hash, model="tiny", sample_ids=[str(i) for i in range(12)],
                          raw_input=pb.RawInput(format="png", items=wire.encode_raw_input(images, "png")))
    answers = _run(models, req)[0]
    want = _unsplit(bundles["small"], served.bundle.policy, _normalize(images, 0.5, 0.25))
    assert [(a.label, a.exit_index) for a in answers] == [want[i][:2] for i in range(12)]
    assert any(a.exit_index <= SPLIT for a in answers), "some rows should leave at the head's exits"


def test_cascade_escalates_on_raw_input_and_degrades_without_it(bundles, models) -> None:
    images = _images(24, seed=11)
    served = _served(models, "cascade")
    with_raw, rows = _edge_request(bundles["cascade"], images, raw="png")
    without_raw, _ = _edge_request(bundles["cascade"], images)
    want = _unsplit(bundles["small"], served.bundle.policy, _normalize(images, 0.5, 0.25),
                    network=served.bundle.network, large=bundles["large"], large_x=_normalize(images, 0.4, 0.3))
    got = _run(models, with_raw)[0]
    large_name = wire.larger_network_name("cascade")
    assert any(a.network == large_name for a in got), "the test needs escalated rows"
    for a in got:
        label, stage, net = want[int(a.sample_id)]
        assert (a.label, a.exit_index, a.network) == (label, stage, large_name if net == "large" else "cascade")
        assert not a.degraded
    degraded = _run(models, without_raw)[0]
    for a, b in zip(got, degraded):
        if a.network == large_name:
            assert b.degraded and b.network == "cascade" and b.exit_index > SPLIT
        else:
            assert (b.label, b.exit_index, b.degraded) == (a.label, a.exit_index, False)


def test_a_request_the_policy_cannot_resume_fails_alone(bundles, models) -> None:
    good, _ = _edge_request(bundles["predictive"], _images(16, seed=2))
    bad = pb.InferRequest()
    bad.CopyFrom(good)
    bad.request_id = "bad"
    rows = len(bad.sample_ids)
    # structurally valid, but an exit index the policy's tables do not have
    bad.policy_state["at"].CopyFrom(encode(torch.full((rows,), 99.0)).to_proto())
    results = _run(models, good, bad, good)
    assert isinstance(results[1], RequestError) and results[1].code == "INVALID_ARGUMENT"
    assert not isinstance(results[0], Exception) and not isinstance(results[2], Exception)
    alone = _run(models, good)[0]
    assert [r.label for r in results[0]] == [r.label for r in alone]


def test_model_info_describes_what_is_served(models) -> None:
    info = model_info(models, LIMITS, "w1")
    assert info.protocol_version == PROTOCOL_VERSION and info.worker_id == "w1"
    assert info.limits.max_batch_rows == 16 and info.limits.max_message_bytes == LIMITS.max_message_bytes
    spec = {m.name: m for m in info.models}
    assert set(spec) == {"tiny", "cascade", "pred"}
    tiny = spec["tiny"]
    assert tiny.bundle_hash == _served(models, "tiny").hash and tiny.arch == "resnet14_tiny"
    assert [(s.split, list(s.feature_shape)) for s in tiny.splits] == [(SPLIT, [8, 8, 8])]
    assert list(tiny.input_shape) == [1, 8, 8] and list(tiny.classes) == list(CLASSES)
    assert set(tiny.codecs) == {"fp32", "fp16", "int8", "int8-per-channel"}
    assert set(tiny.raw_formats) == set(wire.RAW_FORMATS)


def test_rows_escalated_on_the_edge_need_no_edge_weights(bundles, tmp_path: Path) -> None:
    """An edge policy that already chose the larger network sends raw input and its state
    only; a worker without the edge weights still answers those rows (and only those)."""
    import shutil

    cloud_only = tmp_path / "cascade"
    shutil.copytree(bundles["cascade"], cloud_only)
    (cloud_only / "edge.safetensors").unlink()
    models = load_models([cloud_only])
    served = _served(models, "cascade")
    assert not served.can_start_raw
    images = _images(5, seed=13)
    state = served.runner.initial_state(5)
    state.next_exit[:] = served.runner.num_exits - 1  # the larger network's exit
    req = wire.build_request(served.bundle, None, state, [str(i) for i in range(5)],
                             raw_items=wire.encode_raw_input(images, "u8"), raw_format="u8")
    got = _run(models, req)[0]
    with torch.no_grad():
        probs = bundles["large"](_normalize(images, 0.4, 0.3)).softmax(-1)
    assert [a.label for a in got] == probs.argmax(-1).tolist()
    assert all(a.network == wire.larger_network_name("cascade") and not a.degraded for a in got)
    fresh = wire.build_request(served.bundle, None, None, [str(i) for i in range(5)],
                               raw_items=wire.encode_raw_input(images, "u8"), raw_format="u8")
    with pytest.raises(RequestError) as info:
        parse_request(fresh, models, LIMITS)
    assert info.value.code == "FAILED_PRECONDITION" and "no edge weights" in info.value.message
