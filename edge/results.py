"""Answers and where they go: one `Answer` per input row, written as JSON lines.

A JSONL row:
    {"sample_id": "cat/1.png", "label": 3, "class_name": "cat", "confidence": 0.91,
     "exit": 2, "network": "resnet20", "route": "edge", "reason": null, "latency_ms": 3.2}
- `exit` is the stage index of the answering exit in `network` (inference.proto's
  convention); -1 when no exit could answer (a degraded row that never reached one).
- `route`: "edge" (an edge exit answered), "cloud", or "degraded": not the answer the
  policy asked for; `reason` says why (a gRPC status in lower case, e.g.
  "deadline_exceeded" (the request timeout), "latency_budget" (the budget ran out before
  the cloud answered), "no_worker", "worker_degraded" when the worker cut it short).
- Optional keys: "worker" (who answered), "spooled": true (the row's feature waits in the
  spool; `splitexit edge refine` may send an update), "update": true (a refined answer
  that replaces an earlier degraded one with the same sample_id), "top_k".
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import IO, Any, Iterator, Literal

__all__ = ["Answer", "ResultWriter", "ResultsError", "Route", "read_results"]

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


class ResultsError(ValueError):
    """A results file that cannot be written or resumed as asked."""


class ResultWriter:
    """JSON lines into `path`, never lost to an interruption.

    Rows go to `<path>.partial` beside it, flushed to disk batch by batch (`checkpoint`), and
    `commit` renames that into place. A run stopped by an error, SIGTERM, kill -9 or a power
    cut leaves the answers it had written in the partial file; a rerun keeps them (`done`:
    their sample ids) and appends the rest, so every input is answered exactly once and
    only what was not written is computed again. A torn last line (killed mid-write) is cut
    off. A partial file names the run that wrote it (`run`, e.g. the bundle hash, in a
    sidecar `<path>.partial.run`): one left by another run is refused, not mixed in.
    `resume=False` starts over. `path` "-" writes to stdout (nothing to resume)."""

    def __init__(self, path: str | Path, *, run: str = "", resume: bool = True) -> None:
        self.path = Path(path)
        self.count = 0
        self.done: set[str] = set()
        self._stdout = str(path) == "-"
        self._file: IO[str]
        self._open = True
        if self._stdout:
            import sys

            self._file = sys.stdout
            return
        if self.path.is_dir():
            raise ResultsError(f"{self.path} is a directory: give the results file's name")
        if not self.path.parent.is_dir():
            raise ResultsError(f"{self.path.parent}: no such directory for the results file")
        self.partial = self.path.with_name(self.path.name + ".partial")
        self._run_file = self.path.with_name(self.path.name + ".partial.run")
        if self.partial.exists() and resume:
            left_by = self._run_file.read_text() if self._run_file.exists() else "an unknown run"
            if left_by != run:
                raise ResultsError(f"{self.partial} was left by another run ({left_by[:16]}, not {run[:16]}): "
                                   f"remove it to start over")
            self.done = _recover(self.partial)
        else:
            self.partial.unlink(missing_ok=True)
            self._run_file.write_text(run)
        self._file = open(self.partial, "a", encoding="utf-8")

    def write(self, answer: Answer) -> None:
        self._file.write(answer.to_json() + "\n")
        self.count += 1

    def checkpoint(self) -> None:
        """On disk now: what a crash after this call still finds."""
        self._file.flush()
        if not self._stdout:
            os.fsync(self._file.fileno())

    def commit(self) -> Path:
        if self._stdout:
            self._file.flush()
            return self.path
        if not self._open:
            raise ResultsError("this results file was already committed or closed")
        self.checkpoint()
        self._file.close()
        self._open = False
        os.replace(self.partial, self.path)
        self._run_file.unlink(missing_ok=True)
        return self.path

    def abort(self) -> None:
        """Stop writing. Answers written so far stay in the partial file for a rerun; a
        partial file with no answer in it is removed."""
        if self._stdout or not self._open:
            return
        self.checkpoint()
        self._file.close()
        self._open = False
        if self.count == 0 and not self.done:
            self.partial.unlink(missing_ok=True)
            self._run_file.unlink(missing_ok=True)

    def __enter__(self) -> "ResultWriter":
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if exc_type is None:
            self.commit()
        else:
            self.abort()


def _recover(partial: Path) -> set[str]:
    """Sample ids of the whole JSON lines of a partial results file; the file is cut after
    the last one (a line torn by a kill, or damaged, and everything after it, is answered
    again)."""
    data = partial.read_bytes()
    done: set[str] = set()
    keep = 0
    for line in data.splitlines(keepends=True):
        if not line.endswith(b"\n"):
            break
        try:
            row = json.loads(line)
            sample_id = row["sample_id"]
        except (ValueError, KeyError, TypeError):
            break
        done.add(str(sample_id))
        keep += len(line)
    if keep < len(data):
        with open(partial, "r+b") as handle:
            handle.truncate(keep)
    return done


def read_results(path: str | Path) -> Iterator[dict[str, Any]]:
    """The rows of a results file as dicts."""
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if line.strip():
                try:
                    yield json.loads(line)
                except json.JSONDecodeError as exc:
                    raise ValueError(f"{path}:{n}: not a JSON line ({exc.msg})") from None
