"""`GrpcTransport`: one cloud worker (or one DNS name) over a `grpc.aio` channel with
explicit message-size limits, keepalive, optional TLS/mTLS and a bearer token, and
idempotent retries (same request id) on UNAVAILABLE within the call's deadline.

grpc is imported only where a gRPC object is built, so in-process users never load it.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Literal

from splitexit.edge.transport.base import OffloadError, check_timeout, is_loopback
from splitexit.proto import inference_pb2 as pb
from splitexit.tls import check_key_pair, check_pem

if TYPE_CHECKING:
    import grpc

__all__ = ["GrpcConfig", "GrpcTransport", "TlsConfig", "channel_options", "create_channel"]

log = logging.getLogger(__name__)

@dataclass(frozen=True, kw_only=True)
class TlsConfig:
    """Server authentication (ca) and, with cert + key, client authentication (mTLS).
    PEM bytes; None for `ca` uses the system roots."""

    ca: bytes | None = field(default=None, repr=False)
    cert: bytes | None = field(default=None, repr=False)
    key: bytes | None = field(default=None, repr=False)
    # Expected name in the server's certificate when it differs from the dialled address
    # (an IP, or a test certificate); leave None in production.
    server_name: str | None = None

    def __post_init__(self) -> None:
        if (self.cert is None) != (self.key is None):
            raise ValueError("mTLS needs both a client certificate and its key")
        # checked now, not at the first handshake (TlsError is a ValueError)
        if self.ca is not None:
            check_pem(self.ca, "CA certificate", b"CERTIFICATE-----", "the TLS CA")
        if self.cert is not None and self.key is not None:
            check_key_pair(self.cert, self.key, where="the client certificate and key")

    @classmethod
    def from_files(cls, *, ca: str | Path | None = None, cert: str | Path | None = None,
                   key: str | Path | None = None, server_name: str | None = None) -> "TlsConfig":
        def read(path: str | Path | None, what: str) -> bytes | None:
            if path is None:
                return None
            try:
                return Path(path).read_bytes()
            except OSError as exc:
                raise ValueError(f"{path}: cannot read the TLS {what} ({exc.strerror or exc})") from exc

        return cls(ca=read(ca, "CA certificate"), cert=read(cert, "client certificate"),
                   key=read(key, "client key"), server_name=server_name)


@dataclass(frozen=True, kw_only=True)
class GrpcConfig:
    """Channel settings, each for a reason (see create_channel)."""

    # Explicit both ways: the default 4 MiB receive cap would refuse a large activation.
    # The worker advertises its own limit in ModelInfo.limits; the agent splits to it.
    max_message_bytes: int = 64 * 1024 * 1024
    # A ping every 30 s finds a dead connection (NAT timeout, pulled cable) before a request
    # waits on it. The worker must allow pings this often (its min ping interval <= 30 s).
    keepalive_time_ms: int = 30_000
    keepalive_timeout_ms: int = 10_000
    # Idle connections are pinged too (an edge is idle between bursts, and that is when a
    # NAT drops it). splitexit workers permit this; a server that does not would answer
    # with GOAWAY "too_many_pings": turn it off for such a server.
    keepalive_without_calls: bool = True
    # gRPC's reconnect backoff grows to 120 s by default: after a long outage the channel
    # would wait up to two minutes to try again (measured: answers from the cloud 87 s after
    # a worker came back from a 300 s outage). Capped, it retries every second at most.
    initial_reconnect_backoff_ms: int = 200
    max_reconnect_backoff_ms: int = 1000
    tls: TlsConfig | None = None
    token: str | None = field(default=None, repr=False)  # sent as "authorization: Bearer ..."
    # Retries on UNAVAILABLE only (the request did not run, or runs idempotently by id),
    # with jittered exponential backoff, never past the call's deadline.
    max_attempts: int = 3
    initial_backoff_s: float = 0.05
    max_backoff_s: float = 1.0
    health_service: str = ""  # grpc.health.v1 service name; "" = the whole server
    # "round_robin" spreads calls over every address a DNS name resolves to (a headless
    # Kubernetes Service); "pick_first" keeps one connection.
    lb_policy: Literal["pick_first", "round_robin"] = "pick_first"
    # The least time between two DNS resolutions of a name. gRPC's default, 30 s, would keep a
    # worker added behind the name (a new pod) unseen for that long after the old ones'
    # connections were closed by their max connection age.
    dns_min_reresolve_ms: int = 1000

    def __post_init__(self) -> None:
        if self.max_message_bytes < 1024:
            raise ValueError(f"max_message_bytes must be >= 1024, got {self.max_message_bytes}")
        if self.keepalive_time_ms < 1000 or self.keepalive_timeout_ms < 100:
            raise ValueError("keepalive_time_ms must be >= 1000 and keepalive_timeout_ms >= 100")
        if not 0 < self.initial_reconnect_backoff_ms <= self.max_reconnect_backoff_ms:
            raise ValueError("need 0 < initial_reconnect_backoff_ms <= max_reconnect_backoff_ms")
        if self.max_attempts < 1 or self.initial_backoff_s < 0 or self.max_backoff_s < self.initial_backoff_s:
            raise ValueError("need max_attempts >= 1 and 0 <= initial_backoff_s <= max_backoff_s")
        if self.token is not None and (not self.token or any(c in self.token for c in "\r\n")):
            raise ValueError("the bearer token must be one non-empty line")


def channel_options(config: GrpcConfig) -> list[tuple[str, Any]]:
    options: list[tuple[str, Any]] = [
        ("grpc.max_send_message_length", config.max_message_bytes),
        ("grpc.max_receive_message_length", config.max_message_bytes),
        ("grpc.keepalive_time_ms", config.keepalive_time_ms),
        ("grpc.keepalive_timeout_ms", config.keepalive_timeout_ms),
        ("grpc.keepalive_permit_without_calls", int(config.keepalive_without_calls)),
        ("grpc.initial_reconnect_backoff_ms", config.initial_reconnect_backoff_ms),
        ("grpc.min_reconnect_backoff_ms", config.initial_reconnect_backoff_ms),
        ("grpc.max_reconnect_backoff_ms", config.max_reconnect_backoff_ms),
        # our own retry loop (by request id, within the deadline) replaces grpc's
        ("grpc.enable_retries", 0),
        ("grpc.lb_policy_name", config.lb_policy),
        ("grpc.dns_min_time_between_resolutions_ms", config.dns_min_reresolve_ms),
    ]
    if config.tls is not None and config.tls.server_name:
        options.append(("grpc.ssl_target_name_override", config.tls.server_name))
    return options


def create_channel(target: str, config: GrpcConfig) -> "grpc.aio.Channel":
    """A grpc.aio channel to `target` ("host:port", "dns:///name:port", "ipv4:...") with the
    settings of `config`. Call it inside the event loop that will use the channel."""
    import grpc

    options = channel_options(config)
    if config.tls is None:
        return grpc.aio.insecure_channel(target, options=options)
    creds = grpc.ssl_channel_credentials(root_certificates=config.tls.ca, private_key=config.tls.key,
                                         certificate_chain=config.tls.cert)
    return grpc.aio.secure_channel(target, creds, options=options)


class GrpcTransport:
    """One cloud worker address over gRPC. The channel is created on first use, in the
    event loop that uses it (grpc.aio channels belong to one loop)."""

    def __init__(self, target: str, config: GrpcConfig | None = None) -> None:
        if not target or any(c.isspace() for c in target):
            raise ValueError(f"bad worker address {target!r}; expected HOST:PORT or dns:///NAME:PORT")
        self.name = target
        self.config = config or GrpcConfig()
        self._channel: Any = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stub: Any = None
        self._health_stub: Any = None
        self._metadata: tuple[tuple[str, str], ...] = ()
        if self.config.token is not None:
            if self.config.tls is None and not is_loopback(target):
                log.warning("sending a bearer token to %s without TLS", target)
            self._metadata = (("authorization", f"Bearer {self.config.token}"),)

    def _ensure(self) -> None:
        loop = asyncio.get_running_loop()
        if self._channel is not None and self._loop is loop:
            return
        from grpc_health.v1 import health_pb2_grpc

        from splitexit.proto import inference_pb2_grpc

        # A channel of a closed loop cannot be reused; this one is simply dropped.
        self._channel = create_channel(self.name, self.config)
        self._loop = loop
        self._stub = inference_pb2_grpc.SplitInferenceStub(self._channel)
        self._health_stub = health_pb2_grpc.HealthStub(self._channel)

    async def _call(self, method: Callable[..., Any], request: Any, timeout: float, *, retry: bool) -> Any:
        import grpc

        loop = asyncio.get_running_loop()
        deadline = loop.time() + check_timeout(timeout)
        attempt = 0
        while True:
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise OffloadError("DEADLINE_EXCEEDED", f"no answer within {timeout * 1000:.0f} ms", worker=self.name)
            try:
                # wait_for_ready=False: an unreachable worker fails fast (UNAVAILABLE) so
                # the row can be answered locally instead of waiting out its budget.
                return await method(request, timeout=remaining, metadata=self._metadata, wait_for_ready=False)
            except grpc.aio.AioRpcError as exc:
                code = exc.code()
                attempt += 1
                if retry and code == grpc.StatusCode.UNAVAILABLE and attempt < self.config.max_attempts:
                    backoff = min(self.config.max_backoff_s, self.config.initial_backoff_s * 2 ** (attempt - 1))
                    backoff *= random.uniform(0.5, 1.0)  # jitter: many edges must not retry in step
                    if loop.time() + backoff < deadline:
                        await asyncio.sleep(backoff)
                        continue
                raise OffloadError(code.name, exc.details() or "", worker=self.name) from None

    async def infer(self, request: pb.InferRequest, timeout: float) -> pb.InferResponse:
        self._ensure()
        # Retrying is safe: the same request_id lets the worker answer a duplicate from cache.
        return await self._call(self._stub.Infer, request, timeout, retry=True)

    async def model_info(self, timeout: float) -> pb.ModelInfo:
        self._ensure()
        return await self._call(self._stub.GetModelInfo, pb.ModelInfoRequest(), timeout, retry=True)

    async def health(self, timeout: float) -> str:
        from grpc_health.v1 import health_pb2

        self._ensure()
        reply = await self._call(self._health_stub.Check,
                                 health_pb2.HealthCheckRequest(service=self.config.health_service), timeout,
                                 retry=False)
        return health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)

    async def close(self) -> None:
        channel, self._channel, self._stub, self._health_stub = self._channel, None, None, None
        if channel is not None and self._loop is asyncio.get_running_loop():
            await channel.close(grace=None)
