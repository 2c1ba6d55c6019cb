"""`InProcessTransport`: any async handler, e.g. a cloud servicer's function wired in by
the simulator or a test (httpx's MockTransport idea). Messages are serialized both ways,
so sizes and aliasing are the wire's."""

from __future__ import annotations

import asyncio
import time
from typing import Awaitable, Callable, Union

from splitexit.edge.transport.base import SERVING, OffloadError, check_timeout
from splitexit.proto import inference_pb2 as pb

__all__ = ["HealthSource", "InProcessTransport", "InferHandler", "ModelInfoSource"]

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
        timeout = check_timeout(timeout)
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
        timeout = check_timeout(timeout)
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
        timeout = check_timeout(timeout)
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
