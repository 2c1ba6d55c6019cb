"""The live harness's parts: a real cloud worker process, the strategies a user could run
(each input answered one at a time, end to end, through an emulated link), and their
summary (accuracy, mean and p95 latency, share answered on the device, bytes sent).

Strategies (METHODS.md §5-6):
- `edge_only`: the whole network on the device, no exits, no link;
- `edge_exits`: the network with its exits, all on the device;
- `cloud_only`: the input as JPEG up the link, the whole network in the worker;
- `split`: cut after a stage, no exits (every row crosses the link);
- `adaptive`: the edge agent with the planner's cut and exit policy.
"""

from __future__ import annotations

import asyncio
import os
import signal
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

__all__ = ["Record", "StrategyResult", "WorkerProcess", "pad_to_profile", "run_cloud_only", "run_edge_agent",
           "run_local", "summarize"]


@dataclass(frozen=True)
class Record:
    """One input's answer as the strategy gave it."""

    label: int
    latency_ms: float
    on_device: bool
    degraded: bool = False


@dataclass(frozen=True)
class StrategyResult:
    name: str
    acc: float
    mean_ms: float
    p95_ms: float
    on_device: float  # share answered on the device
    bytes_up: float  # per input
    degraded: int
    answered: int
    inputs: int
    plan: str = ""  # what the strategy ran (its cut, its policy)

    def row(self) -> dict[str, Any]:
        return self.__dict__.copy()


def summarize(name: str, records: Sequence[Record], labels: np.ndarray, *, bytes_up: int = 0,
              plan: str = "") -> StrategyResult:
    latencies = [r.latency_ms for r in records]
    correct = sum(int(r.label == int(y)) for r, y in zip(records, labels))
    return StrategyResult(
        name=name, acc=correct / len(labels), mean_ms=statistics.fmean(latencies),
        p95_ms=float(np.percentile(latencies, 95)), on_device=sum(r.on_device for r in records) / len(records),
        bytes_up=bytes_up / len(records), degraded=sum(r.degraded for r in records), answered=len(records),
        inputs=len(labels), plan=plan)


class WorkerProcess:
    """`splitexit cloud serve BUNDLE...` in a process of its own, on 127.0.0.1, without mDNS;
    `address` once started. It can be killed and started again (on the same port)."""

    def __init__(self, bundles: Sequence[Path], *, threads: int = 1, port: int = 0, extra: Sequence[str] = ()) -> None:
        self.bundles = list(bundles)
        self.threads = threads
        self.port = port  # 0: a free one (a restarted worker keeps the port it was given)
        self.extra = list(extra)
        self.address = ""
        self._proc: asyncio.subprocess.Process | None = None

    async def start(self) -> None:
        """Start the process and wait for its "serving ... on HOST:PORT" line."""
        env = {**os.environ, "OMP_NUM_THREADS": str(self.threads)}
        self._proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "splitexit.cli", "cloud", "serve", *map(str, self.bundles), "--host", "127.0.0.1",
            "--port", str(self.port), "--no-advertise", "--threads", str(self.threads), "--grace", "1", *self.extra,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env=env)
        assert self._proc.stdout is not None and self._proc.stderr is not None
        try:
            line = (await asyncio.wait_for(self._proc.stdout.readline(), 60)).decode()
        except asyncio.TimeoutError:
            line = ""
        if " on " not in line:
            err = (await self._proc.stderr.read()).decode()[-2000:]
            await self.stop()
            raise RuntimeError(f"the worker did not start: {line.strip()} {err.strip()}")
        self.address = line.split(" on ", 1)[1].split()[0]

    async def kill(self) -> None:
        """SIGKILL, as a crash would: no drain, no goodbye."""
        proc, self._proc = self._proc, None
        if proc is not None and proc.returncode is None:
            proc.kill()
            await proc.wait()

    async def stop(self) -> None:
        """SIGTERM (the worker drains), then SIGKILL after 15 s."""
        proc, self._proc = self._proc, None
        if proc is None or proc.returncode is not None:
            return
        proc.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(proc.wait(), 15)
        except asyncio.TimeoutError:
            proc.kill()
            await proc.wait()

    async def __aenter__(self) -> "WorkerProcess":
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()


def pad_to_profile(model: Any, profile: Any) -> Any:
    """A copy of `model` (a MultiExitNet) whose stages, exit heads and final head each take
    at least the device profile's time for the batch they run on: this machine, faster
    than the device, waits out the difference, so a live run behaves like the device."""
    import copy

    import torch

    class Padded(torch.nn.Module):
        def __init__(self, inner: torch.nn.Module, kind: str, index: int = 0) -> None:
            super().__init__()
            self.inner, self.kind, self.index = inner, kind, index  # "stage", "exit" (after stage index) or "head"

        def target_ms(self, batch: int) -> float:
            t = profile.at(batch)
            return float(t.head_ms if self.kind == "head" else t.exit_ms[self.index] if self.kind == "exit"
                         else t.stage_ms[self.index])

        def forward(self, *args: Any) -> Any:
            start = time.perf_counter()
            out = self.inner(*args)
            left = self.target_ms(int(args[0].shape[0])) / 1e3 - (time.perf_counter() - start)
            if left > 0:
                time.sleep(left)
            return out

    padded = copy.deepcopy(model)
    for i in range(padded.num_stages):
        padded.stages[i] = Padded(padded.stages[i], "stage", i)
    for k in list(padded.exits):
        padded.exits[k] = Padded(padded.exits[k], "exit", int(k))
    padded.head = Padded(padded.head, "head")
    return padded


def run_local(runner: Any, x: Any, *, exits: bool = True) -> list[Record]:
    """A runner (`ExitRunner` on the whole network) on each input alone, on this device;
    without `exits`, every row goes straight to the final head (no exit head runs)."""
    out = []
    for i in range(len(x)):
        t0 = time.perf_counter()
        state = runner.initial_state(1)
        if not exits:
            state.next_exit[:] = runner.num_exits - 1
        merged = runner.run(x[i: i + 1], state=state).merged()
        ms = (time.perf_counter() - t0) * 1e3
        out.append(Record(label=int(merged.probs[0].argmax()), latency_ms=ms, on_device=True))
    return out


async def run_edge_agent(bundle: Any, address: str, images: np.ndarray, *, config: Any = None) -> list[Record]:
    """The edge agent on `bundle` (a path or a loaded edge bundle), one input per call,
    offloading to `address`."""
    from splitexit.edge import AgentConfig, EdgeAgent, GrpcTransport

    out = []
    async with EdgeAgent(bundle, GrpcTransport(address), config=config or AgentConfig()) as agent:
        await agent.infer(images[:1])  # connect and warm up, not timed
        for i in range(len(images)):
            t0 = time.perf_counter()
            answer = (await agent.infer(images[i: i + 1]))[0]
            out.append(Record(label=answer.label, latency_ms=(time.perf_counter() - t0) * 1e3,
                              on_device=answer.route == "edge", degraded=answer.degraded))
    return out


async def run_cloud_only(bundle: Any, address: str, images: np.ndarray, *, quality: int = 90,
                         timeout_s: float = 10.0) -> list[Record]:
    """Each input as a JPEG (as a device would send it) in a raw-input request; the worker
    runs the whole network with no early exit (the rows start bound for the final head)."""
    from splitexit import wire
    from splitexit.edge import GrpcTransport
    from splitexit.runtime import ExitRunner

    runner = ExitRunner(bundle.model, bundle.policy, num_classes=len(bundle.classes), network=bundle.network)
    final = len(bundle.manifest.exits) - 1
    transport = GrpcTransport(address)
    out = []
    try:
        async def one(i: int) -> Record:
            t0 = time.perf_counter()
            items = wire.encode_raw_input(images[i: i + 1], "jpeg", quality=quality)  # the device's encoding
            state = runner.initial_state(1)
            state.next_exit[:] = final
            request = wire.build_request(bundle, None, state, [str(i)], raw_items=items, raw_format="jpeg")
            try:
                response = await transport.infer(request, timeout_s)
                label, degraded = wire.parse_response(response, request).rows[0].label, False
            except Exception:  # noqa: BLE001 - unanswered: counted as a wrong, degraded answer
                label, degraded = -1, True
            return Record(label=label, latency_ms=(time.perf_counter() - t0) * 1e3, on_device=False, degraded=degraded)

        await one(0)  # connect, not timed
        for i in range(len(images)):
            out.append(await one(i))
    finally:
        await transport.close()
    return out
