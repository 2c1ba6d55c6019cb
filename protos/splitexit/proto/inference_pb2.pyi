from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class DType(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    DTYPE_UNSPECIFIED: _ClassVar[DType]
    DTYPE_FLOAT32: _ClassVar[DType]
    DTYPE_FLOAT16: _ClassVar[DType]
    DTYPE_INT8: _ClassVar[DType]
    DTYPE_UINT8: _ClassVar[DType]

class QuantScheme(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    QUANT_SCHEME_NONE: _ClassVar[QuantScheme]
    QUANT_SCHEME_PER_TENSOR: _ClassVar[QuantScheme]
    QUANT_SCHEME_PER_CHANNEL: _ClassVar[QuantScheme]
DTYPE_UNSPECIFIED: DType
DTYPE_FLOAT32: DType
DTYPE_FLOAT16: DType
DTYPE_INT8: DType
DTYPE_UINT8: DType
QUANT_SCHEME_NONE: QuantScheme
QUANT_SCHEME_PER_TENSOR: QuantScheme
QUANT_SCHEME_PER_CHANNEL: QuantScheme

class Quantization(_message.Message):
    __slots__ = ("scheme", "axis", "scale", "zero_point")
    SCHEME_FIELD_NUMBER: _ClassVar[int]
    AXIS_FIELD_NUMBER: _ClassVar[int]
    SCALE_FIELD_NUMBER: _ClassVar[int]
    ZERO_POINT_FIELD_NUMBER: _ClassVar[int]
    scheme: QuantScheme
    axis: int
    scale: _containers.RepeatedScalarFieldContainer[float]
    zero_point: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, scheme: _Optional[_Union[QuantScheme, str]] = ..., axis: _Optional[int] = ..., scale: _Optional[_Iterable[float]] = ..., zero_point: _Optional[_Iterable[int]] = ...) -> None: ...

class Tensor(_message.Message):
    __slots__ = ("dtype", "shape", "data", "quant")
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    QUANT_FIELD_NUMBER: _ClassVar[int]
    dtype: DType
    shape: _containers.RepeatedScalarFieldContainer[int]
    data: bytes
    quant: Quantization
    def __init__(self, dtype: _Optional[_Union[DType, str]] = ..., shape: _Optional[_Iterable[int]] = ..., data: _Optional[bytes] = ..., quant: _Optional[_Union[Quantization, _Mapping]] = ...) -> None: ...

class EdgeExitInfo(_message.Message):
    __slots__ = ("exits_evaluated", "best_exit", "best_confidence", "best_label")
    EXITS_EVALUATED_FIELD_NUMBER: _ClassVar[int]
    BEST_EXIT_FIELD_NUMBER: _ClassVar[int]
    BEST_CONFIDENCE_FIELD_NUMBER: _ClassVar[int]
    BEST_LABEL_FIELD_NUMBER: _ClassVar[int]
    exits_evaluated: int
    best_exit: int
    best_confidence: float
    best_label: int
    def __init__(self, exits_evaluated: _Optional[int] = ..., best_exit: _Optional[int] = ..., best_confidence: _Optional[float] = ..., best_label: _Optional[int] = ...) -> None: ...

class RawInput(_message.Message):
    __slots__ = ("format", "items")
    FORMAT_FIELD_NUMBER: _ClassVar[int]
    ITEMS_FIELD_NUMBER: _ClassVar[int]
    format: str
    items: _containers.RepeatedScalarFieldContainer[bytes]
    def __init__(self, format: _Optional[str] = ..., items: _Optional[_Iterable[bytes]] = ...) -> None: ...

class InferRequest(_message.Message):
    __slots__ = ("request_id", "bundle_hash", "model", "split", "sample_ids", "feature", "edge_exits", "want_probabilities", "top_k", "raw_input", "policy_state")
    class PolicyStateEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: Tensor
        def __init__(self, key: _Optional[str] = ..., value: _Optional[_Union[Tensor, _Mapping]] = ...) -> None: ...
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    BUNDLE_HASH_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    SPLIT_FIELD_NUMBER: _ClassVar[int]
    SAMPLE_IDS_FIELD_NUMBER: _ClassVar[int]
    FEATURE_FIELD_NUMBER: _ClassVar[int]
    EDGE_EXITS_FIELD_NUMBER: _ClassVar[int]
    WANT_PROBABILITIES_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    RAW_INPUT_FIELD_NUMBER: _ClassVar[int]
    POLICY_STATE_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    bundle_hash: str
    model: str
    split: int
    sample_ids: _containers.RepeatedScalarFieldContainer[str]
    feature: Tensor
    edge_exits: _containers.RepeatedCompositeFieldContainer[EdgeExitInfo]
    want_probabilities: bool
    top_k: int
    raw_input: RawInput
    policy_state: _containers.MessageMap[str, Tensor]
    def __init__(self, request_id: _Optional[str] = ..., bundle_hash: _Optional[str] = ..., model: _Optional[str] = ..., split: _Optional[int] = ..., sample_ids: _Optional[_Iterable[str]] = ..., feature: _Optional[_Union[Tensor, _Mapping]] = ..., edge_exits: _Optional[_Iterable[_Union[EdgeExitInfo, _Mapping]]] = ..., want_probabilities: _Optional[bool] = ..., top_k: _Optional[int] = ..., raw_input: _Optional[_Union[RawInput, _Mapping]] = ..., policy_state: _Optional[_Mapping[str, Tensor]] = ...) -> None: ...

class ClassScore(_message.Message):
    __slots__ = ("class_index", "probability")
    CLASS_INDEX_FIELD_NUMBER: _ClassVar[int]
    PROBABILITY_FIELD_NUMBER: _ClassVar[int]
    class_index: int
    probability: float
    def __init__(self, class_index: _Optional[int] = ..., probability: _Optional[float] = ...) -> None: ...

class RowResult(_message.Message):
    __slots__ = ("sample_id", "label", "top_k", "exit_index", "network", "degraded", "confidence")
    SAMPLE_ID_FIELD_NUMBER: _ClassVar[int]
    LABEL_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    EXIT_INDEX_FIELD_NUMBER: _ClassVar[int]
    NETWORK_FIELD_NUMBER: _ClassVar[int]
    DEGRADED_FIELD_NUMBER: _ClassVar[int]
    CONFIDENCE_FIELD_NUMBER: _ClassVar[int]
    sample_id: str
    label: int
    top_k: _containers.RepeatedCompositeFieldContainer[ClassScore]
    exit_index: int
    network: str
    degraded: bool
    confidence: float
    def __init__(self, sample_id: _Optional[str] = ..., label: _Optional[int] = ..., top_k: _Optional[_Iterable[_Union[ClassScore, _Mapping]]] = ..., exit_index: _Optional[int] = ..., network: _Optional[str] = ..., degraded: _Optional[bool] = ..., confidence: _Optional[float] = ...) -> None: ...

class ServerTiming(_message.Message):
    __slots__ = ("queue_ms", "compute_ms", "batch_size")
    QUEUE_MS_FIELD_NUMBER: _ClassVar[int]
    COMPUTE_MS_FIELD_NUMBER: _ClassVar[int]
    BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    queue_ms: float
    compute_ms: float
    batch_size: int
    def __init__(self, queue_ms: _Optional[float] = ..., compute_ms: _Optional[float] = ..., batch_size: _Optional[int] = ...) -> None: ...

class RequestError(_message.Message):
    __slots__ = ("code", "message")
    CODE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    code: int
    message: str
    def __init__(self, code: _Optional[int] = ..., message: _Optional[str] = ...) -> None: ...

class InferResponse(_message.Message):
    __slots__ = ("request_id", "rows", "timing", "worker_id", "error")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    ROWS_FIELD_NUMBER: _ClassVar[int]
    TIMING_FIELD_NUMBER: _ClassVar[int]
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    rows: _containers.RepeatedCompositeFieldContainer[RowResult]
    timing: ServerTiming
    worker_id: str
    error: RequestError
    def __init__(self, request_id: _Optional[str] = ..., rows: _Optional[_Iterable[_Union[RowResult, _Mapping]]] = ..., timing: _Optional[_Union[ServerTiming, _Mapping]] = ..., worker_id: _Optional[str] = ..., error: _Optional[_Union[RequestError, _Mapping]] = ...) -> None: ...

class ModelInfoRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class SplitPoint(_message.Message):
    __slots__ = ("split", "feature_shape")
    SPLIT_FIELD_NUMBER: _ClassVar[int]
    FEATURE_SHAPE_FIELD_NUMBER: _ClassVar[int]
    split: int
    feature_shape: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, split: _Optional[int] = ..., feature_shape: _Optional[_Iterable[int]] = ...) -> None: ...

class ModelSpec(_message.Message):
    __slots__ = ("name", "bundle_hash", "arch", "splits", "input_shape", "classes", "codecs", "raw_formats")
    NAME_FIELD_NUMBER: _ClassVar[int]
    BUNDLE_HASH_FIELD_NUMBER: _ClassVar[int]
    ARCH_FIELD_NUMBER: _ClassVar[int]
    SPLITS_FIELD_NUMBER: _ClassVar[int]
    INPUT_SHAPE_FIELD_NUMBER: _ClassVar[int]
    CLASSES_FIELD_NUMBER: _ClassVar[int]
    CODECS_FIELD_NUMBER: _ClassVar[int]
    RAW_FORMATS_FIELD_NUMBER: _ClassVar[int]
    name: str
    bundle_hash: str
    arch: str
    splits: _containers.RepeatedCompositeFieldContainer[SplitPoint]
    input_shape: _containers.RepeatedScalarFieldContainer[int]
    classes: _containers.RepeatedScalarFieldContainer[str]
    codecs: _containers.RepeatedScalarFieldContainer[str]
    raw_formats: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, name: _Optional[str] = ..., bundle_hash: _Optional[str] = ..., arch: _Optional[str] = ..., splits: _Optional[_Iterable[_Union[SplitPoint, _Mapping]]] = ..., input_shape: _Optional[_Iterable[int]] = ..., classes: _Optional[_Iterable[str]] = ..., codecs: _Optional[_Iterable[str]] = ..., raw_formats: _Optional[_Iterable[str]] = ...) -> None: ...

class Limits(_message.Message):
    __slots__ = ("max_message_bytes", "max_batch_rows")
    MAX_MESSAGE_BYTES_FIELD_NUMBER: _ClassVar[int]
    MAX_BATCH_ROWS_FIELD_NUMBER: _ClassVar[int]
    max_message_bytes: int
    max_batch_rows: int
    def __init__(self, max_message_bytes: _Optional[int] = ..., max_batch_rows: _Optional[int] = ...) -> None: ...

class ModelInfo(_message.Message):
    __slots__ = ("protocol_version", "models", "limits", "worker_id")
    PROTOCOL_VERSION_FIELD_NUMBER: _ClassVar[int]
    MODELS_FIELD_NUMBER: _ClassVar[int]
    LIMITS_FIELD_NUMBER: _ClassVar[int]
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    protocol_version: int
    models: _containers.RepeatedCompositeFieldContainer[ModelSpec]
    limits: Limits
    worker_id: str
    def __init__(self, protocol_version: _Optional[int] = ..., models: _Optional[_Iterable[_Union[ModelSpec, _Mapping]]] = ..., limits: _Optional[_Union[Limits, _Mapping]] = ..., worker_id: _Optional[str] = ...) -> None: ...
