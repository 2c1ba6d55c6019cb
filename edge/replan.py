"""Online re-planning in the edge agent (SPINN-style): where to cut the network for the
link as it is now, among the split points the bundle allows.

The inputs of the planner (`splitexit.plan.expected_ms`, METHODS.md §6) are, per split:
- the device's times, from its profile (`splitexit profile`), fixed before the run;
- the worker's times, from its profile (or taken as 0: the link and the device dominate);
- the bytes an offloaded row carries there, in the agent's codec;
- the share of inputs each exit answers: counted from this agent's own answers (the policy
  decides the same whatever the cut, so every answer counts, wherever it came from);
- the link: `LinkEstimator`'s passive estimate from the agent's own offloads.

A `Replanner` keeps the choice until another split is better by a margin on several
estimates in a row, so a noisy but steady link does not make it flap. The estimate needs
offloads of different sizes to tell the RTT from the bandwidth, and none at all while the
plan keeps every row on the device: so every `probe_s`, when the recent offloads are all
alike or there are none, one batch is cut at another split (the deepest a worker takes
when the plan is on the device or the shallowest, the one whose feature differs most in
size otherwise). Its rows are answered as usual; only its latency differs. When the cloud
is gone the agent answers from its exits whatever the plan.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

import numpy as np

from splitexit.codec import encoded_bytes
from splitexit.plan import (Candidate, DeviceTimes, ExitBehaviour, LinkEstimate, LinkEstimator, Replanner, expected_ms,
                            rank, route_overhead_ms)

__all__ = ["ReplanConfig", "SplitChooser"]


@dataclass(frozen=True, kw_only=True)
class ReplanConfig:
    """How the agent re-plans its split. Times in milliseconds per input (batch 1)."""

    device: DeviceTimes  # the device's times (`DeviceProfile.at(1)`)
    cloud: DeviceTimes | None = None  # the worker's; None = its compute taken as 0
    margin: float = 0.1  # another split must be this much faster (relative)...
    patience: int = 3  # ...on this many re-plans in a row
    every_s: float = 0.2  # re-plan at most this often
    probe_s: float = 1.0  # while every row stays on the device, one batch offloaded this often
    window: int = 10  # offloads the link estimate is fitted on (fewer: quicker to follow, noisier)
    # the share of inputs each ladder exit answers, to start from (e.g. measured on
    # validation data); the agent's own answers are added to it. () = no prior.
    share: tuple[float, ...] = ()
    share_weight: float = 1000.0  # how many answers the prior counts as
    # the link as planned offline: what the agent assumes until its offloads measure it
    prior: LinkEstimate | None = None
    # while no cut that crosses the link could win even over an infinitely fast uplink (the
    # RTT alone costs more), probes are this many times rarer: each one costs an input a
    # round trip, and only an RTT that shrank could change the plan
    hopeless_backoff: float = 10.0
    # what each kind of route costs per input beyond the cost model, as the offline planner
    # counts it (`splitexit.plan.plan`'s overhead_ms: "edge", "split"); None = nothing
    overhead_ms: Mapping[str, float] | None = None

    def __post_init__(self) -> None:
        if self.share and (min(self.share) < 0 or abs(sum(self.share) - 1) > 1e-6):
            raise ValueError(f"replan: share must be >= 0 and sum to 1, got {self.share}")
        if not 0 <= self.margin < 1 or self.patience < 1 or self.every_s < 0 or self.probe_s <= 0 or self.window < 2:
            raise ValueError("replan: margin in [0, 1), patience >= 1, every_s >= 0, probe_s > 0, window >= 2")


@dataclass
class PlanEvent:
    """One re-plan: when, the link estimate it used, and the split chosen."""

    t: float  # the chooser's clock (seconds)
    split: int
    up_mbps: float | None
    rtt_ms: float | None
    expected_ms: float


@dataclass
class SplitChooser:
    """The agent's current split, re-planned from its link estimate and its answers."""

    manifest: Any  # splitexit.manifest.Manifest
    config: ReplanConfig
    codec: str
    # seconds, monotonic: the wall clock in the agent, simulated time in the fleet simulator
    clock: Callable[[], float] = time.monotonic
    link: LinkEstimator = field(init=False)  # the uplink, from the agent's offloads
    history: list[PlanEvent] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.link = LinkEstimator(self.config.window)
        exits = self.manifest.exits
        stages = self.config.device.num_stages
        if stages != exits[-1] + 1:
            raise ValueError(f"the device profile has {stages} stages, the bundle's network {exits[-1] + 1}")
        if set(self.config.device.exit_ms) < set(exits[:-1]):
            raise ValueError(f"the device profile times exits {sorted(self.config.device.exit_ms)}, "
                             f"the bundle has {list(exits[:-1])}")
        self._cloud = self.config.cloud or DeviceTimes(stage_ms=(0.0,) * stages, exit_ms={k: 0.0 for k in exits[:-1]},
                                                       head_ms=0.0)
        self._bytes = {s: float(encoded_bytes(self.codec, (1, *self.manifest.feature_shapes[s])))  # type: ignore[arg-type]
                       for s in self.manifest.cloud_splits}
        self._counts = np.ones(len(exits))  # answers per ladder exit, one of each to start
        if self.config.share:
            if len(self.config.share) != len(exits):
                raise ValueError(f"replan: {len(self.config.share)} shares for {len(exits)} exits")
            self._counts += np.asarray(self.config.share) * self.config.share_weight
        self._index = {stage: i for i, stage in enumerate(exits)}
        self._replanner = Replanner(margin=self.config.margin, patience=self.config.patience)
        self.split: int = self.manifest.split
        self._planned = -float("inf")
        # without a prior the first batch probes; with one, the plan starts from it
        self._probed = self.clock() if self.config.prior is not None else -math.inf
        self._estimate: LinkEstimate | None = None
        self._hopeless = False  # no cut crossing the link could win (set by `replan`)
        self._probe_last = False  # the last batch was a probe

    # --- what the agent tells it ------------------------------------------------------
    def observe_answer(self, stage: int, own_network: bool = True) -> None:
        """An answer from the exit after `stage` (the larger network's: the ladder's end)."""
        i = self._index.get(stage, len(self._counts) - 1) if own_network else len(self._counts) - 1
        self._counts[i] += 1

    # --- what it tells the agent ------------------------------------------------------
    def offload_bytes(self, split: int) -> float:
        """The feature's bytes per row when cut after `split` (0 for the last stage: nothing leaves)."""
        return self._bytes.get(split, 0.0)

    def split_for_batch(self) -> int:
        """The split to cut the next batch at (re-planning first when it is time)."""
        now = self.clock()
        if now - self._planned >= self.config.every_s:
            self._planned = now
            self.replan()
        interval = self.config.probe_s * (self.config.hopeless_backoff if self._hopeless else 1.0)
        # never two probes in a row: with batches rarer than probe_s every batch would be a
        # probe, and the plan's own split would never be measured
        if (self._bytes and now - self._probed >= interval and not self._probe_last
                and not (self.split in self._bytes and self.link.varied())):
            self._probed, self._probe_last = now, True
            return self._probe_split()
        self._probe_last = False
        return self.split

    def _no_cut_could_win(self, rtt_ms: float) -> bool:
        """Does the plan keep every row on the device, and would it still with an
        infinitely fast uplink at this RTT?"""
        if self.split in self._bytes:
            return False
        return self.candidates(LinkEstimate(up_mbps=math.inf, rtt_ms=rtt_ms))[0].split not in self._bytes

    def _probe_split(self) -> int:
        """A cut whose offloads measure what the current one's cannot: any that crosses
        the link when nothing does, else the one whose feature differs most in size."""
        deepest = max(self._bytes)
        if self.split not in self._bytes:
            return deepest
        size = self._bytes[self.split]
        return max(self._bytes, key=lambda s: max(self._bytes[s], size) / max(1.0, min(self._bytes[s], size)))

    def candidates(self, link: LinkEstimate) -> list[Candidate]:
        """Every allowed split under `link`, best first."""
        exits = self.manifest.exits[:-1]
        share = self._counts / self._counts.sum()
        behaviour = ExitBehaviour(setting="the bundle's policy", share=tuple(float(x) for x in share), acc=0.0)
        out = []
        for split in self.manifest.splits:
            ms, local = expected_ms(self.config.device, self._cloud, link, exits, behaviour, split,
                                    self._bytes.get(split, 0.0))
            ms += route_overhead_ms(self.config.overhead_ms, local)
            out.append(Candidate(route="adaptive" if split in self._bytes else "edge_exits", split=split,
                                 setting=behaviour.setting, expected_ms=ms, acc=0.0,
                                 bytes_up=(1 - local) * self._bytes.get(split, 0.0), on_device=local))
        return rank(out)

    def replan(self) -> int:
        """Re-plan on the current link estimate (the prior until there is one); the split to use."""
        measured = self.link.estimate()
        if measured is not None:
            self._estimate = measured  # the last measured (the prior is not a measurement)
        estimate = measured or self.config.prior
        if estimate is None:
            return self.split
        chosen = self._replanner.update(self.candidates(estimate))
        assert chosen.split is not None
        self.history.append(PlanEvent(t=self.clock(), split=chosen.split,
                                      up_mbps=measured.up_mbps if measured else None,
                                      rtt_ms=measured.rtt_ms if measured else None,
                                      expected_ms=chosen.expected_ms))
        self.split = chosen.split
        # judged here, once a re-plan, not at every batch: it ranks every split again
        self._hopeless = self._no_cut_could_win(estimate.rtt_ms)
        return self.split

    @property
    def changes(self) -> int:
        """Plans made that differed from the one before (the first plan counts as one)."""
        return self._replanner.changes

    def record(self) -> dict[str, Any]:
        """For the agent's trace: the split and the estimate it was chosen on."""
        out: dict[str, Any] = {"split": self.split, "changes": self.changes}
        if self._estimate is not None and self._estimate.up_mbps is not None:
            out.update(up_mbps=round(self._estimate.up_mbps, 3), rtt_ms=round(self._estimate.rtt_ms, 3))
        return out
