"""The one error type of the worker's request path, free of grpc (see `servicer` for the
mapping to gRPC status codes)."""

from __future__ import annotations

from typing import Literal

__all__ = ["Code", "RequestError"]

# gRPC status code names the request path produces (grpc.StatusCode[name] in the servicer).
Code = Literal["INVALID_ARGUMENT", "FAILED_PRECONDITION", "NOT_FOUND", "RESOURCE_EXHAUSTED", "UNAVAILABLE",
               "DEADLINE_EXCEEDED", "INTERNAL", "CANCELLED", "UNAUTHENTICATED"]


class RequestError(Exception):
    """A request the worker refuses or cannot answer: a status code name and a message fit
    to send to the client."""

    def __init__(self, code: Code, message: str) -> None:
        super().__init__(message)
        self.code: Code = code
        self.message = message

    def __repr__(self) -> str:
        return f"RequestError({self.code}, {self.message!r})"
