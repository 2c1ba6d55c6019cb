"""What every transport shares: the `Transport` protocol the agent talks to, and
`OffloadError`, the one failure it raises (a gRPC status code name, from the table in
`splitexit.status`, and the reason a degraded answer reports)."""

from __future__ import annotations

import asyncio
from typing import Protocol, runtime_checkable

from splitexit.proto import inference_pb2 as pb
from splitexit.status import STATUS_CODES, status_name

__all__ = ["SERVING", "OffloadError", "Transport", "check_timeout", "dns_name", "is_loopback"]

SERVING = "SERVING"
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
        code = status_name(getattr(exc, "code", None))
        if code is not None:
            details = getattr(exc, "details", None)
            message = details() if callable(details) else (details or str(exc))
            return cls(code, str(message or ""), worker=worker)
        if isinstance(exc, (asyncio.TimeoutError, TimeoutError)):
            return cls("DEADLINE_EXCEEDED", "the worker did not answer in time", worker=worker)
        if isinstance(exc, (ConnectionError, OSError)):
            return cls("UNAVAILABLE", f"connection failed ({exc})", worker=worker)
        return cls("INTERNAL", f"{type(exc).__name__}: {exc}", worker=worker)


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


def check_timeout(timeout: float) -> float:
    if not timeout > 0:
        raise OffloadError("DEADLINE_EXCEEDED", "no time left for the call")
    return float(timeout)


def dns_name(target: str) -> str | None:
    """"NAME:PORT" of a DNS target ("dns:///NAME:PORT", or "dns://SERVER/NAME:PORT" naming
    the DNS server to ask), else None."""
    if not target.startswith("dns:"):
        return None
    rest = target[len("dns:"):]
    if rest.startswith("//"):  # dns://[AUTHORITY]/NAME:PORT
        _, sep, rest = rest[2:].partition("/")
        if not sep:
            return ""
    return rest


def is_loopback(target: str) -> bool:
    """A worker address on this machine ("127.x", "localhost", "::1", also behind "dns:"
    or "ipv4:")."""
    host = (dns_name(target) or target.removeprefix("ipv4:")).rsplit(":", 1)[0].strip("[]").lower()
    return host in ("localhost", "::1") or host.startswith("127.")
