"""The agent's answers, one `Answer` per row: from an edge exit, from the cloud's response
(checked against its request), or the row's own fallback flagged degraded."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from splitexit.edge.config import AgentConfig
from splitexit.edge.results import Answer
from splitexit.edge.transport import OffloadError
from splitexit.proto import inference_pb2 as pb
from splitexit.status import status_name

if TYPE_CHECKING:
    from splitexit.manifest import Bundle

__all__ = ["AnswerMaker"]


class AnswerMaker:
    def __init__(self, bundle: "Bundle", config: AgentConfig) -> None:
        self.bundle = bundle
        self.config = config
        self.exit_stages: tuple[int, ...] = bundle.manifest.exits

    def stage(self, ladder_exit: int) -> int:
        return self.exit_stages[ladder_exit] if 0 <= ladder_exit < len(self.exit_stages) else -1

    def _class_name(self, label: int) -> str | None:
        return self.bundle.classes[label] if 0 <= label < len(self.bundle.classes) else None

    def edge(self, sample_id: str, k: int, probs: np.ndarray, latency_ms: float) -> Answer:
        conf, label = probs.max(), probs.argmax()
        return Answer(sample_id=sample_id, label=int(label), class_name=self._class_name(int(label)),
                      confidence=float(conf), exit=self.stage(k), network=self.bundle.name, route="edge",
                      latency_ms=latency_ms, top_k=self._top_k(probs))

    def _top_k(self, probs: np.ndarray) -> tuple[tuple[int, float], ...]:
        from splitexit.wire import top_classes

        if not self.config.want_probabilities:
            return ()
        return top_classes(probs, self.config.top_k or len(probs))

    def degraded(self, sample_id: str, fallback: tuple[int, np.ndarray | None, float], reason: str,
                  latency_ms: float, *, spooled: bool) -> Answer:
        k, probs, _ = fallback
        if probs is None:  # no exit could run on this row on the edge: nothing to answer with
            return Answer(sample_id=sample_id, label=-1, class_name=None, confidence=0.0, exit=-1,
                          network=self.bundle.name, route="degraded", reason=reason, latency_ms=latency_ms,
                          spooled=spooled)
        conf, label = probs.max(), probs.argmax()
        return Answer(sample_id=sample_id, label=int(label), class_name=self._class_name(int(label)),
                      confidence=float(conf), exit=self.stage(k), network=self.bundle.name, route="degraded",
                      reason=reason, latency_ms=latency_ms, spooled=spooled, top_k=self._top_k(probs))

    def cloud(self, request: pb.InferRequest, response: pb.InferResponse, latency_ms: float,
                       worker: str, *, update: bool = False) -> list[Answer]:
        """Answers from a response; raises OffloadError when it does not answer the request."""
        from splitexit import wire

        try:
            parsed = wire.parse_response(response, request, num_classes=len(self.bundle.classes))
        except wire.WireError as exc:
            raise OffloadError("INTERNAL", f"malformed answer: {exc}", reason="bad_response", worker=worker) from None
        if parsed.error is not None:
            code, message = parsed.error
            raise OffloadError(status_name(code) or "UNKNOWN", message, worker=worker)
        return [Answer(sample_id=r.sample_id, label=r.label, class_name=self._class_name(r.label),
                       confidence=r.confidence, exit=r.exit_index, network=r.network or self.bundle.name,
                       route="degraded" if r.degraded else "cloud", reason="worker_degraded" if r.degraded else None,
                       latency_ms=latency_ms, worker=worker, update=update, top_k=r.top_k)
                for r in parsed.rows]
