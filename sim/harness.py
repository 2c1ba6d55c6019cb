"""`splitexit sim live SCENARIO.toml`: the live harness. Real cloud worker processes and N
real edge agents, each agent through links of its own (the user-space link emulator, one
per agent and worker), fed test inputs by an arrival process while a timeline of events
runs: a bandwidth change, a switch to a recorded trace, an outage, a worker killed and
started again. Each strategy runs the same scenario in turn:

- `fixed`: the cut the offline planner chooses for the scenario's first link, kept;
- `adaptive`: the same start, re-planned online by each agent (`splitexit.edge.replan`);
- `edge_exits`: every stage on the device with the exits (no link).

The network is the recipe's trained edge network (the digits' `quick` or CIFAR-10's
`reference`, trained once and cached), exported with every exit's stage and the last
stage as split points and a max-prob exit policy. The device is this machine padded to a
device class's profile (`splitexit.profile`), fixed before the run; the workers are this
machine (`--threads` each).

The report: per strategy, the inputs sent and answered (exactly once each: the harness
counts), accuracy, mean/p95/p99 latency, the share answered on the device, degraded
answers by reason, bytes sent up per input (the link emulator's count), and the splits
used; plots of the latency CDF per strategy, accuracy against mean latency, the p95 over
time with the events, the adaptive agents' split and link estimate over time, the exit
histogram and the bytes sent.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np

__all__ = ["LiveScenario", "export_planned", "load_live_scenario", "prepare", "run_live_scenario"]

STRATEGIES = ("fixed", "adaptive", "edge_exits")
EVENT_KINDS = ("link", "outage", "kill_worker", "restart_worker")
TRACES = Path("../shared/data/cellular-traces.tar.gz")


# --- the scenario ------------------------------------------------------------------------
@dataclass(frozen=True, kw_only=True)
class ModelPart:
    # "demo": `splitexit demo`'s digits network (what `make run` trains); "quick": the
    # benchmarks' quick digits one; "reference": CIFAR-10's edge network (../shared/data)
    recipe: str = "demo"
    threshold: float = 0.8  # the max-prob exit policy's
    codec: str = "fp16"

    def __post_init__(self) -> None:
        if self.recipe not in ("demo", "quick", "reference"):
            raise ValueError(f"[model] recipe must be demo, quick or reference, got {self.recipe!r}")
        if not 0 < self.threshold <= 1:
            raise ValueError("[model] threshold must be in (0, 1]")


@dataclass(frozen=True, kw_only=True)
class DevicePart:
    device_class: str = "rpi4"  # `class` in TOML: a device class of splitexit.profile
    profile: str = ""  # or a device profile file (`splitexit profile`)


@dataclass(frozen=True, kw_only=True)
class AgentsPart:
    count: int = 2
    arrival: str = "poisson"  # "poisson", "periodic" or "closed" (the next input when the last is answered)
    rate_hz: float = 5.0  # inputs per second per agent (poisson, periodic)
    strategies: tuple[str, ...] = ("fixed", "adaptive")

    def __post_init__(self) -> None:
        if self.count < 1 or self.rate_hz <= 0:
            raise ValueError("[agents] count must be >= 1 and rate_hz > 0")
        if self.arrival not in ("poisson", "periodic", "closed"):
            raise ValueError(f"[agents] arrival must be poisson, periodic or closed, got {self.arrival!r}")
        bad = [s for s in self.strategies if s not in STRATEGIES]
        if bad or not self.strategies:
            raise ValueError(f"[agents] unknown strategy {bad[0] if bad else None!r}; choose from {', '.join(STRATEGIES)}")


@dataclass(frozen=True, kw_only=True)
class LinkPart:
    """The uplink and the RTT (half each way); a trace replaces up_mbps."""

    up_mbps: float | None = 20.0
    rtt_ms: float = 20.0
    jitter_ms: float = 0.0
    loss: float = 0.0
    trace: str = ""  # a Mahimahi file, or NAME of ../shared/data/cellular-traces.tar.gz

    def __post_init__(self) -> None:
        if self.up_mbps is not None and self.up_mbps <= 0:
            raise ValueError("[link] up_mbps must be > 0")
        if self.rtt_ms < 0 or self.jitter_ms < 0 or not 0 <= self.loss < 1:
            raise ValueError("[link] rtt_ms and jitter_ms must be >= 0, loss in [0, 1)")


@dataclass(frozen=True, kw_only=True)
class WorkersPart:
    count: int = 1
    threads: int = 1

    def __post_init__(self) -> None:
        if self.count < 1 or self.threads < 1:
            raise ValueError("[workers] count and threads must be >= 1")


@dataclass(frozen=True, kw_only=True)
class Event:
    """One entry of [[events]]: at `at_s`, `kind` happens.
    link: the uplink becomes `up_mbps` (or `trace`), the RTT `rtt_ms` if given;
    outage: every link `mode` (blackhole, refuse, reset) for `duration_s`;
    kill_worker / restart_worker: worker `worker` (0-based) is killed (SIGKILL) / started again."""

    at_s: float
    kind: str
    up_mbps: float | None = None
    rtt_ms: float | None = None
    trace: str = ""
    mode: str = "blackhole"
    duration_s: float = 0.0
    worker: int = 0

    def __post_init__(self) -> None:
        if self.at_s < 0:
            raise ValueError("[[events]] at_s must be >= 0")
        if self.kind not in EVENT_KINDS:
            raise ValueError(f"[[events]] unknown kind {self.kind!r}; choose from {', '.join(EVENT_KINDS)}")
        if self.kind == "link" and self.up_mbps is None and not self.trace and self.rtt_ms is None:
            raise ValueError("[[events]] a link event needs up_mbps, trace or rtt_ms")
        if self.kind == "outage" and (self.duration_s <= 0 or self.mode not in ("blackhole", "refuse", "reset")):
            raise ValueError("[[events]] an outage needs duration_s > 0 and mode blackhole, refuse or reset")

    def describe(self) -> str:
        if self.kind == "link":
            what = f"trace {self.trace}" if self.trace else f"{self.up_mbps} Mbit/s" if self.up_mbps else ""
            return f"link -> {what}{f' RTT {self.rtt_ms} ms' if self.rtt_ms is not None else ''}".strip()
        if self.kind == "outage":
            return f"outage ({self.mode}) {self.duration_s:g} s"
        return f"{self.kind.replace('_', ' ')} {self.worker}"


@dataclass(frozen=True, kw_only=True)
class LiveScenario:
    name: str = "live"
    seed: int = 0
    duration_s: float = 20.0
    model: ModelPart = field(default_factory=ModelPart)
    device: DevicePart = field(default_factory=DevicePart)
    agents: AgentsPart = field(default_factory=AgentsPart)
    link: LinkPart = field(default_factory=LinkPart)
    workers: WorkersPart = field(default_factory=WorkersPart)
    events: tuple[Event, ...] = ()

    def __post_init__(self) -> None:
        if self.duration_s <= 0:
            raise ValueError("duration_s must be > 0")
        for e in self.events:
            if e.kind in ("kill_worker", "restart_worker") and not 0 <= e.worker < self.workers.count:
                raise ValueError(f"[[events]] worker {e.worker}: the scenario has {self.workers.count} worker(s)")

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "LiveScenario":
        parts: dict[str, Any] = {"model": ModelPart, "device": DevicePart, "agents": AgentsPart, "link": LinkPart,
                                 "workers": WorkersPart}
        known = {"name", "seed", "duration_s", "events", *parts}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown scenario keys {unknown}; known: {', '.join(sorted(known))}")
        built: dict[str, Any] = {}
        for key, kind in parts.items():
            table = dict(data.get(key, {}))
            if key == "device" and "class" in table:
                table["device_class"] = table.pop("class")
            if key == "agents" and "strategies" in table:
                table["strategies"] = tuple(table["strategies"])
            built[key] = _build(kind, table, f"[{key}]")
        events = tuple(_build(Event, dict(e), "[[events]]") for e in data.get("events", ()))
        return cls(name=str(data.get("name", "live")), seed=int(data.get("seed", 0)),
                   duration_s=float(data.get("duration_s", 20.0)), events=tuple(sorted(events, key=lambda e: e.at_s)),
                   **built)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _build(kind: Any, table: dict[str, Any], where: str) -> Any:
    allowed = {f.name for f in fields(kind)}
    extra = sorted(set(table) - allowed)
    if extra:
        raise ValueError(f"{where}: unknown keys {extra}; known: {', '.join(sorted(allowed))}")
    return kind(**table)


def load_live_scenario(path: str | Path) -> LiveScenario:
    """A live scenario TOML file; ValueError naming the file and what is wrong."""
    from splitexit.sim.virtual import read_scenario_file

    return read_scenario_file(path, LiveScenario.from_dict)


# --- what every strategy shares -----------------------------------------------------------
@dataclass
class Prepared:
    """The scenario's network, bundle, device and inputs, made once for every strategy."""

    bundle: Path
    edge: Any  # the loaded edge Bundle (torch)
    device: Any  # DeviceProfile of the device class
    worker_profile: Any  # this machine's profile (the workers' times)
    share: tuple[float, ...]  # each exit's share of answers on validation data
    start_split: int  # the offline plan for the first link
    planned: list[Any]  # its ranked candidates
    images: np.ndarray
    labels: np.ndarray
    arch: str


def prepare(scenario: LiveScenario, cache_dir: Path, out: Path, *, log: Callable[[str], None] = print) -> Prepared:
    """Train (cached) or load the recipe's edge network, profile this machine, derive the
    device, export the bundle of every split, and plan the first cut offline."""
    import torch

    from splitexit.bundle import load_bundle
    from splitexit.cost import cost_model
    from splitexit.data import Normalize
    from splitexit.edge.replan import ReplanConfig
    from splitexit.evaluate import cached_exit_outputs
    from splitexit.plan import LinkEstimate
    from splitexit.policies import MaxProb
    from splitexit.profile import device_class, load_profile, measure_profile
    from splitexit.reference import recipe
    from splitexit.sim.demo import demo_network
    from splitexit.sim.planning import exit_behaviour

    torch.set_num_threads(1)
    if scenario.model.recipe == "demo":
        model, meta, dataset = demo_network(cache_dir)
    else:
        rec = recipe(scenario.model.recipe == "quick")
        if scenario.model.recipe == "reference" and not Path(rec.data).exists():
            raise ValueError(f"reference data not found at {rec.data}")
        dataset = rec.load_data(cache_dir)
        trained = rec.train_edge(dataset, cache_dir)
        model, meta = trained.model.eval(), trained.meta
    log(f"edge network: {meta.model.arch} on {dataset.name} ({scenario.model.recipe} recipe, trained once, cached)")
    shape = (dataset.in_chans, dataset.image_size, dataset.image_size)
    measured = measure_profile(model, shape, name="this machine", arch=meta.model.arch, threads=1, repeats=30)
    device = (load_profile(scenario.device.profile) if scenario.device.profile
              else device_class(measured, scenario.device.device_class))
    val = cached_exit_outputs(model, dataset.val, Normalize(meta.mean, meta.std), cache_dir=cache_dir, tag="val")
    policy = MaxProb(scenario.model.threshold, fallback=False)
    share = exit_behaviour(policy, "validation", val, cost_model(model, shape).exit_ladder()).share
    replan = ReplanConfig(device=device.at(1), cloud=measured.at(1), share=share)
    up = scenario.link.up_mbps if not scenario.link.trace else _trace(scenario.link.trace).mean_mbps
    path, (planned,) = export_planned(out / "bundle", model, meta, shape, policy, scenario.model.codec, replan,
                                      [LinkEstimate(up_mbps=up, rtt_ms=scenario.link.rtt_ms)])
    start = planned[0].split
    assert start is not None
    log("the offline plan for the first link: " + ", ".join(f"split {c.split} {c.expected_ms:.1f} ms"
                                                            for c in planned))
    test = dataset.test
    return Prepared(bundle=path, edge=load_bundle(path, "edge"), device=device, worker_profile=measured,
                    share=share, start_split=start, planned=planned, images=test.images, labels=test.labels,
                    arch=meta.model.arch)


def export_planned(out: Path, model: Any, meta: Any, shape: tuple[int, int, int], policy: Any, codec: str,
                   replan: Any, links: Sequence[Any]) -> tuple[Path, list[list[Any]]]:
    """The network exported with every exit's stage and the last stage as split points,
    cut first where the offline plan for `links[0]` says (when that is the device, at the
    deepest cut that crosses the link: an agent with the plan's link as its prior moves to
    the device at its first batch); and the plan (every split,
    ranked by `SplitChooser` with `replan`'s profiles and shares) for each of `links`."""
    from splitexit.bundle import export_bundle
    from splitexit.edge.replan import SplitChooser
    from splitexit.manifest import read_manifest

    splits = sorted({*model.exit_points, model.num_stages - 1})

    def export(split: int) -> Path:
        return export_bundle(out, model, meta, split=split, splits=splits, policy=policy, input_shape=shape,
                             codec=codec, name=meta.model.arch)

    path = export(splits[0])
    chooser = SplitChooser(read_manifest(path), replan, codec)
    planned = [chooser.candidates(link) for link in links]
    start = planned[0][0].split
    assert start is not None
    if start == splits[-1]:  # on the device: a bundle's own split must cross the link; the deepest that does
        start = splits[-2]
    return (path if start == splits[0] else export(start)), planned


def _trace(name: str) -> Any:
    from splitexit.sim.link import load_trace

    if Path(name).is_file():
        return load_trace(name)
    return load_trace(TRACES, name)


def _direction(link: LinkPart, *, up_mbps: float | None = None, trace: str = "", rtt_ms: float | None = None) -> Any:
    from splitexit.sim.link import Direction

    rtt = link.rtt_ms if rtt_ms is None else rtt_ms
    # a bucket of one packet: a link's rate holds from the first byte (no 16 KB head start)
    common = {"delay_ms": rtt / 2, "jitter_ms": link.jitter_ms / 2, "loss": link.loss, "burst_bytes": 1500}
    if trace:
        return Direction(trace=_trace(trace), **common)  # type: ignore[arg-type]
    return Direction(rate_mbps=up_mbps, **common)  # type: ignore[arg-type]


# --- one strategy's run -------------------------------------------------------------------
@dataclass
class Answered:
    agent: int
    seq: int  # the agent's n-th input
    t: float  # seconds since the start, when sent
    ms: float
    route: str
    reason: str | None
    exit: int
    correct: bool


async def run_strategy(scenario: LiveScenario, prep: Prepared, strategy: str, out: Path,
                       log: Callable[[str], None] = print) -> dict[str, Any]:
    """One strategy through the scenario: every agent, link and worker, and the timeline."""
    from splitexit.edge import AgentConfig, EdgeAgent, GrpcTransport
    from splitexit.edge.replan import ReplanConfig
    from splitexit.edge.transport import WorkerPool
    from splitexit.sim.bench.common import free_port
    from splitexit.sim.link import Direction, LinkProfile, LinkProxy
    from splitexit.sim.live import WorkerProcess, pad_to_profile

    link = scenario.link
    up = _direction(link, up_mbps=link.up_mbps, trace=link.trace)
    down = Direction(delay_ms=link.rtt_ms / 2)
    workers = [WorkerProcess([prep.bundle], threads=scenario.workers.threads, port=free_port())
               for _ in range(scenario.workers.count)]
    await asyncio.gather(*(w.start() for w in workers))
    proxies: list[list[Any]] = []
    agents: list[Any] = []
    try:
        replan = ReplanConfig(device=prep.device.at(1), cloud=prep.worker_profile.at(1), share=prep.share)
        config = AgentConfig(codec=scenario.model.codec, replan=replan if strategy == "adaptive" else None,
                             request_timeout_ms=2000.0)
        for a in range(scenario.agents.count):
            mine = []
            for w in workers:
                host, port = w.address.rsplit(":", 1)
                proxy = LinkProxy((host, int(port)), LinkProfile(up=up, down=down))
                await proxy.start()
                mine.append(proxy)
            proxies.append(mine)
            pool = WorkerPool(bundle_hash=prep.edge.hash, model=prep.edge.name, split=prep.edge.split,
                              codec=scenario.model.codec, connect=lambda address: GrpcTransport(address))
            for proxy in mine:
                pool.add(proxy.address)
            await pool.probe(force=True)
            edge = replace(prep.edge, model=pad_to_profile(prep.edge.model, prep.device))  # a device each
            agent = EdgeAgent(edge, pool, config=config, trace=out / f"{strategy}-agent{a}.msgpack")
            agent.split = prep.edge.manifest.last_stage if strategy == "edge_exits" else prep.start_split
            await agent.infer(prep.images[:1])  # warm up, not counted
            agents.append(agent)
        answers: list[Answered] = []
        sent = [0] * len(agents)
        t0 = time.monotonic()
        tasks = [asyncio.ensure_future(_feed(scenario, prep, i, agent, t0, answers, sent))
                 for i, agent in enumerate(agents)]
        timeline = asyncio.ensure_future(_timeline(scenario, workers, proxies, t0, log))
        progress = asyncio.ensure_future(_progress(strategy, scenario, answers, sent, t0, log))
        await asyncio.gather(*tasks)
        timeline.cancel()
        progress.cancel()
        await asyncio.gather(timeline, progress, return_exceptions=True)
        bytes_up = sum(p.counters.bytes_up for mine in proxies for p in mine)
        history = [[{"t": round(e.t - t0, 3), "split": e.split, "up_mbps": e.up_mbps}
                    for e in agent.chooser.history] if agent.chooser is not None else [] for agent in agents]
    finally:
        for agent in agents:
            await agent.close()
        for mine in proxies:
            for proxy in mine:
                await proxy.close()
        await asyncio.gather(*(w.stop() for w in workers))
    return _report(strategy, scenario, answers, sum(sent), bytes_up, history, out)


async def _feed(scenario: LiveScenario, prep: Prepared, a: int, agent: Any, t0: float, answers: list[Answered],
                sent: list[int]) -> None:
    """One agent's inputs by the scenario's arrival process until the end; open loop
    (poisson, periodic) sends without waiting for answers."""
    rng = np.random.default_rng(scenario.seed * 1000 + a)
    n = len(prep.images)
    offset = a * 997  # each agent its own stretch of the test set
    in_flight: set[asyncio.Task[None]] = set()

    async def one(i: int, t: float) -> None:
        index = (offset + i) % n
        start = time.monotonic()
        answer = (await agent.infer(prep.images[index: index + 1], [f"{a}:{i}"]))[0]
        answers.append(Answered(agent=a, seq=i, t=t, ms=(time.monotonic() - start) * 1e3, route=answer.route,
                                reason=answer.reason, exit=answer.exit, correct=answer.label == int(prep.labels[index])))

    i, due = 0, rng.uniform(0, 1 / scenario.agents.rate_hz)
    while True:
        now = time.monotonic() - t0
        if scenario.agents.arrival == "closed":
            if now >= scenario.duration_s:
                break
            sent[a] += 1
            await one(i, now)
        else:
            if due >= scenario.duration_s:
                break
            if due > now:
                await asyncio.sleep(due - now)
            sent[a] += 1
            task = asyncio.ensure_future(one(i, due))
            in_flight.add(task)
            task.add_done_callback(in_flight.discard)
            gap = 1 / scenario.agents.rate_hz
            due += rng.exponential(gap) if scenario.agents.arrival == "poisson" else gap
        i += 1
    await asyncio.gather(*in_flight)


async def _timeline(scenario: LiveScenario, workers: list[Any], proxies: list[list[Any]], t0: float,
                    log: Callable[[str], None]) -> None:
    for event in scenario.events:
        wait = t0 + event.at_s - time.monotonic()
        if wait > 0:
            await asyncio.sleep(wait)
        log(f"  t={event.at_s:g}s: {event.describe()}")
        if event.kind == "link":
            for mine in proxies:
                for proxy in mine:
                    up = _direction(scenario.link, up_mbps=event.up_mbps or scenario.link.up_mbps, trace=event.trace,
                                    rtt_ms=event.rtt_ms)
                    down = None if event.rtt_ms is None else replace(proxy.profile.down, delay_ms=event.rtt_ms / 2)
                    proxy.update(up=up, down=down)
        elif event.kind == "outage":
            for mine in proxies:
                for proxy in mine:
                    proxy.outage(event.mode, event.duration_s)
        elif event.kind == "kill_worker":
            await workers[event.worker].kill()
        else:
            await workers[event.worker].start()


async def _progress(strategy: str, scenario: LiveScenario, answers: list[Answered], sent: list[int], t0: float,
                    log: Callable[[str], None]) -> None:
    while True:
        await asyncio.sleep(5.0)
        routes = Counter(a.route for a in answers)
        log(f"  {strategy} t={time.monotonic() - t0:.0f}/{scenario.duration_s:g}s: {sum(sent)} sent, "
            f"{len(answers)} answered ({', '.join(f'{k} {v}' for k, v in sorted(routes.items()))})")


def _report(strategy: str, scenario: LiveScenario, answers: list[Answered], sent: int,
            bytes_up: int, history: list[list[dict[str, Any]]], out: Path) -> dict[str, Any]:
    from splitexit.edge.trace import read_trace

    ms = np.asarray([a.ms for a in answers]) if answers else np.zeros(1)
    ids = Counter((a.agent, a.seq) for a in answers)
    splits: Counter[int] = Counter()
    for agent in range(scenario.agents.count):
        for record in list(read_trace(out / f"{strategy}-agent{agent}.msgpack"))[1:]:  # the warm-up first
            splits[int(record.get("split", -1))] += int(record.get("rows", 0))
    return {
        "strategy": strategy, "sent": sent, "answered": len(answers),
        "answered_twice": sum(c > 1 for c in ids.values()), "lost": sent - len(ids),
        "acc": round(float(np.mean([a.correct for a in answers])), 4) if answers else 0.0,
        "mean_ms": round(float(ms.mean()), 2), "p95_ms": round(float(np.percentile(ms, 95)), 2),
        "p99_ms": round(float(np.percentile(ms, 99)), 2),
        "on_device": round(sum(a.route == "edge" for a in answers) / max(1, len(answers)), 4),
        "degraded": sum(a.route == "degraded" for a in answers),
        "reasons": dict(Counter(a.reason for a in answers if a.route == "degraded" and a.reason)),
        "bytes_up_per_input": round(bytes_up / max(1, len(answers)), 1),
        "splits": {str(k): v for k, v in sorted(splits.items())},
        "exits": {str(k): v for k, v in sorted(Counter(a.exit for a in answers).items())},
        "history": history,
        "records": [[a.agent, round(a.t, 3), round(a.ms, 2), a.route] for a in answers],
    }


# --- the whole run -------------------------------------------------------------------------
def run_live_scenario(scenario: LiveScenario, *, cache_dir: Path, out: Path,
                      log: Callable[[str], None] = print) -> dict[str, Any]:
    """Every strategy of the scenario in turn; writes live.json and live.png into `out`."""
    import json

    out.mkdir(parents=True, exist_ok=True)
    prep = prepare(scenario, cache_dir, out, log=log)
    results = {}
    for strategy in scenario.agents.strategies:
        log(f"{strategy}: {scenario.agents.count} agents, {scenario.workers.count} worker(s), "
            f"{scenario.duration_s:g} s")
        results[strategy] = asyncio.run(run_strategy(scenario, prep, strategy, out, log))
        r = results[strategy]
        log(f"{strategy}: {r['answered']}/{r['sent']} answered, acc {r['acc']:.4f}, mean {r['mean_ms']:.1f} ms, "
            f"p95 {r['p95_ms']:.1f} ms, on device {r['on_device']:.2f}, degraded {r['degraded']} {r['reasons']}")
    report = {"scenario": scenario.to_dict(), "device": prep.device.source, "worker": prep.worker_profile.name,
              "bundle_splits": list(prep.edge.splits), "start_split": prep.start_split,
              "planned": [{"split": c.split, "expected_ms": round(c.expected_ms, 3)} for c in prep.planned],
              "strategies": results}
    (out / "live.json").write_text(json.dumps(report, indent=1))
    plot(report, out / "live.png", title=f"{scenario.name}: {prep.arch} on a {prep.device.name} device")
    log(table(results))
    return report


def table(results: Mapping[str, Mapping[str, Any]]) -> str:
    lines = [f"{'strategy':<11} {'answered':>9} {'acc':>7} {'mean ms':>8} {'p95 ms':>8} {'p99 ms':>8} "
             f"{'device':>7} {'degraded':>8} {'bytes up':>9}"]
    for name, r in results.items():
        lines.append(f"{name:<11} {r['answered']:>4}/{r['sent']:<4} {r['acc']:>7.4f} {r['mean_ms']:>8.1f} "
                     f"{r['p95_ms']:>8.1f} {r['p99_ms']:>8.1f} {r['on_device']:>7.2f} {r['degraded']:>8} "
                     f"{r['bytes_up_per_input']:>9.0f}")
    return "\n".join(lines)


def plot(report: Mapping[str, Any], path: Path, *, title: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    results = report["strategies"]
    events = [Event(**e) for e in report["scenario"]["events"]]
    fig, axes = plt.subplots(2, 3, figsize=(15, 8))
    (cdf, scatter, over_time), (plans, exits, sent) = axes
    estimate = plans.twinx()
    colors = dict(zip(STRATEGIES, ("tab:red", "tab:blue", "tab:green")))
    for name, r in results.items():
        records = np.asarray([[rec[1], rec[2]] for rec in r["records"]]) if r["records"] else np.zeros((0, 2))
        ms = np.sort(records[:, 1])
        cdf.plot(ms, np.arange(1, len(ms) + 1) / max(1, len(ms)), color=colors[name], label=name)
        scatter.scatter(r["mean_ms"], r["acc"], color=colors[name], s=40, label=name)
        scatter.annotate(f"{name}\n{r['mean_ms']:.0f} ms, {r['acc']:.3f}", (r["mean_ms"], r["acc"]), fontsize=7,
                         textcoords="offset points", xytext=(4, 4))
        if len(records):
            edges = np.arange(0, report["scenario"]["duration_s"] + 1, 1.0)
            p95 = [np.percentile(records[(records[:, 0] >= lo) & (records[:, 0] < lo + 1), 1], 95)
                   if ((records[:, 0] >= lo) & (records[:, 0] < lo + 1)).any() else np.nan for lo in edges]
            over_time.plot(edges + 0.5, p95, color=colors[name], label=name)
        for i, history in enumerate(r["history"]):
            if history:
                t = [h["t"] for h in history]
                plans.step(t, [h["split"] for h in history], where="post", color=colors[name], alpha=0.8,
                           label=f"{name}: split" if i == 0 else None)
                estimate.plot(t, [h["up_mbps"] or np.nan for h in history], ".", markersize=2, color="grey")
        sent.bar(name, r["bytes_up_per_input"], color=colors[name])
    stages = sorted({int(k) for r in results.values() for k in r["exits"]})
    width = 0.8 / max(1, len(results))
    for i, (name, r) in enumerate(results.items()):
        exits.bar(np.arange(len(stages)) + i * width, [r["exits"].get(str(k), 0) for k in stages], width,
                  color=colors[name], label=name)
    exits.set_xticks(np.arange(len(stages)) + 0.4 - width / 2, [str(k) for k in stages])
    exits.set_xlabel("answering exit (stage; the last is the final head)")
    exits.legend(fontsize=7)
    for ax in (over_time, plans):
        for e in events:
            ax.axvline(e.at_s, color="black", lw=0.7, ls="--")
            ax.annotate(e.describe(), (e.at_s, 1.0), xycoords=("data", "axes fraction"), fontsize=6, rotation=90,
                        va="top", ha="right")
    cdf.set_xscale("log")
    cdf.set_xlabel("ms per input (log)")
    cdf.set_ylabel("share answered within")
    cdf.legend(fontsize=7)
    cdf.grid(alpha=0.3)
    scatter.set_xlabel("mean ms per input")
    scatter.set_ylabel("accuracy")
    over_time.set_yscale("log")
    over_time.set_xlabel("seconds")
    over_time.set_ylabel("p95 ms per 1 s (log)")
    over_time.legend(fontsize=7)
    plans.set_xlabel("seconds")
    plans.set_ylabel("the adaptive agents' split (stage, lines)")
    estimate.set_yscale("log")
    estimate.set_ylabel("their uplink estimate, Mbit/s (grey dots)")
    exits.set_ylabel("answers")
    sent.set_ylabel("bytes up per input (the link's count)")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
