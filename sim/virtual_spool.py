"""The edge's spool and refine inside the fleet simulator (`[edge.spool]`).

What the agent does (`splitexit.edge.agent`, `splitexit edge refine`, the systemd timer in
deploy/systemd): every offload that fails (refused, late, lost with a worker, cut off by
an outage) is answered on the device, degraded, and its request is kept in the spool.
A refine run, `refine_every_s` after the previous one ended (the timer's
OnUnitInactiveSec), resends the spooled requests one at a time, oldest first, each with
`refine_timeout_ms`, and stops at the first that fails again: it stays spooled for the
next run. The resends share the device's uplink and the workers with the live traffic.

Which requests are resent depends on the answers (which offloads failed, which resends
failed), so the simulator finds it as it finds closed-loop arrivals: it runs the fleet
again with the resends that the last run's answers give, until they settle. A resend not
made in the last run is taken as answered; the next run corrects it.

One simplification, so that the resends settle in a few runs however many devices share
the workers: the agent sends a resend when the one before is answered; here it leaves one
quiet round trip after the one before (RTT, its bytes at the link's rate, the batcher's
delay and a batch of one), so a run's schedule depends only on which resends failed, not
on the exact time of each answer (with thousands of devices sharing the workers, those
times would move a little at every repeat and never settle). On a busy cloud the
simulator's resends therefore overlap a little where the agent's would queue.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from splitexit.sim.virtual import Resends, Scenario, VirtualResult

__all__ = ["SpoolRefiner"]

DEGRADED = (2, 3)  # route codes of a failed offload: refused (or lost), late


@dataclass(frozen=True)
class _Attempt:
    device: int
    run: int  # the device's refine run, 0, 1, ...
    position: int  # within its run
    row: int  # the request resent
    sent: float  # ms


class SpoolRefiner:
    """The devices' refine runs, resend by resend, from a run's answers."""

    def __init__(self, scenario: "Scenario") -> None:
        spool = scenario.edge.spool
        assert spool is not None
        self.every_ms = 1e3 * float(spool.get("refine_every_s", 60.0))
        self.timeout_ms = float(spool.get("refine_timeout_ms", 10_000.0))
        from splitexit.sim.virtual import device_links

        fleet, cloud = scenario.fleet, scenario.cloud
        self.per = fleet.requests
        # the first run of each device's timer, at its own phase
        self.first = np.random.default_rng([scenario.seed, 13]).uniform(0, self.every_ms, fleet.devices)
        # a quiet round trip's parts per device, from its own link (a trace's rate taken as unlimited)
        self.rtt_ms, self.ms_per_byte = np.zeros(fleet.devices), np.zeros(fleet.devices)
        for lo, hi, link, _ in device_links(scenario):
            self.rtt_ms[lo:hi] = link.rtt_ms
            self.ms_per_byte[lo:hi] = 8 / (link.up_mbps * 1000.0) if link.up_mbps else 0.0
        self.cloud_ms = cloud.max_delay_ms + cloud.batch_time_ms(1) + cloud.rpc_ms
        self.attempts: list[_Attempt] = []

    def _quiet(self, device: int, nbytes: float) -> float:
        """A resend's round trip on a quiet link and cloud: RTT, its bytes, a lone batch."""
        return float(self.rtt_ms[device] + nbytes * self.ms_per_byte[device]) + self.cloud_ms

    def resends(self, last: "VirtualResult | None") -> "Resends":
        """The resends the devices make given the answers of `last` (None: no run yet)."""
        from splitexit.sim.virtual import Resends

        known: dict[tuple[int, int, int], tuple[int, float, float, int]] = {}
        if last is not None and last.resent_done is not None and last.resent_route is not None:
            for a, done, route in zip(self.attempts, last.resent_done.tolist(), last.resent_route.tolist()):
                known[(a.device, a.run, a.position)] = (a.row, a.sent, done, route)
        self.attempts = []
        if last is None:
            return Resends.none()
        failed = np.flatnonzero(np.isin(last.route, DEGRADED))
        horizon = float(np.nanmax(last.done_ms)) + self.every_ms  # every entry gets a run after it is spooled
        by_device: dict[int, list[tuple[float, int]]] = {}
        for row in failed.tolist():
            by_device.setdefault(row // self.per, []).append((float(last.done_ms[row]), row))
        assert last.nbytes is not None
        for device, entries in by_device.items():
            self._device(device, sorted(entries), known, horizon, last.nbytes)
        return Resends(np.asarray([a.device for a in self.attempts], dtype=np.int64),
                       np.asarray([a.sent for a in self.attempts]),
                       np.asarray([float(last.nbytes[a.row]) for a in self.attempts]), self.timeout_ms)

    def _device(self, device: int, spooled: list[tuple[float, int]], known: dict[tuple[int, int, int], Any],
                horizon: float, nbytes: np.ndarray) -> None:
        """One device's refine runs over its spooled requests ((when spooled, row), in order)."""
        start, run, head = float(self.first[device]), 0, 0
        while head < len(spooled) and start <= horizon:
            t, position = start, 0
            while head < len(spooled) and spooled[head][0] < start:  # spooled before this run began
                row = spooled[head][1]
                self.attempts.append(_Attempt(device, run, position, row, t))
                seen = known.get((device, run, position))
                # the last run's outcome of this very resend; one not made then is taken as answered
                ok = seen is None or seen[0] != row or seen[1] != t or seen[3] not in DEGRADED
                t += self._quiet(device, float(nbytes[row]))
                if not ok:
                    break  # it stays spooled; the run ends
                head += 1
                position += 1
            start, run = t + self.every_ms, run + 1

    def report(self, last: "VirtualResult") -> dict[str, Any]:
        """What the spool did: requests spooled, refined (and how long after they were
        first sent), left in the spool at the end, resends and resends that failed."""
        assert last.resent_done is not None and last.resent_route is not None
        spooled = int(np.isin(last.route, DEGRADED).sum())
        ok = ~np.isin(last.resent_route, DEGRADED)
        rows = np.asarray([a.row for a in self.attempts], dtype=np.int64)
        delay_s = (last.resent_done[ok] - last.sent_ms[rows[ok]]) / 1e3
        refined = int(ok.sum())
        return {"spooled": spooled, "refined": refined, "left_in_spool": spooled - refined,
                "resends": len(self.attempts), "resends_failed": int((~ok).sum()),
                "refine_delay_mean_s": round(float(delay_s.mean()), 3) if refined else None,
                "refine_delay_p95_s": round(float(np.percentile(delay_s, 95)), 3) if refined else None}
