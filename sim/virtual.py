"""The virtual-time fleet simulator (DESIGN.md's virtual mode; issue 18, first part):
thousands of edge devices, their links and a pool of cloud workers, in simulated time.

How it runs, and why this way: arrivals do not depend on answers here (each device sends
on its own schedule, open loop), so everything before the cloud is computed for all
requests at once with numpy (arrival times, the exit decision, edge compute, uplink), and
only the shared part, the workers' queue and batches, is one event pass over the
requests in their order of arrival at the cloud (a heap of worker free times). Measured
on this kind of machine, that shape simulates 1M requests in a few seconds where SimPy
took 21 s and a plain event loop over every step 4.5 s (issue 18's figures).

The model, each part from what the live system does:
- devices: Poisson or periodic arrivals at `rate_hz`, each request one input;
- the edge: a share of inputs answered on the device after `edge_ms`, the rest
  offloaded after `split_ms` (the stages up to the split and their exits);
- the link: `rtt_ms` (half each way) and the uplink's rate for the feature's bytes;
- the cloud: `workers` workers with the real batcher's rules: a batch takes up to
  `max_batch` rows; a worker free with fewer rows waiting waits for company until the
  oldest has waited `max_delay_ms`; a batch of b rows takes `batch_ms + row_ms * b`;
  admission refuses at once (RESOURCE_EXHAUSTED) a request when `queue_limit_rows` would
  be passed or when the work ahead (in full batches) would keep it waiting longer than
  `max_queue_wait_ms` or past its deadline, as `cloud.batcher` does;
- a refused or late request is answered on the device, degraded: at the refusal's return,
  or at the deadline (`timeout_ms`).

What it reports has the live harness's keys: `mean_ms`, `p95_ms`, `edge_share`,
`degraded_share`, and the cloud's utilisation and mean batch.
"""

from __future__ import annotations

import functools
import heapq
import math
import time
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Callable, Mapping, TypeVar

import numpy as np

from splitexit.sim.link import SEGMENT_BYTES, Outage

T = TypeVar("T")

__all__ = ["Autoscale", "CloudModel", "Cuts", "EdgeModel", "FleetModel", "LinkGroup", "LinkModel", "Resends", "Scenario",
           "VirtualResult", "WorkerEvent", "fewest_workers", "load_scenario", "network_exits", "profile_costs", "requests",
           "simulate_fleet"]


@dataclass(frozen=True, kw_only=True)
class FleetModel:
    devices: int = 100
    requests: int = 100  # per device
    # "poisson", "periodic" (each device at a random phase), "bursts": `burst` requests at
    # once, the bursts' starts a Poisson process (the same mean rate), or "closed": each
    # device sends its next request `think_ms` after the answer to its last (1000 /
    # rate_hz by default; the first at a random phase)
    arrival: str = "poisson"
    rate_hz: float = 1.0  # requests per second per device
    burst: int = 1  # requests per burst (arrival "bursts")
    think_ms: float | None = None  # arrival "closed"

    def __post_init__(self) -> None:
        if self.devices < 1 or self.requests < 1 or self.rate_hz <= 0 or self.burst < 1:
            raise ValueError("a fleet needs devices >= 1, requests >= 1, rate_hz > 0 and burst >= 1")
        if self.arrival not in ("poisson", "periodic", "bursts", "closed"):
            raise ValueError(f"arrival must be poisson, periodic, bursts or closed, got {self.arrival!r}")
        if self.think_ms is not None and self.think_ms < 0:
            raise ValueError("think_ms must be >= 0")

    @property
    def think(self) -> float:
        """A closed loop's ms between an answer and the next request."""
        return 1000.0 / self.rate_hz if self.think_ms is None else self.think_ms


@dataclass(frozen=True, kw_only=True)
class EdgeModel:
    on_device_share: float = 0.0  # inputs an edge exit answers
    edge_ms: float = 0.0  # device time of an input answered on the device
    split_ms: float = 0.0  # device time of an offloaded input, up to the split
    feature_bytes: int = 0  # what an offloaded input sends
    # Or the network's own decisions: a bundle (its network and exit policy) run over a data
    # set's test split (cached exit outputs); request i is test input i mod N, answered on
    # the device when the policy's exit is at or before the split, and the report gains
    # the answers' accuracy. Replaces on_device_share.
    bundle: str = ""
    data: str = "digits"
    # With `bundle`: a device profile of its network (`splitexit profile`, e.g. `--as rpi4`):
    # each input's device time is then the profile's time of the stages and exit heads it
    # runs (to its exit, or to the split), not edge_ms / split_ms.
    profile: str = ""
    # [edge.energy]: the device's power (`splitexit.plan.EnergyModel`'s fields: busy_w,
    # idle_w, radio_alpha_mw_per_mbps, radio_beta_mw); the report gains the mean mJ per request
    energy: Mapping[str, float] | None = None
    # [edge.replan]: each device re-plans its split online as the agent's `--replan` does
    # (`splitexit.edge.replan`), among the bundle's splits (`export --splits`), from its own
    # answered offloads; needs bundle and profile. Keys: ReplanConfig's margin, patience,
    # every_s, probe_s, window, hopeless_backoff (its defaults for those not given). An
    # offload then carries the bundle's codec's bytes at its split, not feature_bytes.
    replan: Mapping[str, float] | None = None

    # [edge.spool]: failed offloads are kept and resent later, as the agent's spool and
    # `edge refine` on the systemd timer do (`splitexit.sim.virtual_spool`). Keys:
    # refine_every_s (60: the timer's period after a run ends), refine_timeout_ms (10,000).
    spool: Mapping[str, float] | None = None

    REPLAN_KEYS = ("margin", "patience", "every_s", "probe_s", "window", "hopeless_backoff")
    SPOOL_KEYS = ("refine_every_s", "refine_timeout_ms")

    def __post_init__(self) -> None:
        if self.replan is not None:
            unknown = sorted(set(self.replan) - set(self.REPLAN_KEYS))
            if unknown:
                raise ValueError(f"[edge.replan]: unknown keys {unknown}; known: {', '.join(self.REPLAN_KEYS)}")
            if not (self.bundle and self.profile):
                raise ValueError("[edge.replan] plans on a bundle's network and a device profile: give bundle and profile")
        if self.spool is not None:
            unknown = sorted(set(self.spool) - set(self.SPOOL_KEYS))
            if unknown:
                raise ValueError(f"[edge.spool]: unknown keys {unknown}; known: {', '.join(self.SPOOL_KEYS)}")
            if not all(float(v) > 0 for v in self.spool.values()):
                raise ValueError("[edge.spool]: refine_every_s and refine_timeout_ms must be > 0")
        if not 0 <= self.on_device_share <= 1 or min(self.edge_ms, self.split_ms, self.feature_bytes) < 0:
            raise ValueError("on_device_share must be in [0, 1] and times and bytes >= 0")
        if self.profile and not self.bundle:
            raise ValueError("[edge] profile times a bundle's network: give bundle too")
        if self.energy is not None:
            self.energy_model()  # checked here: a bad table fails on load

    def energy_model(self) -> Any:
        """The device's EnergyModel from [edge.energy]: its fields, or `board = NAME`, a board
        of `splitexit.energy` at its top clock (busy: its power there; idle: its idle power),
        with the radio's fields beside it."""
        from splitexit.energy import get_board
        from splitexit.plan import EnergyModel

        if self.energy is None:
            return None
        fields: dict[str, Any] = {str(k): v for k, v in self.energy.items()}
        try:
            if "board" in fields:
                board = get_board(str(fields.pop("board")))
                fields.update(busy_w=board.power(board.f_max), idle_w=board.p_idle_w,
                              source=f"board {board.name} at {board.f_max:g} MHz (splitexit.energy)")
            return EnergyModel(**fields)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"[edge.energy]: {exc}") from None


@dataclass(frozen=True, kw_only=True)
class LinkModel:
    rtt_ms: float = 0.0
    up_mbps: float | None = None  # None: no rate limit
    # or the uplink's capacity replayed from a Mahimahi trace (as the link emulator does): a
    # file, or NAME of ../shared/data/cellular-traces.tar.gz (e.g. "TMobile-LTE-short.up");
    # each device replays it from a random point of its period ("random"), or all from its
    # start at the scenario's time 0 ("aligned", as the live harness's emulators do)
    trace: str = ""
    trace_phase: str = "random"
    # the link emulator's loss model: per TCP segment of the uplink, the probability of a
    # retransmission stall of rto_ms (a request stalls once when any of its segments does)
    loss: float = 0.0
    rto_ms: float = 200.0
    # [[link.groups]]: the first `devices` devices on a link of their own, the next group's
    # after them, and so on; devices left over use this link. A group's outages are its
    # region's: they hit its devices only.
    groups: tuple["LinkGroup", ...] = ()
    # outages of every device's link at once (a region), the link emulator's own kind
    # (seconds from the first send): `blackhole` holds what crosses until it ends (as TCP
    # would retransmit), `refuse` fails a request sent meanwhile at once
    outages: tuple[Outage, ...] = ()

    def __post_init__(self) -> None:
        if self.rtt_ms < 0 or (self.up_mbps is not None and self.up_mbps <= 0):
            raise ValueError("rtt_ms must be >= 0 and up_mbps > 0")
        if self.trace and self.up_mbps is not None:
            raise ValueError("[link] has up_mbps or a trace, not both")
        if self.trace_phase not in ("random", "aligned"):
            raise ValueError(f"trace_phase must be random or aligned, got {self.trace_phase!r}")
        if not 0 <= self.loss < 1 or self.rto_ms < 0:
            raise ValueError("loss must be in [0, 1) and rto_ms >= 0")
        outages = tuple(o if isinstance(o, Outage) else Outage(**o) for o in self.outages)
        if any(o.mode == "reset" for o in outages):
            raise ValueError("the simulator models blackhole and refuse outages, not reset")
        object.__setattr__(self, "outages", outages)  # TOML gives tables; keep Outage objects
        groups = tuple(g if isinstance(g, LinkGroup) else LinkGroup(**g) for g in self.groups)
        if any(g.groups for g in groups):
            raise ValueError("a link group has no groups of its own")
        object.__setattr__(self, "groups", groups)

    def per_device(self, devices: int) -> list[tuple[int, int, "LinkModel"]]:
        """(first device, end, link) of each group, then the rest on this link."""
        out: list[tuple[int, int, LinkModel]] = []
        lo = 0
        for g in self.groups:
            out.append((lo, lo + g.devices, g))
            lo += g.devices
        if lo > devices:
            raise ValueError(f"[[link.groups]] hold {lo} devices, the fleet {devices}")
        if lo < devices:
            out.append((lo, devices, self))
        return out


@dataclass(frozen=True, kw_only=True)
class LinkGroup(LinkModel):
    """A group of devices (a region) on a link of its own."""

    devices: int = 1

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.devices < 1:
            raise ValueError("[[link.groups]] devices must be >= 1")


@dataclass(frozen=True, kw_only=True)
class Autoscale:
    """A HorizontalPodAutoscaler's rules over the workers: every `sync_s` it computes the
    desired count from the utilisation of the last period (ceil(current x utilisation /
    target), within min and max); more workers start at once and serve `start_s` later
    (a pod's start and warm-up); fewer only when every desired count of the last
    `stabilization_s` was lower (Kubernetes' scale-down stabilization), and only idle
    workers leave."""

    min_workers: int = 1
    max_workers: int = 10
    target: float = 0.6  # utilisation
    sync_s: float = 15.0
    stabilization_s: float = 300.0
    start_s: float = 20.0

    def __post_init__(self) -> None:
        if not 1 <= self.min_workers <= self.max_workers:
            raise ValueError("need 1 <= min_workers <= max_workers")
        if not 0 < self.target <= 1 or self.sync_s <= 0 or self.stabilization_s < 0 or self.start_s < 0:
            raise ValueError("need 0 < target <= 1, sync_s > 0, stabilization_s >= 0 and start_s >= 0")


@dataclass(frozen=True, kw_only=True)
class WorkerEvent:
    """[[cloud.events]]: at `at_s` (from the first send), `count` workers `fail` (killed: the
    batch each is computing is lost, its requests answered on the device, degraded, as
    the edge does on UNAVAILABLE), `drain` (they finish their batch, then leave: nothing
    is lost) or `start` (they serve from then on)."""

    at_s: float
    kind: str
    count: int = 1

    def __post_init__(self) -> None:
        if self.at_s < 0 or self.count < 1 or self.kind not in ("fail", "drain", "start"):
            raise ValueError("[[cloud.events]] needs at_s >= 0, count >= 1 and kind fail, drain or start")


@dataclass(frozen=True, kw_only=True)
class CloudModel:
    workers: int = 1
    max_batch: int = 32
    max_delay_ms: float = 2.0
    batch_ms: float = 5.0  # a batch's fixed time
    row_ms: float = 0.5  # and its time per row
    queue_limit_rows: int = 2048
    max_queue_wait_ms: float = 250.0
    timeout_ms: float = 5000.0  # the edge's request deadline
    rpc_ms: float = 0.0  # per request, outside its batch: gRPC both ways, decoding (measured: fleet_live)
    autoscale: Autoscale | None = None  # None: `workers` workers throughout
    events: tuple[WorkerEvent, ...] = ()  # workers failing, draining, starting

    def __post_init__(self) -> None:
        if isinstance(self.autoscale, Mapping):  # a TOML table
            object.__setattr__(self, "autoscale", Autoscale(**self.autoscale))
        events = tuple(e if isinstance(e, WorkerEvent) else WorkerEvent(**e) for e in self.events)
        object.__setattr__(self, "events", tuple(sorted(events, key=lambda e: e.at_s)))
        self._check()

    def _check(self) -> None:
        if self.workers < 1 or self.max_batch < 1 or self.queue_limit_rows < 1:
            raise ValueError("workers, max_batch and queue_limit_rows must be >= 1")
        if min(self.max_delay_ms, self.batch_ms, self.row_ms) < 0 or self.batch_ms + self.row_ms <= 0:
            raise ValueError("times must be >= 0, and a batch must take some time")
        if self.max_queue_wait_ms <= 0 or self.timeout_ms <= 0 or self.rpc_ms < 0:
            raise ValueError("max_queue_wait_ms and timeout_ms must be > 0")

    def batch_time_ms(self, rows: int) -> float:
        return self.batch_ms + self.row_ms * rows


@dataclass(frozen=True, kw_only=True)
class Scenario:
    name: str = "scenario"
    seed: int = 0
    fleet: FleetModel = field(default_factory=FleetModel)
    edge: EdgeModel = field(default_factory=EdgeModel)
    link: LinkModel = field(default_factory=LinkModel)
    cloud: CloudModel = field(default_factory=CloudModel)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "Scenario":
        """A scenario from its TOML tables ([fleet], [edge], [link], [cloud]); an unknown
        key is an error that names it."""
        parts = {"fleet": FleetModel, "edge": EdgeModel, "link": LinkModel, "cloud": CloudModel}
        unknown = sorted(set(data) - set(parts) - {"name", "seed"})
        if unknown:
            raise ValueError(f"unknown scenario keys {unknown}; known: name, seed, {', '.join(parts)}")
        built: dict[str, Any] = {}
        for key, kind in parts.items():
            table = dict(data.get(key, {}))
            allowed = {f.name for f in fields(kind)}
            extra = sorted(set(table) - allowed)
            if extra:
                raise ValueError(f"[{key}]: unknown keys {extra}; known: {', '.join(sorted(allowed))}")
            built[key] = kind(**table)
        return cls(name=str(data.get("name", "scenario")), seed=int(data.get("seed", 0)), **built)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class VirtualResult:
    """Per request: when it was sent and answered (ms of simulated time), and how."""

    sent_ms: np.ndarray  # float64 [N]
    done_ms: np.ndarray  # float64 [N]
    route: np.ndarray  # int8 [N]: 0 edge, 1 cloud, 2 degraded (refused), 3 degraded (late)
    batches: int
    batch_rows: int
    busy_ms: float  # the workers' summed compute time
    span_ms: float  # first arrival to last answer
    correct: np.ndarray | None = None  # bool [N]: the answer is right (when the network decides)
    workers: tuple[tuple[float, int], ...] = ()  # (s, count) at the start and each autoscaling change
    energy_mj: np.ndarray | None = None  # per request, the device's (with [edge.energy])
    # per request: when its offload left the device (after its compute to the split), the
    # worker's queue and compute time (NaN when no worker answered), its bytes up
    ready: np.ndarray | None = None
    server_ms: np.ndarray | None = None
    nbytes: np.ndarray | None = None
    split: np.ndarray | None = None  # int [N]: the split each request was cut at (re-planning)
    plans: int = 0  # with re-planning: split changes over every device
    # the spool's resends (Resends, in their order): when each ended and how (route codes)
    resent_done: np.ndarray | None = None
    resent_route: np.ndarray | None = None
    spool: Mapping[str, Any] | None = None  # with [edge.spool]: what it did (SpoolRefiner.report)

    ROUTES = ("edge", "cloud", "refused", "late")

    @property
    def latency_ms(self) -> np.ndarray:
        return self.done_ms - self.sent_ms

    def report(self, workers: int) -> dict[str, Any]:
        n = len(self.sent_ms)
        latency = self.latency_ms
        counts = np.bincount(self.route, minlength=4)
        return {
            "requests": n, "mean_ms": round(float(latency.mean()), 3),
            "p95_ms": round(float(np.percentile(latency, 95)), 3),
            "p99_ms": round(float(np.percentile(latency, 99)), 3),
            "edge_share": round(float(counts[0] / n), 5), "cloud_share": round(float(counts[1] / n), 5),
            "degraded_share": round(float((counts[2] + counts[3]) / n), 5),
            "refused": int(counts[2]), "late": int(counts[3]),
            "mean_batch": round(self.batch_rows / self.batches, 3) if self.batches else None,
            "utilisation": round(self.busy_ms / (workers * self.span_ms), 4) if self.span_ms > 0 else None,
            **({} if self.correct is None else {"acc": round(float(self.correct.mean()), 5)}),
            **({} if self.energy_mj is None else {"energy_mj": round(float(self.energy_mj.mean()), 4)}),
            **({"workers_over_time": [list(w) for w in self.workers], "max_workers": max(c for _, c in self.workers)}
               if len(self.workers) > 1 else {}),
            **(dict(self.spool) if self.spool is not None else {}),
            **({} if self.split is None else {"plan_changes": self.plans, "split_shares": {
                str(s): round(float(c / n), 5) for s, c in zip(*np.unique(self.split, return_counts=True))}}),
        }


def _arrivals(fleet: FleetModel, rng: np.random.Generator) -> np.ndarray:
    """Send times (ms) of every request, devices in rows: [devices, requests]."""
    gap_ms = 1000.0 / fleet.rate_hz
    if fleet.arrival == "poisson":
        gaps = rng.exponential(gap_ms, size=(fleet.devices, fleet.requests))
    elif fleet.arrival == "closed":  # a first guess, as if every answer were instant (see simulate_fleet)
        gaps = np.full((fleet.devices, fleet.requests), fleet.think)
        gaps[:, 0] = rng.uniform(0, gap_ms, size=fleet.devices)
    elif fleet.arrival == "bursts":
        starts = rng.exponential(gap_ms * fleet.burst, size=(fleet.devices, -(-fleet.requests // fleet.burst)))
        gaps = np.zeros((fleet.devices, fleet.requests))
        gaps[:, ::fleet.burst] = starts  # the first of each burst waits; the rest go with it
    else:
        gaps = np.full((fleet.devices, fleet.requests), gap_ms)
        gaps[:, 0] = rng.uniform(0, gap_ms, size=fleet.devices)  # each device its own phase
    return np.cumsum(gaps, axis=1)


def requests(scenario: Scenario) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Every request of the scenario, devices in rows, flattened: when it is sent (ms),
    whether the device answers it, and (when the network decides) whether that answer is
    right. The simulator and the live harness (`fleet_live`) both draw them here, so a
    seed means the same requests both ways."""
    rng = np.random.default_rng(scenario.seed)
    sent = _arrivals(scenario.fleet, rng).ravel()
    draws = rng.random(len(sent))  # drawn either way: the same seed gives the same arrivals and draws
    if not scenario.edge.bundle:
        return sent, draws < scenario.edge.on_device_share, None
    decided, right = network_decisions(scenario.edge.bundle, scenario.edge.data)
    sample = np.arange(len(sent)) % len(decided)
    return sent, decided[sample], right[sample]


def device_links(scenario: Scenario) -> list[tuple[int, int, LinkModel, int]]:
    """(first device, end, link, seed of its trace points) of each link group, then the
    rest on [link] (with the scenario's seed); the live harness builds its emulators from it."""
    groups = scenario.link.per_device(scenario.fleet.devices)
    return [(lo, hi, link, scenario.seed if link is scenario.link else scenario.seed * 1000 + g + 1)
            for g, (lo, hi, link) in enumerate(groups)]


@dataclass(frozen=True)
class Cuts:
    """Per request (flat, devices in rows), what its device does with it: answers it
    (`on_device`) after `edge_ms`, or offloads `nbytes` after `split_ms` (its stages and
    exits up to the split it is cut at)."""

    on_device: np.ndarray  # bool
    edge_ms: np.ndarray
    split_ms: np.ndarray
    nbytes: np.ndarray
    split: np.ndarray | None = None  # int: the split each was cut at, when the device re-plans

    def same(self, other: "Cuts") -> bool:
        return bool(np.array_equal(self.on_device, other.on_device) and np.array_equal(self.split_ms, other.split_ms)
                    and np.array_equal(self.nbytes, other.nbytes))


def fixed_cuts(scenario: Scenario, on_device: np.ndarray) -> Cuts:
    """Every request cut where the scenario (or its bundle) says."""
    n = len(on_device)
    edge_ms, split_ms = device_times(scenario, n)
    return Cuts(on_device, edge_ms, split_ms, np.full(n, float(scenario.edge.feature_bytes)))


def simulate_fleet(scenario: Scenario, progress: Callable[[str], None] | None = None) -> VirtualResult:
    """Run the scenario; the same scenario (seed included) gives the same result, bit for bit.

    Three behaviours make what a device does depend on earlier answers: closed-loop
    arrivals (each request sent `think` after the previous one's answer), online
    re-planning (`[edge.replan]`: the split of each request chosen from the link as the
    device's earlier offloads measured it) and the spool (`[edge.spool]`: failed offloads
    resent later, one after another). Then the run is repeated, each time with the send
    times, cuts and resends that the last run's answers give, until they no longer
    change: a fixed point, the devices' own behaviour. A device's choice at time t depends
    only on answers before t, so each repeat settles at least the earliest choice still
    wrong, and in practice a few repeats do."""
    sent, on_device, correct = requests(scenario)
    fleet = scenario.fleet
    cuts = fixed_cuts(scenario, on_device)
    planner = refiner = None
    if scenario.edge.replan is not None:
        from splitexit.sim.virtual_replan import DevicePlanners

        planner = DevicePlanners(scenario)
        cuts = planner.cuts(sent, None)
    if scenario.edge.spool is not None:
        from splitexit.sim.virtual_spool import SpoolRefiner

        refiner = SpoolRefiner(scenario)
    if fleet.arrival != "closed" and planner is None and refiner is None:
        return _simulate(scenario, sent, cuts, correct, progress=progress)
    shape = (fleet.devices, fleet.requests)
    resends = Resends.none()
    for run in range(1, 4 * fleet.requests + 11):
        result = _simulate(scenario, sent, cuts, correct, resends)
        following = sent
        if fleet.arrival == "closed":
            following = sent.reshape(shape).copy()
            following[:, 1:] = result.done_ms.reshape(shape)[:, :-1] + fleet.think
            following = following.ravel()
        then = cuts if planner is None else planner.cuts(following, result)
        again = resends if refiner is None else refiner.resends(result)
        settled = np.array_equal(following, sent) and then.same(cuts) and again.same(resends)
        if progress is not None:
            moved = int(np.count_nonzero(following != sent) + np.count_nonzero(then.split_ms != cuts.split_ms))
            progress(f"run {run}: settled" if settled else
                     f"run {run}: {moved:,} send times and cuts changed, {len(again.sent):,} resends")
        if settled:
            if planner is not None:
                result = replace(result, split=cuts.split, plans=planner.changes)
            return result if refiner is None else replace(result, spool=refiner.report(result))
        sent, cuts, resends = following, then, again
    raise RuntimeError(f"{scenario.name}: the devices' send times, cuts and resends did not settle")


@dataclass(frozen=True)
class Resends:
    """Requests a device sends again from its spool (`[edge.spool]`): stored features, so
    no device time before they leave; per resend its device, send time (ms) and bytes."""

    device: np.ndarray  # int
    sent: np.ndarray
    nbytes: np.ndarray
    timeout_ms: float

    @classmethod
    def none(cls) -> "Resends":
        return cls(np.zeros(0, dtype=np.int64), np.zeros(0), np.zeros(0), 1.0)

    def same(self, other: "Resends") -> bool:
        return bool(np.array_equal(self.device, other.device) and np.array_equal(self.sent, other.sent)
                    and np.array_equal(self.nbytes, other.nbytes))


def _simulate(scenario: Scenario, sent: np.ndarray, cuts: Cuts, correct: np.ndarray | None,
              resends: Resends | None = None, progress: Callable[[str], None] | None = None) -> VirtualResult:
    """One run with these send times and cuts (flat, devices in rows), and these resends
    from the devices' spools sharing their uplinks and the workers."""
    edge, cloud = scenario.edge, scenario.cloud
    fleet = scenario.fleet
    resends = resends or Resends.none()
    n, m = len(sent), len(resends.sent)
    on_device, edge_ms, split_ms, nbytes = cuts.on_device, cuts.edge_ms, cuts.split_ms, cuts.nbytes
    # everything that may cross a link: the requests (when their offload would leave), then the resends
    device = np.concatenate([np.repeat(np.arange(fleet.devices), fleet.requests), resends.device])
    ready = np.concatenate([sent + split_ms, resends.sent])
    offloading = np.concatenate([~on_device, np.ones(m, dtype=bool)])
    size = np.concatenate([nbytes, resends.nbytes])
    timeout = np.concatenate([np.full(n, cloud.timeout_ms), np.full(m, resends.timeout_ms)])
    done, route, server_ms, crossed, (batches, batch_rows, busy, workers) = _network(
        scenario, device, ready, offloading, size, timeout, progress)
    done[:n][on_device] = sent[on_device] + edge_ms[on_device]
    route[:n][on_device] = 0
    span = float(done.max() - min(sent.min(), ready.min())) if n else 0.0
    energy = edge.energy_model()
    energy_mj = None
    if energy is not None:  # computing, then (offloaded) sending and waiting for the answer
        energy_mj = np.where(on_device, edge_ms * energy.busy_w, split_ms * energy.busy_w)
        sending_ms = crossed[:n] - ready[:n]
        up_mbps = np.where(sending_ms > 0, nbytes * 8 / np.maximum(sending_ms, 1e-9) / 1e3, 0.0)
        radio_w = (energy.radio_beta_mw + energy.radio_alpha_mw_per_mbps * up_mbps) / 1e3
        waiting_ms = np.maximum(done[:n] - crossed[:n], 0.0)
        energy_mj = np.where(on_device, energy_mj, energy_mj + sending_ms * radio_w + waiting_ms * energy.idle_w)
    return VirtualResult(sent, done[:n], route[:n], batches, batch_rows, busy, span, correct, tuple(workers), energy_mj,
                         ready=ready[:n], server_ms=server_ms[:n], nbytes=nbytes,
                         resent_done=done[n:], resent_route=route[n:])


CloudTotals = tuple[int, int, float, list[tuple[float, int]]]  # batches, rows, busy ms, workers over time


def _network(scenario: Scenario, device: np.ndarray, ready: np.ndarray, offloading: np.ndarray, size: np.ndarray,
             timeout: np.ndarray, progress: Callable[[str], None] | None = None
             ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, CloudTotals]:
    """Every offload (where `offloading`) over its device's link to the workers and back:
    when it is answered (a refusal at once, a late one at its deadline) and how (route
    codes), the worker's queue and compute time, and when it had crossed the uplink;
    and the cloud's batches, rows, busy ms and worker count over time."""
    cloud = scenario.cloud
    n = len(ready)
    done, route = np.full(n, np.nan), np.zeros(n, dtype=np.int8)
    # per offload, from its device's link: half the RTT, refused by an outage, past the uplink
    half, refused_all, crossed_all = np.zeros(n), np.zeros(n, dtype=bool), ready.copy()
    groups = device_links(scenario)
    for lo, hi, link, seed in groups:
        rows = np.flatnonzero((device >= lo) & (device < hi))
        half[rows] = link.rtt_ms / 2
        refused_all[rows] = _in_outage(ready[rows], link.outages, "refuse")
        crossed = _uplink(ready[rows], offloading[rows], size[rows], device[rows] - lo, hi - lo, link, seed)
        if link.loss > 0:  # its own generator: the requests' draws are the same with or without loss
            segments = np.maximum(1, np.ceil(size[rows] / SEGMENT_BYTES))
            stalled = np.random.default_rng([seed, 11]).random(len(crossed)) < 1 - (1 - link.loss) ** segments
            crossed = crossed + np.where(stalled, link.rto_ms, 0.0)
        crossed_all[rows] = _held(crossed, link.outages)
    offloaded = np.flatnonzero(offloading)
    leaves = ready[offloaded]
    refused = refused_all[offloaded]
    deadline = leaves + timeout[offloaded]
    sending = np.flatnonzero(~refused)
    back_half = half[offloaded[sending]]
    at_cloud = crossed_all[offloaded[sending]] + back_half
    order = np.argsort(at_cloud, kind="stable")
    answered, how, batches, batch_rows, busy, workers = _cloud(at_cloud[order],
                                                              deadline[sending][order] - back_half[order], cloud,
                                                              progress)
    # answers travel back (half an RTT, held by a blackhole of their link); a refusal too;
    # a late request ends at its deadline
    who = offloaded[sending][order]
    server_ms = np.full(n, np.nan)  # queue and compute at the worker, as its answer reports them
    server_ms[who] = answered - at_cloud[order]
    back = answered + cloud.rpc_ms
    for lo, hi, link, _ in groups:
        mine = (device[who] >= lo) & (device[who] < hi)
        back[mine] = _held(back[mine], link.outages)
    back += back_half[order]
    due = deadline[sending][order]
    how = np.where(back > due, 3, how).astype(np.int8)  # whatever the cloud did, the device gave up first
    back = np.where(how == 3, due, back)
    done[who] = back
    route[who] = how
    done[offloaded[refused]] = leaves[refused]  # the device answers at once, degraded
    route[offloaded[refused]] = 2
    return done, route, server_ms, crossed_all, (batches, batch_rows, busy, workers)


def network_decisions(bundle: str | Path, data: str) -> tuple[np.ndarray, np.ndarray]:
    """Per test input of `data`: answered on the device (the bundle's policy leaves at an
    exit at or before its split), and whether the answer is right; from the network's
    cached exit outputs. A degraded answer (the cloud unreachable) is not modelled
    here: it counts as the policy's answer."""
    stages, split, right = network_exits(str(bundle), data)
    return stages <= split, right


@functools.lru_cache(maxsize=4)
def network_exits(bundle: str, data: str) -> tuple[np.ndarray, int, np.ndarray]:
    """Per test input of `data`: the stage of the exit the bundle's policy answers at, the
    bundle's split, and whether the answer is right."""
    from splitexit.bundle import load_whole
    from splitexit.cost import cost_model
    from splitexit.data import Normalize, load_dataset
    from splitexit.evaluate import cached_exit_outputs
    from splitexit.policies import simulate
    from splitexit.cli import default_cache_dir

    whole = load_whole(bundle)
    test = load_dataset(data, cache_dir=default_cache_dir()).test
    outputs = cached_exit_outputs(whole.model, test, Normalize(whole.mean, whole.std),
                                  cache_dir=default_cache_dir(), tag="test")
    c, h, w = whole.input_shape
    ladder = cost_model(whole.model, (c, h, w)).exit_ladder()
    out = simulate(whole.policy, outputs.probs, ladder, outputs.labels)
    stages = np.asarray(list(whole.model.exit_points) + [whole.model.num_stages - 1])
    assert out.correct is not None
    return stages[out.exit_index], whole.split, out.correct


def device_times(scenario: Scenario, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Per request: the device's ms when it answers it, and its ms up to the split when it
    offloads it: the scenario's edge_ms and split_ms, or with a device profile and a
    bundle the profile's time of what each input runs (its stages and the exit heads on
    the way, to its exit or to the split)."""
    edge = scenario.edge
    if not edge.profile:
        return np.full(n, edge.edge_ms), np.full(n, edge.split_ms)
    stages, split, _ = network_exits(edge.bundle, edge.data)
    reach, to_split = profile_costs(edge)
    sample = np.arange(n) % len(stages)
    return np.asarray([reach[int(s)] for s in stages])[sample], np.full(n, to_split(split))


def profile_costs(edge: EdgeModel) -> tuple[dict[int, float], Callable[[int], float]]:
    """From [edge]'s device profile of its bundle's network: the ms to reach each ladder
    exit (stage -> ms, the final head's at the last stage), and the ms up to a split (its
    stages and the exits on the way)."""
    from splitexit.plan import exit_costs
    from splitexit.profile import load_profile

    stages, split, _ = network_exits(edge.bundle, edge.data)
    times = load_profile(edge.profile).at(1)
    exits = sorted(times.exit_ms)
    if times.num_stages - 1 < split or not set(np.unique(stages)) <= {*exits, times.num_stages - 1}:
        raise ValueError(f"{edge.profile}: not a profile of {edge.bundle}'s network")
    ladder = [*exits, times.num_stages - 1]
    reach = dict(zip(ladder, exit_costs(times, exits, 0, times.num_stages - 1, final=True)))

    def to_split(at: int) -> float:
        return sum(times.stage_ms[: at + 1]) + sum(times.exit_ms[k] for k in exits if k <= at)
    return reach, to_split


def _in_outage(t_ms: np.ndarray, outages: tuple[Outage, ...], mode: str) -> np.ndarray:
    """Which times fall inside an outage of `mode`."""
    inside = np.zeros(len(t_ms), dtype=bool)
    for o in outages:
        if o.mode == mode:
            inside |= (t_ms >= 1e3 * o.start_s) & (t_ms < 1e3 * o.end_s)
    return inside


def _held(t_ms: np.ndarray, outages: tuple[Outage, ...]) -> np.ndarray:
    """Times at which something crossing at `t_ms` gets through: held to a blackhole's end."""
    out = t_ms.copy()
    for o in sorted(outages, key=lambda o: o.start_s):
        if o.mode == "blackhole":
            inside = (out >= 1e3 * o.start_s) & (out < 1e3 * o.end_s)
            out[inside] = 1e3 * o.end_s
    return out


TRACES = Path("../shared/data/cellular-traces.tar.gz")


def load_link_trace(name: str) -> Any:
    """A trace file, or NAME of the traces archive beside the project."""
    from splitexit.sim.link import load_trace

    return load_trace(name) if Path(name).is_file() else load_trace(TRACES, name)


def _uplink(ready: np.ndarray, sends: np.ndarray, nbytes: np.ndarray, device: np.ndarray, devices: int,
            link: LinkModel, seed: int) -> np.ndarray:
    """When each request's feature has left its device: each device's uplink is its own
    queue, one feature after another (in the order they are ready) at the link's rate, or
    in the trace's delivery opportunities (a device sending faster than its uplink carries
    waits, as the link emulator makes it). Per entry of `ready`, from device `device`
    (0..devices-1); only entries where `sends` is true are meaningful; each sends `nbytes`."""
    if (link.up_mbps is None and not link.trace) or not nbytes.any():
        return ready
    order = np.lexsort((ready, device))  # by device, then when ready (stable)
    counts = np.bincount(device, minlength=devices)
    rank = np.arange(len(order)) - np.repeat(np.cumsum(counts) - counts, counts)
    slots = np.full((devices, int(counts.max())), -1, dtype=np.int64)  # per device, its entries in turn
    slots[device[order], rank] = order
    left = ready.copy()
    free = np.full(devices, -np.inf)  # when each device's uplink is next idle
    send: Callable[[np.ndarray, np.ndarray, np.ndarray], np.ndarray]
    if link.trace:
        send = _TraceSender(link, devices, seed)
    else:
        ms_per_byte = 8 / (link.up_mbps * 1000.0)  # type: ignore[operator]

        def send(start: np.ndarray, sending: np.ndarray, size: np.ndarray) -> np.ndarray:
            return start + size * ms_per_byte
    for column in slots.T:  # vectorized over devices, in each device's order of sending
        held = column >= 0
        at = np.where(held, column, 0)
        sending = held & sends[at]
        out = send(np.maximum(free, ready[at]), sending, np.where(held, nbytes[at], 0.0))
        left[column[held]] = out[held]
        free = np.where(sending, out, free)
    return left


def trace_offsets_ms(link: LinkModel, devices: int, seed: int, period_ms: float) -> np.ndarray:
    """Where in its trace each device is at the scenario's time 0 (ms); the live harness
    starts its emulators' traces there too."""
    if link.trace_phase == "aligned":
        return np.zeros(devices)
    # its own generator: the requests' draws (`requests`) are the same with or without a trace
    return np.random.default_rng([seed, 7]).uniform(0, period_ms, devices)


class _TraceSender:
    """When a feature (of its size) has crossed each device's uplink, in the trace's delivery
    opportunities of 1,500 bytes, step for step as the link emulator's `_Bottleneck` does
    it (vectorized over devices): a link idle when a feature starts has lost the
    opportunities before; a busy one goes on from the first it has not used, and the
    room left in a packet carries the next feature's first bytes."""

    def __init__(self, link: LinkModel, devices: int, seed: int) -> None:
        from splitexit.sim.link import PACKET_BYTES

        trace = load_link_trace(link.trace)
        self.times = np.asarray(trace.times_ms, dtype=np.float64)
        self.period, self.per = float(trace.period_ms), len(self.times)
        self.packet = PACKET_BYTES
        self.offset = trace_offsets_ms(link, devices, seed, self.period)
        self.next = np.zeros(devices)  # per device: the first opportunity not used yet
        self.left = np.zeros(devices)  # bytes still free in the one before it
        self.free = np.full(devices, -np.inf)  # when its last feature finished crossing (trace time)

    def _time(self, index: np.ndarray) -> np.ndarray:
        return (index // self.per) * self.period + self.times[(index % self.per).astype(np.int64)]

    def __call__(self, start: np.ndarray, sending: np.ndarray, nbytes: np.ndarray) -> np.ndarray:
        now = start + self.offset  # each device's time in its trace
        cycle = np.floor(np.maximum(now, 0) / self.period)
        first = cycle * self.per + np.searchsorted(self.times, now - cycle * self.period, side="left")
        reset = (now > self.free) & (first >= self.next)
        nxt, left = np.where(reset, first, self.next), np.where(reset, 0.0, self.left)
        rest = nbytes - np.minimum(nbytes, left)
        packets = np.ceil(rest / self.packet)
        last = np.where(rest > 0, nxt + packets - 1, nxt - 1)
        left = np.where(rest > 0, packets * self.packet - rest, left - nbytes)
        done = np.maximum(now, self._time(np.maximum(last, 0)))
        self.next = np.where(sending, nxt + packets, self.next)
        self.left = np.where(sending, left, self.left)
        self.free = np.where(sending, np.maximum(self.free, done), self.free)
        return done - self.offset


def _cloud(arrive: np.ndarray, deadline: np.ndarray, cloud: CloudModel, progress: Callable[[str], None] | None = None
           ) -> tuple[np.ndarray, np.ndarray, int, int, float, list[tuple[float, int]]]:
    """The workers' shared queue, one row per request, requests in arrival order.

    Returns when each request's answer (or refusal) leaves the cloud, how it ended (1
    answered, 2 refused or lost with a failed worker, 3 late: its deadline passed before
    its batch would end), and the batches' count, rows and summed compute time, and the
    worker count over time ((s, count) at the start and at each change: with
    `cloud.autoscale` it follows its rules, and `cloud.events` fail, drain and start
    workers)."""
    n = len(arrive)
    out = np.empty(n)
    how = np.ones(n, dtype=np.int8)
    scale = cloud.autoscale
    count = cloud.workers if scale is None else min(max(cloud.workers, scale.min_workers), scale.max_workers)
    free: list[float] = [0.0] * count  # when each worker is next free (a heap)
    heapq.heapify(free)
    full_ms = cloud.batch_time_ms(cloud.max_batch)
    delay = cloud.max_delay_ms
    queue: list[int] = []  # waiting requests (indices), FIFO
    head = 0  # queue[head:] are waiting
    batches = rows_total = 0
    busy = 0.0
    running: list[tuple[float, float]] = []  # (start, end) of recent batches: utilisation
    computing: list[float] = []  # ends of the batches started and not yet over (a heap): admission
    members_at: dict[float, list[int]] = {}  # a worker's busy-until time -> the requests of its batch
    events = list(cloud.events)
    i = 0
    arrive_l, deadline_l = arrive.tolist(), deadline.tolist()
    # autoscaling state
    sync_ms = 1e3 * scale.sync_s if scale is not None else float("inf")
    next_sync = sync_ms
    # the starting count stands as a recommendation at 0: no scale-down within the first window
    desired_history: list[tuple[float, int]] = [(0.0, count)]
    timeline: list[tuple[float, int]] = [(0.0, count)]

    def start_batches(until: float) -> None:
        """Start every batch the rules would start before time `until`."""
        nonlocal head, batches, rows_total, busy
        while head < len(queue) and free:
            worker_free = free[0]
            oldest = arrive_l[queue[head]]
            waiting = len(queue) - head
            # a batch starts when a worker is free and either it is full or the oldest
            # request has waited the queue delay
            ready = max(worker_free, oldest) if waiting >= cloud.max_batch else max(worker_free, oldest + delay)
            if ready > until:
                return
            take = min(waiting, cloud.max_batch)
            members = queue[head:head + take]
            head += take
            compute = cloud.batch_time_ms(take)
            ends = ready + compute
            while ends in members_at:  # the key names one batch
                ends = math.nextafter(ends, math.inf)
            heapq.heapreplace(free, ends)
            if events:
                members_at[ends] = members
            live = 0
            for j in members:
                if deadline_l[j] < ends:  # would be answered too late: dropped, not computed
                    how[j], out[j] = 3, deadline_l[j]
                else:
                    out[j] = ends
                    live += 1
            if live:
                batches += 1
                rows_total += live
                busy += compute
            running.append((ready, ends))
            heapq.heappush(computing, ends)

    def autoscale(now: float) -> None:
        """The autoscaler's syncs up to `now` (see Autoscale)."""
        nonlocal next_sync, running
        assert scale is not None
        while next_sync <= now:
            start_batches(next_sync)
            window = (next_sync - sync_ms, next_sync)
            used = sum(max(0.0, min(e, window[1]) - max(b, window[0])) for b, e in running)
            running = [(b, e) for b, e in running if e > window[0] - full_ms]  # keep what may still count
            workers = len(free)
            utilisation = used / (workers * sync_ms)
            desired = min(scale.max_workers, max(scale.min_workers, math.ceil(workers * utilisation / scale.target)))
            desired_history.append((next_sync, desired))
            recent = [d for t, d in desired_history if t >= next_sync - 1e3 * scale.stabilization_s]
            if desired > workers:
                for _ in range(desired - workers):  # serving once started and warm
                    heapq.heappush(free, next_sync + 1e3 * scale.start_s)
            elif max(recent) < workers:
                leave = workers - max(recent)
                idle = sorted(f for f in free if f <= next_sync)[:leave]
                for f in idle:
                    free.remove(f)
                heapq.heapify(free)
            if len(free) != timeline[-1][1]:
                timeline.append((next_sync / 1e3, len(free)))
            next_sync += sync_ms

    def worker_events(now: float) -> None:
        """The scenario's worker failures, drains and starts up to `now`."""
        while events and 1e3 * events[0].at_s <= now:
            event = events.pop(0)
            at = 1e3 * event.at_s
            start_batches(at)
            for _ in range(event.count):
                if event.kind == "start":
                    heapq.heappush(free, at)
                elif not free:
                    break
                elif event.kind == "drain":  # the first to be free leaves once its batch is done
                    heapq.heappop(free)
                else:  # fail: the busiest worker dies, its batch with it
                    worst = max(free)
                    free.remove(worst)
                    heapq.heapify(free)
                    for j in members_at.pop(worst, []) if worst > at else []:
                        if how[j] == 1:
                            how[j], out[j] = 2, at
            timeline.append((event.at_s, len(free)))

    step = max(n // 10, 100_000)  # a progress line per tenth of a long pass
    while i < n:
        t = arrive_l[i]
        if progress is not None and i % step == 0 and i:
            progress(f"{i:,} of {n:,} offloads through the workers")
        if events:
            worker_events(t)
        if scale is not None:
            autoscale(t)
        start_batches(t)
        # admission, as cloud.batcher decides it: by count, then by the work ahead (full
        # batches, waiting and computing; a request's own batch is not waiting)
        waiting = len(queue) - head
        if waiting + 1 > cloud.queue_limit_rows or not free:  # no worker at all: UNAVAILABLE
            how[i], out[i] = 2, t
            i += 1
            continue
        while computing and computing[0] <= t:
            heapq.heappop(computing)
        wait_ms = (-(-waiting // cloud.max_batch) + min(len(computing), len(free))) * full_ms / len(free)
        if wait_ms > cloud.max_queue_wait_ms or t + wait_ms + cloud.batch_time_ms(1) > deadline_l[i]:
            how[i], out[i] = 2, t
            i += 1
            continue
        queue.append(i)
        i += 1
        if head > 4096 and head > len(queue) // 2:  # keep the list short
            del queue[:head]
            head = 0
        if len(running) > 8192 and scale is None:  # only the autoscaler looks back
            del running[:4096]
        if len(members_at) > 8192:  # only batches still computing can be lost
            members_at = {e: m for e, m in members_at.items() if e > t}
    if events:
        worker_events(math.inf)
    start_batches(float("inf"))
    for j in queue[head:]:  # no worker left to take them: the edge gives up at the deadline
        how[j], out[j] = 3, deadline_l[j]
    return out, how, batches, rows_total, busy, timeline


def run_timed(scenario: Scenario, progress: Callable[[str], None] | None = None) -> tuple[VirtualResult, float]:
    """The result and the wall time it took (s)."""
    started = time.perf_counter()
    result = simulate_fleet(scenario, progress)
    return result, time.perf_counter() - started


def load_scenario(path: str | Path) -> Scenario:
    """A scenario TOML file ([fleet], [edge], [link], [cloud] tables; `name`, `seed`).
    Raises ValueError naming the file and what is wrong."""
    return read_scenario_file(path, Scenario.from_dict)


def read_scenario_file(path: str | Path, build: Callable[[Mapping[str, Any]], T]) -> T:
    """`build` on a TOML file's tables (with `name` defaulting to the file's stem); any
    error a ValueError naming the file and what is wrong."""
    import sys

    if sys.version_info >= (3, 11):
        import tomllib
    else:  # the same parser, before it joined the standard library
        import tomli as tomllib

    path = Path(path)
    try:
        data = tomllib.loads(path.read_text())
    except OSError as exc:
        raise ValueError(f"{path}: cannot read ({exc.strerror or exc})") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"{path}: not a TOML file ({exc})") from None
    try:
        return build({"name": path.stem, **data})
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{path}: {exc}") from None


def plot_latency(result: VirtualResult, path: Path, *, title: str) -> Path:
    """The latency distribution (CDF) of every request, and of each route's."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    fig, ax = plt.subplots(figsize=(7, 4.2))
    latency = result.latency_ms
    for code, name in [(-1, "all")] + list(enumerate(VirtualResult.ROUTES)):
        values = np.sort(latency if code < 0 else latency[result.route == code])
        if len(values):
            ax.plot(values, np.arange(1, len(values) + 1) / len(values), label=f"{name} ({len(values):,})",
                    linewidth=2.5 if code < 0 else 1.2)
    ax.set_xscale("log")
    ax.xaxis.set_major_locator(matplotlib.ticker.LogLocator(subs=(1.0, 2.0, 5.0)))  # 10, 20, 50, 100, ...
    ax.xaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())  # 20, not 2x10^1
    ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax.set_xlabel("latency per request (ms, log scale)")
    ax.set_ylabel("share of requests answered within")
    ax.grid(alpha=0.3, which="both")
    ax.legend(loc="lower right", fontsize=8)
    ax.set_title(title, fontsize=10)
    return _save(fig, path)


def plot_splits(result: VirtualResult, path: Path, *, title: str, bins: int = 100) -> Path:
    """Where the devices cut their requests over time (re-planning): per time slot, the
    share of the requests sent then at each split, and the mean latency beside it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    assert result.split is not None
    sent_s = result.sent_ms / 1e3
    edges = np.linspace(sent_s.min(), sent_s.max(), bins + 1)
    slot = np.clip(np.searchsorted(edges, sent_s, side="right") - 1, 0, bins - 1)
    per_slot = np.maximum(np.bincount(slot, minlength=bins), 1)
    middle = (edges[:-1] + edges[1:]) / 2
    fig, (cuts, latency) = plt.subplots(2, 1, figsize=(7, 5), sharex=True, height_ratios=(2, 1))
    splits = np.unique(result.split)
    shares = [np.bincount(slot[result.split == s], minlength=bins) / per_slot for s in splits]
    cuts.stackplot(middle, shares, labels=[f"cut after stage {s}" for s in splits], alpha=0.85)
    cuts.set_ylabel("share of requests")
    cuts.set_ylim(0, 1)
    cuts.legend(loc="lower left", fontsize=8)
    cuts.set_title(f"{title}: where the devices cut ({result.plans} plan changes)", fontsize=10)
    mean = np.bincount(slot, weights=result.latency_ms, minlength=bins) / per_slot
    latency.plot(middle, mean, color="black", linewidth=1.2)
    latency.set_ylabel("mean latency (ms)")
    latency.set_xlabel("time sent (s)")
    latency.grid(alpha=0.3)
    return _save(fig, path)


def _save(fig: Any, path: Path) -> Path:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def cmd_virtual(args: Any) -> None:
    """`splitexit sim virtual SCENARIO.toml`: run it, print the report, write JSON and a plot."""
    import json

    from splitexit.cli import CliError

    try:
        scenario = load_scenario(args.scenario)
    except ValueError as exc:
        raise CliError(str(exc)) from None
    if args.seed is not None:
        scenario = replace(scenario, seed=args.seed)
    f = scenario.fleet
    print(f"{scenario.name}: {f.devices:,} devices x {f.requests} requests ({f.devices * f.requests:,}), "
          f"{scenario.cloud.workers} worker(s), seed {scenario.seed}")
    result, wall = run_timed(scenario, progress=lambda line: print(f"  {line}", flush=True))
    report = {**result.report(scenario.cloud.workers), "wall_s": round(wall, 3), "scenario": scenario.to_dict()}
    print(", ".join(f"{k} {v}" for k, v in report.items() if k != "scenario"))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "virtual.json").write_text(json.dumps(report, indent=2))
    png = plot_latency(result, args.out / "virtual.png",
                       title=f"{scenario.name}: {f.devices:,} devices, {scenario.cloud.workers} worker(s), "
                             f"p95 {report['p95_ms']} ms, degraded {report['degraded_share']:.1%}")
    plots = [png] if result.split is None else [png, plot_splits(result, args.out / "splits.png", title=scenario.name)]
    print(f"wrote {args.out / 'virtual.json'} and {' and '.join(map(str, plots))}")


def fewest_workers(scenario: Scenario, *, p99_ms: float, max_degraded: float = 0.01,
                   limit: int = 4096) -> tuple[int, dict[int, dict[str, Any]]]:
    """The fewest workers with which the scenario's p99 latency is at most `p99_ms` and its
    degraded share at most `max_degraded`, and the reports of every count tried (doubling
    up to a count that meets the target, then bisecting). ValueError when `limit` workers
    do not meet it (the target is below what the devices and links alone take)."""
    tried: dict[int, dict[str, Any]] = {}

    def meets(workers: int) -> bool:
        if workers not in tried:
            sized = replace(scenario, cloud=replace(scenario.cloud, workers=workers))
            tried[workers] = simulate_fleet(sized).report(workers)
        report = tried[workers]
        return report["p99_ms"] <= p99_ms and report["degraded_share"] <= max_degraded

    high = 1
    while not meets(high):
        if high >= limit:
            raise ValueError(f"{limit} workers do not keep p99 <= {p99_ms:g} ms and degraded <= {max_degraded:.1%} "
                             f"(p99 {tried[high]['p99_ms']} ms, degraded {tried[high]['degraded_share']:.2%}): the "
                             f"devices and links alone may take longer")
        high = min(limit, high * 2)
    low = high // 2  # misses (or 0)
    while high - low > 1:
        middle = (low + high) // 2
        if meets(middle):
            high = middle
        else:
            low = middle
    if high > 1:
        meets(high - 1)  # the count below, reported beside: it must miss
    return high, tried


def plot_capacity(tried: dict[int, dict[str, Any]], path: Path, *, p99_ms: float, max_degraded: float,
                  answer: int, title: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    counts = sorted(tried)
    fig, ax = plt.subplots(figsize=(7, 4.2))
    ax.plot(counts, [tried[c]["p99_ms"] for c in counts], "o-", color="tab:blue", label="p99 latency (ms)")
    ax.axhline(p99_ms, color="tab:blue", linestyle="--", label=f"target p99 {p99_ms:g} ms")
    ax.axvline(answer, color="grey", linestyle=":", label=f"answer: {answer} workers")
    ax.set_xlabel("workers")
    ax.set_ylabel("p99 latency (ms)")
    ax.set_ylim(bottom=0)
    ax2 = ax.twinx()
    ax2.plot(counts, [100 * tried[c]["degraded_share"] for c in counts], "s-", color="tab:red",
             label="degraded (%)")
    ax2.axhline(100 * max_degraded, color="tab:red", linestyle="--", label=f"target degraded {max_degraded:.1%}")
    ax2.set_ylabel("degraded answers (%)")
    lines = ax.get_legend_handles_labels()
    more = ax2.get_legend_handles_labels()
    ax.legend(lines[0] + more[0], lines[1] + more[1], loc="upper right", fontsize=8)
    ax.grid(alpha=0.3)
    ax.set_title(title, fontsize=10)
    return _save(fig, path)


def cmd_capacity(args: Any) -> None:
    """`splitexit sim capacity SCENARIO.toml --p99-ms X`: the fewest workers that meet it."""
    import json

    from splitexit.cli import CliError

    try:
        scenario = load_scenario(args.scenario)
        answer, tried = fewest_workers(scenario, p99_ms=args.p99_ms, max_degraded=args.max_degraded)
    except ValueError as exc:
        raise CliError(str(exc)) from None
    for workers in sorted(tried):
        r = tried[workers]
        print(f"{workers:5d} workers: p99 {r['p99_ms']:9.1f} ms, degraded {r['degraded_share']:7.2%}, "
              f"utilisation {r['utilisation']}")
    below = tried.get(answer - 1)
    print(f"fewest workers for p99 <= {args.p99_ms:g} ms and degraded <= {args.max_degraded:.1%}: {answer}"
          + (f" ({answer - 1} give p99 {below['p99_ms']} ms, degraded {below['degraded_share']:.2%})" if below else ""))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "capacity.json").write_text(json.dumps(
        {"workers": answer, "p99_ms_target": args.p99_ms, "max_degraded": args.max_degraded,
         "tried": {str(k): v for k, v in sorted(tried.items())}, "scenario": scenario.to_dict()}, indent=2))
    png = plot_capacity(tried, args.out / "capacity.png", p99_ms=args.p99_ms, max_degraded=args.max_degraded,
                        answer=answer, title=f"{scenario.name}: workers needed")
    print(f"wrote {args.out / 'capacity.json'} and {png}")
