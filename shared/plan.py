"""The split planner: the expected latency of every way to answer an input, for a device,
a link and a cloud worker, and the choice among them (METHODS.md §5-6).

A row answered at ladder exit j (stage e_j) costs, with the network cut after stage s:
- on the device, e_j <= s: the device's stages 0..e_j and the exit heads evaluated so far;
- in the cloud, e_j > s: the device's stages 0..s and its exit heads, the feature at s
  up the link (bytes / uplink + RTT), the worker's stages s+1..e_j and its exit heads, and
  the answer down.
The expected latency of a (split, policy setting) is the sum over exits of the share of
inputs answered there times that cost (METHODS.md §6's formula, with exit heads counted).
The routes a user would otherwise take are special cases, always in the table:
- `edge_only`: the whole network on the device, no exits, no link;
- `edge_exits`: exits, every stage on the device (a split after the last stage);
- `cloud_only`: the input compressed (e.g. JPEG) up the link, the whole network in the cloud;
- `split`: Neurosurgeon's best cut without exits;
- `adaptive`: the best (split, policy setting) with exits on both sides.

Everything here is plain data and arithmetic (no torch), so the edge agent can re-plan
online (`Replanner`) from its own estimate of the link (`LinkEstimator`).
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field
from typing import Literal, Mapping, Sequence

__all__ = [
    "Candidate",
    "DeviceTimes",
    "EnergyModel",
    "ExitBehaviour",
    "LinkEstimate",
    "LinkEstimator",
    "Replanner",
    "plan",
]

Route = Literal["edge_only", "edge_exits", "cloud_only", "split", "adaptive"]
Objective = Literal["latency", "energy"]
ANSWER_BYTES = 64  # one row's answer on the wire (label, confidence, ids): small, but not zero


@dataclass(frozen=True, kw_only=True)
class DeviceTimes:
    """Milliseconds of one sample's pass on one machine: each stage, each exit head (keyed
    by the stage it follows) and the final head (`splitexit.cost.Timings` at batch 1)."""

    stage_ms: tuple[float, ...]
    exit_ms: Mapping[int, float]
    head_ms: float

    def __post_init__(self) -> None:
        if not self.stage_ms or min(self.stage_ms) < 0 or self.head_ms < 0 or min(self.exit_ms.values(), default=0) < 0:
            raise ValueError("times must be non-negative, with at least one stage")

    @property
    def num_stages(self) -> int:
        return len(self.stage_ms)

    def backbone_ms(self) -> float:
        return sum(self.stage_ms) + self.head_ms

    def scaled(self, factor: float) -> "DeviceTimes":
        """These times `factor` times slower (a device class derived from a measurement)."""
        if not factor > 0:
            raise ValueError(f"factor must be > 0, got {factor}")
        return DeviceTimes(stage_ms=tuple(t * factor for t in self.stage_ms),
                           exit_ms={k: t * factor for k, t in self.exit_ms.items()}, head_ms=self.head_ms * factor)


@dataclass(frozen=True, kw_only=True)
class LinkEstimate:
    """A link as the planner sees it. `up_mbps` None or 0: no link (the cloud is out of reach)."""

    up_mbps: float | None
    down_mbps: float | None = None  # None: not the bottleneck (answers are tiny)
    rtt_ms: float = 0.0

    @property
    def usable(self) -> bool:
        return self.up_mbps is not None and self.up_mbps > 0 and math.isfinite(self.rtt_ms)

    def transfer_ms(self, up_bytes: float, down_bytes: float = ANSWER_BYTES) -> float:
        """One request's bytes up, its answer down, and a round trip."""
        if not self.usable:
            return math.inf
        return self.send_ms(up_bytes) + self.rtt_ms + self.receive_ms(down_bytes)

    def send_ms(self, up_bytes: float) -> float:
        """The time the radio sends `up_bytes` (inf without a link)."""
        if not self.usable:
            return math.inf
        assert self.up_mbps is not None
        return up_bytes * 8 / (self.up_mbps * 1e3)

    def receive_ms(self, down_bytes: float = ANSWER_BYTES) -> float:
        return down_bytes * 8 / (self.down_mbps * 1e3) if self.down_mbps else 0.0


@dataclass(frozen=True, kw_only=True)
class EnergyModel:
    """The device's power, for the energy objective (mJ per input = W x ms): it draws
    `busy_w` while it computes, `idle_w` while it waits for an answer (the RTT and the
    worker's time), and its radio `radio_beta_mw + radio_alpha_mw_per_mbps * rate` while
    it sends (the linear power-throughput model of Huang et al., MobiSys 2012), without
    the radio's tail after a transfer (inputs taken to follow each other closely)."""

    busy_w: float
    idle_w: float
    radio_alpha_mw_per_mbps: float
    radio_beta_mw: float
    source: str = ""  # where the figures come from

    def __post_init__(self) -> None:
        if min(self.busy_w, self.idle_w, self.radio_alpha_mw_per_mbps, self.radio_beta_mw) < 0:
            raise ValueError("powers must be >= 0")

    def radio_w(self, up_mbps: float | None) -> float:
        rate = up_mbps if up_mbps is not None and math.isfinite(up_mbps) else 0.0
        return (self.radio_beta_mw + self.radio_alpha_mw_per_mbps * rate) / 1e3

    def mj(self, device_ms: float, send_ms: float, wait_ms: float, up_mbps: float | None) -> float:
        if send_ms == 0 and wait_ms == 0:
            return device_ms * self.busy_w
        return device_ms * self.busy_w + send_ms * self.radio_w(up_mbps) + wait_ms * self.idle_w


@dataclass(frozen=True, kw_only=True)
class ExitBehaviour:
    """How a policy setting answers, measured on validation outputs: the share of inputs
    answered at each ladder exit (this network's exits, its final head last) and the
    accuracy of those answers."""

    setting: str  # e.g. "maxprob q=0.9"
    share: tuple[float, ...]
    acc: float

    def __post_init__(self) -> None:
        if min(self.share, default=-1) < 0 or abs(sum(self.share) - 1) > 1e-6:
            raise ValueError(f"{self.setting}: shares must be >= 0 and sum to 1, got {self.share}")


@dataclass(frozen=True, kw_only=True)
class Candidate:
    """One way to answer, with what the cost model expects of it per input."""

    route: Route
    split: int | None  # the stage the network is cut after (None: not cut)
    setting: str | None  # the exit policy setting (None: no exits)
    expected_ms: float
    acc: float
    bytes_up: float  # expected bytes sent per input
    on_device: float  # share of inputs answered on the device
    energy_mj: float | None = None  # expected device energy per input (with an EnergyModel)

    def describe(self) -> str:
        """e.g. "adaptive: split after stage 3, maxprob q=0.9"."""
        parts = [] if self.split is None else [f"split after stage {self.split}"]
        parts += [] if self.setting is None else [self.setting]
        if self.route == "split":
            parts.append("no exits")
        return self.route + (": " + ", ".join(parts) if parts else "")


def exit_costs(times: DeviceTimes, exits: Sequence[int], start: int, end: int, *, final: bool) -> list[float]:
    """Cumulative ms on one machine of running stages start..end and evaluating, on the
    way, the exit heads of `exits` within that range: the cost of reaching each of those
    exits, in order, then (with `final`) of the final head after stage `end`."""
    out, ms = [], 0.0
    wanted = [k for k in exits if start <= k <= end]
    stage = start
    for k in wanted:
        while stage <= k:
            ms += times.stage_ms[stage]
            stage += 1
        ms += times.exit_ms[k]
        out.append(ms)
    if final:
        while stage <= end:
            ms += times.stage_ms[stage]
            stage += 1
        out.append(ms + times.head_ms)
    return out


def exit_parts(device: DeviceTimes, cloud: DeviceTimes, link: LinkEstimate, exits: Sequence[int],
               behaviour: ExitBehaviour, split: int,
               feature_bytes: float) -> tuple[list[tuple[float, float, float, float]], float]:
    """What an input answered at each ladder exit costs when cut after `split`: (share,
    device ms, ms sending, ms waiting for the answer) per exit, and the share answered
    on the device. `exits` are the stages of the exit heads, ascending (the final head is
    after the last stage); a split after the last stage keeps everything on the device."""
    last = device.num_stages - 1
    if len(behaviour.share) != len(exits) + 1:
        raise ValueError(f"{behaviour.setting}: {len(behaviour.share)} shares for {len(exits) + 1} exits")
    if split >= last:
        costs = exit_costs(device, exits, 0, last, final=True)
        return [(p, c, 0.0, 0.0) for p, c in zip(behaviour.share, costs)], 1.0
    edge = exit_costs(device, exits, 0, split, final=False)
    edge_part = sum(device.stage_ms[: split + 1]) + sum(device.exit_ms[k] for k in exits if k <= split)
    tail = exit_costs(cloud, exits, split + 1, last, final=True)
    send, wait = link.send_ms(feature_bytes), link.rtt_ms + link.receive_ms()
    parts = [(p, c, 0.0, 0.0) for p, c in zip(behaviour.share, edge)]
    parts += [(p, edge_part, send, wait + c) for p, c in zip(behaviour.share[len(edge):], tail)]
    return parts, float(sum(behaviour.share[: len(edge)]))


def expected_ms(device: DeviceTimes, cloud: DeviceTimes, link: LinkEstimate, exits: Sequence[int],
                behaviour: ExitBehaviour, split: int, feature_bytes: float) -> tuple[float, float]:
    """(expected ms per input, share answered on the device) of cutting after `split` under
    `behaviour` (see `exit_parts`)."""
    parts, on_device = exit_parts(device, cloud, link, exits, behaviour, split, feature_bytes)
    # an unreachable cloud costs nothing when no input goes there
    return sum(p * (d + s + w) for p, d, s, w in parts if p > 0), on_device


def expected_mj(energy: EnergyModel, device: DeviceTimes, cloud: DeviceTimes, link: LinkEstimate,
                exits: Sequence[int], behaviour: ExitBehaviour, split: int, feature_bytes: float) -> float:
    """Expected device energy per input (mJ) of cutting after `split` under `behaviour`."""
    parts, _ = exit_parts(device, cloud, link, exits, behaviour, split, feature_bytes)
    return sum(p * energy.mj(d, s, w, link.up_mbps) for p, d, s, w in parts if p > 0)


def route_overhead_ms(overhead_ms: Mapping[str, float] | None, on_device: float) -> float:
    """A route's own cost per input beyond the cost model (see `plan`'s overhead_ms): the
    edge's for the share answered on the device, the split's for the rest."""
    over = overhead_ms or {}
    return on_device * over.get("edge", 0.0) + (1 - on_device) * over.get("split", 0.0)


def plan(*, device: DeviceTimes, cloud: DeviceTimes, link: LinkEstimate, exits: Sequence[int],
         behaviours: Sequence[ExitBehaviour], full_acc: float, feature_bytes: Sequence[float],
         input_bytes: float, splits: Sequence[int] | None = None, cloud_only_acc: float | None = None,
         accuracy_floor: float | None = None, latency_target_ms: float | None = None,
         energy: EnergyModel | None = None, objective: Objective = "latency",
         overhead_ms: Mapping[str, float] | None = None) -> list[Candidate]:
    """Every candidate, best first.

    `overhead_ms`: what each kind of route costs per input beyond the cost model (the
    software's own time: the runner, encoding, gRPC, the worker's handling), keyed "edge"
    (the device answers), "cloud_only" and "split" (every row offloaded); measured on an
    ideal link as the measured time less the model's (`sim.e2e.calibrate_overheads`). A cut
    with exits pays the edge's for the rows it answers and the split's for the rest.

    Best: with `latency_target_ms`, the most accurate candidate that meets it (Edgent), then
    the fastest; otherwise the fastest (the least energy with `objective="energy"`, which
    needs `energy`) among those at or above `accuracy_floor` (default: no floor).
    Candidates that break the constraint follow, fastest first. `feature_bytes[s]`
    is what crosses the link per input when cut after stage s (in the codec used);
    `input_bytes` the compressed input of cloud-only; `splits` the allowed cut points
    (default: every stage but the last).
    """
    if device.num_stages != cloud.num_stages or len(feature_bytes) < device.num_stages - 1:
        raise ValueError("device and cloud times, and feature bytes, must describe the same network")
    if objective == "energy" and energy is None:
        raise ValueError("the energy objective needs an EnergyModel")
    last = device.num_stages - 1
    allowed = [s for s in (range(last) if splits is None else splits) if 0 <= s < last]
    no_exits = ExitBehaviour(setting="no exits", share=(0.0,) * len(exits) + (1.0,), acc=full_acc)

    def mj(behaviour: ExitBehaviour, split: int, nbytes: float) -> float | None:
        if energy is None:
            return None
        return expected_mj(energy, device, cloud, link, exits, behaviour, split, nbytes)

    over = {"edge": 0.0, "cloud_only": 0.0, "split": 0.0, **(overhead_ms or {})}

    out = [Candidate(route="edge_only", split=None, setting=None, expected_ms=device.backbone_ms() + over["edge"],
                     acc=full_acc, bytes_up=0.0, on_device=1.0, energy_mj=mj(no_exits, last, 0.0))]
    cloud_ms = link.transfer_ms(input_bytes) + cloud.backbone_ms() + over["cloud_only"]
    cloud_mj = None if energy is None else energy.mj(
        0.0, link.send_ms(input_bytes), link.rtt_ms + link.receive_ms() + cloud.backbone_ms(), link.up_mbps)
    out.append(Candidate(route="cloud_only", split=None, setting=None, expected_ms=cloud_ms,
                         acc=full_acc if cloud_only_acc is None else cloud_only_acc,
                         bytes_up=input_bytes, on_device=0.0, energy_mj=cloud_mj))
    plain = [Candidate(route="split", split=s, setting=None, acc=full_acc, bytes_up=feature_bytes[s], on_device=0.0,
                       expected_ms=expected_ms(device, cloud, link, exits, no_exits, s, feature_bytes[s])[0]
                       + over["split"], energy_mj=mj(no_exits, s, feature_bytes[s]))
             for s in allowed]
    if plain:
        out.append(min(plain, key=lambda c: c.expected_ms))  # Neurosurgeon's cut
    with_exits = []
    for b in behaviours:
        ms, _ = expected_ms(device, cloud, link, exits, b, last, 0.0)
        out.append(Candidate(route="edge_exits", split=None, setting=b.setting, expected_ms=ms + over["edge"],
                             acc=b.acc, bytes_up=0.0, on_device=1.0, energy_mj=mj(b, last, 0.0)))
        for s in allowed:
            ms, local = expected_ms(device, cloud, link, exits, b, s, feature_bytes[s])
            with_exits.append(Candidate(route="adaptive", split=s, setting=b.setting,
                                        expected_ms=ms + route_overhead_ms(overhead_ms, local), acc=b.acc,
                                        bytes_up=(1 - local) * feature_bytes[s], on_device=local,
                                        energy_mj=mj(b, s, feature_bytes[s])))
    out.extend(with_exits)
    return rank(out, accuracy_floor=accuracy_floor, latency_target_ms=latency_target_ms, objective=objective)


def rank(candidates: Sequence[Candidate], *, accuracy_floor: float | None = None,
         latency_target_ms: float | None = None, objective: Objective = "latency") -> list[Candidate]:
    """Best first (see `plan`)."""
    def cost(c: Candidate) -> float:
        if objective == "energy":
            return math.inf if c.energy_mj is None else c.energy_mj
        return c.expected_ms

    if latency_target_ms is not None:
        meets = [c for c in candidates if c.expected_ms <= latency_target_ms]
        first = sorted(meets, key=lambda c: (-c.acc, cost(c)))
    else:
        floor = -math.inf if accuracy_floor is None else accuracy_floor
        first = sorted((c for c in candidates if c.acc >= floor), key=lambda c: (cost(c), -c.acc))
    rest = sorted((c for c in candidates if c not in first), key=lambda c: c.expected_ms)
    return first + rest


# --- online -----------------------------------------------------------------------------
class LinkEstimator:
    """A passive estimate of the uplink from the agent's own offloads: over the last
    `window` requests, the time on the wire is fitted as RTT + bytes / bandwidth (least
    squares), which needs requests of different sizes (`varied`). While they are all
    alike, the last RTT fitted stands in for it; before any was fitted, there is no
    estimate (RTT and bandwidth cannot be told apart)."""

    def __init__(self, window: int = 20) -> None:
        self._seen: deque[tuple[float, float]] = deque(maxlen=window)  # (bytes, ms on the wire)
        self._rtt_ms: float | None = None
        self._floor_ms = 0.0  # the round trip is at least this: offloads ran out of time since the last answer

    def observe(self, bytes_up: int, seconds: float, *, server_ms: float = 0.0) -> None:
        """One offload: its request's bytes and its round trip (seconds), of which the
        worker spent `server_ms` (queue and compute, from its answer's timing)."""
        self._seen.append((float(bytes_up), max(seconds * 1e3 - server_ms, 1e-3)))
        self._floor_ms = 0.0

    def observe_timeout(self, seconds: float) -> None:
        """An offload that got no answer within `seconds`: until one is answered again, the
        round trip counts as at least that. Without it, a link so slow that every offload
        runs out of time would never be measured, and the plan would keep offloading."""
        self._floor_ms = max(self._floor_ms, seconds * 1e3)

    def varied(self) -> bool:
        """Do the requests in the window differ enough in size to fit RTT and bandwidth?"""
        sizes = [b for b, _ in self._seen]
        return len(sizes) >= 2 and max(sizes) >= 1.5 * min(sizes)

    def estimate(self) -> LinkEstimate | None:
        fitted = self._fit()
        if not self._floor_ms:
            return fitted
        if fitted is None:  # nothing known but the time-out: the uplink as if free
            return LinkEstimate(up_mbps=math.inf, rtt_ms=self._floor_ms)
        return LinkEstimate(up_mbps=fitted.up_mbps, rtt_ms=max(fitted.rtt_ms, self._floor_ms))

    def _fit(self) -> LinkEstimate | None:
        if len(self._seen) < 2:
            return None
        sizes = [b for b, _ in self._seen]
        times = [t for _, t in self._seen]
        mean_b, mean_t = sum(sizes) / len(sizes), sum(times) / len(times)
        var_b = sum((b - mean_b) ** 2 for b in sizes)
        if var_b > 0 and self.varied():
            slope = sum((b - mean_b) * (t - mean_t) for b, t in self._seen) / var_b  # ms per byte
            if slope > 0:
                self._rtt_ms = max(0.0, mean_t - slope * mean_b)
                return LinkEstimate(up_mbps=8 / (slope * 1e3), rtt_ms=self._rtt_ms)
        if self._rtt_ms is None:
            return None
        rtt = self._rtt_ms
        transfer = [(b, t - rtt) for b, t in self._seen if t > rtt]
        if not transfer:
            return None
        return LinkEstimate(up_mbps=sum(b for b, _ in transfer) * 8 / (sum(t for _, t in transfer) * 1e3), rtt_ms=rtt)


@dataclass
class Replanner:
    """Keeps a plan, and changes it only when another is better by `margin` (relative) on
    `patience` estimates in a row: a noisy but steady link must not make it flap."""

    margin: float = 0.1
    patience: int = 3
    current: Candidate | None = None
    _challenger: str | None = field(default=None, repr=False)
    _streak: int = field(default=0, repr=False)
    changes: int = 0

    def update(self, ranked: Sequence[Candidate]) -> Candidate:
        """The plan to use given a fresh ranking (best first, costs under the new estimate)."""
        best = ranked[0]
        if self.current is None:
            self.current, self.changes = best, self.changes + 1
            return best
        now = next((c for c in ranked if c.describe() == self.current.describe()), None)
        if now is None or best.expected_ms < now.expected_ms * (1 - self.margin) or not math.isfinite(now.expected_ms):
            key = best.describe()
            self._streak = self._streak + 1 if key == self._challenger else 1
            self._challenger = key
            if self._streak >= self.patience or now is None or not math.isfinite(now.expected_ms):
                self.current, self._streak, self._challenger = best, 0, None
                self.changes += 1
        else:
            self._streak, self._challenger = 0, None
            self.current = now  # the same plan, its cost under the new estimate
        return self.current
