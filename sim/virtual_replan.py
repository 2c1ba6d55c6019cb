"""Online re-planning inside the fleet simulator (`[edge.replan]`): each device chooses the
split of each request as the edge agent's `--replan` does, with the agent's own class
(`splitexit.edge.replan.SplitChooser`) on simulated time, from what its earlier requests
saw: the offloads answered by the cloud (bytes, round trip, the worker's queue and
compute), those that ran out of time (a lower bound on the round trip) and the exits
that answered.

The choices depend on the answers, so `simulate_fleet` runs the fleet again with the
choices that the last run's answers give until they settle (`DevicePlanners.cuts`).
What differs from the agent, and why:
- the agent does not count its first offload's round trip (it paid for the connection's
  set-up); the simulator has no set-up, so it counts every one;
- the worker's compute is counted as 0 in the plan (the agent's default without
  `--cloud-profile`), and the share each exit answers starts from the test set's own.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable, NamedTuple

import numpy as np

from splitexit.edge.replan import ReplanConfig, SplitChooser

if TYPE_CHECKING:
    from splitexit.sim.virtual import Cuts, Scenario, VirtualResult

__all__ = ["DevicePlanners"]

ANSWERED = (0, 1)  # routes whose answers the chooser counts: the edge's and the cloud's
LATE = 3  # an offload that ran out of time


class DevicePlanners:
    """The re-planning devices of a scenario: the cuts their choices give, run after run."""

    def __init__(self, scenario: "Scenario") -> None:
        from splitexit.bundle import read_manifest
        from splitexit.profile import load_profile
        from splitexit.sim.virtual import network_exits, profile_costs

        edge = scenario.edge
        assert edge.replan is not None
        self.manifest = read_manifest(edge.bundle)
        if len(self.manifest.splits) < 2:
            raise ValueError(f"[edge.replan]: {edge.bundle} allows one split ({self.manifest.split}); "
                             "export it with --splits")
        stages, _, _ = network_exits(edge.bundle, edge.data)
        ladder = list(self.manifest.exits)
        share = np.bincount([ladder.index(int(s)) for s in stages], minlength=len(ladder)) / len(stages)
        config = dict(edge.replan)
        for key in ("patience", "window"):
            if key in config:
                config[key] = int(config[key])
        self.config = ReplanConfig(device=load_profile(edge.profile).at(1), share=tuple(float(x) for x in share),
                                   **config)  # type: ignore[arg-type]
        self.devices, self.per = scenario.fleet.devices, scenario.fleet.requests
        self.stage = stages[np.arange(self.devices * self.per) % len(stages)]
        reach, to_split = profile_costs(edge)
        self.edge_ms = np.asarray([reach[int(s)] for s in self.stage])
        probe = self._new(lambda: 0.0)
        splits = self.manifest.splits
        self.split_ms = {s: to_split(s) for s in splits}
        self.bytes = {s: probe.offload_bytes(s) for s in splits}
        self.changes = 0
        self._memo: dict[int, tuple[bytes, np.ndarray, int]] = {}  # per device: (_key, splits, changes)

    def _new(self, clock: Callable[[], float]) -> SplitChooser:
        return SplitChooser(self.manifest, self.config, self.manifest.codec, clock=clock)

    def cuts(self, sent: np.ndarray, last: "VirtualResult | None") -> "Cuts":
        """Each request's cut as its device would choose it, given the answers of `last`
        (None: no answer seen yet, as on a first run). A device whose sends and answers
        are those of the run before chooses as it did then: it is not walked again."""
        from splitexit.sim.virtual import Cuts

        split = np.empty(len(sent), dtype=np.int64)
        self.changes = 0
        for d in range(self.devices):
            rows = np.arange(d * self.per, (d + 1) * self.per)
            key = self._key(rows, sent, last)
            memo = self._memo.get(d)
            if memo is None or memo[0] != key:
                memo = (key, *self._walk(rows, sent, last))
                self._memo[d] = memo
            split[rows] = memo[1]
            self.changes += memo[2]
        on_device = self.stage <= split
        split_ms = np.asarray([self.split_ms[int(s)] for s in split])
        nbytes = np.where(on_device, 0.0, np.asarray([self.bytes[int(s)] for s in split]))
        return Cuts(on_device, self.edge_ms, split_ms, nbytes, split)

    @staticmethod
    def _key(rows: np.ndarray, sent: np.ndarray, last: "VirtualResult | None") -> bytes:
        """Everything a device's choices depend on: its send times and what it saw answered."""
        parts = [sent[rows]]
        if last is not None:
            assert last.ready is not None and last.server_ms is not None and last.nbytes is not None
            parts += [last.done_ms[rows], last.route[rows].astype(np.float64), last.ready[rows],
                      last.server_ms[rows], last.nbytes[rows]]
        return b"".join(np.ascontiguousarray(x).tobytes() for x in parts)

    def _walk(self, rows: np.ndarray, sent: np.ndarray, last: "VirtualResult | None") -> tuple[np.ndarray, int]:
        """One device's chooser through its requests in order of sending: the split of
        each, and how often its plan changed (a probe is not a change)."""
        now = [0.0]
        chooser = self._new(lambda: now[0])
        seen = self._observations(rows, last)
        out = np.empty(len(rows), dtype=np.int64)
        changes = k = 0
        for i in np.argsort(sent[rows], kind="stable"):
            t = float(sent[rows[i]])
            while k < len(seen) and seen[k].at_ms < t:  # what was answered before this request
                o = seen[k]
                if o.route == 1:
                    chooser.link.observe(int(o.nbytes), o.round_trip_s, server_ms=o.server_ms)
                if o.route == LATE:  # ran out of time: the agent takes it as a lower bound
                    chooser.link.observe_timeout(o.round_trip_s)
                else:  # a degraded answer does not count toward the exits' shares
                    chooser.observe_answer(int(self.stage[o.row]))
                k += 1
            now[0] = t / 1e3
            before = chooser.split
            out[i] = chooser.split_for_batch()
            changes += chooser.split != before
        return out, changes

    @staticmethod
    def _observations(rows: np.ndarray, last: "VirtualResult | None") -> list["_Seen"]:
        """What a device saw in `last`, in time order: each answer, and each offload that
        ran out of time."""
        if last is None:
            return []
        assert last.ready is not None and last.server_ms is not None and last.nbytes is not None
        mine = rows[np.isin(last.route[rows], (*ANSWERED, LATE))]
        trip_s = (last.done_ms[mine] - last.ready[mine]) / 1e3
        return sorted(_Seen(*fields) for fields in zip(last.done_ms[mine].tolist(), mine.tolist(),
                                                         last.route[mine].tolist(), last.nbytes[mine].tolist(),
                                                         trip_s.tolist(), last.server_ms[mine].tolist()))


class _Seen(NamedTuple):
    """One outcome a device saw: when, which request, its route, bytes, round trip, the worker's time."""

    at_ms: float
    row: int
    route: int
    nbytes: float
    round_trip_s: float
    server_ms: float
