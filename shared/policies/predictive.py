"""Predictive Exit (Li et al., AAAI 2023; METHODS.md §4): evaluate exits only at predicted
target layers, and lower the clock while running towards them.

The rule, per row:
1. The first exit evaluated is L0 (`l0`); exits before it are skipped.
2. At an evaluated exit k, exit if max-prob >= `threshold` (the same rule as SDN's).
3. Otherwise the prediction engine counts how many rounds of smoothing it takes for the
   confidence to pass that rule: logits z = log p, each round z <- z * [1, 1, 1] over the
   class axis (circular, unnormalized), confidence = max softmax(z); at most `max_rounds`
   (8). The unnormalized kernel mixes neighbouring classes *and* triples the logit gaps,
   so confidence grows round by round the faster the more peaked z already is: the count
   is an estimate of how far away the exit is. (Smoothing normalized probabilities would
   only ever lower max-prob, so it could not count rounds "until the rule passes".)
   Uniform outputs never pass and get the longest jump. jump = max(1, rounds) *
   `exits_per_round` exits, capped at the last exit; the exits in between are skipped
   (`Decision.next_exit`).
4. DVFS: with `jump` exits predicted and `remain` = K-1-k left, run the jump at
   f = f_max * jump / remain, rounded to the nearest level of the board (never below its
   minimum); after an exit the clock goes back to f_max. So that a wrong prediction can
   never miss the deadline, the level is raised, where needed, to the slowest one that
   still leaves time to evaluate every remaining exit at f_max afterwards (see
   `deadline_ms`); f_max always satisfies that, so the deadline holds by induction. The
   slack DVFS spends is the time of the heads Predictive Exit skips (plus any looseness of
   `deadline`): with free heads and the default deadline the clock stays at f_max, and the
   saving is race-to-idle after the early exit alone.

Energy model (`splitexit.energy`): a segment that takes t ms at f_max takes t*f_max/f at f
and costs P(f) * that (W x ms = mJ). Per-segment times at f_max come from per-exit costs in
ms: `step_ms[k]` is the backbone from exit k-1's point to exit k's (from the input for
k = 0), `head_ms[k]` evaluating exit k's head. The per-row account (time_ms, energy_mj,
evals, the clocks used) lives in the policy state, so `simulate(...).extra` carries it.
The prediction engine's own cost and the clock-switch latency are not modelled.

Deadline and "energy at equal deadline" (for the comparison with evaluating every exit at
full clock): the deadline D (`deadline`, default: the worst case of that baseline, every
exit evaluated in order at f_max) is each sample's budget; whoever finishes early waits at the
board's idle power until D (race-to-idle for the baseline, and the same for Predictive
Exit), so energy at equal deadline = active energy + P_idle * (D - active time).

`simulate(policy, ...)` starts every row at exit 0 (base.py has no way for a policy to name
its first exit), so with l0 > 0 it counts exit 0's head in `Outcome.head_evals` and `cost`
although the policy never looks at it (its own account does not count it).
`simulate_predictive` runs the policy on the exits from L0 on, which is exact.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, replace
from functools import cached_property
from typing import Any, ClassVar, Sequence

import numpy as np

from splitexit.energy import Board, get_board
from splitexit.policies.base import Decision, Ladder, Outcome, PolicyError, State, simulate
from splitexit.policies.rules import MaxProb

__all__ = [
    "Comparison", "MethodResult", "Predictive", "SearchResult", "compare_all_exits", "match_accuracy",
    "predict_rounds", "simulate_predictive",
]

_REL_TOL = 1e-9  # relative slack below which the deadline is treated as tight


def predict_rounds(probs: np.ndarray, threshold: float, max_rounds: int = 8) -> np.ndarray:
    """The prediction engine: int64 [B], 0 where the exit rule already fires, else the first
    round r in 1..max_rounds at which the smoothed confidence reaches `threshold`, and
    `max_rounds` where it never does."""
    p = np.asarray(probs, dtype=np.float64)
    conf = p.max(-1)
    rounds = np.full(conf.shape, int(max_rounds), dtype=np.int64)
    done = conf >= threshold
    rounds[done] = 0
    z = np.log(np.maximum(p, 1e-12))
    for r in range(1, int(max_rounds) + 1):
        if bool(done.all()):
            break
        # circular: a constant shift of z stays a constant shift, so softmax ignores it
        z = z + np.roll(z, 1, -1) + np.roll(z, -1, -1)
        # max of softmax(z) = 1 / sum(exp(z - max z))
        top = 1.0 / np.exp(z - z.max(-1, keepdims=True)).sum(-1)
        hit = (top >= threshold) & ~done
        rounds[hit] = r
        done |= hit
    return rounds


def _floats(value: Any, label: str) -> tuple[float, ...]:
    try:
        out = tuple(float(v) for v in value)
    except (TypeError, ValueError) as exc:
        raise PolicyError(f"{label} must be a sequence of numbers, got {value!r}") from exc
    if any(not math.isfinite(v) or v < 0 for v in out):
        raise PolicyError(f"{label} must be non-negative finite numbers (ms), got {list(out)}")
    return out


@dataclass(frozen=True)
class Predictive:
    """Predictive Exit with DVFS (see the module docstring)."""

    name: ClassVar[str] = "predictive"
    step_ms: tuple[float, ...]  # backbone ms at f_max from exit k-1's point to exit k's
    head_ms: tuple[float, ...] = ()  # ms at f_max of exit k's head; () = free heads
    threshold: float = 0.9
    l0: int = 0
    max_rounds: int = 8
    exits_per_round: int = 1
    board: str = "jetson-tx2-gpu"
    dvfs: bool = True
    deadline: float | None = None  # ms; None = every exit evaluated at f_max (`deadline_ms`)

    def __post_init__(self) -> None:
        step = _floats(self.step_ms, "step_ms")
        if not step:
            raise PolicyError("step_ms needs one backbone cost per exit, got none")
        head = _floats(self.head_ms, "head_ms") or (0.0,) * len(step)
        if len(head) != len(step):
            raise PolicyError(f"head_ms needs one cost per exit ({len(step)}), got {len(head)}")
        object.__setattr__(self, "step_ms", step)
        object.__setattr__(self, "head_ms", head)
        if isinstance(self.threshold, bool) or not isinstance(self.threshold, numbers.Real) \
                or not 0.0 < float(self.threshold) <= 1.0:
            raise PolicyError(f"threshold must be a max-prob in (0, 1], got {self.threshold!r}")
        object.__setattr__(self, "threshold", float(self.threshold))
        for label, value, low in (("l0", self.l0, 0), ("max_rounds", self.max_rounds, 1),
                                  ("exits_per_round", self.exits_per_round, 1)):
            if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < low:
                raise PolicyError(f"{label} must be an integer >= {low}, got {value!r}")
            object.__setattr__(self, label, int(value))
        if self.l0 >= len(step):
            raise PolicyError(f"l0 = {self.l0} is past the last exit ({len(step) - 1})")
        try:
            get_board(self.board)
        except ValueError as exc:
            raise PolicyError(str(exc)) from exc
        object.__setattr__(self, "dvfs", bool(self.dvfs))
        if self.deadline is not None:
            if isinstance(self.deadline, bool) or not isinstance(self.deadline, numbers.Real) \
                    or not math.isfinite(self.deadline):
                raise PolicyError(f"deadline must be a number of ms or None, got {self.deadline!r}")
            object.__setattr__(self, "deadline", float(self.deadline))
            # the guarantee needs room to evaluate every exit from L0 on at f_max
            worst = float(sum(step)) + float(sum(head[self.l0:]))
            if self.deadline < worst * (1 - 1e-12):
                raise PolicyError(f"deadline {self.deadline:g} ms is shorter than evaluating every exit from "
                                  f"L0 = {self.l0} at f_max ({worst:g} ms): it could not be guaranteed")

    # -- costs ---------------------------------------------------------------------------

    @property
    def num_exits(self) -> int:
        return len(self.step_ms)

    @cached_property
    def board_spec(self) -> Board:
        return get_board(self.board)

    @cached_property
    def _cum(self) -> np.ndarray:
        """[K+1]: backbone ms at f_max from the input to exit k's point is _cum[k+1]."""
        return np.asarray((0.0, *np.cumsum(self.step_ms)), dtype=np.float64)

    @cached_property
    def _rest(self) -> np.ndarray:
        """[K]: ms at f_max of evaluating every exit after k, in order."""
        cum, heads = self._cum, np.asarray(self.head_ms, dtype=np.float64)
        tail_heads = np.cumsum(heads[::-1])[::-1]  # sum of heads k..K-1
        return (cum[-1] - cum[1:]) + np.concatenate([tail_heads[1:], np.zeros(1)])

    @property
    def deadline_ms(self) -> float:
        """`deadline`, by default every exit evaluated in order at f_max: the worst case of
        the per-exit baseline."""
        if self.deadline is not None:
            return self.deadline
        return float(self._cum[-1]) + float(sum(self.head_ms))

    def ladder(self) -> Ladder:
        """The one-network ladder (ms at f_max) these costs describe."""
        return Ladder(tuple(float(c) for c in self._cum[1:]), self.head_ms)

    @classmethod
    def from_ladder(cls, ladder: Ladder, **params: Any) -> "Predictive":
        """Per-exit step costs from a one-network ladder whose costs are ms at f_max."""
        if len(set(ladder.network)) > 1:
            raise PolicyError("Predictive Exit runs one network: the ladder mixes networks (a cascade)")
        step = tuple(ladder.step_cost(k - 1, k) for k in range(ladder.num_exits))
        return cls(step_ms=step, head_ms=tuple(ladder.head_cost), **params)

    def restricted(self) -> "Predictive":
        """The same policy over exits L0..K-1 only (L0 becomes exit 0): what a runtime that
        never touches the earlier exits runs."""
        if self.l0 == 0:
            return self
        first = float(sum(self.step_ms[: self.l0 + 1]))
        return replace(self, step_ms=(first, *self.step_ms[self.l0 + 1:]), head_ms=self.head_ms[self.l0:], l0=0,
                       deadline=self.deadline_ms)  # the same deadline: the full ladder's

    # -- the policy ----------------------------------------------------------------------

    def first_exit(self, num_exits: int) -> int:
        """Exits before L0 are never evaluated (see `splitexit.policies.base.first_exit`)."""
        return self.l0

    def init_state(self, rows: int, num_classes: int) -> State:
        f_max = self.board_spec.f_max
        return {
            "at": np.full(rows, -1, dtype=np.int64),  # last exit point reached
            "freq_mhz": np.full(rows, f_max, dtype=np.float64),  # clock of the running segment
            "min_freq_mhz": np.full(rows, f_max, dtype=np.float64),
            "jump": np.zeros(rows, dtype=np.int64),  # last predicted jump (exits)
            "evals": np.zeros(rows, dtype=np.int64),  # heads the policy evaluated
            "time_ms": np.zeros(rows, dtype=np.float64),
            "energy_mj": np.zeros(rows, dtype=np.float64),
        }

    def _power(self, freq: np.ndarray) -> np.ndarray:
        out = np.empty_like(freq)
        for f in np.unique(freq).tolist():  # clocks are board levels: a handful of values
            out[freq == f] = self.board_spec.power(f)
        return out

    def _clock(self, k: int, target: np.ndarray, elapsed: np.ndarray) -> np.ndarray:
        """The level for running from exit k to `target` (rows that go on)."""
        board = self.board_spec
        f_max = board.f_max
        levels = np.asarray(board.frequencies, dtype=np.float64)
        remain = self.num_exits - 1 - k
        wanted = f_max * (target - k).astype(np.float64) / remain
        dist = np.abs(levels[None, :] - wanted[:, None])
        ties = dist <= dist.min(1, keepdims=True) + 1e-9
        index = np.broadcast_to(np.arange(len(levels)), dist.shape)
        nearest = levels[np.where(ties, index, -1).max(1)]  # ties go up
        heads = np.asarray(self.head_ms, dtype=np.float64)
        segment = self._cum[target + 1] - self._cum[k + 1] + heads[target]
        slack = self.deadline_ms - elapsed - self._rest[target] - segment
        tight = slack <= _REL_TOL * max(self.deadline_ms, 1.0)
        safe = np.minimum(np.where(tight, f_max, f_max * segment / (segment + np.maximum(slack, 1e-300))), f_max)
        at_least = levels[(levels[None, :] >= safe[:, None] - 1e-6).argmax(1)]
        return np.maximum(nearest, at_least)

    def decide(self, k: int, probs: np.ndarray, state: State) -> tuple[Decision, State]:
        num_exits = self.num_exits
        if not 0 <= k < num_exits:
            raise PolicyError(f"exit {k} is outside this policy's {num_exits} exits")
        rows = probs.shape[0]
        f_max = self.board_spec.f_max
        freq = state["freq_mhz"]
        evaluated = k >= self.l0
        # account for the segment just run: backbone from the last point (+ this head)
        segment = self._cum[k + 1] - self._cum[state["at"] + 1] + (self.head_ms[k] if evaluated else 0.0)
        seconds = segment * f_max / freq
        time = state["time_ms"] + seconds
        energy = state["energy_mj"] + self._power(freq) * seconds
        evals = state["evals"] + int(evaluated)
        at = np.full(rows, k, dtype=np.int64)
        if not evaluated:
            # before L0: pass through at f_max without looking at this exit
            update = dict(state, at=at, time_ms=time, energy_mj=energy, evals=evals)
            return Decision(np.zeros(rows, dtype=bool), np.full(rows, self.l0, dtype=np.int64)), update
        exits = probs.max(-1) >= self.threshold
        if k == num_exits - 1:
            exits = np.ones_like(exits)
        go_on = ~exits
        jump = np.zeros(rows, dtype=np.int64)
        new_freq = np.full(rows, f_max, dtype=np.float64)  # back to f_max after an exit
        if bool(go_on.any()):
            rounds = predict_rounds(probs[go_on], self.threshold, self.max_rounds)
            jump[go_on] = np.minimum(np.maximum(rounds, 1) * self.exits_per_round, num_exits - 1 - k)
            if self.dvfs:
                new_freq[go_on] = self._clock(k, k + jump[go_on], time[go_on])
        target = np.where(go_on, k + jump, min(k + 1, num_exits - 1))
        update = {
            "at": at, "freq_mhz": new_freq, "min_freq_mhz": np.minimum(state["min_freq_mhz"], new_freq),
            "jump": jump, "evals": evals, "time_ms": time, "energy_mj": energy,
        }
        return Decision(exits, target), update

    # -- plain data ----------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        return {"step_ms": list(self.step_ms), "head_ms": list(self.head_ms), "threshold": self.threshold,
                "l0": self.l0, "max_rounds": self.max_rounds, "exits_per_round": self.exits_per_round,
                "board": self.board, "dvfs": self.dvfs, "deadline": self.deadline}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Predictive":
        return cls(step_ms=tuple(data["step_ms"]), head_ms=tuple(data.get("head_ms") or ()),
                   threshold=data["threshold"], l0=data.get("l0", 0), max_rounds=data.get("max_rounds", 8),
                   exits_per_round=data.get("exits_per_round", 1), board=str(data.get("board", "jetson-tx2-gpu")),
                   dvfs=bool(data.get("dvfs", True)), deadline=data.get("deadline"))


# -- the benchmark ---------------------------------------------------------------------------


def simulate_predictive(policy: Predictive, probs: np.ndarray,
                        labels: np.ndarray | None = None) -> Outcome:
    """`simulate` over the exits from L0 on (exact head counts and costs, in ms at f_max),
    exit indices reported in the full ladder's numbering; `extra` holds the energy account."""
    p = np.asarray(probs)
    if p.ndim != 3 or p.shape[0] != policy.num_exits:
        raise PolicyError(f"need cached outputs [K={policy.num_exits}, N, C], got shape {p.shape}")
    sub = policy.restricted()
    out = simulate(sub, p[policy.l0:], sub.ladder(), labels)
    answer_exit = None if out.answer_exit is None else out.answer_exit + policy.l0
    return Outcome(out.exit_index + policy.l0, out.label, out.cost, out.head_evals, out.correct, out.extra,
                   answer_exit)


@dataclass(frozen=True)
class MethodResult:
    """One method over a set: means per sample."""

    name: str
    accuracy: float
    head_evals: float  # exit heads evaluated per sample
    time_ms: float  # active time per sample
    max_time_ms: float
    active_energy_mj: float  # while computing
    energy_mj: float  # at equal deadline: active + idle until the deadline
    deadline_met: bool


@dataclass(frozen=True)
class Comparison:
    """Predictive Exit against evaluating every exit at full clock, same threshold."""

    board: str
    deadline_ms: float
    predictive: MethodResult
    all_exits: MethodResult

    @property
    def energy_saving(self) -> float:
        """Fraction of the baseline's energy at equal deadline that Predictive Exit saves."""
        return 1.0 - self.predictive.energy_mj / self.all_exits.energy_mj

    @property
    def head_eval_saving(self) -> float:
        return 1.0 - self.predictive.head_evals / self.all_exits.head_evals


def _result(name: str, outcome: Outcome, time_ms: np.ndarray, energy_mj: np.ndarray, board: Board,
            deadline_ms: float) -> MethodResult:
    idle = board.p_idle_w * np.clip(deadline_ms - time_ms, 0.0, None)
    return MethodResult(
        name=name, accuracy=outcome.acc, head_evals=float(outcome.head_evals.mean()),
        time_ms=float(time_ms.mean()), max_time_ms=float(time_ms.max()),
        active_energy_mj=float(energy_mj.mean()), energy_mj=float((energy_mj + idle).mean()),
        deadline_met=bool((time_ms <= deadline_ms * (1 + 1e-9)).all()),
    )


def _predictive_result(policy: Predictive, probs: np.ndarray, labels: np.ndarray) -> MethodResult:
    out = simulate_predictive(policy, probs, labels)
    return _result("predictive", out, out.extra["time_ms"], out.extra["energy_mj"], policy.board_spec,
                   policy.deadline_ms)


def _all_exits_result(policy: Predictive, threshold: float, probs: np.ndarray, labels: np.ndarray,
                      fallback: bool) -> MethodResult:
    board = policy.board_spec
    out = simulate(MaxProb(threshold=threshold, fallback=fallback), probs, policy.ladder(), labels)
    time_ms = out.cost  # the ladder is in ms at f_max, and the baseline never leaves f_max
    return _result("all_exits", out, time_ms, board.power(board.f_max) * time_ms, board, policy.deadline_ms)


def compare_all_exits(policy: Predictive, probs: np.ndarray, labels: np.ndarray, *,
                      fallback: bool = False) -> Comparison:
    """Run `policy` and the max-prob rule at every exit at f_max (same threshold; without
    SDN's most-confident fallback unless `fallback`) on cached outputs [K, N, C]: accuracy,
    head evaluations per sample, time, and energy at the equal deadline `policy.deadline_ms`
    on `policy.board` (module docstring)."""
    p, y = np.asarray(probs), np.asarray(labels)
    return Comparison(board=policy.board, deadline_ms=policy.deadline_ms,
                      predictive=_predictive_result(policy, p, y),
                      all_exits=_all_exits_result(policy, policy.threshold, p, y, fallback))


@dataclass(frozen=True)
class SearchResult:
    policy: Predictive
    predictive: MethodResult
    reference: MethodResult  # the per-exit rule it was matched to
    tolerance: float
    candidates: int  # settings tried


def match_accuracy(probs: np.ndarray, labels: np.ndarray, policy: Predictive, *,
                   reference_threshold: float | None = None, thresholds: Sequence[float] | None = None,
                   l0s: Sequence[int] | None = None, tolerance: float = 0.002,
                   below: float | None = None, fallback: bool = False) -> SearchResult:
    """Search (threshold, L0) for the Predictive Exit setting whose accuracy on this
    (validation) set is within `tolerance` (0.002 = ±0.2 points) of the per-exit max-prob
    rule at `reference_threshold` (default: `policy.threshold`); among those, the lowest
    energy at equal deadline, then the fewest head evaluations. `below` narrows how far
    under the reference a setting may be (default `tolerance`; 0 = not less accurate):
    the cheapest setting of a two-sided band tends to sit at its lower edge, so a
    held-out set then sees it less accurate. Other parameters (costs, board, rounds)
    come from `policy`."""
    below = tolerance if below is None else float(below)
    if not 0 <= below <= tolerance:
        raise PolicyError(f"below must be in [0, tolerance={tolerance}], got {below}")
    p, y = np.asarray(probs), np.asarray(labels)
    ref_threshold = policy.threshold if reference_threshold is None else float(reference_threshold)
    reference = _all_exits_result(policy, ref_threshold, p, y, fallback)
    grid = sorted({*(np.round(np.linspace(0.3, 0.995, 140), 4).tolist() if thresholds is None else thresholds),
                   ref_threshold})
    starts = range(policy.num_exits) if l0s is None else l0s
    best: tuple[tuple[float, float, float], Predictive, MethodResult] | None = None
    closest = math.inf
    tried = 0
    for l0 in starts:
        for threshold in grid:
            candidate = replace(policy, threshold=float(threshold), l0=int(l0))
            result = _predictive_result(candidate, p, y)
            tried += 1
            delta = result.accuracy - reference.accuracy
            gap = abs(delta)
            closest = min(closest, gap)
            if -below - 1e-12 <= delta <= tolerance + 1e-12:
                key = (result.energy_mj, result.head_evals, gap)
                if best is None or key < best[0]:
                    best = (key, candidate, result)
    if best is None:
        raise PolicyError(f"no (threshold, L0) of {tried} tried is within -{below * 100:.2f}/+{tolerance * 100:.2f} "
                          f"points of the per-exit rule's accuracy {reference.accuracy:.4f}; closest is "
                          f"{closest * 100:.2f} points away")
    return SearchResult(policy=best[1], predictive=best[2], reference=reference, tolerance=tolerance,
                        candidates=tried)
