"""How the edge agent offloads (`AgentConfig`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from splitexit.codec import CODECS

if TYPE_CHECKING:
    from splitexit.edge.replan import ReplanConfig

__all__ = ["REQUEST_OVERHEAD", "AgentConfig"]

# Framing and per-request fields on top of the feature bytes: headroom below a worker's
# message limit when packing rows into requests.
REQUEST_OVERHEAD = 64 * 1024


@dataclass(frozen=True, kw_only=True)
class AgentConfig:
    """How the agent offloads. Times in milliseconds."""

    codec: str | None = None  # feature codec; None = the bundle's
    # End-to-end budget per `infer` call: each offload's deadline is what is left of it
    # after the edge's own work. None = no budget (offloads get request_timeout_ms).
    latency_budget_ms: float | None = None
    # Upper bound of one offload even under a larger budget: a worker that takes longer is
    # treated as gone.
    request_timeout_ms: float = 5000.0
    # Below this much budget left there is no point in a round trip: answer locally.
    min_offload_ms: float = 1.0
    max_batch_rows: int = 256  # rows per InferRequest (a worker's advertised limit may lower it)
    max_message_bytes: int = 64 * 1024 * 1024  # per InferRequest (likewise)
    raw_format: str = "png"  # RawInput format for escalated rows: png (lossless), jpeg, u8
    # A cascade's rows that reach the cloud may be sent on to its larger network by a cloud
    # exit, which runs on their raw input: send it with their feature. None = when the
    # bundle's ladder ends in a larger network; False saves the bytes (such rows are then
    # answered degraded, with the best exit they evaluated).
    raw_with_features: bool | None = None
    want_probabilities: bool = False
    top_k: int = 0  # with want_probabilities: classes per row, 0 = all
    refine_timeout_ms: float = 10_000.0  # per spooled request resent by `refine`
    # Run the head in a worker thread (torch and ONNX Runtime release the GIL): the event
    # loop keeps serving answers and other requests meanwhile.
    compute_in_thread: bool = True
    # What runs the head (`splitexit.edge.engine`): "auto" = the bundle's ONNX segments
    # when it has them, else torch; and ONNX Runtime's intra-op threads.
    engine: str = "auto"
    engine_threads: int = 1
    # Move the cut among the bundle's split points as the link changes (`edge.replan`);
    # None keeps the bundle's split.
    replan: "ReplanConfig | None" = None

    def __post_init__(self) -> None:
        if self.codec is not None and self.codec not in CODECS:
            raise ValueError(f"unknown codec {self.codec!r}; choose one of {', '.join(CODECS)}")
        if self.latency_budget_ms is not None and not self.latency_budget_ms > 0:
            raise ValueError(f"latency_budget_ms must be > 0, got {self.latency_budget_ms}")
        for name in ("request_timeout_ms", "refine_timeout_ms"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0")
        if self.min_offload_ms < 0:
            raise ValueError("min_offload_ms must be >= 0")
        if self.max_batch_rows < 1 or self.max_message_bytes < 2 * REQUEST_OVERHEAD:
            raise ValueError(f"max_batch_rows must be >= 1 and max_message_bytes >= {2 * REQUEST_OVERHEAD}")
        if self.raw_format not in ("png", "jpeg", "u8"):
            raise ValueError(f"unknown raw format {self.raw_format!r}; choose png, jpeg or u8")
        if self.top_k < 0:
            raise ValueError("top_k must be >= 0")
        if self.engine not in ("auto", "onnx", "torch"):
            raise ValueError(f"unknown engine {self.engine!r}; choose auto, onnx or torch")
        if self.engine_threads < 1:
            raise ValueError("engine_threads must be >= 1")
