"""Store-and-forward spool: offloads that failed, kept on disk to be refined later.

A spool is a directory holding one append-only log, `spool.log`, of framed msgpack records:

    [u32 little-endian payload length][u32 CRC-32 of the payload][msgpack payload]

- {"type": "put", "id": request_id, "hash": bundle hash, "ids": [sample ids],
   "reason": why it was spooled, "created": Unix seconds, "request": serialized InferRequest}
  The request is the exact protobuf that failed (feature, policy state, raw input), so a
  refinement resends it unchanged, with the same request id (idempotent on the worker).
- {"type": "done", "ids": [request ids], "outcome": "refined" | "dropped"}

Every append is one write followed by fsync, under an exclusive lock (`spool.lock`), so
two processes (an agent spooling, `splitexit edge refine` draining) never interleave. A
record torn by a crash is caught by its length or CRC; a torn tail is cut off on the next
append, and readers ignore it. A record damaged in the middle of the log (a flipped bit)
costs that record only: readers find the next whole record after it (a frame whose
payload starts like every record, `{"type": ...`, and whose CRC checks) and go on, and
count what they skipped (`damage`). `compact` rewrites the log without finished entries
and without damaged bytes (temp file, fsync, rename).
"""

from __future__ import annotations

import fcntl
import os
import struct
import time
import zlib
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import msgpack

from splitexit.proto import inference_pb2 as pb

__all__ = ["Spool", "SpoolDamage", "SpoolEntry", "SpoolError"]

LOG = "spool.log"
LOCK = "spool.lock"
_HEADER = struct.Struct("<II")
_MAX_RECORD = 1 << 30  # a length beyond this is a torn or garbage header


# Every record is a msgpack map whose first key is "type" (insertion order): a fixmap
# header byte, then this. What a reader looks for after a damaged record.
_RECORD_START = b"\xa4type"


class SpoolError(ValueError):
    """A spool directory that cannot be used."""


@dataclass(frozen=True)
class SpoolDamage:
    """What a read of the log had to skip: damaged records (regions between whole
    records) and their bytes. A torn tail (an interrupted append) is not damage."""

    records: int = 0
    bytes: int = 0


@dataclass(frozen=True, kw_only=True)
class SpoolEntry:
    request_id: str
    bundle_hash: str
    sample_ids: tuple[str, ...]
    reason: str
    created: float
    request: bytes  # a serialized splitexit.v1.InferRequest

    def message(self) -> pb.InferRequest:
        return pb.InferRequest.FromString(self.request)


class Spool:
    def __init__(self, directory: str | Path) -> None:
        self.directory = Path(directory)
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise SpoolError(f"{self.directory}: cannot create the spool directory ({exc.strerror or exc})") from exc
        if not self.directory.is_dir():
            raise SpoolError(f"{self.directory}: not a directory")
        self.log = self.directory / LOG
        self._lock_path = self.directory / LOCK
        self.damage = SpoolDamage()  # what the last read skipped

    @contextmanager
    def _locked(self) -> Iterator[None]:
        with open(self._lock_path, "a+b") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    # reading
    def _scan(self) -> tuple[list[dict[str, Any]], int]:
        """Whole records and the byte offset where the last one ends (the rest is a torn
        tail); damaged regions between whole records are skipped and counted in `damage`."""
        try:
            data = self.log.read_bytes()
        except FileNotFoundError:
            self.damage = SpoolDamage()
            return [], 0
        records: list[dict[str, Any]] = []
        pos = end = 0
        damaged = damaged_bytes = 0
        while pos + _HEADER.size <= len(data):
            frame = _frame_at(data, pos)
            if frame is not None:
                records.append(frame[0])
                pos = end = frame[1]
                continue
            found = _next_frame(data, pos + 1)
            if found is None:
                break  # nothing whole after it: a torn tail
            damaged, damaged_bytes = damaged + 1, damaged_bytes + found - pos
            pos = found
        self.damage = SpoolDamage(damaged, damaged_bytes)
        return records, end

    def entries(self) -> list[SpoolEntry]:
        """Spooled requests not yet refined or dropped, oldest first."""
        with self._locked():
            records, _ = self._scan()
        finished = {rid for r in records if r.get("type") == "done" for rid in r.get("ids", ())}
        out = []
        for r in records:
            if r.get("type") == "put" and r.get("id") not in finished:
                out.append(SpoolEntry(request_id=str(r["id"]), bundle_hash=str(r.get("hash", "")),
                                      sample_ids=tuple(str(s) for s in r.get("ids", ())),
                                      reason=str(r.get("reason", "")), created=float(r.get("created", 0.0)),
                                      request=bytes(r["request"])))
        return out

    def __len__(self) -> int:
        return len(self.entries())

    # writing
    def _append(self, record: dict[str, Any]) -> None:
        payload = msgpack.packb(record, use_bin_type=True)
        frame = _HEADER.pack(len(payload), zlib.crc32(payload)) + payload
        with self._locked():
            _, good = self._scan() if self.log.exists() else ([], 0)
            fd = os.open(self.log, os.O_WRONLY | os.O_CREAT, 0o600)
            try:
                if os.fstat(fd).st_size != good:
                    os.ftruncate(fd, good)  # cut a torn record off before appending after it
                os.lseek(fd, good, os.SEEK_SET)
                os.write(fd, frame)
                os.fsync(fd)
            finally:
                os.close(fd)

    def put(self, request: pb.InferRequest, *, reason: str) -> SpoolEntry:
        """Keep a request that could not be answered (durable when this returns)."""
        entry = SpoolEntry(request_id=request.request_id, bundle_hash=request.bundle_hash,
                           sample_ids=tuple(request.sample_ids), reason=reason, created=time.time(),
                           request=request.SerializeToString())
        self._append({"type": "put", "id": entry.request_id, "hash": entry.bundle_hash,
                      "ids": list(entry.sample_ids), "reason": reason, "created": entry.created,
                      "request": entry.request})
        return entry

    def done(self, request_ids: Sequence[str], *, outcome: str = "refined") -> None:
        """Mark entries finished (refined, or dropped as never answerable)."""
        if request_ids:
            self._append({"type": "done", "ids": list(request_ids), "outcome": outcome})

    def compact(self) -> int:
        """Rewrite the log with only the unfinished entries; returns how many remain."""
        with self._locked():
            records, _ = self._scan()
            finished = {rid for r in records if r.get("type") == "done" for rid in r.get("ids", ())}
            keep = [r for r in records if r.get("type") == "put" and r.get("id") not in finished]
            if not records:
                return 0
            tmp = self.log.with_name(LOG + ".tmp")
            with open(tmp, "wb") as f:
                for r in keep:
                    payload = msgpack.packb(r, use_bin_type=True)
                    f.write(_HEADER.pack(len(payload), zlib.crc32(payload)) + payload)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.log)
            return len(keep)


def _frame_at(data: bytes, pos: int) -> tuple[dict[str, Any], int] | None:
    """The record framed at `pos` and the offset after it, or None if there is no whole,
    intact record there."""
    length, crc = _HEADER.unpack_from(data, pos)
    end = pos + _HEADER.size + length
    if length > _MAX_RECORD or end > len(data):
        return None
    payload = data[pos + _HEADER.size:end]
    if zlib.crc32(payload) != crc:
        return None
    try:
        record = msgpack.unpackb(payload, raw=False)
    except (msgpack.UnpackException, ValueError):
        return None
    return (record, end) if isinstance(record, dict) else None


def _next_frame(data: bytes, start: int) -> int | None:
    """The offset of the first whole record at or after `start`: where a record's payload
    starts as every record's does and its frame checks out."""
    at = data.find(_RECORD_START, start + _HEADER.size + 1)
    while at != -1:
        pos = at - 1 - _HEADER.size  # the fixmap byte, then the frame header
        if data[pos + _HEADER.size] & 0xF0 == 0x80 and _frame_at(data, pos) is not None:
            return pos
        at = data.find(_RECORD_START, at + 1)
    return None
