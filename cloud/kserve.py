"""The KServe v2 / Triton gRPC protocol (`inference.GRPCInferenceService`) on the worker,
beside `splitexit.v1`, so that platforms whose clients already speak it (Triton's
`tritonclient`, KServe's SDK) can call the worker without our edge agent.

Each served bundle is one v2 model: its name is the bundle's model name, its version the
bundle hash. The model's input is the split feature; it runs the bundle's tail with its
exit policy started fresh after the split, exactly as a `splitexit.v1` request without
policy state does: the request is turned into one and goes through the same servicer
(checks, batching, admission, metrics, answer cache), so both protocols give the same
answers and share the worker's capacity.

| tensor       | datatype     | shape         | what                                             |
|--------------|--------------|---------------|--------------------------------------------------|
| `feature`    | FP32 or FP16 | [-1, C, H, W] | input: the output of stage `split` (the bundle's feature shape) |
| `probs`      | FP32         | [-1, classes] | output: the answer's class probabilities         |
| `label`      | INT64        | [-1]          | output: the answer's class index                 |
| `confidence` | FP32         | [-1]          | output: its probability                          |
| `exit`       | INT64        | [-1]          | output: stage index of the exit that answered    |

Not served: streaming inference, model repository control, shared memory, statistics
and configuration (Triton extensions); their calls answer UNIMPLEMENTED.
"""

from __future__ import annotations

import time
import uuid
from typing import TYPE_CHECKING, Any, Callable, Mapping

import grpc
import numpy as np

from splitexit.cloud.errors import RequestError
from splitexit.cloud.servicer import SplitInferenceServicer, deadline_of
from splitexit.proto import inference_pb2 as pb
from splitexit.proto import kserve_v2_pb2 as v2
from splitexit.proto import kserve_v2_pb2_grpc as v2_grpc

if TYPE_CHECKING:
    from splitexit.cloud.served import ServedModel

__all__ = ["KServeV2Servicer", "SERVICE_NAME", "add_to_server"]

SERVICE_NAME = v2.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name  # "inference.GRPCInferenceService"
INPUT = "feature"
OUTPUTS = ("probs", "label", "confidence", "exit")
_FEATURE_DTYPES = {"FP32": pb.DTYPE_FLOAT32, "FP16": pb.DTYPE_FLOAT16}  # v2 datatype -> our wire dtype


class KServeV2Servicer(v2_grpc.GRPCInferenceServiceServicer):
    """v2 calls answered by the worker's `SplitInferenceServicer`."""

    def __init__(self, servicer: SplitInferenceServicer, version: str) -> None:
        self.servicer = servicer
        self.version = version  # the worker's software version (ServerMetadata)

    # -- health and metadata ----------------------------------------------------------
    async def ServerLive(self, request: v2.ServerLiveRequest, context: grpc.aio.ServicerContext) -> v2.ServerLiveResponse:
        return v2.ServerLiveResponse(live=True)

    async def ServerReady(self, request: v2.ServerReadyRequest,
                          context: grpc.aio.ServicerContext) -> v2.ServerReadyResponse:
        return v2.ServerReadyResponse(ready=self.servicer.phase == "serving")

    async def ModelReady(self, request: v2.ModelReadyRequest, context: grpc.aio.ServicerContext) -> v2.ModelReadyResponse:
        try:
            self._model(request.name, request.version)
        except RequestError:
            return v2.ModelReadyResponse(ready=False)
        return v2.ModelReadyResponse(ready=self.servicer.phase == "serving")

    async def ServerMetadata(self, request: v2.ServerMetadataRequest,
                             context: grpc.aio.ServicerContext) -> v2.ServerMetadataResponse:
        return v2.ServerMetadataResponse(name="splitexit", version=self.version, extensions=[])

    async def ModelMetadata(self, request: v2.ModelMetadataRequest,
                            context: grpc.aio.ServicerContext) -> v2.ModelMetadataResponse:
        model = await self._call(context, lambda: self._model(request.name, request.version))
        tensor = v2.ModelMetadataResponse.TensorMetadata
        classes = model.num_classes
        return v2.ModelMetadataResponse(
            name=model.name, versions=[model.hash], platform="splitexit",
            inputs=[tensor(name=INPUT, datatype="FP32", shape=[-1, *model.bundle.feature_shape])],
            outputs=[tensor(name="probs", datatype="FP32", shape=[-1, classes]),
                     tensor(name="label", datatype="INT64", shape=[-1]),
                     tensor(name="confidence", datatype="FP32", shape=[-1]),
                     tensor(name="exit", datatype="INT64", shape=[-1])])

    # -- inference --------------------------------------------------------------------
    async def ModelInfer(self, request: v2.ModelInferRequest,
                         context: grpc.aio.ServicerContext) -> v2.ModelInferResponse:
        started, code = time.monotonic(), "OK"
        try:
            model = self._model(request.model_name, request.model_version)
            split_request, wanted = to_split_request(request, model)
            answer = await self.servicer.handle(split_request, deadline_of(context))
            return to_v2_response(request, model, answer, wanted)
        except RequestError as exc:
            code = exc.code
            await context.abort(grpc.StatusCode[exc.code], exc.message)
            raise  # not reached: abort raises
        except BaseException:  # cancelled (the client went away) or a bug
            code = "CANCELLED"
            raise
        finally:
            self.servicer.done("ModelInfer", code, started)

    def _model(self, name: str, version: str) -> "ServedModel":
        """The served model of that name (and bundle hash, when `version` is given)."""
        found = [m for (n, h), m in self.servicer.models.items() if n == name and (not version or h == version)]
        if not found:
            known = ", ".join(f"{n}@{h[:12]}" for n, h in sorted(self.servicer.models)) or "none"
            raise RequestError("NOT_FOUND", f"no model {name!r}{' version ' + version if version else ''} here "
                                            f"(served: {known})")
        if len(found) > 1:
            raise RequestError("INVALID_ARGUMENT", f"{len(found)} bundles serve {name!r}: give the version "
                                                   f"(bundle hash) of one: {', '.join(m.hash for m in found)}")
        return found[0]

    async def _call(self, context: grpc.aio.ServicerContext, fn: Callable[[], Any]) -> Any:
        try:
            return fn()
        except RequestError as exc:
            await context.abort(grpc.StatusCode[exc.code], exc.message)


def to_split_request(request: v2.ModelInferRequest, model: "ServedModel") -> tuple[pb.InferRequest, tuple[str, ...]]:
    """The `splitexit.v1` request a v2 one stands for, and the outputs it asks for.
    Raises RequestError (INVALID_ARGUMENT) with what is wrong."""
    if len(request.inputs) != 1 or request.inputs[0].name != INPUT:
        names = [t.name for t in request.inputs]
        raise RequestError("INVALID_ARGUMENT", f"{model.name} takes one input named {INPUT!r} (the split feature, "
                                               f"[-1, {', '.join(map(str, model.bundle.feature_shape))}]); got {names}")
    tensor = request.inputs[0]
    if tensor.datatype not in _FEATURE_DTYPES:
        raise RequestError("INVALID_ARGUMENT", f"input {INPUT!r}: datatype {tensor.datatype!r} is not one of "
                                               f"{', '.join(_FEATURE_DTYPES)}")
    shape = [int(d) for d in tensor.shape]
    if len(shape) < 1 or shape[0] < 1 or any(d < 1 for d in shape):
        raise RequestError("INVALID_ARGUMENT", f"input {INPUT!r}: shape {shape} needs a batch dimension and sizes >= 1")
    if request.raw_input_contents:
        if len(request.raw_input_contents) != 1:
            raise RequestError("INVALID_ARGUMENT", f"{len(request.raw_input_contents)} raw_input_contents for 1 input")
        data = request.raw_input_contents[0]
    elif tensor.datatype == "FP32" and tensor.contents.fp32_contents:
        data = np.asarray(tensor.contents.fp32_contents, dtype="<f4").tobytes()
    else:
        raise RequestError("INVALID_ARGUMENT", f"input {INPUT!r} carries no data (raw_input_contents or "
                                               f"contents.fp32_contents)")
    wanted = tuple(o.name for o in request.outputs) or OUTPUTS
    unknown = sorted(set(wanted) - set(OUTPUTS))
    if unknown:
        raise RequestError("INVALID_ARGUMENT", f"unknown output(s) {unknown}; {model.name} has {list(OUTPUTS)}")
    # A v2 id is the client's label, not a retry key (Triton does not deduplicate by it, and
    # clients reuse ids): the v1 request gets a fresh id, so the answer cache never answers
    # one v2 request with another's answer. Shape and size against the bundle are checked
    # by the v1 path, with its messages.
    split = pb.InferRequest(request_id=uuid.uuid4().hex, bundle_hash=model.hash, model=model.name,
                            split=model.bundle.split, sample_ids=[f"{request.id}:{i}" for i in range(shape[0])],
                            feature=pb.Tensor(dtype=_FEATURE_DTYPES[tensor.datatype], shape=shape, data=data),
                            want_probabilities="probs" in wanted, top_k=0)
    return split, wanted


def to_v2_response(request: v2.ModelInferRequest, model: "ServedModel", answer: pb.InferResponse,
                   wanted: tuple[str, ...]) -> v2.ModelInferResponse:
    rows = answer.rows
    n = len(rows)
    arrays: Mapping[str, Callable[[], np.ndarray]] = {
        "probs": lambda: _probs(rows, model.num_classes),
        "label": lambda: np.asarray([r.label for r in rows], dtype="<i8"),
        "confidence": lambda: np.asarray([r.confidence for r in rows], dtype="<f4"),
        "exit": lambda: np.asarray([r.exit_index for r in rows], dtype="<i8"),
    }
    out = v2.ModelInferResponse(model_name=model.name, model_version=model.hash, id=request.id)
    for name in wanted:
        array = arrays[name]()
        out.outputs.add(name=name, datatype="FP32" if array.dtype.kind == "f" else "INT64",
                        shape=[n, *array.shape[1:]])
        out.raw_output_contents.append(array.tobytes())
    return out


def _probs(rows: Any, classes: int) -> np.ndarray:
    probs = np.zeros((len(rows), classes), dtype="<f4")
    for i, row in enumerate(rows):
        for score in row.top_k:
            probs[i, score.class_index] = score.probability
    return probs


def add_to_server(servicer: KServeV2Servicer, server: grpc.aio.Server) -> None:
    v2_grpc.add_GRPCInferenceServiceServicer_to_server(servicer, server)
