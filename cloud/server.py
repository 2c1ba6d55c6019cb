"""`build_server(config, models)`: the cloud worker's grpc.aio server, ready to start.

What it wires up, each for a reason:
- `SplitInference` (splitexit.v1) with dynamic batching (`splitexit.cloud.batcher`) on
  compute threads of its own (`batching.concurrent_batches` of them, each with
  `compute_threads` torch threads): torch gets the CPU, the event loop stays free to
  accept, refuse and answer.
- `grpc.health.v1.Health`: "" and "splitexit.v1.SplitInference" are NOT_SERVING while the
  worker warms up (the tail runs once on a dummy batch), SERVING after, and NOT_SERVING
  again, for good, once it drains. Kubernetes gRPC probes and the edge's confirmation
  check read it.
- Server reflection, listing SplitInference, Health and reflection itself, so that tools
  work without the .proto, e.g. (plaintext, no token):

      grpcurl -plaintext 127.0.0.1:50051 list
      grpcurl -plaintext 127.0.0.1:50051 splitexit.v1.SplitInference/GetModelInfo
      grpcurl -plaintext 127.0.0.1:50051 grpc.health.v1.Health/Check
      # with TLS and a token:
      grpcurl -cacert ca.pem -H 'authorization: Bearer TOKEN' HOST:PORT \\
          splitexit.v1.SplitInference/GetModelInfo

- Message size limits set explicitly both ways (the 4 MiB default meets a large batch of
  activations), keepalive that accepts the edge's pings every 30 s, a cap on concurrent
  RPCs (beyond it gRPC answers RESOURCE_EXHAUSTED), SO_REUSEPORT off (a port in use is an
  error, not a silently shared port).
- Optional TLS (cert + key) and mTLS (client CA; client certificate required by default).
- Optional bearer-token auth: a server interceptor rejects a missing or wrong
  `authorization: Bearer <token>` with UNAUTHENTICATED. Health checks stay open on
  purpose: probes (kubelet, load balancers) carry no token and learn nothing but
  SERVING/NOT_SERVING. Reflection and GetModelInfo need the token (they name the bundles).
- Overload refused at the headers: an Infer (or KServe ModelInfer) call that the batcher
  would refuse whatever it carries (too much work ahead) gets RESOURCE_EXHAUSTED before
  its body is read (`_RefuseOverloadAtHeaders`).
- Graceful drain (`CloudServer.drain`, also on SIGTERM/SIGINT after
  `install_signal_handlers`): health NOT_SERVING, new Infer calls UNAVAILABLE, requests in
  flight finish within the grace period, then the server stops.
- Prometheus metrics (`splitexit.cloud.metrics`) in a registry of this server, over HTTP
  when `metrics_port` is set.

Call `build_server` from inside the event loop that will run the server.
"""

from __future__ import annotations

import asyncio
import errno
import hmac
import logging
import os
import signal
import socket
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Awaitable, Callable, Hashable, Mapping

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from splitexit.cloud.answers import AnswerCacheConfig
from splitexit import __version__
from splitexit.cloud import kserve
from splitexit.cloud.batcher import Batcher, BatcherConfig
from splitexit.cloud.metrics import Metrics
from splitexit.cloud.memory import trim_when_idle
from splitexit.cloud.requests import ServiceLimits
from splitexit.cloud.served import ServedModel
from splitexit.cloud.servicer import SERVICE_NAME, SplitInferenceServicer, add_to_server
from splitexit.tls import TlsError, check_key_pair

__all__ = ["CloudServer", "HEALTH_SERVICES", "ServerConfig", "ServerError", "build_server"]

log = logging.getLogger("splitexit.cloud")

# Health is reported for the whole server ("") and for the inference service.
HEALTH_SERVICES = ("", SERVICE_NAME)
_OPEN_METHODS = ("/grpc.health.v1.Health/",)  # never behind the token (probes)


# The GIL switch interval a worker process should run with (`sys.setswitchinterval`; the
# CLI sets it, a process embedding a worker may). The event loop (gRPC callbacks, protobuf)
# and the compute thread share the GIL: at Python's default of 5 ms the compute thread,
# between two torch ops, may wait that long for the loop to let go. bench serve on 2 cores:
# 0.68 of the bare tail's samples/s at 5 ms, 0.70 at 0.5 ms.
SWITCH_INTERVAL_MS = 0.5


class ServerError(ValueError):
    """The server cannot be built or started as configured (port in use, bad cert...)."""


@dataclass(frozen=True, kw_only=True)
class ServerConfig:
    """Everything the worker's server needs; validated at construction."""

    host: str = "127.0.0.1"  # "0.0.0.0" / "[::]" to listen on every interface
    port: int = 0  # 0 = any free port (CloudServer.port says which)
    # Both ways: a batch of 256 rows of a 32 KB feature is 8 MiB; the 4 MiB default is too small.
    max_message_bytes: int = 32 * 1024 * 1024
    max_concurrent_rpcs: int | None = 1024  # beyond it gRPC answers RESOURCE_EXHAUSTED at once
    # Keepalive: we ping idle clients to find dead connections; clients (the edge pings every
    # 30 s, also without calls) are allowed pings down to min_client_ping_interval_s.
    keepalive_time_s: float = 60.0
    keepalive_timeout_s: float = 20.0
    min_client_ping_interval_s: float = 10.0
    tls_cert: Path | None = None  # PEM certificate chain
    tls_key: Path | None = None  # PEM private key
    client_ca: Path | None = None  # PEM CA bundle for mTLS
    require_client_cert: bool = True  # with client_ca: refuse clients without a certificate
    token: str | None = field(default=None, repr=False)  # bearer token; None = no auth
    batching: BatcherConfig = field(default_factory=BatcherConfig)
    max_request_rows: int = 256
    max_raw_item_bytes: int = 4 * 1024 * 1024
    stream_inflight: int = 64
    # torch intra-op threads of each compute thread; None = torch's default, shared out among
    # the compute threads when batching.concurrent_batches > 1 (`compute_thread_count`)
    compute_threads: int | None = None
    answer_cache: AnswerCacheConfig = field(default_factory=AnswerCacheConfig)  # retried request ids
    drain_grace_s: float = 10.0
    metrics_port: int = 0  # 0 = no HTTP endpoint (metrics stay readable in-process)
    metrics_host: str | None = None  # default: host
    worker_id: str = ""  # default: hostname-pid
    # Close each client connection after this long (gRPC GOAWAY; calls in flight get
    # max_connection_age_grace_s to finish): a client then connects anew and re-resolves
    # its DNS name, so workers added behind a headless Service get traffic. Without it a
    # client keeps its first connections forever and a new pod gets none. None = never.
    max_connection_age_s: float | None = None
    max_connection_age_grace_s: float = 30.0
    # Give freed heap memory back to the OS once the worker has been idle this long after
    # serving (`cloud.memory.trim_when_idle`); 0 = never.
    trim_idle_s: float = 1.0

    def __post_init__(self) -> None:
        if not 0 <= self.port <= 65535 or not 0 <= self.metrics_port <= 65535:
            raise ServerError(f"ports must be in 0..65535, got {self.port} and {self.metrics_port}")
        if self.max_message_bytes < 1024:
            raise ServerError(f"max_message_bytes must be >= 1024, got {self.max_message_bytes}")
        if self.trim_idle_s < 0:
            raise ServerError(f"trim_idle_s must be >= 0, got {self.trim_idle_s}")
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ServerError("TLS needs both a certificate and a key")
        if self.client_ca is not None and self.tls_cert is None:
            raise ServerError("a client CA (mTLS) needs TLS: give a certificate and a key")
        if self.token is not None and (not self.token or any(c.isspace() for c in self.token)):
            raise ServerError("the token must be non-empty and without whitespace")
        if self.max_concurrent_rpcs is not None and self.max_concurrent_rpcs < 1:
            raise ServerError("max_concurrent_rpcs must be >= 1 or None")
        if self.max_request_rows > self.batching.queue_limit_rows:
            raise ServerError(f"max_request_rows {self.max_request_rows} exceeds the queue limit "
                              f"{self.batching.queue_limit_rows} rows: such a request could never be queued")
        if self.compute_threads is not None and self.compute_threads < 1:
            raise ServerError("compute_threads must be >= 1")
        if self.drain_grace_s < 0 or min(self.keepalive_time_s, self.keepalive_timeout_s,
                                         self.min_client_ping_interval_s) <= 0:
            raise ServerError("drain grace must be >= 0 and keepalive times > 0")
        if self.max_connection_age_s is not None and (self.max_connection_age_s <= 0
                                                      or self.max_connection_age_grace_s < 0):
            raise ServerError("max_connection_age must be > 0 and its grace >= 0")
        ServiceLimits(max_message_bytes=self.max_message_bytes, max_request_rows=self.max_request_rows,
                      max_raw_item_bytes=self.max_raw_item_bytes, stream_inflight=self.stream_inflight)

    @property
    def tls(self) -> bool:
        return self.tls_cert is not None

    def grpc_options(self) -> list[tuple[str, Any]]:
        age = [] if self.max_connection_age_s is None else [
            ("grpc.max_connection_age_ms", int(self.max_connection_age_s * 1000)),
            ("grpc.max_connection_age_grace_ms", int(self.max_connection_age_grace_s * 1000))]
        return age + [
            ("grpc.max_receive_message_length", self.max_message_bytes),
            ("grpc.max_send_message_length", self.max_message_bytes),
            ("grpc.keepalive_time_ms", int(self.keepalive_time_s * 1000)),
            ("grpc.keepalive_timeout_ms", int(self.keepalive_timeout_s * 1000)),
            # edge agents ping while idle: allow it, and at their 30 s (never a GOAWAY for "too many pings")
            ("grpc.keepalive_permit_without_calls", 1),
            ("grpc.http2.min_recv_ping_interval_without_data_ms", int(self.min_client_ping_interval_s * 1000)),
            ("grpc.http2.max_ping_strikes", 2),
            ("grpc.so_reuseport", 0),  # a port in use must fail, not be shared with another process
        ]


def _read_pem(path: Path, what: str, marker: str) -> bytes:
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise ServerError(f"cannot read the {what} {path}: {exc.strerror or exc}") from None
    if b"-----BEGIN " not in data or marker.encode() not in data:
        raise ServerError(f"{path}: not a PEM {what} (no '-----BEGIN ...{marker}' block)")
    return data


def _check_bindable(host: str, port: int) -> None:
    """Fail with one clear line before gRPC tries (its C core logs its own failure lines
    to stderr). Binds like gRPC's listener does: SO_REUSEADDR on, SO_REUSEPORT off."""
    name = host.strip("[]") or None
    try:
        infos = socket.getaddrinfo(name, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise ServerError(f"cannot listen on {_bind_address(host, port)}: unknown host ({exc.strerror})") from None
    for family, kind, proto, _, sockaddr in infos:
        with socket.socket(family, kind, proto) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                probe.bind(sockaddr)
            except OSError as exc:
                what = "the port is in use" if exc.errno == errno.EADDRINUSE else exc.strerror
                raise ServerError(f"cannot listen on {_bind_address(host, port)}: {what}") from None


def _bind_address(host: str, port: int) -> str:
    if ":" in host and not host.startswith("["):  # a bare IPv6 address
        host = f"[{host}]"
    return f"{host}:{port}"


class _TokenAuth(grpc.aio.ServerInterceptor):
    """Refuses calls without `authorization: Bearer <token>` (health checks exempt)."""

    def __init__(self, token: str, on_reject: Callable[[str], None]) -> None:
        self._expected = token.encode()
        self._on_reject = on_reject

    async def intercept_service(self, continuation: Callable[[grpc.HandlerCallDetails], Awaitable[Any]],
                                details: grpc.HandlerCallDetails) -> Any:
        if details.method.startswith(_OPEN_METHODS):
            return await continuation(details)
        got = b""
        for key, value in details.invocation_metadata or ():
            if key == "authorization":
                got = value.encode() if isinstance(value, str) else bytes(value)
        # "Bearer" is an HTTP auth scheme: matched without regard to case (RFC 9110 11.1)
        scheme, _, credential = got.strip().partition(b" ")
        if scheme.lower() == b"bearer" and hmac.compare_digest(credential.strip(), self._expected):
            return await continuation(details)  # constant time: no timing oracle on the token
        handler = await continuation(details)
        if handler is None:
            return None
        message = "missing bearer token" if not got else "wrong bearer token"
        self._on_reject(details.method)
        return _refusing(handler, message)


class _RefuseOverloadAtHeaders(grpc.aio.ServerInterceptor):
    """Refuses an inference call (RESOURCE_EXHAUSTED) at its headers when the batcher would
    refuse it whatever it carries (more than `max_queue_wait_ms` of work ahead, or the
    request limit reached), without receiving or parsing its body. Under overload most
    calls are refused; read and parsed first, each refusal of a 512 KB request held the
    event loop that also answers the accepted ones. The refusal is a stream-shaped
    handler: gRPC then calls it before reading any message, and a unary caller sees the
    status as for any unary call."""

    def __init__(self, servicer: SplitInferenceServicer, methods: Mapping[str, str]) -> None:
        self._servicer = servicer
        self._methods = methods  # full method path -> the name the metrics count it under

    async def intercept_service(self, continuation: Callable[[grpc.HandlerCallDetails], Awaitable[Any]],
                                details: grpc.HandlerCallDetails) -> Any:
        handler = await continuation(details)
        method = self._methods.get(details.method)
        refusal = None if handler is None or method is None else self._servicer.refusal_at_headers(method)
        if refusal is None:
            return handler
        message = refusal.message

        async def refuse(_requests: Any, context: grpc.aio.ServicerContext) -> None:
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, message)

        return grpc.stream_unary_rpc_method_handler(refuse, response_serializer=handler.response_serializer)


def _refusing(handler: grpc.RpcMethodHandler, message: str) -> grpc.RpcMethodHandler:
    """A handler of the same shape as `handler` that answers UNAUTHENTICATED."""

    async def refuse(_request: Any, context: grpc.aio.ServicerContext) -> None:
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)

    codecs = {"request_deserializer": handler.request_deserializer,
              "response_serializer": handler.response_serializer}
    if handler.unary_unary:
        return grpc.unary_unary_rpc_method_handler(refuse, **codecs)
    if handler.unary_stream:
        return grpc.unary_stream_rpc_method_handler(refuse, **codecs)
    if handler.stream_unary:
        return grpc.stream_unary_rpc_method_handler(refuse, **codecs)
    return grpc.stream_stream_rpc_method_handler(refuse, **codecs)


def compute_thread_count(config: ServerConfig) -> int | None:
    """Torch threads of each compute thread: as configured, or, with several batches
    computing at once, torch's default shared out among them (two batches of two threads
    each on two cores would only fight over them). None: torch's default as it is."""
    if config.compute_threads is not None or config.batching.concurrent_batches == 1:
        return config.compute_threads
    import torch

    return max(1, torch.get_num_threads() // config.batching.concurrent_batches)


def _init_compute_thread(threads: int | None) -> None:
    if threads is not None:
        import torch

        torch.set_num_threads(threads)


def compute_executor(config: ServerConfig, name: str = "splitexit-compute") -> ThreadPoolExecutor:
    """The worker's compute threads: one per batch computing at once, each with
    `compute_thread_count(config)` torch threads (benchmarks build theirs the same way)."""
    return ThreadPoolExecutor(max_workers=config.batching.concurrent_batches, thread_name_prefix=name,
                              initializer=_init_compute_thread, initargs=(compute_thread_count(config),))


class CloudServer:
    """A built worker: `await start()`, then `await drain()` (or a signal) ends it."""

    def __init__(self, *, server: grpc.aio.Server, port: int, config: ServerConfig, servicer: SplitInferenceServicer,
                 health_servicer: health.aio.HealthServicer, batcher: Batcher, metrics: Metrics,
                 executor: ThreadPoolExecutor) -> None:
        self.server = server
        self.port = port
        self.config = config
        self.servicer = servicer
        self.health = health_servicer
        self.batcher = batcher
        self.metrics = metrics
        self.metrics_port: int | None = None
        self._executor = executor
        self._drain_hooks: list[Callable[[], Awaitable[None]]] = []
        self._drain_task: asyncio.Task[None] | None = None
        self._trimmer: asyncio.Task[None] | None = None
        self._started = False

    @property
    def address(self) -> str:
        """host:port to connect to (a wildcard host reads as 127.0.0.1)."""
        host = self.config.host
        if host in ("0.0.0.0", "", "[::]", "::"):
            host = "127.0.0.1"
        return _bind_address(host, self.port)

    @property
    def models(self) -> Mapping[tuple[str, str], ServedModel]:
        return self.servicer.models

    async def start(self) -> None:
        """Listen (health NOT_SERVING, Infer UNAVAILABLE), warm every model up, then SERVING.
        Raises ServerError when the metrics port cannot be bound or a warm-up fails (and
        then has stopped everything it started)."""
        try:
            await self._start()
        except BaseException:
            await self.stop()
            raise

    async def _start(self) -> None:
        for service in HEALTH_SERVICES:
            await self.health.set(service, health_pb2.HealthCheckResponse.NOT_SERVING)
        if self.config.metrics_port:
            try:
                self.metrics_port = self.metrics.serve_http(self.config.metrics_port,
                                                            self.config.metrics_host or self.config.host)
            except OSError as exc:
                raise ServerError(f"cannot serve metrics on port {self.config.metrics_port}: "
                                  f"{exc.strerror or exc}") from None
        await self.server.start()
        self._started = True
        loop = asyncio.get_running_loop()
        for model in self.models.values():
            try:
                await loop.run_in_executor(self._executor, model.warm_up)
            except Exception as exc:
                raise ServerError(f"warm-up of {model.name} failed: {type(exc).__name__}: {exc}") from exc
        self.servicer.phase = "serving"
        if self.config.trim_idle_s > 0:
            self._trimmer = asyncio.ensure_future(trim_when_idle(
                lambda: self.servicer.calls, self.servicer.is_idle, interval_s=self.config.trim_idle_s))
        for service in HEALTH_SERVICES:
            await self.health.set(service, health_pb2.HealthCheckResponse.SERVING)
        log.info("serving %s on %s", ", ".join(f"{m.name}@{m.hash[:12]}" for m in self.models.values()), self.address)

    def on_drain(self, hook: Callable[[], Awaitable[None]]) -> None:
        """Run `hook` when draining (or stopping) starts, e.g. withdraw the mDNS
        advertisement so that no new edge picks a worker on its way out."""
        self._drain_hooks.append(hook)

    async def _run_drain_hooks(self) -> None:
        hooks, self._drain_hooks = self._drain_hooks, []
        for hook in hooks:
            try:
                await hook()
            except Exception as exc:  # a hook must not keep the worker from stopping
                log.warning("drain hook failed: %s: %s", type(exc).__name__, exc)

    def drain(self, grace: float | None = None) -> asyncio.Task[None]:
        """Start draining (idempotent) and return the task; await it to wait for the stop."""
        if self._drain_task is None:
            self._drain_task = asyncio.ensure_future(self._drain(self.config.drain_grace_s if grace is None else grace))
        return self._drain_task

    async def _drain(self, grace: float) -> None:
        ends = time.monotonic() + grace
        self.servicer.phase = "draining"
        await self.health.enter_graceful_shutdown()  # NOT_SERVING for every service, for good
        await self._run_drain_hooks()
        idle = await self.servicer.wait_idle(grace)
        if not idle:
            log.warning("drain: requests still in flight after %.1f s; cancelling them", grace)
        # streams may still be open: they get what is left of the grace period
        await self.server.stop(max(ends - time.monotonic(), 0.1))
        await self._close()

    async def _close(self) -> None:
        if self._trimmer is not None:
            self._trimmer.cancel()
            await asyncio.gather(self._trimmer, return_exceptions=True)
        await self.batcher.close()
        await asyncio.get_running_loop().run_in_executor(None, self._executor.shutdown)
        self.metrics.close()

    async def stop(self) -> None:
        """Stop at once (no grace): tests and second signals."""
        self.servicer.phase = "draining"
        await self.health.enter_graceful_shutdown()
        await self._run_drain_hooks()
        await self.server.stop(None)
        await self._close()

    async def wait_for_termination(self) -> None:
        await self.server.wait_for_termination()
        if self._drain_task is not None:
            await self._drain_task

    def install_signal_handlers(self) -> None:
        """SIGTERM/SIGINT drain gracefully (a second one stops at once). Unix event loops."""
        loop = asyncio.get_running_loop()

        def on_signal(signum: int) -> None:
            if self._drain_task is None:
                log.info("%s: draining (grace %.1f s)", signal.Signals(signum).name, self.config.drain_grace_s)
                self.drain()
            else:
                log.warning("%s again: stopping now", signal.Signals(signum).name)
                asyncio.ensure_future(self.server.stop(None))

        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, on_signal, signum)

    async def __aenter__(self) -> "CloudServer":
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._drain_task is not None:
            await self._drain_task
        else:
            await self.stop()


def _model_name(key: Hashable) -> str:
    """The model of a batch key (model, split, dtype, shape), for the metrics' label."""
    return str(key[0]) if isinstance(key, tuple) else str(key)


def build_server(config: ServerConfig, models: Mapping[tuple[str, str], ServedModel]) -> CloudServer:
    """A grpc.aio server for `models` (from `splitexit.cloud.served.load_models`), bound
    to config.host:config.port but not started. Raises ServerError (port in use, unreadable
    or non-PEM TLS files)."""
    if not models:
        raise ServerError("no models to serve")
    metrics = Metrics()
    executor = compute_executor(config)

    def run_batch(key: Any, items: Any) -> Any:
        return items[0].model.run_batch(items)

    batcher = Batcher(config.batching, run_batch, executor=executor, on_depth=metrics.queue_rows.set,
                      on_batch=lambda key, rows, s: metrics.batch_done(_model_name(key), rows, s))
    limits = ServiceLimits(max_message_bytes=config.max_message_bytes, max_request_rows=config.max_request_rows,
                           max_raw_item_bytes=config.max_raw_item_bytes, stream_inflight=config.stream_inflight)
    worker_id = config.worker_id or f"{socket.gethostname()}-{os.getpid()}"
    servicer = SplitInferenceServicer(models, batcher=batcher, limits=limits, worker_id=worker_id, metrics=metrics,
                                      answers=config.answer_cache)
    interceptors: list[grpc.aio.ServerInterceptor] = []
    if config.token is not None:
        interceptors.append(_TokenAuth(config.token, lambda method: metrics.request_done(
            method.rsplit("/", 1)[-1], "UNAUTHENTICATED", 0.0)))
    # after the token check: an unauthenticated caller learns nothing of the load
    interceptors.append(_RefuseOverloadAtHeaders(servicer, {f"/{SERVICE_NAME}/Infer": "Infer",
                                                            f"/{kserve.SERVICE_NAME}/ModelInfer": "ModelInfer"}))
    try:
        credentials = None
        if config.tls:
            assert config.tls_cert is not None and config.tls_key is not None
            cert = _read_pem(config.tls_cert, "certificate", "CERTIFICATE-----")
            key = _read_pem(config.tls_key, "private key", "PRIVATE KEY-----")
            try:  # a key of another certificate would surface as a failed bind
                check_key_pair(cert, key, where=f"{config.tls_cert} and {config.tls_key}")
            except TlsError as exc:
                raise ServerError(str(exc)) from None
            ca = _read_pem(config.client_ca, "client CA", "CERTIFICATE-----") if config.client_ca else None
            credentials = grpc.ssl_server_credentials(
                [(key, cert)], root_certificates=ca, require_client_auth=ca is not None and config.require_client_cert)
        server = grpc.aio.server(interceptors=interceptors, options=config.grpc_options(),
                                 maximum_concurrent_rpcs=config.max_concurrent_rpcs)
        add_to_server(servicer, server)
        kserve.add_to_server(kserve.KServeV2Servicer(servicer, __version__), server)  # the v2 protocol beside ours
        health_servicer = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
        reflection.enable_server_reflection(
            (SERVICE_NAME, kserve.SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
             reflection.SERVICE_NAME), server)
        address = _bind_address(config.host, config.port)
        _check_bindable(config.host, config.port)
        try:
            port = server.add_secure_port(address, credentials) if credentials else server.add_insecure_port(address)
        except RuntimeError as exc:  # grpc raises on a failed bind (older versions return 0)
            raise ServerError(f"cannot listen on {address}: the port is in use or the address is not "
                              f"available ({exc})") from None
        if not port:
            raise ServerError(f"cannot listen on {address}: the port is in use or the address is not available")
    except BaseException:
        executor.shutdown(wait=False)
        raise
    return CloudServer(server=server, port=port, config=config, servicer=servicer, health_servicer=health_servicer,
                       batcher=batcher, metrics=metrics, executor=executor)
