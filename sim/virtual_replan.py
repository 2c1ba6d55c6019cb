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

from typing import TYPE_CHECKING, Callable

import numpy as np

from splitexit.edge.replan import ReplanConfig, SplitChooser

if TYPE_CHECKING:
    from splitexit.sim.virtual import Cuts, Scenario, VirtualResult

__all__ = ["DevicePlanners"]

ANSWERED = (0, 1)  # routes whose answers the chooser counts: the edge's and the cloud's
LATE = 3  # an offload that ran out of time


class DevicePlanners:
    """The re-planning devices of a scenario: the cuts their choices give, run after run."""

    def __init__(self, scenario: "Scenario", sent: np.ndarray) -> None:
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
        self.stage = stages[np.arange(len(sent)) % len(stages)]
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
            while k < len(seen) and seen[k][0] < t:  # what was answered before this request
                _, row = seen[k]
                assert last is not None and last.ready is not None and last.server_ms is not None
                assert last.nbytes is not None
                if last.route[row] == 1:
                    chooser.link.observe(int(last.nbytes[row]), (last.done_ms[row] - last.ready[row]) / 1e3,
                                         server_ms=float(last.server_ms[row]))
                if last.route[row] == LATE:  # ran out of time: the agent takes it as a lower bound
                    chooser.link.observe_timeout((last.done_ms[row] - last.ready[row]) / 1e3)
                else:  # a degraded answer does not count toward the exits' shares
                    chooser.observe_answer(int(self.stage[row]))
                k += 1
            now[0] = t / 1e3
            before = chooser.split
            out[i] = chooser.split_for_batch()
            changes += chooser.split != before
        return out, changes

    @staticmethod
    def _observations(rows: np.ndarray, last: "VirtualResult | None") -> list[tuple[float, int]]:
        """(when, request) of each answer a device saw in `last`, and of each offload that
        ran out of time, in time order."""
        if last is None:
            return []
        mine = rows[np.isin(last.route[rows], (*ANSWERED, LATE))]
        return sorted(zip(last.done_ms[mine].tolist(), mine.tolist()))

