"""`bench faults`: an edge agent keeps answering while its worker dies, comes back, or is
cut off; nothing is lost, and answers come from the cloud again soon after the worker
returns (issue 21).

Each scenario runs a real worker process (`splitexit cloud serve`, a fixed port on
127.0.0.1) and an edge agent that sends a batch every `--interval-ms` through a link
emulator (`splitexit.sim.link`), and counts every input sent and answered:
- `outage_Ns`: the worker is killed (SIGKILL) and restarted on the same port N seconds
  later; `recovered_s` is the time from the new worker's first "serving" line to the
  agent's first answer from the cloud.
- `partition_Ns`: the link black-holes everything for N seconds (the worker stays up, the
  agent's requests hang); `recovered_s` is from the partition's end to the first cloud
  answer.
- `edge_run_sigterm` / `edge_run_kill9`: `splitexit edge run` on a file of inputs against
  the worker is interrupted (SIGTERM, SIGKILL) once a quarter of its answers are written,
  then run again with the same command: every input must be answered exactly once, the
  rerun computing only what the first run had not written (`kept`, `recomputed`).
- `spool_bitflip`: every offload fails (no worker) and is spooled; one bit in the middle
  of the spool log is flipped; `splitexit edge refine` against the worker must refine
  every request but the damaged one and say how many records it could not read
  (`lost` here counts rows whose spool record was damaged: they are reported, not silent).
The network is the recipe's edge network (the embedded digits with --quick); faults do
not depend on its weights.
- `overload`: open-loop load at 3x and 8x the worker's capacity (`sim/bench/overload.py`).
`--scenarios` picks groups of these.
"""

from __future__ import annotations

import argparse
import asyncio
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from splitexit.cli import CliError
from splitexit.sim.bench.common import BenchContext, free_port, log

HELP = "nothing lost and fast recovery through worker outages, partitions, interrupted runs and overload"
SCENARIO_GROUPS = ("outages", "partition", "interrupted", "spool", "overload")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--outages", default="", help="comma-separated outage lengths in s (default 15,150,300; "
                                                      "2,5 with --quick)")
    parser.add_argument("--partition", type=float, default=0.0, help="partition length in s (default 15; 3 with --quick)")
    parser.add_argument("--interval-ms", type=float, default=200.0, help="time between the agent's batches")
    parser.add_argument("--rows", type=int, default=4, help="inputs per batch")
    parser.add_argument("--scenarios", default=",".join(SCENARIO_GROUPS),
                        help="comma-separated groups to run (default: all: %(default)s)")
    parser.add_argument("--overload", default="3,8", help="comma-separated load factors, times the worker's capacity")
    parser.add_argument("--overload-rows", type=int, default=16,
                        help="rows per request under overload (default: %(default)s: an edge batch's offloads; "
                             "Python load generators on the worker's own two cores cannot offer 8x in smaller ones)")
    parser.add_argument("--overload-worker-threads", type=int, default=1,
                        help="the overloaded worker's --threads (default: %(default)s: on two cores shared with the "
                             "clients, a second torch thread takes the core the event loop needs to refuse fast)")
    parser.add_argument("--overload-worker-args", default="",
                        help="more `cloud serve` options for the overloaded worker, e.g. \"--max-queue-wait-ms 100\"")
    parser.add_argument("--overload-client-nice", type=int, default=19,
                        help="niceness added to the overload's client processes (default: %(default)s)")
    parser.add_argument("--overload-seconds", type=float, default=0.0,
                        help="measured seconds per load level (default 10; 2 with --quick)")


class _Feeder:
    """Sends a batch every interval through the agent and counts what comes back."""

    def __init__(self, agent: Any, images: np.ndarray, rows: int, interval_s: float) -> None:
        self.agent, self.images, self.rows, self.interval_s = agent, images, rows, interval_s
        self.sent = self.answered = self.degraded = 0
        self.in_flight = 0  # rows of the batch awaiting its answers
        self.cloud_times: list[float] = []  # monotonic times of answers from the cloud
        self._task: asyncio.Task[None] | None = None

    async def _loop(self) -> None:
        i = 0
        while True:
            batch = self.images[(i * self.rows) % len(self.images):][: self.rows]
            i += 1
            self.sent += len(batch)
            self.in_flight = len(batch)
            answers = await self.agent.infer(batch)
            self.in_flight = 0
            now = time.monotonic()
            self.answered += len(answers)
            self.degraded += sum(a.degraded for a in answers)
            if any(a.route == "cloud" for a in answers):
                self.cloud_times.append(now)
            await asyncio.sleep(self.interval_s)

    def start(self) -> None:
        self._task = asyncio.ensure_future(self._loop())

    async def stop(self) -> None:
        assert self._task is not None
        self._task.cancel()
        try:
            await self._task
        except asyncio.CancelledError:
            pass

    def first_cloud_after(self, t: float) -> float | None:
        return next((c for c in self.cloud_times if c >= t), None)

    def counts(self) -> dict[str, int]:
        """After `stop`: the batch it cancelled was never fully sent, and is not counted."""
        sent = self.sent - self.in_flight
        return {"sent": sent, "answered": self.answered, "lost": sent - self.answered, "degraded": self.degraded}


async def _scenario(bundle: Path, images: np.ndarray, *, kind: str, seconds: float, rows: int,
                    interval_s: float) -> dict[str, Any]:
    from splitexit.edge import AgentConfig, EdgeAgent, GrpcTransport
    from splitexit.sim.link import LinkProfile, LinkProxy
    from splitexit.sim.live import WorkerProcess

    port = free_port()
    worker = WorkerProcess([bundle], port=port)
    await worker.start()
    try:
        async with LinkProxy(("127.0.0.1", port), LinkProfile()) as proxy:
            config = AgentConfig(request_timeout_ms=1000)
            async with EdgeAgent(bundle, GrpcTransport(proxy.address), config=config) as agent:
                feeder = _Feeder(agent, images, rows, interval_s)
                feeder.start()
                await asyncio.sleep(2.0)  # steady state first
                if not feeder.cloud_times:
                    raise RuntimeError("no answer came from the cloud before the fault: nothing to recover")
                if kind == "outage":
                    await worker.kill()
                    await asyncio.sleep(seconds)
                    await worker.start()
                    back = time.monotonic()  # its "serving" line has been read
                else:
                    proxy.outage("blackhole", seconds)
                    await asyncio.sleep(seconds)
                    back = time.monotonic()
                deadline = back + 60.0
                while feeder.first_cloud_after(back) is None and time.monotonic() < deadline:
                    await asyncio.sleep(0.05)
                await feeder.stop()
                first = feeder.first_cloud_after(back)
                return {**feeder.counts(), "seconds": seconds,
                        "recovered_s": None if first is None else round(first - back, 3)}
    finally:
        await worker.stop()


def _cli(*argv: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "splitexit.cli", *argv], capture_output=True, text=True,
                          timeout=timeout)


def _answers(path: Path) -> list[dict[str, Any]]:
    import json

    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


async def _interrupted_run(bundle: Path, images: np.ndarray, workdir: Path, signal_name: str) -> dict[str, Any]:
    """`edge run` cut by a signal once a quarter of its answers are on disk, then rerun."""
    import signal

    from splitexit.sim.live import WorkerProcess

    workdir.mkdir(parents=True, exist_ok=True)
    inputs, out = workdir / "inputs.npy", workdir / "answers.jsonl"
    np.save(inputs, images)
    worker = WorkerProcess([bundle])
    await worker.start()
    try:
        argv = ["edge", "run", str(bundle), "--input", str(inputs), "--worker", worker.address, "--out", str(out),
                "--batch-size", "8"]
        proc = subprocess.Popen([sys.executable, "-m", "splitexit.cli", *argv], stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE, text=True)
        partial = out.with_name(out.name + ".partial")
        deadline = time.monotonic() + 300
        while len(_answers(partial)) < len(images) // 4 and proc.poll() is None and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        proc.send_signal(signal.SIGTERM if signal_name == "sigterm" else signal.SIGKILL)
        _, err = proc.communicate(timeout=60)
        kept = len(_answers(partial))
        rerun = await asyncio.to_thread(_cli, *argv)
        if rerun.returncode != 0:
            raise RuntimeError(f"the rerun failed: {rerun.stderr[-1000:]}")
    finally:
        await worker.stop()
    answers = _answers(out)
    ids = [a["sample_id"] for a in answers]
    answered = len(set(ids))
    # no recovery time here: the worker never went away
    return {"sent": len(images), "answered": answered, "lost": len(images) - answered,
            "degraded": sum(a["route"] == "degraded" for a in answers), "exit_code": proc.returncode,
            "kept": kept, "recomputed": len(images) - kept, "duplicates": len(ids) - answered}


async def _spool_bitflip(bundle: Path, images: np.ndarray, workdir: Path) -> dict[str, Any]:
    """Everything spooled (no worker), one bit flipped mid-log, then refined."""
    import re

    from splitexit.edge.spool import LOG
    from splitexit.sim.live import WorkerProcess

    workdir.mkdir(parents=True, exist_ok=True)
    inputs, spool = workdir / "inputs.npy", workdir / "spool"
    np.save(inputs, images)
    first = await asyncio.to_thread(_cli, "edge", "run", str(bundle), "--input", str(inputs), "--worker",
                                    f"127.0.0.1:{free_port()}", "--spool", str(spool), "--out",
                                    str(workdir / "degraded.jsonl"), "--batch-size", "8", "--request-timeout-ms", "300")
    if first.returncode != 0:
        raise RuntimeError(f"the spooling run failed: {first.stderr[-1000:]}")
    spooled = sum(bool(a.get("spooled")) for a in _answers(workdir / "degraded.jsonl"))
    log_file = spool / LOG
    data = bytearray(log_file.read_bytes())
    data[len(data) // 2] ^= 0x10  # one bit, in the middle of some record
    log_file.write_bytes(bytes(data))
    worker = WorkerProcess([bundle])
    await worker.start()
    try:
        refine = await asyncio.to_thread(_cli, "edge", "refine", str(bundle), "--spool", str(spool), "--worker",
                                         worker.address, "--out", str(workdir / "refined.jsonl"))
    finally:
        await worker.stop()
    if refine.returncode != 0:
        raise RuntimeError(f"refine failed: {refine.stderr[-1000:]}")
    answers = _answers(workdir / "refined.jsonl")
    refined = len({a["sample_id"] for a in answers})
    damaged = re.search(r"(\d+) damaged spool records", refine.stderr)
    return {"sent": spooled, "answered": refined, "lost": spooled - refined,
            "degraded": sum(a["route"] == "degraded" for a in answers),
            "damaged_records": int(damaged.group(1)) if damaged else 0, "reported": damaged is not None}


def _overload(ctx: BenchContext, args: argparse.Namespace) -> dict[str, Any]:
    """The reference tail (the serve bench's: the last two ResNet stages and the final head)
    served alone under open-loop load at each factor of its capacity."""
    from splitexit.bundle import export_bundle, load_bundle
    from splitexit.policies import MaxProb
    from splitexit.sim.bench.overload import OverloadSettings, measure_overload
    from splitexit.sim.bench.serve import build_requests, to_final_head
    from splitexit.sim.bench.serving import SplitBundle, last_stages_split, pending_rows

    trained = ctx.edge()
    split = last_stages_split(trained)
    policy = MaxProb(2.0, fallback=False)  # every row crosses
    path = export_bundle(ctx.out / "faults" / "overload-bundle", trained.model.eval(), trained.meta, split=split,
                         policy=policy, input_shape=ctx.input_shape, name=trained.meta.model.arch)
    bundle = SplitBundle(path, trained, policy, split, {})
    pending = to_final_head(pending_rows(bundle, ctx.dataset.test.subset(np.arange(min(512, len(ctx.dataset.test))))), bundle)
    s = OverloadSettings(factors=tuple(float(f) for f in args.overload.split(",") if f.strip()),
                         duration_s=args.overload_seconds or (2.0 if ctx.quick else 10.0),
                         warmup_s=0.5 if ctx.quick else 1.0, rows=args.overload_rows,
                         worker_threads=args.overload_worker_threads, client_nice=args.overload_client_nice,
                         worker_args=tuple(shlex.split(args.overload_worker_args)))
    requests = build_requests(load_bundle(path, "edge"), pending, rows=s.rows, count=128, prefix="o")
    result = measure_overload(path, [r.SerializeToString() for r in requests], s)
    return {"split": split, **result}


def run(ctx: BenchContext, args: argparse.Namespace) -> dict:
    from splitexit.bundle import export_bundle
    from splitexit.policies import MaxProb
    from splitexit.sim.bench.serving import default_split

    groups = [g.strip() for g in args.scenarios.split(",") if g.strip()]
    unknown = sorted(set(groups) - set(SCENARIO_GROUPS))
    if unknown:
        raise CliError(f"--scenarios: unknown {', '.join(unknown)} (choose from {', '.join(SCENARIO_GROUPS)})")
    outages = [float(s) for s in (args.outages or ("2,5" if ctx.quick else "15,150,300")).split(",") if s.strip()]
    partition = args.partition or (3.0 if ctx.quick else 15.0)
    # no early exit: every row crosses the split, so the cloud's absence and return show at once
    trained = ctx.edge()
    bundle = export_bundle(ctx.out / "faults" / "bundle", trained.model.eval(), trained.meta,
                           split=default_split(trained), policy=MaxProb(2.0, fallback=False),
                           input_shape=ctx.input_shape, name=trained.meta.model.arch)
    images = ctx.dataset.test.images[:256]
    scenarios: dict[str, Any] = {}
    plan = ([("outage", s) for s in outages] if "outages" in groups else []) + \
        ([("partition", partition)] if "partition" in groups else [])
    for kind, seconds in plan:
        name = f"{kind}_{seconds:g}s"
        log(f"{name}: the agent sends {args.rows} inputs every {args.interval_ms:g} ms; "
            f"{'the worker is killed and restarted' if kind == 'outage' else 'the link black-holes'} for {seconds:g} s")
        result = asyncio.run(_scenario(bundle, images, kind=kind, seconds=seconds, rows=args.rows,
                                       interval_s=args.interval_ms / 1e3))
        log(f"{name}: sent {result['sent']}, answered {result['answered']}, lost {result['lost']}, "
            f"degraded {result['degraded']}, cloud answers again {result['recovered_s']} s after the worker was back")
        scenarios[name] = result
    # recovery is about outages and partitions (the only scenarios measuring it)
    recovered = [s["recovered_s"] for s in scenarios.values()]
    worst = None if not recovered or any(r is None for r in recovered) else max(recovered)
    interrupted = images[:64] if ctx.quick else ctx.dataset.test.images[:2000]
    for sig in ("sigterm", "kill9") if "interrupted" in groups else ():
        name = f"edge_run_{sig}"
        log(f"{name}: `edge run` on {len(interrupted)} inputs, cut by {sig} a quarter of the way, then rerun")
        result = asyncio.run(_interrupted_run(bundle, interrupted, ctx.out / "faults" / name, sig))
        log(f"{name}: {result['kept']} answers kept, {result['recomputed']} computed by the rerun, "
            f"{result['answered']} of {result['sent']} answered, {result['duplicates']} twice")
        scenarios[name] = result
    # rows in a damaged spool record are known and reported (its own scenario), not lost unseen
    totals = {k: sum(s[k] for s in scenarios.values()) for k in ("sent", "answered", "lost", "degraded")}
    out: dict[str, Any] = {**totals, "recovered_s": worst, "scenarios": scenarios}
    if "spool" in groups:
        log("spool_bitflip: every offload spooled (no worker), one bit flipped mid-log, then `edge refine`")
        result = asyncio.run(_spool_bitflip(bundle, images[:64] if ctx.quick else images, ctx.out / "faults" / "spool"))
        log(f"spool_bitflip: {result['sent']} rows spooled, {result['answered']} refined, {result['lost']} in "
            f"{result['damaged_records']} damaged record(s), reported: {result['reported']}")
        scenarios["spool_bitflip"] = result
        out["spool_damage_lost_rows"] = result["lost"]
    if "overload" in groups:
        out["overload"] = _overload(ctx, args)
    return out
