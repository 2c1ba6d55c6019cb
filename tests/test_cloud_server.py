"""The cloud worker over a real gRPC channel on loopback (127.0.0.1, port 0): answers,
batching, every error code, health through warm-up and drain, reflection, TLS/mTLS and
token auth, metrics, bind and certificate errors."""

from __future__ import annotations

import asyncio
import datetime
import ipaddress
import socket
import threading
import time
import urllib.request
from contextlib import asynccontextmanager
from pathlib import Path
from typing import AsyncIterator

import grpc
import numpy as np
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc

from splitexit import wire
from splitexit.bundle import export_bundle, load_bundle
from splitexit.checkpoint import CheckpointMeta
from splitexit.cloud.batcher import BatcherConfig
from splitexit.cloud.errors import RequestError
from splitexit.cloud.server import CloudServer, ServerConfig, ServerError, build_server, compute_thread_count
from splitexit.cloud.served import load_models
from splitexit.models import ModelConfig, build_model
from splitexit.policies import MaxProb
from splitexit.proto import inference_pb2 as pb
from splitexit.proto import inference_pb2_grpc as pb_grpc
from splitexit.runtime import ExitRunner

pytestmark = pytest.mark.loopback

CONFIG = ModelConfig(arch="resnet14_tiny", in_chans=1, exit_after=(1, 2, 3, 4, 5))
SHAPE = (1, 8, 8)
SERVICE = "splitexit.v1.SplitInference"
T = 5.0  # every call has a deadline


def _normalize(images: torch.Tensor) -> torch.Tensor:
    return (images.permute(0, 3, 1, 2).float() / 255 - 0.5) / 0.25


@pytest.fixture(scope="module")
def bundle(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    model = build_model(CONFIG).eval()
    with torch.no_grad():  # sharpen the random heads so that rows leave at different exits
        for p in model.parameters():
            p.mul_(1.5)
        x = _normalize(torch.randint(0, 256, (64, 8, 8, 1), dtype=torch.uint8))
        conf = torch.stack([z.softmax(-1).max(-1).values for z in model.forward_exits(x)])
    meta = CheckpointMeta(model=CONFIG, mean=(0.5,), std=(0.25,), classes=tuple(str(i) for i in range(10)))
    policy = MaxProb(tuple(float(q) for q in conf.quantile(0.7, dim=1)))
    return export_bundle(tmp_path_factory.mktemp("b") / "tiny", model, meta, split=2, policy=policy,
                         input_shape=SHAPE, name="tiny")


@pytest.fixture(scope="module")
def models(bundle: Path):
    return load_models([bundle])


@pytest.fixture
def served(models):
    return next(iter(models.values()))


def _run(coro) -> None:
    asyncio.run(asyncio.wait_for(coro, 60))


@asynccontextmanager
async def serving(models, **overrides) -> AsyncIterator[tuple[CloudServer, pb_grpc.SplitInferenceStub]]:
    config = ServerConfig(**{"host": "127.0.0.1", "port": 0, "drain_grace_s": 2.0, **overrides})
    server = build_server(config, models)
    await server.start()
    try:
        async with grpc.aio.insecure_channel(server.address) as channel:
            yield server, pb_grpc.SplitInferenceStub(channel)
    finally:
        await server.stop()


def _feature_request(served, rows: int, request_id: str = "r") -> pb.InferRequest:
    """Rows with a random feature and no policy state (the policy starts at the first cloud exit)."""
    return wire.build_request(served.bundle, torch.rand(rows, *served.bundle.feature_shape), None,
                              [f"{request_id}-{i}" for i in range(rows)], request_id=request_id)


def _edge_requests(bundle: Path, images: torch.Tensor, parts: int) -> list[pb.InferRequest]:
    """What edge agents send for these images, split over `parts` requests."""
    edge = load_bundle(bundle, "edge")
    runner = ExitRunner(edge.model, edge.policy, num_classes=10)
    p = runner.run(_normalize(images), stop=edge.split).pending
    assert p is not None and len(p.rows) >= 2 * parts
    chunks = torch.arange(len(p.rows)).chunk(parts)
    return [wire.build_request(edge, p.feature[c], p.state.take(c),
                               [str(int(r)) for r in p.rows[c]], request_id=f"q{i}")
            for i, c in enumerate(chunks)]


async def _code(call) -> grpc.StatusCode:
    try:
        await call
    except grpc.aio.AioRpcError as exc:
        return exc.code()
    return grpc.StatusCode.OK


def _block_compute(monkeypatch, served) -> tuple[threading.Event, list[str]]:
    """Compute waits for the returned event; the list collects the request ids computed."""
    gate, computed = threading.Event(), []
    original = served.run_batch

    def run_batch(items):
        if items[0].request_id != "warm-up":
            gate.wait(10)
            computed.extend(i.request_id for i in items)
        return original(items)

    monkeypatch.setattr(served, "run_batch", run_batch)
    return gate, computed


async def _until(predicate, timeout: float = 5.0) -> None:
    ends = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < ends, "condition not reached in time"
        await asyncio.sleep(0.005)


# --- answers and batching ----------------------------------------------------------------
def _requests_and_answers(bundle: Path, served, images: int, parts: int, seed: int
                          ) -> tuple[list[pb.InferRequest], dict[int, tuple[int, int]]]:
    """Edge requests for random images, and per sample id the (label, exit stage) that the
    unsplit model gives under the same policy."""
    pixels = torch.randint(0, 256, (images, 8, 8, 1), generator=torch.Generator().manual_seed(seed), dtype=torch.uint8)
    requests = _edge_requests(bundle, pixels, parts=parts)
    full = ExitRunner(served.bundle.model, served.bundle.policy, num_classes=10).run(_normalize(pixels)).merged()
    stages = served.runner.exit_stages
    return requests, {int(r): (int(p.argmax()), stages[int(k)])
                      for r, p, k in zip(full.rows, full.probs, full.exit_index)}


def test_concurrent_requests_are_batched_and_answer_as_the_unsplit_model(bundle, models, served) -> None:
    requests, want = _requests_and_answers(bundle, served, images=48, parts=6, seed=4)

    async def body() -> None:
        # a long delay: the six concurrent requests must meet in one batch
        async with serving(models, batching=BatcherConfig(max_batch=256, max_queue_delay_ms=300)) as (server, stub):
            responses = await asyncio.gather(*(stub.Infer(r, timeout=T) for r in requests))
            batch_sizes = set()
            for request, response in zip(requests, responses):
                answer = wire.parse_response(response, request, num_classes=10)
                batch_sizes.add(answer.batch_size)
                assert answer.batch_size >= len(request.sample_ids) and answer.queue_ms >= 0
                assert answer.worker_id == server.servicer.worker_id
                for row in answer.rows:
                    assert (row.label, row.exit_index) == want[int(row.sample_id)], row
            assert max(batch_sizes) > max(len(r.sample_ids) for r in requests), "nothing was batched"
            assert server.metrics.value("splitexit_batch_rows_count", {"model": "tiny"}) < len(requests)

    _run(body())


def test_batches_computing_side_by_side_answer_as_the_unsplit_model(bundle, models, served) -> None:
    requests, want = _requests_and_answers(bundle, served, images=96, parts=12, seed=5)
    batching = BatcherConfig(max_batch=max(len(r.sample_ids) for r in requests), max_queue_delay_ms=0,
                             concurrent_batches=2)

    async def body() -> None:
        async with serving(models, batching=batching) as (server, stub):
            # each compute thread runs with torch's threads shared out between the two
            per_thread = server._executor.submit(torch.get_num_threads).result()
            assert per_thread == compute_thread_count(server.config) == max(1, torch.get_num_threads() // 2)
            for _ in range(3):
                responses = await asyncio.gather(*(stub.Infer(r, timeout=T) for r in requests))
                for request, response in zip(requests, responses):
                    for row in wire.parse_response(response, request, num_classes=10).rows:
                        assert (row.label, row.exit_index) == want[int(row.sample_id)], row

    _run(body())
    assert compute_thread_count(ServerConfig(compute_threads=3, batching=batching)) == 3
    assert compute_thread_count(ServerConfig()) is None  # one compute thread: torch's default as it is


def test_a_retried_request_id_is_answered_once(models, served) -> None:
    request = _feature_request(served, 3, "retry-me")
    other_rows = _feature_request(served, 2, "retry-me")  # the same id for other rows is another request

    async def body() -> None:
        async with serving(models) as (server, stub):
            first, second = await asyncio.gather(stub.Infer(request, timeout=T), stub.Infer(request, timeout=T))
            third = await stub.Infer(request, timeout=T)
            assert first == second == third
            other = await stub.Infer(other_rows, timeout=T)
            assert len(other.rows) == 2
            assert server.metrics.value("splitexit_duplicate_requests_total") == 2
            assert server.metrics.value("splitexit_rows_total", {"model": "tiny"}) == 3 + 2

    _run(body())


def test_get_model_info_and_stream(models, served) -> None:
    async def body() -> None:
        async with serving(models) as (server, stub):
            info = await stub.GetModelInfo(pb.ModelInfoRequest(), timeout=T)
            assert [m.bundle_hash for m in info.models] == [served.hash] and info.limits.max_batch_rows == 256
            good = [_feature_request(served, 3, f"g{i}") for i in range(3)]
            bad = pb.InferRequest()
            bad.CopyFrom(good[0])
            bad.request_id, bad.bundle_hash = "stale", "0" * 64
            nan = pb.InferRequest()
            nan.CopyFrom(good[1])
            nan.request_id = "nan"
            nan.feature.data = np.full(len(nan.feature.data) // 4, np.nan, "<f4").tobytes()

            async def requests():
                for r in (good[0], bad, good[1], nan, good[2]):
                    yield r

            answers = {}
            async for response in stub.InferStream(requests(), timeout=T):
                answers[response.request_id] = response
            assert set(answers) == {"g0", "g1", "g2", "stale", "nan"}
            assert answers["stale"].error.code == grpc.StatusCode.FAILED_PRECONDITION.value[0]
            assert answers["nan"].error.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
            assert "NaN" in answers["nan"].error.message and not answers["nan"].rows
            for i in range(3):
                assert len(answers[f"g{i}"].rows) == 3 and not answers[f"g{i}"].HasField("error")
            assert server.metrics.value("splitexit_errors_total", {"code": "FAILED_PRECONDITION"}) == 1

    _run(body())


# --- errors ------------------------------------------------------------------------------
def test_error_codes_over_the_wire(models, served) -> None:
    async def body() -> None:
        async with serving(models, max_request_rows=8) as (server, stub):
            cases = []
            r = _feature_request(served, 2)
            r.bundle_hash = "f" * 64
            cases.append((r, grpc.StatusCode.FAILED_PRECONDITION, "not served here"))
            r = _feature_request(served, 2)
            r.model = "other"
            cases.append((r, grpc.StatusCode.NOT_FOUND, "not served"))
            r = _feature_request(served, 2)
            r.split = 4
            cases.append((r, grpc.StatusCode.NOT_FOUND, "split point 4"))
            r = _feature_request(served, 2)
            r.feature.data = r.feature.data[:-1]
            cases.append((r, grpc.StatusCode.INVALID_ARGUMENT, "truncated"))
            r = _feature_request(served, 2)
            r.feature.data = np.full(len(r.feature.data) // 4, np.inf, "<f4").tobytes()
            cases.append((r, grpc.StatusCode.INVALID_ARGUMENT, "NaN/inf"))
            cases.append((_feature_request(served, 9), grpc.StatusCode.INVALID_ARGUMENT, "limit is 8"))
            r = _feature_request(served, 2)
            r.policy_state["bogus"].CopyFrom(pb.Tensor(dtype=1, shape=[2], data=b"\0" * 8))
            cases.append((r, grpc.StatusCode.INVALID_ARGUMENT, "unknown policy state"))
            for request, code, fragment in cases:
                with pytest.raises(grpc.aio.AioRpcError) as info:
                    await stub.Infer(request, timeout=T)
                assert info.value.code() == code and fragment in info.value.details(), info.value
            ok = await stub.Infer(_feature_request(served, 2), timeout=T)  # still serving
            assert len(ok.rows) == 2
            text = server.metrics.text()
            assert 'splitexit_requests_total{code="INVALID_ARGUMENT",method="Infer"} 4.0' in text
            assert 'splitexit_errors_total{code="NOT_FOUND"} 2.0' in text

    _run(body())


def test_a_full_queue_answers_resource_exhausted_at_once(monkeypatch, models, served) -> None:
    gate, computed = _block_compute(monkeypatch, served)

    async def body() -> None:
        batching = BatcherConfig(max_batch=8, max_queue_delay_ms=0, queue_limit_rows=8)
        async with serving(models, batching=batching, max_request_rows=8) as (server, stub):
            first = asyncio.ensure_future(stub.Infer(_feature_request(served, 8, "a"), timeout=T))
            await _until(lambda: server.servicer._inflight == 1 and server.batcher.queued_rows == 0)  # computing
            second = asyncio.ensure_future(stub.Infer(_feature_request(served, 8, "b"), timeout=T))
            await _until(lambda: server.batcher.queued_rows == 8)  # waiting: the queue is full
            started = time.monotonic()
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await stub.Infer(_feature_request(served, 1, "c"), timeout=T)
            assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "queue full" in info.value.details()
            assert time.monotonic() - started < 1.0
            gate.set()
            assert len((await first).rows) == 8 and len((await second).rows) == 8
            assert computed == ["a", "b"]

    try:
        _run(body())
    finally:
        gate.set()


def test_an_overloaded_worker_refuses_at_the_headers_without_reading_the_body(monkeypatch, models, served) -> None:
    """A call the batcher would refuse whatever it carries is refused before its body is
    read: here a body that is not even a protobuf gets RESOURCE_EXHAUSTED, not the
    INVALID_ARGUMENT that reading it gives. Both inference protocols; counted in the
    metrics; the worker serves again once the work ahead is done."""
    gate, computed = _block_compute(monkeypatch, served)
    garbage = b"\xff" * 4096

    async def body() -> None:
        batching = BatcherConfig(max_batch=8, max_queue_delay_ms=0, queue_limit_requests=1)
        async with serving(models, batching=batching, max_request_rows=8) as (server, stub):
            first = asyncio.ensure_future(stub.Infer(_feature_request(served, 8, "a"), timeout=T))
            await _until(lambda: server.servicer._inflight == 1 and server.batcher.queued_requests == 0)
            second = asyncio.ensure_future(stub.Infer(_feature_request(served, 8, "b"), timeout=T))
            await _until(lambda: server.batcher.queued_requests == 1)  # the queue's one place is taken
            channel = grpc.aio.insecure_channel(server.address)
            for method in (f"/{SERVICE}/Infer", "/inference.GRPCInferenceService/ModelInfer"):
                with pytest.raises(grpc.aio.AioRpcError) as info:
                    await channel.unary_unary(method)(garbage, timeout=T)
                assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, (method, info.value)
                assert "queue full" in info.value.details()
            text = server.metrics.text()
            assert 'splitexit_requests_total{code="RESOURCE_EXHAUSTED",method="Infer"} 1.0' in text
            assert 'splitexit_requests_total{code="RESOURCE_EXHAUSTED",method="ModelInfer"} 1.0' in text
            gate.set()
            assert len((await first).rows) == 8 and len((await second).rows) == 8
            with pytest.raises(grpc.aio.AioRpcError) as info:  # no longer overloaded: the body is read
                await channel.unary_unary(f"/{SERVICE}/Infer")(garbage, timeout=T)
            assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, info.value
            assert len((await stub.Infer(_feature_request(served, 2, "c"), timeout=T)).rows) == 2
            await channel.close()
            assert computed == ["a", "b", "c"]

    try:
        _run(body())
    finally:
        gate.set()


def test_deadlines_passed_in_the_queue_or_on_arrival_are_not_computed(monkeypatch, models, served) -> None:
    gate, computed = _block_compute(monkeypatch, served)

    async def body() -> None:
        async with serving(models, batching=BatcherConfig(max_batch=8, max_queue_delay_ms=0)) as (server, stub):
            first = asyncio.ensure_future(stub.Infer(_feature_request(served, 8, "a"), timeout=T))
            await _until(lambda: server.servicer._inflight == 1 and server.batcher.queued_rows == 0)
            code = await _code(stub.Infer(_feature_request(served, 2, "late"), timeout=0.3))
            assert code == grpc.StatusCode.DEADLINE_EXCEEDED
            gate.set()
            await first
            await _until(lambda: server.servicer._inflight == 0)
            assert computed == ["a"]  # "late" was dropped from the queue, never computed
            with pytest.raises(RequestError) as info:  # a deadline already passed on arrival
                await server.servicer.handle(_feature_request(served, 1), deadline=time.monotonic() - 1)
            assert info.value.code == "DEADLINE_EXCEEDED"
            assert computed == ["a"]

    try:
        _run(body())
    finally:
        gate.set()


# --- health, drain, reflection -----------------------------------------------------------
def test_health_goes_serving_after_warm_up_and_not_serving_on_drain(monkeypatch, models, served) -> None:
    warm = threading.Event()
    original_warm_up = served.warm_up
    monkeypatch.setattr(served, "warm_up", lambda: (warm.wait(10), original_warm_up()))
    gate, computed = _block_compute(monkeypatch, served)

    async def body() -> None:
        server = build_server(ServerConfig(host="127.0.0.1", port=0), models)
        withdrawn: list[int] = []

        async def withdraw() -> None:  # what `splitexit cloud serve` hooks here: the mDNS withdrawal
            withdrawn.append(server.servicer._inflight)

        server.on_drain(withdraw)
        starting = asyncio.ensure_future(server.start())
        try:
            async with grpc.aio.insecure_channel(server.address) as channel:
                health = health_pb2_grpc.HealthStub(channel)
                stub = pb_grpc.SplitInferenceStub(channel)

                async def status(service: str = SERVICE) -> int:
                    return (await health.Check(health_pb2.HealthCheckRequest(service=service), timeout=T,
                                               wait_for_ready=True)).status

                assert await status() == health_pb2.HealthCheckResponse.NOT_SERVING  # warming up
                assert await status("") == health_pb2.HealthCheckResponse.NOT_SERVING
                assert await _code(stub.Infer(_feature_request(served, 1), timeout=T)) == grpc.StatusCode.UNAVAILABLE
                warm.set()
                await starting
                assert await status() == health_pb2.HealthCheckResponse.SERVING
                inflight = asyncio.ensure_future(stub.Infer(_feature_request(served, 2, "inflight"), timeout=T))
                await _until(lambda: server.servicer._inflight == 1)
                draining = server.drain(grace=5)
                await _until(lambda: server.servicer.phase == "draining")
                assert await status() == health_pb2.HealthCheckResponse.NOT_SERVING
                await _until(lambda: bool(withdrawn))
                assert withdrawn == [1]  # at the drain's start, with the request still in flight
                refused = await _code(stub.Infer(_feature_request(served, 1, "new"), timeout=T))
                assert refused == grpc.StatusCode.UNAVAILABLE
                gate.set()
                assert len((await inflight).rows) == 2  # the request in flight finished
                await asyncio.wait_for(draining, 5)
                assert "new" not in computed and "inflight" in computed
        finally:
            warm.set()
            gate.set()
            await server.stop()

    _run(body())


def test_reflection_lists_the_services(models) -> None:
    from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

    def services(address: str) -> set[str]:
        with grpc.insecure_channel(address) as channel:  # the reflection client is synchronous
            db = ProtoReflectionDescriptorDatabase(channel)
            names = set(db.get_services())
            method = db.FindFileContainingSymbol(SERVICE)
            assert any(s.name == "SplitInference" for s in method.service)
            return names

    async def body() -> None:
        async with serving(models) as (server, _):
            names = await asyncio.to_thread(services, server.address)
            assert {SERVICE, "grpc.health.v1.Health", "grpc.reflection.v1alpha.ServerReflection"} <= names

    _run(body())


# --- TLS and auth ------------------------------------------------------------------------
def _certificates(folder: Path) -> dict[str, Path]:
    """A CA, a server certificate for 127.0.0.1/localhost and a client certificate."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    now = datetime.datetime.now(datetime.timezone.utc)

    def name(cn: str) -> x509.Name:
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])

    def issue(subject: str, key, issuer: x509.Name, issuer_key, *, ca: bool, usage=None, san=None):
        builder = (x509.CertificateBuilder().subject_name(name(subject)).issuer_name(issuer)
                   .public_key(key.public_key()).serial_number(x509.random_serial_number())
                   .not_valid_before(now - datetime.timedelta(minutes=5))
                   .not_valid_after(now + datetime.timedelta(days=1))
                   .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
        if usage is not None:
            builder = builder.add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        if san is not None:
            builder = builder.add_extension(x509.SubjectAlternativeName(san), critical=False)
        return builder.sign(issuer_key, hashes.SHA256())

    out = {}

    def write(label: str, cert, key) -> None:
        out[f"{label}_cert"] = folder / f"{label}.pem"
        out[f"{label}_cert"].write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        out[f"{label}_key"] = folder / f"{label}.key"
        out[f"{label}_key"].write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                                          serialization.PrivateFormat.PKCS8,
                                                          serialization.NoEncryption()))

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = issue("splitexit test CA", ca_key, name("splitexit test CA"), ca_key, ca=True)
    write("ca", ca, ca_key)
    server_key = ec.generate_private_key(ec.SECP256R1())
    san = [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
    write("server", issue("localhost", server_key, ca.subject, ca_key, ca=False,
                          usage=ExtendedKeyUsageOID.SERVER_AUTH, san=san), server_key)
    client_key = ec.generate_private_key(ec.SECP256R1())
    write("client", issue("edge-1", client_key, ca.subject, ca_key, ca=False,
                          usage=ExtendedKeyUsageOID.CLIENT_AUTH), client_key)
    return out


def test_tls_and_bearer_token(tmp_path: Path, models, served) -> None:
    certs = _certificates(tmp_path)
    token = "s3cret-token"

    async def body() -> None:
        config = ServerConfig(host="127.0.0.1", port=0, tls_cert=certs["server_cert"], tls_key=certs["server_key"],
                              token=token)
        server = build_server(config, models)
        await server.start()
        try:
            creds = grpc.ssl_channel_credentials(root_certificates=certs["ca_cert"].read_bytes())
            async with grpc.aio.secure_channel(server.address, creds) as channel:
                stub = pb_grpc.SplitInferenceStub(channel)
                good = [("authorization", f"Bearer {token}")]
                info = await stub.GetModelInfo(pb.ModelInfoRequest(), timeout=T, metadata=good)
                assert info.models[0].name == "tiny"
                for scheme in ("bearer", "BEARER"):  # an HTTP auth scheme: any case
                    other_case = [("authorization", f"{scheme} {token}")]
                    assert (await stub.GetModelInfo(pb.ModelInfoRequest(), timeout=T, metadata=other_case)).models
                assert len((await stub.Infer(_feature_request(served, 2), timeout=T, metadata=good)).rows) == 2
                for metadata in (None, [("authorization", "Bearer wrong")], [("authorization", token)]):
                    for call in (stub.GetModelInfo(pb.ModelInfoRequest(), timeout=T, metadata=metadata),
                                 stub.Infer(_feature_request(served, 1), timeout=T, metadata=metadata)):
                        assert await _code(call) == grpc.StatusCode.UNAUTHENTICATED

                    async def one():
                        yield _feature_request(served, 1)

                    assert await _code(_drain_stream(stub.InferStream(one(), timeout=T, metadata=metadata))) == \
                        grpc.StatusCode.UNAUTHENTICATED
                # probes carry no token: health stays open
                health = health_pb2_grpc.HealthStub(channel)
                check = await health.Check(health_pb2.HealthCheckRequest(service=SERVICE), timeout=T)
                assert check.status == health_pb2.HealthCheckResponse.SERVING
            async with grpc.aio.insecure_channel(server.address) as plain:  # plaintext to a TLS port
                stub = pb_grpc.SplitInferenceStub(plain)
                assert await _code(stub.GetModelInfo(pb.ModelInfoRequest(), timeout=1)) == grpc.StatusCode.UNAVAILABLE
            assert server.metrics.value("splitexit_requests_total", {"method": "Infer", "code": "UNAUTHENTICATED"}) == 3
        finally:
            await server.stop()

    _run(body())


async def _drain_stream(call) -> None:
    async for _ in call:
        pass


def test_a_key_that_does_not_fit_the_certificate_is_named_as_such(tmp_path: Path, models) -> None:
    """Not reported as "the port is in use", which is what gRPC's failed bind reads as."""
    certs = _certificates(tmp_path)
    config = ServerConfig(host="127.0.0.1", port=0, tls_cert=certs["server_cert"], tls_key=certs["client_key"])
    with pytest.raises(ServerError, match="private key does not belong to the certificate"):
        build_server(config, models)


def test_mutual_tls_requires_a_client_certificate(tmp_path: Path, models) -> None:
    certs = _certificates(tmp_path)

    async def body() -> None:
        config = ServerConfig(host="127.0.0.1", port=0, tls_cert=certs["server_cert"], tls_key=certs["server_key"],
                              client_ca=certs["ca_cert"])
        server = build_server(config, models)
        await server.start()
        try:
            ca = certs["ca_cert"].read_bytes()
            with_cert = grpc.ssl_channel_credentials(ca, certs["client_key"].read_bytes(),
                                                     certs["client_cert"].read_bytes())
            async with grpc.aio.secure_channel(server.address, with_cert) as channel:
                info = await pb_grpc.SplitInferenceStub(channel).GetModelInfo(pb.ModelInfoRequest(), timeout=T)
                assert info.models[0].name == "tiny"
            async with grpc.aio.secure_channel(server.address, grpc.ssl_channel_credentials(ca)) as channel:
                call = pb_grpc.SplitInferenceStub(channel).GetModelInfo(pb.ModelInfoRequest(), timeout=2)
                assert await _code(call) == grpc.StatusCode.UNAVAILABLE
        finally:
            await server.stop()

    _run(body())


# --- metrics, configuration errors -------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_metrics_are_served_over_http(models, served) -> None:
    async def body() -> None:
        async with serving(models, metrics_port=_free_port()) as (server, stub):
            await asyncio.gather(*(stub.Infer(_feature_request(served, 2, f"m{i}"), timeout=T) for i in range(3)))
            url = f"http://127.0.0.1:{server.metrics_port}/metrics"
            text = await asyncio.to_thread(lambda: urllib.request.urlopen(url, timeout=T).read().decode())
            for line in ('splitexit_requests_total{code="OK",method="Infer"} 3.0', 'splitexit_rows_total{model="tiny"} 6.0',
                         "splitexit_batch_rows_bucket", "splitexit_queue_rows 0.0", "splitexit_queue_seconds_bucket",
                         "splitexit_compute_seconds_bucket", "splitexit_request_seconds_bucket"):
                assert line in text, line
            snapshot = server.metrics.snapshot()
            assert snapshot.requests == 3 and snapshot.rows == 6 and snapshot.batches >= 1

    _run(body())


def test_bind_and_certificate_errors_are_clear(tmp_path: Path, models) -> None:
    async def body() -> None:
        async with serving(models) as (server, _):
            with pytest.raises(ServerError, match="in use"):
                build_server(ServerConfig(host="127.0.0.1", port=server.port), models)
        missing = tmp_path / "missing.pem"
        with pytest.raises(ServerError, match="cannot read the certificate"):
            build_server(ServerConfig(tls_cert=missing, tls_key=missing), models)
        junk = tmp_path / "junk.pem"
        junk.write_text("not a certificate")
        with pytest.raises(ServerError, match="not a PEM certificate"):
            build_server(ServerConfig(tls_cert=junk, tls_key=junk), models)

    _run(body())
    with pytest.raises(ServerError, match="both a certificate and a key"):
        ServerConfig(tls_cert=tmp_path / "c.pem")
    with pytest.raises(ServerError, match="needs TLS"):
        ServerConfig(client_ca=tmp_path / "ca.pem")


def test_a_failed_warm_up_or_metrics_port_stops_the_server(monkeypatch, models, served) -> None:
    def broken() -> None:
        raise RuntimeError("no memory for the tail")

    async def body() -> None:
        with socket.socket() as taken:
            taken.bind(("127.0.0.1", 0))
            taken.listen()
            server = build_server(ServerConfig(metrics_port=taken.getsockname()[1]), models)
            with pytest.raises(ServerError, match="cannot serve metrics"):
                await server.start()
        monkeypatch.setattr(served, "warm_up", broken)
        server = build_server(ServerConfig(), models)
        with pytest.raises(ServerError, match="warm-up of tiny failed: RuntimeError: no memory"):
            await server.start()
        async with grpc.aio.insecure_channel(server.address) as channel:  # nothing listens any more
            call = pb_grpc.SplitInferenceStub(channel).GetModelInfo(pb.ModelInfoRequest(), timeout=1)
            assert await _code(call) == grpc.StatusCode.UNAVAILABLE

    _run(body())


def test_the_heap_is_trimmed_once_the_worker_is_idle_after_serving(monkeypatch, models, served) -> None:
    """Not while requests are in flight, once after they end, not again while nothing
    new arrives; and the real malloc_trim runs (this is glibc Linux)."""
    from splitexit.cloud import memory

    trims: list[float] = []
    monkeypatch.setattr(memory, "trim_heap", lambda: trims.append(time.monotonic()) or True)
    gate, _ = _block_compute(monkeypatch, served)

    async def body() -> None:
        async with serving(models, trim_idle_s=0.05) as (server, stub):
            await asyncio.sleep(0.2)
            assert trims == []  # nothing served yet
            call = stub.Infer(_feature_request(served, 4, "big"), timeout=T)
            await asyncio.sleep(0.3)
            assert trims == []  # busy: the request waits on the gate
            gate.set()
            await call
            await _until(lambda: len(trims) == 1)
            await asyncio.sleep(0.3)
            assert len(trims) == 1  # idle, but nothing served since

    _run(body())
    monkeypatch.undo()
    assert memory.trim_heap() in (True, False)  # the real call returns


def test_a_negative_trim_interval_is_refused() -> None:
    with pytest.raises(ServerError, match="trim_idle_s must be >= 0"):
        ServerConfig(trim_idle_s=-1)
