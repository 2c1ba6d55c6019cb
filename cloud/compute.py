"""Where a worker's batches compute: a thread of the server's process, or a child process.

The batcher hands each batch to a compute thread. `InThreadCompute` runs it right there,
one batch at a time. `ChildProcessCompute` sends it to a child process that holds its own
copy of the served models and answers over a pipe, with the next batch already sent
while one computes.

Why a child process: in one process the grpc.aio event loop and the compute thread share
one GIL. The loop's Python per request (protobuf, header checks, answers) and the batch's
Python (decoding bodies, the exit runner, building answers) take turns, and on a 2-core
machine the served tail ran at about 0.65 of its bare speed. The child has a GIL of its
own; requests cross the pipe as their undecoded bytes and answers come back as protobuf
messages, a small copy next to the tail's compute.

A child that dies (killed, out of memory) fails the batch it was running with
UNAVAILABLE (the edge retries or answers on-device) and is started again for the next one.
"""

from __future__ import annotations

import logging
import multiprocessing
import signal
import threading
from dataclasses import replace
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any, Hashable, Literal, Mapping, Protocol, Sequence

from splitexit.cloud.errors import RequestError
from splitexit.cloud.servicer import Body, Parsed, ServedModel, load_models

__all__ = ["ChildProcessCompute", "Compute", "ComputeError", "ComputeKind", "InThreadCompute", "make_compute"]

log = logging.getLogger("splitexit.cloud")

ComputeKind = Literal["thread", "process"]
START_TIMEOUT_S = 120.0  # loading and warming up every model in a fresh interpreter


class ComputeError(RuntimeError):
    """The compute could not start (a model failed to load or to warm up)."""


class Compute(Protocol):
    """Runs batches; every method is called from the one compute thread."""

    def start(self) -> None:
        """Warm up (first-call costs paid before the worker says SERVING); raises ComputeError."""

    def run_batch(self, key: Hashable, items: Sequence[Parsed]) -> Sequence[Any]:
        """One answer (a list of RowResult) or RequestError per item."""

    def close(self) -> None: ...

    threads_wanted: int  # compute threads the server should run


class InThreadCompute:
    threads_wanted = 1  # one batch at a time: torch has the CPU to itself

    def __init__(self, models: Mapping[tuple[str, str], ServedModel]) -> None:
        self.models = models

    def start(self) -> None:
        for model in self.models.values():
            try:
                model.warm_up()
            except Exception as exc:
                raise ComputeError(f"warm-up of {model.name} failed: {type(exc).__name__}: {exc}") from exc

    def run_batch(self, key: Hashable, items: Sequence[Parsed]) -> Sequence[Any]:
        return items[0].model.run_batch(items)

    def close(self) -> None:
        pass


class ChildProcessCompute:
    """Batches run in a child process (spawned: a fresh interpreter, no forked locks) that
    loads the same bundles as the server.

    Two compute threads may call `run_batch` at once (the batcher hands the next batch over
    while one runs): the second batch is sent while the first computes, so the child finds
    it waiting instead of idling while this process, busy with the event loop, gets round
    to sending it. The child answers in order; each thread receives its own answer by its
    ticket (the order of sending).
    """

    threads_wanted = 2  # compute threads of the server for this kind

    def __init__(self, models: Mapping[tuple[str, str], ServedModel], threads: int | None) -> None:
        self.paths = [model.bundle.path for model in models.values()]
        self.threads = threads
        self._context = multiprocessing.get_context("spawn")
        self._process: Any = None
        self._conn: Connection | None = None
        self._ready = False
        self._lock = threading.Lock()  # the child's lifecycle and sending
        self._turn = threading.Condition()  # receiving, in ticket order
        self._generation = 0  # bumped at each restart: tickets of a dead child are void
        self._sent = 0  # tickets handed out
        self._received = 0  # answers received (the next ticket to receive)
        self.restarts = 0

    @property
    def pid(self) -> int | None:
        process = self._process
        return None if process is None else process.pid

    def start(self) -> None:
        with self._lock:
            self._spawn()
            self._wait_ready()

    def _spawn(self) -> None:
        parent, child = self._context.Pipe()
        process = self._context.Process(target=child_main, args=(child, self.paths, self.threads),
                                        name="splitexit-compute", daemon=True)
        process.start()
        child.close()  # the child's end lives in the child only: its death reads as EOF here
        self._process, self._conn, self._ready = process, parent, False

    def _wait_ready(self) -> None:
        """Block until the spawned child has loaded and warmed up; raises ComputeError."""
        conn = self._conn
        assert conn is not None
        try:
            if not conn.poll(START_TIMEOUT_S):
                self._reap()
                raise ComputeError(f"the compute process did not start within {START_TIMEOUT_S:.0f} s")
            status, message = conn.recv()
        except (EOFError, OSError):
            status, message = "error", f"the compute process exited with code {self._reap()}"
        if status != "ready":
            self._reap()
            raise ComputeError(message)
        self._ready = True

    def run_batch(self, key: Hashable, items: Sequence[Parsed]) -> Sequence[Any]:
        message = (key, [_detached(item) for item in items])
        died = [RequestError("UNAVAILABLE", "the worker's compute process died during this batch; retry")] * len(items)
        with self._lock:
            if self._conn is None:
                self._spawn()
            if not self._ready:
                self._wait_ready()  # raises ComputeError: the batcher fails this batch with INTERNAL
            conn, generation = self._conn, self._generation
            assert conn is not None
            ticket, self._sent = self._sent, self._sent + 1
            try:
                conn.send(message)
            except OSError:
                sent = False
            else:
                sent = True
        with self._turn:
            while generation == self._generation and self._received != ticket:
                self._turn.wait()
            if generation != self._generation:
                return died  # the child died with this batch in its pipe
            try:
                answers = conn.recv() if sent else None
            except (EOFError, OSError):
                answers = None
            if answers is None:
                self._restart()
                return died
            self._received += 1
            self._turn.notify_all()
            return answers

    def _restart(self) -> None:
        """With `_turn` held: the child is gone; void its tickets and start a new one."""
        with self._lock:
            code = self._reap()
            log.error("the compute process died (exit code %s); starting a new one", code)
            self.restarts += 1
            self._generation += 1
            self._received = self._sent
            self._spawn()  # loads while this batch's callers hear UNAVAILABLE; the next batch waits for it
        self._turn.notify_all()

    def _reap(self) -> int | None:
        process, conn = self._process, self._conn
        self._process, self._conn, self._ready = None, None, False
        if conn is not None:
            conn.close()
        if process is None:
            return None
        process.join(5)
        if process.is_alive():
            process.kill()
            process.join(5)
        return process.exitcode

    def close(self) -> None:
        with self._lock:
            if self._conn is not None:
                try:
                    self._conn.send(None)  # a clean exit
                except OSError:
                    pass
            self._reap()


def make_compute(kind: ComputeKind, models: Mapping[tuple[str, str], ServedModel],
                 threads: int | None) -> Compute:
    if kind == "process":
        return ChildProcessCompute(models, threads)
    return InThreadCompute(models)


def _detached(item: Parsed) -> Parsed:
    """The request as the pipe carries it: without the model (the child has its own) and
    with its policy state as a plain dict (a protobuf map field does not pickle)."""
    body = item.body if item.body is None else Body(item.body.feature, dict(item.body.policy_state))
    return replace(item, model=None, body=body)  # type: ignore[arg-type]


def child_main(conn: Connection, paths: Sequence[Path], threads: int | None) -> None:
    """The compute process: load and warm up, say "ready", then answer batches until told
    to stop (None) or the server goes away (EOF)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the server's: it drains, then ends us
    try:
        import torch

        if threads is not None:
            torch.set_num_threads(threads)
        models = load_models(paths)
        InThreadCompute(models).start()
    except Exception as exc:
        conn.send(("error", f"{type(exc).__name__}: {exc}"))
        return
    conn.send(("ready", ""))
    while True:
        try:
            message = conn.recv()
        except (EOFError, OSError):
            return
        if message is None:
            return
        key, items = message
        model = models[(key[0], key[1])]
        try:
            answers = list(model.run_batch([replace(item, model=model) for item in items]))
        except Exception as exc:  # a bug fails its batch, never the process
            answers = [RequestError("INTERNAL", f"batch failed: {type(exc).__name__}: {exc}")] * len(items)
        conn.send(answers)
