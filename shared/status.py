"""gRPC status codes by name and number, for the edge and the cloud alike, without
importing grpc (in-process users and the core never load it). The numbers are gRPC's
(tests check them against `grpc.StatusCode`)."""

from __future__ import annotations

from types import MappingProxyType
from typing import Any, Mapping

__all__ = ["STATUS_CODES", "STATUS_NAMES", "STATUS_NUMBERS", "status_name"]

STATUS_NUMBERS: Mapping[str, int] = MappingProxyType({
    "OK": 0, "CANCELLED": 1, "UNKNOWN": 2, "INVALID_ARGUMENT": 3, "DEADLINE_EXCEEDED": 4, "NOT_FOUND": 5,
    "ALREADY_EXISTS": 6, "PERMISSION_DENIED": 7, "RESOURCE_EXHAUSTED": 8, "FAILED_PRECONDITION": 9,
    "ABORTED": 10, "OUT_OF_RANGE": 11, "UNIMPLEMENTED": 12, "INTERNAL": 13, "UNAVAILABLE": 14,
    "DATA_LOSS": 15, "UNAUTHENTICATED": 16,
})
STATUS_NAMES: Mapping[int, str] = MappingProxyType({number: name for name, number in STATUS_NUMBERS.items()})
# the codes a failed call can carry (every one but OK)
STATUS_CODES = frozenset(name for name in STATUS_NUMBERS if name != "OK")


def status_name(code: Any) -> str | None:
    """The name of a failure's status code given as grpc.StatusCode (or any enum with that
    name), a callable returning one (grpc's `AioRpcError.code`), a name in any case, or a
    number; None when it is none of these or OK."""
    if callable(code) and not isinstance(code, type):
        try:
            code = code()
        except TypeError:
            return None
    name = getattr(code, "name", None)  # grpc.StatusCode and other enums
    if isinstance(name, str) and name in STATUS_CODES:
        return name
    if isinstance(code, str) and code.upper() in STATUS_CODES:
        return code.upper()
    if isinstance(code, int) and not isinstance(code, bool):
        number_name = STATUS_NAMES.get(code)
        return number_name if number_name in STATUS_CODES else None
    return None
