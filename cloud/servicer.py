"""The `SplitInference` servicer: the gRPC face of the worker, over plain parts that work
without a server:
- `splitexit.cloud.requests.parse_request`: each request checked (and decoded);
- `splitexit.cloud.batcher.Batcher`: requests of one key batched;
- `splitexit.cloud.served.ServedModel.run_batch`: the tail run, answers per request.
This module connects them to gRPC: status codes, deadlines, streams, retried ids.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, AsyncIterator, Mapping

import grpc
from google.protobuf.message import DecodeError

from splitexit.cloud.answers import AnswerCache, AnswerCacheConfig
from splitexit.cloud.batcher import BatchInfo, Batcher
from splitexit.cloud.errors import RequestError
from splitexit.cloud.requests import Parsed, ServiceLimits, parse_request
from splitexit.cloud.served import ServedModel, model_info
from splitexit.proto import inference_pb2 as pb
from splitexit.proto import inference_pb2_grpc as pb_grpc
from splitexit.status import STATUS_NUMBERS

if TYPE_CHECKING:
    from splitexit.cloud.metrics import Metrics

__all__ = ["SERVICE_NAME", "SplitInferenceServicer", "Undecodable", "add_to_server", "deadline_of"]

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["SplitInference"].full_name  # "splitexit.v1.SplitInference"


@dataclass(frozen=True)
class Undecodable:
    """Bytes that are not the expected message: what our deserializer hands the handler, so
    the client gets INVALID_ARGUMENT with a reason (gRPC itself would answer UNKNOWN and
    log a traceback per bad message)."""

    type_name: str
    reason: str

    def error(self) -> RequestError:
        return RequestError("INVALID_ARGUMENT", f"the request is not a valid {self.type_name}: {self.reason[:200]}")


def _parser(message_type):
    def parse(data: bytes):
        try:
            return message_type.FromString(data)
        except DecodeError as exc:
            return Undecodable(message_type.DESCRIPTOR.full_name, str(exc))

    return parse


def add_to_server(servicer: "SplitInferenceServicer", server: grpc.aio.Server) -> None:
    """Register the servicer (as the generated add_SplitInferenceServicer_to_server does,
    with deserializers that turn undecodable bytes into INVALID_ARGUMENT)."""
    handlers = {
        "Infer": grpc.unary_unary_rpc_method_handler(
            servicer.Infer, request_deserializer=_parser(pb.InferRequest),
            response_serializer=pb.InferResponse.SerializeToString),
        "InferStream": grpc.stream_stream_rpc_method_handler(
            servicer.InferStream, request_deserializer=_parser(pb.InferRequest),
            response_serializer=pb.InferResponse.SerializeToString),
        "GetModelInfo": grpc.unary_unary_rpc_method_handler(
            servicer.GetModelInfo, request_deserializer=_parser(pb.ModelInfoRequest),
            response_serializer=pb.ModelInfo.SerializeToString),
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE_NAME, handlers),))
    server.add_registered_method_handlers(SERVICE_NAME, handlers)


def deadline_of(context: grpc.aio.ServicerContext) -> float | None:
    """The call's gRPC deadline as a time.monotonic() value (None: the client set none)."""
    remaining = context.time_remaining()
    return None if remaining is None else time.monotonic() + remaining


class SplitInferenceServicer(pb_grpc.SplitInferenceServicer):
    """gRPC face of the worker. `phase` is set by the server: "starting" and "draining"
    answer UNAVAILABLE, "serving" serves."""

    def __init__(self, models: Mapping[tuple[str, str], ServedModel], *, batcher: Batcher, limits: ServiceLimits,
                 worker_id: str, metrics: "Metrics | None" = None, answers: AnswerCacheConfig | None = None) -> None:
        if not models:
            raise ValueError("a worker needs at least one model")
        self.models = dict(models)
        self.batcher = batcher
        self.limits = limits
        self.worker_id = worker_id
        self.metrics = metrics
        self.phase = "starting"
        self.answers = AnswerCache(answers or AnswerCacheConfig(),
                                   on_hit=None if metrics is None else metrics.duplicates.inc)
        self._inflight = 0
        self._idle = asyncio.Event()
        self._idle.set()
        self.calls = 0  # InferRequests handled, refused ones included

    def is_idle(self) -> bool:
        return self._inflight == 0

    # -- plain async API (no gRPC) --------------------------------------------------------
    async def handle(self, request: "pb.InferRequest | Undecodable", deadline: float | None = None) -> pb.InferResponse:
        """Answer one InferRequest or raise RequestError. deadline: time.monotonic()."""
        arrival = time.monotonic()
        self.calls += 1
        if isinstance(request, Undecodable):
            raise request.error()
        if self.phase != "serving":
            raise RequestError("UNAVAILABLE", f"the worker is {self.phase}: try another worker or retry later")
        if deadline is not None and deadline <= arrival:
            raise RequestError("DEADLINE_EXCEEDED", "the deadline passed before the request arrived")
        # headers only on the event loop: the body decodes with its batch in the compute thread
        parsed = parse_request(request, self.models, self.limits, defer_decode=True)
        if not parsed.request_id:
            return await self._compute(parsed, deadline, arrival)
        # a retry (same id, same rows) shares the first try's answer instead of computing again
        key = (parsed.request_id, parsed.model.name, parsed.model.hash, parsed.sample_ids)
        return await self.answers.answer(key, lambda: self._compute(parsed, deadline, arrival))

    async def _compute(self, parsed: Parsed, deadline: float | None, arrival: float) -> pb.InferResponse:
        self._inflight += 1
        self._idle.clear()
        try:
            rows, info = await self.batcher.submit(parsed.key, parsed, rows=parsed.rows, deadline=deadline,
                                                   arrival=arrival)
        finally:
            self._inflight -= 1
            if self._inflight == 0:
                self._idle.set()
        if self.metrics is not None:
            self.metrics.rows_answered(parsed.model.name, parsed.rows, info.queue_s)
        return self._response(parsed.request_id, rows, info)

    def _response(self, request_id: str, rows: list[pb.RowResult], info: BatchInfo) -> pb.InferResponse:
        response = pb.InferResponse(request_id=request_id, worker_id=self.worker_id,
                                    timing=pb.ServerTiming(queue_ms=1000 * info.queue_s, compute_ms=1000 * info.compute_s,
                                                           batch_size=info.batch_rows))
        response.rows.extend(rows)
        return response

    async def wait_idle(self, timeout: float) -> bool:
        """Wait until no request is in flight (or `timeout` s); True when idle."""
        try:
            await asyncio.wait_for(self._idle.wait(), timeout)
            return True
        except asyncio.TimeoutError:
            return False

    def refusal_at_headers(self, method: str) -> RequestError | None:
        """The RESOURCE_EXHAUSTED a call of `method` gets before its request is read (the
        batcher's refusal that needs no request: see `Batcher.refusal`), counted as a
        finished call; None while serving it is worth reading the request."""
        if self.phase != "serving":
            return None  # the request path answers UNAVAILABLE, as for any call
        refusal = self.batcher.refusal()
        if refusal is not None:
            self.calls += 1
            self.done(method, refusal.code, time.monotonic())
        return refusal

    def done(self, method: str, code: str, started: float) -> None:
        """Count a finished call of `method` with its status code (metrics)."""
        if self.metrics is not None:
            self.metrics.request_done(method, code, time.monotonic() - started)

    # -- gRPC methods ---------------------------------------------------------------------
    async def Infer(self, request: pb.InferRequest, context: grpc.aio.ServicerContext) -> pb.InferResponse:
        started, code = time.monotonic(), "OK"
        try:
            return await self.handle(request, deadline_of(context))
        except RequestError as exc:
            code = exc.code
            await context.abort(grpc.StatusCode[exc.code], exc.message)
            raise  # not reached: abort raises
        except asyncio.CancelledError:
            code = "CANCELLED"
            raise
        finally:
            self.done("Infer", code, started)

    async def InferStream(self, request_iterator: AsyncIterator[pb.InferRequest],
                          context: grpc.aio.ServicerContext) -> AsyncIterator[pb.InferResponse]:
        """Each message handled as by Infer, concurrently (answers may come out of order);
        a failed request answers with InferResponse.error and the stream goes on."""
        started, code = time.monotonic(), "OK"
        deadline = deadline_of(context)
        # Responses wait here until written; a slot is held from reading a request until its
        # response is written, so a client that sends without reading holds at most
        # stream_inflight requests in this worker.
        out: asyncio.Queue[pb.InferResponse | None] = asyncio.Queue()
        slots = asyncio.Semaphore(self.limits.stream_inflight)
        tasks: set[asyncio.Task[None]] = set()

        async def one(request: pb.InferRequest) -> None:
            try:
                response = await self.handle(request, deadline)
            except Exception as exc:  # every request gets an answer; a bug fails that request only
                error = exc if isinstance(exc, RequestError) else RequestError("INTERNAL", f"{type(exc).__name__}: {exc}")
                if self.metrics is not None:
                    self.metrics.stream_error(error.code)
                response = pb.InferResponse(request_id=getattr(request, "request_id", ""), worker_id=self.worker_id,
                                            error=pb.RequestError(code=STATUS_NUMBERS[error.code],
                                                                  message=error.message))
            out.put_nowait(response)

        async def read() -> None:
            try:
                async for request in request_iterator:
                    await slots.acquire()
                    task = asyncio.create_task(one(request))
                    tasks.add(task)
                    task.add_done_callback(tasks.discard)
                if tasks:
                    await asyncio.gather(*list(tasks), return_exceptions=True)
            finally:
                out.put_nowait(None)

        reader = asyncio.create_task(read())
        try:
            while (response := await out.get()) is not None:
                yield response
                slots.release()
            await reader  # a broken request stream surfaces here
        except asyncio.CancelledError:
            code = "CANCELLED"
            raise
        except Exception:
            code = "INTERNAL"
            raise
        finally:
            reader.cancel()
            for task in list(tasks):
                task.cancel()
            self.done("InferStream", code, started)

    async def GetModelInfo(self, request: pb.ModelInfoRequest, context: grpc.aio.ServicerContext) -> pb.ModelInfo:
        started = time.monotonic()
        if isinstance(request, Undecodable):
            self.done("GetModelInfo", "INVALID_ARGUMENT", started)
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, request.error().message)
        info = model_info(self.models, self.limits, self.worker_id)
        self.done("GetModelInfo", "OK", started)
        return info

