"""Transports: gRPC against a real grpc.aio server on 127.0.0.1 (token, deadlines,
idempotent retries, TLS), and the WorkerPool (spreading, confirmation by hash, down and
back)."""

from __future__ import annotations

import asyncio
import datetime
import socket
import time
from pathlib import Path

import grpc
import pytest
import torch
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from splitexit.data import Normalize
from splitexit.edge import (
    AgentConfig,
    EdgeAgent,
    GrpcConfig,
    GrpcTransport,
    InProcessTransport,
    OffloadError,
    PoolConfig,
    TlsConfig,
    WorkerPool,
)
from splitexit.edge.transport import channel_options, check_model_info
from splitexit.policies import MaxProb
from splitexit.proto import inference_pb2 as pb
from splitexit.proto import inference_pb2_grpc as pb_grpc


import splitexit_tests_edge_support as S  # noqa: E402  (registered by conftest.py)

pytestmark = pytest.mark.loopback  # servers on 127.0.0.1 only
N = 32


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    model, meta = S.tiny_model()
    images = S.images(N)
    x = Normalize(meta.mean, meta.std)(torch.from_numpy(images))
    policy = MaxProb(S.exit_thresholds(model, x))
    path = S.export(tmp_path_factory.mktemp("b"), model, meta, policy)
    return model, policy, path, images, x


class StubServicer(pb_grpc.SplitInferenceServicer):
    """SplitInference on the generated base class, around a test handler."""

    def __init__(self, handler, *, token: str | None = None) -> None:
        self.handler = handler
        self.token = token
        self.metadata: list[dict[str, str]] = []
        self.request_ids: list[str] = []
        self.unavailable = 0  # answer this many calls UNAVAILABLE first
        self.delay_s = 0.0

    async def _auth(self, context) -> None:
        md = {k: v for k, v in context.invocation_metadata()}
        self.metadata.append(md)
        if self.token is not None and md.get("authorization") != f"Bearer {self.token}":
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or wrong token")

    async def Infer(self, request, context):
        await self._auth(context)
        self.request_ids.append(request.request_id)
        if self.unavailable > 0:
            self.unavailable -= 1
            await context.abort(grpc.StatusCode.UNAVAILABLE, "draining")
        if self.delay_s:
            await asyncio.sleep(self.delay_s)
        try:
            return await self.handler(request)
        except S.StatusError as exc:
            await context.abort(grpc.StatusCode[exc.code], str(exc))

    async def GetModelInfo(self, request, context):
        await self._auth(context)
        return self.handler.model_info()


async def _serve(servicer, credentials=None):
    server = grpc.aio.server(options=[("grpc.max_receive_message_length", 64 << 20)])
    pb_grpc.add_SplitInferenceServicer_to_server(servicer, server)
    health_servicer = health.aio.HealthServicer()
    await health_servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    if credentials is None:
        port = server.add_insecure_port("127.0.0.1:0")
    else:
        port = server.add_secure_port("127.0.0.1:0", credentials)
    await server.start()
    return server, port


def test_grpc_transport_answers_with_token_and_health(setup) -> None:
    model, policy, path, images, x = setup
    handler = S.TailHandler(path)
    servicer = StubServicer(handler, token="s3cret")

    async def run():
        server, port = await _serve(servicer)
        try:
            good = GrpcTransport(f"127.0.0.1:{port}", GrpcConfig(token="s3cret"))
            assert await good.health(1.0) == "SERVING"
            info = await good.model_info(1.0)
            assert check_model_info(info, bundle_hash=S.load_bundle(path, "edge").hash, split=2, codec="fp32") is None
            agent = EdgeAgent(path, good)
            answers = await agent.infer(images)
            await agent.close()
            bad = EdgeAgent(path, GrpcTransport(f"127.0.0.1:{port}", GrpcConfig(token="wrong")))
            refused = await bad.infer(images)
            await bad.close()
            return answers, refused
        finally:
            await server.stop(None)

    answers, refused = asyncio.run(run())
    assert [(a.label, a.exit) for a in answers] == S.reference(model, policy, x, handler.exits)
    assert {a.route for a in answers} == {"edge", "cloud"}
    assert servicer.metadata[0]["authorization"] == "Bearer s3cret"
    assert {a.reason for a in refused if a.route == "degraded"} == {"unauthenticated"}


def test_grpc_deadline_retry_and_unreachable(setup) -> None:
    _, _, path, _, _ = setup
    handler = S.TailHandler(path)
    servicer = StubServicer(handler)
    request = pb.InferRequest(request_id="r-1", bundle_hash="nope", model="tiny", split=2, sample_ids=["a"])

    async def run():
        server, port = await _serve(servicer)
        try:
            fast = GrpcConfig(initial_backoff_s=0.01, max_backoff_s=0.02)
            transport = GrpcTransport(f"127.0.0.1:{port}", fast)
            # UNAVAILABLE twice, then the handler answers: retried with the same request id
            servicer.unavailable = 2
            with pytest.raises(OffloadError) as err:
                await transport.infer(request, 2.0)
            assert err.value.code == "FAILED_PRECONDITION"  # the handler's answer to a wrong hash
            assert servicer.request_ids == ["r-1"] * 3
            # no retries left
            servicer.unavailable = 5
            once = GrpcTransport(f"127.0.0.1:{port}", GrpcConfig(max_attempts=1))
            with pytest.raises(OffloadError) as err:
                await once.infer(request, 2.0)
            assert err.value.code == "UNAVAILABLE" and err.value.worker == f"127.0.0.1:{port}"
            servicer.unavailable = 0
            # a slow worker: the call ends at its deadline
            servicer.delay_s = 2.0
            started = time.perf_counter()
            with pytest.raises(OffloadError) as err:
                await transport.infer(request, 0.2)
            assert err.value.code == "DEADLINE_EXCEEDED" and time.perf_counter() - started < 1.5
            servicer.delay_s = 0.0
            await transport.close()
            await once.close()
        finally:
            await server.stop(None)
        # nobody listens: UNAVAILABLE well before the deadline
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            free = s.getsockname()[1]
        gone = GrpcTransport(f"127.0.0.1:{free}", GrpcConfig(max_attempts=2, initial_backoff_s=0.01,
                                                             max_backoff_s=0.01))
        started = time.perf_counter()
        with pytest.raises(OffloadError) as err:
            await gone.infer(request, 5.0)
        assert err.value.code == "UNAVAILABLE" and time.perf_counter() - started < 4.0
        with pytest.raises(OffloadError):
            await gone.health(0.5)
        await gone.close()

    asyncio.run(run())


def test_channel_options_are_explicit() -> None:
    options = dict(channel_options(GrpcConfig(max_message_bytes=8 << 20)))
    assert options["grpc.max_send_message_length"] == options["grpc.max_receive_message_length"] == 8 << 20
    assert options["grpc.keepalive_time_ms"] == 30_000
    # a worker back from a long outage is retried within a second, not after gRPC's 120 s
    assert options["grpc.max_reconnect_backoff_ms"] <= 1000
    with pytest.raises(ValueError, match="reconnect_backoff"):
        GrpcConfig(initial_reconnect_backoff_ms=2000, max_reconnect_backoff_ms=1000)
    with pytest.raises(ValueError, match="one non-empty line"):
        GrpcConfig(token="a\nb")
    with pytest.raises(ValueError, match="both a client certificate and its key"):
        TlsConfig(cert=b"x")
    with pytest.raises(ValueError, match="bad worker address"):
        GrpcTransport("")


def _certificates():
    """A CA, a server certificate for 127.0.0.1 and a client certificate (PEM)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    def key():
        return ec.generate_private_key(ec.SECP256R1())

    def pem_key(k) -> bytes:
        return k.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                               serialization.NoEncryption())

    now = datetime.datetime.now(datetime.timezone.utc)
    ca_key = key()
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "test ca")])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name).public_key(ca_key.public_key())
          .serial_number(1).not_valid_before(now - datetime.timedelta(hours=1))
          .not_valid_after(now + datetime.timedelta(hours=1))
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
          .sign(ca_key, hashes.SHA256()))

    def leaf(name: str, serial: int, san: list):
        k = key()
        cert = (x509.CertificateBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
                .issuer_name(ca_name).public_key(k.public_key()).serial_number(serial)
                .not_valid_before(now - datetime.timedelta(hours=1)).not_valid_after(now + datetime.timedelta(hours=1))
                .add_extension(x509.SubjectAlternativeName(san), critical=False)
                .sign(ca_key, hashes.SHA256()))
        return cert.public_bytes(serialization.Encoding.PEM), pem_key(k)

    import ipaddress

    server = leaf("worker", 2, [x509.DNSName("worker.test"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))])
    client = leaf("edge", 3, [x509.DNSName("edge.test")])
    return ca.public_bytes(serialization.Encoding.PEM), server, client


def test_tls_files_are_checked_when_the_config_is_made() -> None:
    """Not at the first handshake, where a bad client key reads as an unreachable worker."""
    ca, (server_cert, _), (client_cert, client_key) = _certificates()
    TlsConfig(ca=ca, cert=client_cert, key=client_key)
    with pytest.raises(ValueError, match="private key does not belong to the certificate"):
        TlsConfig(ca=ca, cert=server_cert, key=client_key)
    with pytest.raises(ValueError, match="not a PEM private key"):
        TlsConfig(ca=ca, cert=client_cert, key=b"not a key")
    with pytest.raises(ValueError, match="not a PEM CA certificate"):
        TlsConfig(ca=client_key)


def test_mtls(setup) -> None:
    _, _, path, images, _ = setup
    ca, (server_cert, server_key), (client_cert, client_key) = _certificates()
    handler = S.TailHandler(path)
    credentials = grpc.ssl_server_credentials([(server_key, server_cert)], root_certificates=ca,
                                              require_client_auth=True)

    async def run():
        server, port = await _serve(StubServicer(handler), credentials)
        try:
            mtls = GrpcTransport(f"127.0.0.1:{port}", GrpcConfig(
                tls=TlsConfig(ca=ca, cert=client_cert, key=client_key, server_name="worker.test")))
            assert await mtls.health(2.0) == "SERVING"
            agent = EdgeAgent(path, mtls)
            answers = await agent.infer(images)
            await agent.close()
            # without a client certificate the handshake fails: answered locally
            no_cert = EdgeAgent(path, GrpcTransport(f"127.0.0.1:{port}", GrpcConfig(
                tls=TlsConfig(ca=ca, server_name="worker.test"), max_attempts=1)))
            refused = await no_cert.infer(images)
            await no_cert.close()
            return answers, refused
        finally:
            await server.stop(None)

    answers, refused = asyncio.run(run())
    assert "cloud" in {a.route for a in answers}
    assert {a.reason for a in refused if a.route == "degraded"} == {"unavailable"}


# --- WorkerPool ----------------------------------------------------------------------------
def _pool_worker(handler, name: str, *, bundle_hash: str | None = None, delay_s: float = 0.0,
                 health: str = "SERVING"):
    calls: list[str] = []

    async def infer(request: pb.InferRequest) -> pb.InferResponse:
        calls.append(request.request_id)
        if delay_s:
            await asyncio.sleep(delay_s)
        response = await handler(request)
        response.worker_id = name
        return response

    transport = InProcessTransport(infer, model_info=handler.model_info(bundle_hash=bundle_hash), health=health,
                                   name=name)
    return transport, calls


def _request(path: Path, rid: str) -> pb.InferRequest:
    from splitexit import wire

    bundle = S.load_bundle(path, "edge")
    feature = torch.zeros(1, *bundle.feature_shape)
    from splitexit.runtime import ExitRunner

    state = ExitRunner(bundle.model, bundle.policy, num_classes=10).initial_state(1)
    state.next_exit[:] = 2
    return wire.build_request(bundle, feature, state, ["s"], request_id=rid)


def test_pool_spreads_load_and_skips_a_mismatched_worker(setup) -> None:
    _, _, path, _, _ = setup
    handler = S.TailHandler(path)
    bundle_hash = S.load_bundle(path, "edge").hash

    async def run(strategy: str, concurrent: bool):
        pool = WorkerPool(bundle_hash=bundle_hash, model="tiny", split=2, codec="fp32",
                          config=PoolConfig(strategy=strategy))
        workers = {}
        for name in ("a", "b", "c"):
            transport, calls = _pool_worker(handler, name, delay_s=0.05 if concurrent else 0.0)
            pool.add(name, transport)
            workers[name] = calls
        wrong, wrong_calls = _pool_worker(handler, "wrong", bundle_hash="f" * 64)
        pool.add("wrong", wrong)
        sick, sick_calls = _pool_worker(handler, "sick", health="NOT_SERVING")
        pool.add("sick", sick)
        try:
            requests = [_request(path, f"r{i}") for i in range(9)]
            if concurrent:
                responses = await asyncio.gather(*(pool.infer(r, 5.0) for r in requests))
            else:
                responses = [await pool.infer(r, 5.0) for r in requests]
            states = {w.key: w.state for w in pool.workers()}
            limits = pool.limits
        finally:
            await pool.close()
        return workers, wrong_calls, sick_calls, responses, states, limits

    for strategy, concurrent in (("least_outstanding", True), ("round_robin", False), ("least_outstanding", False)):
        workers, wrong_calls, sick_calls, responses, states, limits = asyncio.run(run(strategy, concurrent))
        assert {name: len(calls) for name, calls in workers.items()} == {"a": 3, "b": 3, "c": 3}, strategy
        assert wrong_calls == [] and sick_calls == []
        assert states == {"a": "up", "b": "up", "c": "up", "wrong": "mismatch", "sick": "down"}
        assert {r.worker_id for r in responses} == {"a", "b", "c"}
        assert limits == (4 << 20, 64)


def test_pool_marks_down_fails_over_and_probes_back(setup) -> None:
    _, _, path, images, _ = setup
    handler = S.TailHandler(path)
    bundle_hash = S.load_bundle(path, "edge").hash
    alive = {"a": True, "b": True}

    def worker(name: str):
        async def infer(request: pb.InferRequest) -> pb.InferResponse:
            if not alive[name]:
                raise OffloadError("UNAVAILABLE", f"{name} is draining")
            response = await handler(request)
            response.worker_id = name
            return response

        async def health() -> str:
            return "SERVING" if alive[name] else "NOT_SERVING"

        return InProcessTransport(infer, model_info=handler.model_info(), health=health, name=name)

    async def run():
        pool = WorkerPool(bundle_hash=bundle_hash, config=PoolConfig(strategy="round_robin", max_failures=1,
                                                                     probe_interval_s=0.05))
        pool.add("a", worker("a"))
        pool.add("b", worker("b"))
        try:
            assert (await pool.infer(_request(path, "x0"), 2.0)).worker_id in ("a", "b")
            alive["a"] = False
            # every request is answered: a's UNAVAILABLE sends it on to b (same id)
            answered = [(await pool.infer(_request(path, f"x{i}"), 2.0)).worker_id for i in range(1, 5)]
            assert answered == ["b"] * 4
            assert {w.key: w.state for w in pool.workers()}["a"] == "down"
            alive["b"] = False
            with pytest.raises(OffloadError) as err:
                await pool.infer(_request(path, "y"), 2.0)
            assert err.value.code == "UNAVAILABLE"
            alive["a"] = alive["b"] = True
            for _ in range(100):  # the background prober brings them back
                if all(w.state == "up" for w in pool.workers()):
                    break
                await asyncio.sleep(0.02)
            assert all(w.state == "up" for w in pool.workers())
            agent = EdgeAgent(path, pool, config=AgentConfig(max_batch_rows=4))
            answers = await agent.infer(images)
            assert "degraded" not in {a.route for a in answers}
            assert {a.worker for a in answers if a.route == "cloud"} == {"a", "b"}
            await agent.close()
        finally:
            await pool.close()
        empty = WorkerPool(bundle_hash=bundle_hash)
        with pytest.raises(OffloadError) as err:
            await empty.infer(_request(path, "z"), 1.0)
        assert err.value.reason == "no_worker"
        await empty.close()

    asyncio.run(run())


def test_deadline_misses_take_out_a_partitioned_worker_but_not_a_busy_one(setup) -> None:
    """A miss starts a health probe: a busy worker answers it and stays in rotation (no
    "no_worker" while it is up); one behind a silent partition does not and is taken out
    within the probe's timeout, however long the request timeout."""
    _, _, path, _, _ = setup
    handler = S.TailHandler(path)
    bundle_hash = S.load_bundle(path, "edge").hash
    partitioned = {"on": False}

    async def slow_infer(request: pb.InferRequest) -> pb.InferResponse:
        await asyncio.sleep(10)  # always later than the caller's deadline
        return await handler(request)

    async def health() -> str:
        if partitioned["on"]:
            await asyncio.sleep(10)  # nothing comes back
        return "SERVING"

    async def run():
        pool = WorkerPool(bundle_hash=bundle_hash, config=PoolConfig(max_failures=1, confirm_timeout_s=0.3,
                                                                     probe_interval_s=60))
        pool.add("w", InProcessTransport(slow_infer, model_info=handler.model_info(), health=health, name="w"))
        try:
            await pool.probe(force=True)
            for i in range(4):
                with pytest.raises(OffloadError) as err:
                    await pool.infer(_request(path, f"busy{i}"), 0.05)
                assert err.value.code == "DEADLINE_EXCEEDED" and err.value.reason != "no_worker"
            await asyncio.sleep(0.1)  # the probes the misses started
            assert {w.key: w.state for w in pool.workers()} == {"w": "up"}
            partitioned["on"] = True
            with pytest.raises(OffloadError):
                await pool.infer(_request(path, "cut"), 0.05)
            await asyncio.sleep(0.5)
            assert {w.key: w.state for w in pool.workers()} == {"w": "down"}
        finally:
            await pool.close()

    asyncio.run(run())
