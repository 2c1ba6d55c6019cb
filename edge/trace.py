"""Per-request trace records as a msgpack stream, and the reader for them.

One record per `EdgeAgent.infer` call (a batch), a msgpack map:
    v              format version (1)
    request_id     the agent's id for the batch (offloads carry their own ids)
    t              wall-clock start, Unix seconds
    rows           rows in the batch
    exits_evaluated  per row: exit heads evaluated on the edge
    exit_hist      {"stage index": rows answered there on the edge}
    route          {"edge": n, "cloud": n, "degraded": n}
    reasons        {"deadline_exceeded": n, ...} for degraded rows
    bytes_up, bytes_down   serialized request / response bytes of every offload
    timings_ms     {"prepare", "head", "encode", "offload", "total"}; offload = wall time
                   from the first request sent to the last answer
    workers        workers that answered
    offloads       per InferRequest: {request_id, kind: feature|raw, rows, worker, status,
                   bytes_up, bytes_down, rtt_ms, queue_ms, compute_ms, batch_size}
    link           the agent's estimate of its uplink so far, {up_mbps, rtt_ms}, or nil
                   until offloads of different sizes have been seen (`splitexit.plan.LinkEstimator`)

Records are appended and flushed one by one, so a reader sees whole records; a record
torn by a crash at the end of the file is skipped by `read_trace`.
"""

from __future__ import annotations

import os
from pathlib import Path
from types import TracebackType
from typing import IO, Any, Iterator, Mapping

import msgpack

__all__ = ["TRACE_VERSION", "TraceWriter", "read_trace"]

TRACE_VERSION = 1


class TraceWriter:
    """Appends trace records to `path`. With `atomic=True` the records go to a temporary
    file that `commit` renames into place (a CLI run: nothing half-written on failure)."""

    def __init__(self, path: str | Path, *, atomic: bool = False) -> None:
        self.path = Path(path)
        self.count = 0
        if not self.path.parent.is_dir():
            raise OSError(f"{self.path.parent}: no such directory for the trace file")
        self._target = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp") if atomic else self.path
        self._file: IO[bytes] | None = open(self._target, "wb" if atomic else "ab")
        self._atomic = atomic
        self._packer = msgpack.Packer(use_bin_type=True)

    def write(self, record: Mapping[str, Any]) -> None:
        if self._file is None:
            raise ValueError(f"trace {self.path} is closed")
        self._file.write(self._packer.pack(dict(record)))
        self._file.flush()  # whole records reach the file as they happen
        self.count += 1

    def commit(self) -> None:
        """Close; an atomic trace is renamed into place."""
        if self._file is None:
            return
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        self._file = None
        if self._atomic:
            os.replace(self._target, self.path)

    close = commit

    def abort(self) -> None:
        """Close; an atomic trace is removed (an appending one keeps what it wrote)."""
        if self._file is None:
            return
        self._file.close()
        self._file = None
        if self._atomic:
            self._target.unlink(missing_ok=True)

    def __enter__(self) -> "TraceWriter":
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.commit() if exc_type is None else self.abort()


def read_trace(path: str | Path) -> Iterator[dict[str, Any]]:
    """Every whole record of a trace file, in order. A record cut short at the end (a
    crash while writing) is skipped; garbage inside the file raises ValueError."""
    with open(path, "rb") as f:
        unpacker = msgpack.Unpacker(f, raw=False, strict_map_key=False, max_buffer_size=64 * 1024 * 1024)
        try:
            for record in unpacker:
                if not isinstance(record, dict):
                    raise ValueError(f"{path}: not a splitexit trace (found a {type(record).__name__})")
                yield record
        except (msgpack.UnpackException, msgpack.ExtraData, ValueError) as exc:
            if isinstance(exc, ValueError) and str(exc).startswith(str(path)):
                raise
            raise ValueError(f"{path}: corrupt trace ({exc})") from None
