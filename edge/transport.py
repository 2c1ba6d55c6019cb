"""Offload transports: how the edge agent reaches a cloud worker.

- `Transport`: the protocol the agent talks to (infer / model_info / health / close).
- `GrpcTransport`: one cloud worker (or one DNS name) over a `grpc.aio` channel with
  explicit message-size limits, keepalive, optional TLS/mTLS and a bearer token, and
  idempotent retries (same request id) on UNAVAILABLE within the call's deadline.
- `InProcessTransport`: any async handler, e.g. a cloud servicer's function wired in by
  the simulator or a test (httpx's MockTransport idea). Messages are serialized both ways,
  so sizes and aliasing are the wire's.
- `WorkerPool`: a Transport over several workers: least-outstanding or round-robin, a
  worker is confirmed (health SERVING + GetModelInfo lists our bundle hash) before use,
  marked down after failures and probed back.

Every failure surfaces as `OffloadError` with a gRPC status code name, which the agent
turns into a local answer flagged `degraded`. This is the only edge module importing
grpc, and only where a gRPC object is built, so in-process users never load it.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, Awaitable, Callable, Literal, Protocol, Union, runtime_checkable

from splitexit.proto import PROTOCOL_VERSION  # ModelInfo.protocol_version this edge understands
from splitexit.proto import inference_pb2 as pb
from splitexit.tls import check_key_pair, check_pem

if TYPE_CHECKING:
    import grpc

__all__ = [
    "GrpcConfig",
    "GrpcTransport",
    "InProcessTransport",
    "OffloadError",
    "PoolConfig",
    "PROTOCOL_VERSION",
    "TlsConfig",
    "Transport",
    "WorkerPool",
    "WorkerStatus",
    "channel_options",
    "check_model_info",
    "create_channel",
]

log = logging.getLogger(__name__)

SERVING = "SERVING"
# gRPC status names the agent expects from a worker (inference.proto's list) plus the
# generic ones a transport or a broken peer may produce.
STATUS_CODES = frozenset({
    "CANCELLED", "UNKNOWN", "INVALID_ARGUMENT", "DEADLINE_EXCEEDED", "NOT_FOUND", "ALREADY_EXISTS",
    "PERMISSION_DENIED", "RESOURCE_EXHAUSTED", "FAILED_PRECONDITION", "ABORTED", "OUT_OF_RANGE",
    "UNIMPLEMENTED", "INTERNAL", "UNAVAILABLE", "DATA_LOSS", "UNAUTHENTICATED",
})
_CODE_BY_NUMBER: MappingProxyType[int, str] = MappingProxyType({1: "CANCELLED", 2: "UNKNOWN", 3: "INVALID_ARGUMENT", 4: "DEADLINE_EXCEEDED", 5: "NOT_FOUND",
                   6: "ALREADY_EXISTS", 7: "PERMISSION_DENIED", 8: "RESOURCE_EXHAUSTED", 9: "FAILED_PRECONDITION",
                   10: "ABORTED", 11: "OUT_OF_RANGE", 12: "UNIMPLEMENTED", 13: "INTERNAL", 14: "UNAVAILABLE",
                   15: "DATA_LOSS", 16: "UNAUTHENTICATED"})


class OffloadError(Exception):
    """An offload that did not produce an answer. `code` is a gRPC status name
    (e.g. "UNAVAILABLE"); `reason` is what the degraded answer reports (the code in lower
    case unless a more precise one is known, e.g. "no_worker")."""

    def __init__(self, code: str, message: str = "", *, reason: str | None = None, worker: str = "") -> None:
        code = code if code in STATUS_CODES else "UNKNOWN"
        super().__init__(f"{code}: {message}" if message else code)
        self.code = code
        self.message = message
        self.reason = reason or code.lower()
        self.worker = worker

    @classmethod
    def from_exception(cls, exc: BaseException, *, worker: str = "") -> "OffloadError":
        """Map what a handler raised: an OffloadError as is, anything with a gRPC-like
        `code` (grpc.StatusCode, a status name or number) to that code, a connection
        failure to UNAVAILABLE, a timeout to DEADLINE_EXCEEDED, the rest to INTERNAL."""
        if isinstance(exc, OffloadError):
            return exc if exc.worker or not worker else OffloadError(exc.code, exc.message, reason=exc.reason,
                                                                     worker=worker)
        code = _code_name(getattr(exc, "code", None))
        if code is not None:
            details = getattr(exc, "details", None)
            message = details() if callable(details) else (details or str(exc))
            return cls(code, str(message or ""), worker=worker)
        if isinstance(exc, (asyncio.TimeoutError, TimeoutError)):
            return cls("DEADLINE_EXCEEDED", "the worker did not answer in time", worker=worker)
        if isinstance(exc, (ConnectionError, OSError)):
            return cls("UNAVAILABLE", f"connection failed ({exc})", worker=worker)
        return cls("INTERNAL", f"{type(exc).__name__}: {exc}", worker=worker)


def _code_name(code: Any) -> str | None:
    if callable(code) and not isinstance(code, type):
        try:
            code = code()  # grpc's AioRpcError.code() is a method
        except TypeError:
            return None
    name = getattr(code, "name", None)  # grpc.StatusCode and other enums
    if isinstance(name, str) and name in STATUS_CODES:
        return name
    if isinstance(code, str) and code.upper() in STATUS_CODES:
        return code.upper()
    if isinstance(code, int) and not isinstance(code, bool):
        return _CODE_BY_NUMBER.get(code)
    return None


@runtime_checkable
class Transport(Protocol):
    """What the agent needs from a way to reach cloud workers."""

    name: str  # for traces and logs: an address, "inprocess", "pool"

    async def infer(self, request: pb.InferRequest, timeout: float) -> pb.InferResponse:
        """Send one request; `timeout` in seconds is the whole call's deadline (retries
        included). Raises OffloadError."""
        ...

    async def model_info(self, timeout: float) -> pb.ModelInfo:
        """The worker's GetModelInfo. Raises OffloadError."""
        ...

    async def health(self, timeout: float) -> str:
        """The grpc.health.v1 status name ("SERVING", "NOT_SERVING", ...). Raises
        OffloadError when the worker cannot be asked."""
        ...

    async def close(self) -> None:
        ...


def _check_timeout(timeout: float) -> float:
    if not timeout > 0:
        raise OffloadError("DEADLINE_EXCEEDED", "no time left for the call")
    return float(timeout)


# --- in-process ------------------------------------------------------------------------
InferHandler = Callable[..., Awaitable[pb.InferResponse]]  # (request) or (request, deadline)
ModelInfoSource = Union[pb.ModelInfo, Callable[[], Awaitable[pb.ModelInfo]], None]
HealthSource = Union[str, Callable[[], Awaitable[str]]]


class InProcessTransport:
    """A Transport over an async handler in this process (a cloud servicer's function, a
    simulator's model of one, a test double).

    The handler gets a request (and, with `pass_deadline`, the call's deadline as a
    `time.monotonic()` value, like the cloud servicer's `handle(request, deadline)`) and
    returns a response, or raises: `OffloadError`, or any exception carrying a gRPC-like
    `code` (see `OffloadError.from_exception`). It runs under the call's deadline
    (cancelled at it, as a real channel would). Messages are copied through their
    serialized form, so the handler never shares objects with the agent and the byte
    counts are the wire's.
    """

    def __init__(self, handler: InferHandler, *, model_info: ModelInfoSource = None,
                 health: HealthSource = SERVING, name: str = "inprocess", pass_deadline: bool = False) -> None:
        self.name = name
        self._handler = handler
        self._pass_deadline = pass_deadline
        self._model_info = model_info
        self._health = health

    async def infer(self, request: pb.InferRequest, timeout: float) -> pb.InferResponse:
        timeout = _check_timeout(timeout)
        sent = pb.InferRequest.FromString(request.SerializeToString())
        try:
            call = self._handler(sent, time.monotonic() + timeout) if self._pass_deadline else self._handler(sent)
            response = await asyncio.wait_for(call, timeout)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # the handler is foreign code: every failure becomes a status
            raise OffloadError.from_exception(exc, worker=self.name) from exc
        if not isinstance(response, pb.InferResponse):
            raise OffloadError("INTERNAL", f"handler returned {type(response).__name__}, not an InferResponse",
                               worker=self.name)
        return pb.InferResponse.FromString(response.SerializeToString())

    async def model_info(self, timeout: float) -> pb.ModelInfo:
        timeout = _check_timeout(timeout)
        source = self._model_info
        if source is None:
            raise OffloadError("UNIMPLEMENTED", "this in-process worker has no model info", worker=self.name)
        if isinstance(source, pb.ModelInfo):
            return pb.ModelInfo.FromString(source.SerializeToString())
        try:
            info = await asyncio.wait_for(source(), timeout)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            raise OffloadError.from_exception(exc, worker=self.name) from exc
        return pb.ModelInfo.FromString(info.SerializeToString())

    async def health(self, timeout: float) -> str:
        timeout = _check_timeout(timeout)
        if isinstance(self._health, str):
            return self._health
        try:
            return str(await asyncio.wait_for(self._health(), timeout))
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            raise OffloadError.from_exception(exc, worker=self.name) from exc

    async def close(self) -> None:
        return None


# --- gRPC ------------------------------------------------------------------------------
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
            if self.config.tls is None and not _is_loopback(target):
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
        deadline = loop.time() + _check_timeout(timeout)
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


def _is_loopback(target: str) -> bool:
    host = target.removeprefix("dns:///").removeprefix("ipv4:").rsplit(":", 1)[0].strip("[]")
    return host in ("localhost", "::1") or host.startswith("127.")


# --- a pool of workers -----------------------------------------------------------------
WorkerState = Literal["unconfirmed", "up", "down", "mismatch"]


@dataclass(frozen=True, kw_only=True)
class PoolConfig:
    strategy: Literal["least_outstanding", "round_robin"] = "least_outstanding"
    # Consecutive failed calls (unreachable, draining, timed out) before a worker is taken
    # out of rotation; a success resets the count.
    max_failures: int = 2
    # A down worker is probed (health + model info) this often, so it comes back on its own
    # (with the channel's reconnect backoff capped at 1 s: within about 2 s of its return).
    probe_interval_s: float = 1.0
    # A worker serving another bundle is asked again this rarely (it may be upgraded).
    mismatch_probe_interval_s: float = 60.0
    confirm_timeout_s: float = 2.0  # per probe RPC

    def __post_init__(self) -> None:
        if self.strategy not in ("least_outstanding", "round_robin"):
            raise ValueError(f"unknown strategy {self.strategy!r}; expected least_outstanding or round_robin")
        if self.max_failures < 1:
            raise ValueError("max_failures must be >= 1")
        if not (self.probe_interval_s > 0 and self.mismatch_probe_interval_s > 0 and self.confirm_timeout_s > 0):
            raise ValueError("probe intervals and the confirm timeout must be > 0")


@dataclass(frozen=True)
class WorkerStatus:
    """A snapshot of one pool member."""

    key: str
    state: WorkerState
    outstanding: int
    sent: int  # requests answered by this worker
    failures: int  # consecutive failures
    last_error: str
    worker_id: str
    limits: tuple[int, int] | None  # (max_message_bytes, max_batch_rows) from ModelInfo


@dataclass
class _Worker:
    key: str
    transport: Transport
    state: WorkerState = "unconfirmed"
    outstanding: int = 0
    sent: int = 0
    failures: int = 0
    last_error: str = ""
    worker_id: str = ""
    limits: tuple[int, int] | None = None
    next_probe: float = 0.0  # loop time; 0 = now

    def snapshot(self) -> WorkerStatus:
        return WorkerStatus(self.key, self.state, self.outstanding, self.sent, self.failures, self.last_error,
                            self.worker_id, self.limits)


# Codes after which a request may go to another worker: it was not answered, and running it
# elsewhere (same request id) is safe.
_TRY_ELSEWHERE = frozenset({"UNAVAILABLE", "RESOURCE_EXHAUSTED", "FAILED_PRECONDITION", "UNIMPLEMENTED"})
# Codes that say the worker (not the request) is unwell. A missed deadline is not among
# them: under a latency budget a healthy but busy worker misses deadlines too, so a miss
# only starts a health probe, which takes a partitioned worker out within confirm_timeout_s.
_WORKER_FAILURE = frozenset({"UNAVAILABLE", "INTERNAL", "UNKNOWN", "UNIMPLEMENTED"})


def check_model_info(info: pb.ModelInfo, *, bundle_hash: str, model: str | None = None,
                     split: int | None = None, codec: str | None = None) -> str | None:
    """Why this worker cannot serve our offloads (None = it can): protocol version, a model
    spec with our bundle hash (and name), our split point and codec."""
    if info.protocol_version != PROTOCOL_VERSION:
        return f"protocol version {info.protocol_version}, this edge speaks {PROTOCOL_VERSION}"
    specs = [m for m in info.models if m.bundle_hash == bundle_hash and (model is None or m.name == model)]
    if not specs:
        served = ", ".join(f"{m.name}@{m.bundle_hash[:12]}" for m in info.models) or "nothing"
        return f"serves {served}, not bundle {bundle_hash[:12]}"
    spec = specs[0]
    if split is not None and spec.splits and split not in [s.split for s in spec.splits]:
        return f"does not accept split {split} (accepts {[s.split for s in spec.splits]})"
    if codec is not None and spec.codecs and codec not in spec.codecs:
        return f"does not decode codec {codec} (decodes {', '.join(spec.codecs)})"
    return None


class WorkerPool:
    """A Transport over several cloud workers.

    A worker is used only after it is confirmed: health SERVING and a GetModelInfo that
    lists our bundle hash (`check_model_info`). mDNS and static lists only propose
    workers. A worker that fails `max_failures` times in a row is marked down and probed
    back every `probe_interval_s` by a background task (started on first use, stopped by
    `close`); a hash mismatch marks it `mismatch`. A request that a worker did not answer
    (unavailable, overloaded, mismatched) goes to the next confirmed worker while its
    deadline allows, with the same request id.
    """

    name = "pool"

    def __init__(self, *, bundle_hash: str, model: str | None = None, split: int | None = None,
                 codec: str | None = None, config: PoolConfig | None = None,
                 connect: Callable[[str], Transport] | None = None) -> None:
        self.bundle_hash = bundle_hash
        self.model = model
        self.split = split
        self.codec = codec
        self.config = config or PoolConfig()
        self._connect = connect or (lambda address: GrpcTransport(address))
        self._workers: dict[str, _Worker] = {}
        self._rr = 0
        self._prober: asyncio.Task[None] | None = None
        self._confirming: dict[str, asyncio.Task[bool]] = {}
        self._closed = False

    # membership
    def add(self, key: str, transport: Transport | None = None) -> None:
        """Propose a worker (unconfirmed until probed). `transport` defaults to
        `connect(key)` (a GrpcTransport to the address). Re-adding a known key is a no-op."""
        if key in self._workers:
            return
        self._workers[key] = _Worker(key, transport if transport is not None else self._connect(key))

    async def remove(self, key: str) -> None:
        worker = self._workers.pop(key, None)
        if worker is not None:
            await worker.transport.close()

    def workers(self) -> list[WorkerStatus]:
        return [w.snapshot() for w in self._workers.values()]

    def __len__(self) -> int:
        return len(self._workers)

    @property
    def limits(self) -> tuple[int, int] | None:
        """The tightest (max_message_bytes, max_batch_rows) over confirmed workers."""
        known = [w.limits for w in self._workers.values() if w.state == "up" and w.limits]
        if not known:
            return None
        return min(m for m, _ in known), min(r for _, r in known)

    # confirmation and probing
    async def confirm(self, key: str) -> bool:
        """Probe one worker now (health, then model info); True when it is up. Concurrent
        callers share one probe."""
        return await asyncio.shield(self._confirm_task(key))

    def _confirm_task(self, key: str) -> "asyncio.Task[bool]":
        """The probe of `key` under way, or a new one (cancelled by `close`)."""
        task = self._confirming.get(key)
        if task is None:
            task = asyncio.ensure_future(self._confirm(key))
            self._confirming[key] = task
            task.add_done_callback(functools.partial(self._confirmed, key))
        return task

    def _confirmed(self, key: str, _task: "asyncio.Task[bool]") -> None:
        self._confirming.pop(key, None)

    async def _confirm(self, key: str) -> bool:
        worker = self._workers.get(key)
        if worker is None:
            return False
        loop = asyncio.get_running_loop()
        timeout = self.config.confirm_timeout_s
        try:
            status = await worker.transport.health(timeout)
            if status != SERVING:
                raise OffloadError("UNAVAILABLE", f"health {status}")
            info = await worker.transport.model_info(timeout)
        except OffloadError as exc:
            worker.state, worker.last_error = "down", str(exc)
            worker.next_probe = loop.time() + self.config.probe_interval_s
            return False
        why = check_model_info(info, bundle_hash=self.bundle_hash, model=self.model, split=self.split,
                               codec=self.codec)
        if why is not None:
            worker.state, worker.last_error = "mismatch", why
            worker.next_probe = loop.time() + self.config.mismatch_probe_interval_s
            log.warning("worker %s not used: %s", key, why)
            return False
        limits = (int(info.limits.max_message_bytes), int(info.limits.max_batch_rows))
        worker.limits = limits if all(v > 0 for v in limits) else None
        worker.worker_id, worker.state, worker.failures, worker.last_error = info.worker_id, "up", 0, ""
        return True

    async def probe(self, *, force: bool = False) -> None:
        """Probe every worker that is not up and is due (all of them with force)."""
        now = asyncio.get_running_loop().time()
        due = [w.key for w in self._workers.values() if w.state != "up" and (force or w.next_probe <= now)]
        if due:
            await asyncio.gather(*(self.confirm(k) for k in due))

    async def _probe_loop(self) -> None:
        while not self._closed:
            await asyncio.sleep(self.config.probe_interval_s)
            try:
                await self.probe()
            except asyncio.CancelledError:
                raise
            except Exception:  # a probe must never end the loop
                log.exception("worker probe failed")

    def _start_prober(self) -> None:
        if self._prober is None or self._prober.done():
            self._prober = asyncio.get_running_loop().create_task(self._probe_loop())

    # the Transport API
    def _pick(self, exclude: set[str]) -> _Worker | None:
        up = [w for w in self._workers.values() if w.state == "up" and w.key not in exclude]
        if not up:
            return None
        self._rr += 1
        # Rotating the start breaks ties evenly: sequential calls spread too.
        start = self._rr % len(up)
        rotated = up[start:] + up[:start]
        if self.config.strategy == "round_robin":
            return rotated[0]
        return min(rotated, key=lambda w: w.outstanding)

    async def _choose(self, exclude: set[str], deadline: float) -> _Worker | None:
        worker = self._pick(exclude)
        if worker is not None:
            return worker
        # Nothing up: confirm the proposed ones that are due, within this call's time.
        loop = asyncio.get_running_loop()
        due = [w.key for w in self._workers.values()
               if w.key not in exclude and w.state in ("unconfirmed", "down") and w.next_probe <= loop.time()]
        if due and deadline - loop.time() > 0:
            try:
                await asyncio.wait_for(asyncio.gather(*(self.confirm(k) for k in due)), deadline - loop.time())
            except asyncio.TimeoutError:
                pass
        return self._pick(exclude)

    def _record_failure(self, worker: _Worker, exc: OffloadError) -> None:
        worker.last_error = str(exc)
        if exc.code == "DEADLINE_EXCEEDED" and not self._closed:
            self._confirm_task(worker.key)  # slow, or gone? its health says, in the background
        elif exc.code == "FAILED_PRECONDITION":
            worker.state = "mismatch"
            worker.next_probe = asyncio.get_running_loop().time() + self.config.mismatch_probe_interval_s
        elif exc.code in _WORKER_FAILURE:
            worker.failures += 1
            if worker.failures >= self.config.max_failures:
                worker.state = "down"
                worker.next_probe = asyncio.get_running_loop().time() + self.config.probe_interval_s
                log.warning("worker %s marked down: %s", worker.key, exc)

    async def infer(self, request: pb.InferRequest, timeout: float) -> pb.InferResponse:
        if self._closed:
            raise OffloadError("CANCELLED", "the worker pool is closed", reason="no_worker")
        self._start_prober()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + _check_timeout(timeout)
        tried: set[str] = set()
        last: OffloadError | None = None
        while True:
            worker = await self._choose(tried, deadline)
            if worker is None:
                if last is not None:
                    raise last
                states = ", ".join(f"{w.key} {w.state}" for w in self._workers.values()) or "no workers known"
                raise OffloadError("UNAVAILABLE", f"no confirmed worker ({states})", reason="no_worker")
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise last or OffloadError("DEADLINE_EXCEEDED", "no time left to offload", worker=worker.key)
            tried.add(worker.key)
            worker.outstanding += 1
            try:
                response = await worker.transport.infer(request, remaining)
            except OffloadError as exc:
                last = exc if exc.worker else OffloadError(exc.code, exc.message, reason=exc.reason,
                                                           worker=worker.key)
                self._record_failure(worker, last)
                if exc.code not in _TRY_ELSEWHERE:
                    raise last from None
                continue
            finally:
                worker.outstanding -= 1
            worker.failures = 0
            worker.sent += 1
            if not response.worker_id:
                response.worker_id = worker.worker_id or worker.key
            return response

    async def model_info(self, timeout: float) -> pb.ModelInfo:
        loop = asyncio.get_running_loop()
        worker = await self._choose(set(), loop.time() + _check_timeout(timeout))
        if worker is None:
            raise OffloadError("UNAVAILABLE", "no confirmed worker", reason="no_worker")
        return await worker.transport.model_info(timeout)

    async def health(self, timeout: float) -> str:
        loop = asyncio.get_running_loop()
        worker = await self._choose(set(), loop.time() + _check_timeout(timeout))
        return SERVING if worker is not None else "NOT_SERVING"

    async def close(self) -> None:
        self._closed = True
        tasks = [t for t in (self._prober, *self._confirming.values()) if t is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._prober = None
        workers, self._workers = list(self._workers.values()), {}
        await asyncio.gather(*(w.transport.close() for w in workers), return_exceptions=True)
