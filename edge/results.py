"""Answers and where they go: one `Answer` per input row, written as JSON lines.

A JSONL row:
    {"sample_id": "cat/1.png", "label": 3, "class_name": "cat", "confidence": 0.91,
     "exit": 2, "network": "resnet20", "route": "edge", "reason": null, "latency_ms": 3.2}
- `exit` is the stage index of the answering exit in `network` (inference.proto's
  convention); -1 when no exit could answer (a degraded row that never reached one).
- `route`: "edge" (an edge exit answered), "cloud", or "degraded": not the answer the
  policy asked for; `reason` says why (a gRPC status in lower case, e.g.
  "deadline_exceeded", "no_worker", "worker_degraded" when the worker cut it short).
- Optional keys: "worker" (who answered), "spooled": true (the row's feature waits in the
  spool; `splitexit edge refine` may send an update), "update": true (a refined answer
  that replaces an earlier degraded one with the same sample_id), "top_k".
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import IO, Any, Iterator, Literal

__all__ = ["Answer", "ResultWriter", "Route", "read_results"]

Route = Literal["edge", "cloud", "degraded"]


@dataclass(frozen=True, kw_only=True)
class Answer:
    """The final answer for one input row (or, with update=True, a refinement of one)."""

    sample_id: str
    label: int  # class index; -1 when no exit could answer
    class_name: str | None
    confidence: float
    exit: int  # stage index of the answering exit in `network`; -1 = none
    network: str
    route: Route
    latency_ms: float
    reason: str | None = None  # why the row is degraded
    worker: str | None = None
    spooled: bool = False
    update: bool = False
    top_k: tuple[tuple[int, float], ...] = ()

    @property
    def degraded(self) -> bool:
        return self.route == "degraded"

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "sample_id": self.sample_id, "label": self.label, "class_name": self.class_name,
            "confidence": round(float(self.confidence), 6), "exit": self.exit, "network": self.network,
            "route": self.route, "reason": self.reason, "latency_ms": round(float(self.latency_ms), 3),
        }
        if self.worker:
            out["worker"] = self.worker
        if self.spooled:
            out["spooled"] = True
        if self.update:
            out["update"] = True
        if self.top_k:
            out["top_k"] = [[c, round(p, 6)] for c, p in self.top_k]
        return out

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), separators=(",", ":"))


class ResultWriter:
    """JSON lines into `path`, all or nothing: rows go to a temporary file beside it that
    `commit` renames into place; `abort` (or an exception in a `with` block) removes it, so
    a failed run never leaves a half-written results file. `path` "-" writes to stdout."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.count = 0
        self._stdout = str(path) == "-"
        self._tmp: Path | None = None
        self._file: IO[str]
        if self._stdout:
            import sys

            self._file = sys.stdout
            return
        parent = self.path.parent
        if not parent.is_dir():
            raise OSError(f"{parent}: no such directory for the results file")
        fd, tmp = tempfile.mkstemp(prefix=f".{self.path.name}.", suffix=".tmp", dir=parent)
        self._tmp = Path(tmp)
        self._file = os.fdopen(fd, "w", encoding="utf-8")

    def write(self, answer: Answer) -> None:
        self._file.write(answer.to_json() + "\n")
        self.count += 1

    def commit(self) -> Path:
        if self._stdout:
            self._file.flush()
            return self.path
        if self._tmp is None:
            raise ValueError("this results file was already committed or aborted")
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        os.replace(self._tmp, self.path)
        self._tmp = None
        return self.path

    def abort(self) -> None:
        if self._stdout or self._tmp is None:
            return
        self._file.close()
        self._tmp.unlink(missing_ok=True)
        self._tmp = None

    def __enter__(self) -> "ResultWriter":
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if exc_type is None:
            self.commit()
        else:
            self.abort()


def read_results(path: str | Path) -> Iterator[dict[str, Any]]:
    """The rows of a results file as dicts."""
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if line.strip():
                try:
                    yield json.loads(line)
                except json.JSONDecodeError as exc:
                    raise ValueError(f"{path}:{n}: not a JSON line ({exc.msg})") from None
