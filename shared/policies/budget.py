"""Meeting a compute budget: sequential quantile thresholds (MSDNet, EENet), the
`msdnet_budget` policy, and bisection of any one-parameter rule to a budget."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, ClassVar, Sequence

import numpy as np

from splitexit.policies.base import Decision, ExitPolicy, Ladder, PolicyError, State, simulate


def check_budget(budget: float, ladder: Ladder) -> None:
    """Refuse a budget no policy can meet: below the cost of leaving at the first exit."""
    cheapest = float(ladder.cumulative()[0])
    if budget < cheapest:
        raise PolicyError(
            f"budget {budget:,.0f} is below the cheapest exit's cost {cheapest:,.0f} "
            f"({ladder.names[0]}): no policy can meet it"
        )


def sequential_thresholds(scores: np.ndarray, proportions: Sequence[float] | np.ndarray) -> np.ndarray:
    """Thresholds t_k so that, going through the exits in order, the top ⌊π_k·N⌋ of the
    rows still remaining (by score at exit k) exit at k. scores [K, N]; returns [K] with
    t_{K-1} = -inf (the last exit takes everyone left). A row exits at the first k with
    score >= t_k."""
    k_exits, n = scores.shape
    pi = np.asarray(proportions, dtype=np.float64)
    if len(pi) != k_exits or (pi < 0).any() or pi.sum() <= 0:
        raise PolicyError(f"need {k_exits} non-negative proportions, got {list(proportions)}")
    pi = pi / pi.sum()
    thresholds = np.full(k_exits, -np.inf)
    remaining = np.ones(n, dtype=bool)
    for k in range(k_exits - 1):
        take = int(np.floor(pi[k] * n))
        candidates = scores[k, remaining]
        if take <= 0 or len(candidates) == 0:
            thresholds[k] = np.inf
            continue
        take = min(take, len(candidates))
        thresholds[k] = np.sort(candidates)[::-1][take - 1]
        remaining &= ~(scores[k] >= thresholds[k])
    return thresholds


def geometric_proportions(q: float, k_exits: int) -> np.ndarray:
    """MSDNet's exit distribution p_k ∝ q^k (q < 1: most leave early; q > 1: late)."""
    p = q ** np.arange(k_exits, dtype=np.float64)
    return p / p.sum()


@dataclass(frozen=True)
class MSDNetBudget:
    """Max-prob with per-exit thresholds set by sequential quantiles of a geometric exit
    distribution; `q` is chosen on validation as the most accurate that fits the budget."""

    name: ClassVar[str] = "msdnet_budget"
    thresholds: tuple[float, ...]
    q: float = 1.0
    budget: float | None = None  # what it was fit to (ladder units), for the record

    def init_state(self, rows: int, num_classes: int) -> State:
        return {}

    def decide(self, k: int, probs: np.ndarray, state: State) -> tuple[Decision, State]:
        return Decision(probs.max(-1) >= self.thresholds[k]), state

    def to_dict(self) -> dict[str, Any]:
        # ±inf are not JSON: store them as strings
        return {"thresholds": [t if np.isfinite(t) else str(t) for t in self.thresholds], "q": self.q,
                "budget": self.budget}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "MSDNetBudget":
        return cls(thresholds=tuple(float(t) for t in data["thresholds"]), q=float(data["q"]),
                   budget=None if data.get("budget") is None else float(data["budget"]))

    @classmethod
    def for_q(cls, q: float, probs: np.ndarray) -> "MSDNetBudget":
        conf = np.asarray(probs).max(-1)
        return cls(thresholds=tuple(float(t) for t in sequential_thresholds(conf, geometric_proportions(q, len(conf)))),
                   q=float(q))

    @classmethod
    def fit(cls, probs: np.ndarray, labels: np.ndarray, ladder: Ladder, budget: float,
            qs: Sequence[float] | None = None) -> "MSDNetBudget":
        """The most accurate q on this (validation) set whose average cost fits `budget`."""
        check_budget(budget, ladder)
        candidates = np.geomspace(0.02, 50.0, 241) if qs is None else np.asarray(qs, dtype=np.float64)
        best: tuple[float, float, MSDNetBudget] | None = None
        for q in candidates:
            policy = cls.for_q(float(q), probs)
            outcome = simulate(policy, probs, ladder, labels)
            if outcome.mean_cost <= budget:
                key = (outcome.acc, outcome.mean_cost)
                if best is None or key > best[:2]:
                    best = (*key, policy)
        if best is None:
            raise PolicyError(f"no exit distribution fits budget {budget:,.0f} on this set")
        p = best[2]
        return cls(thresholds=p.thresholds, q=p.q, budget=float(budget))


def fit_scalar_to_budget(make: Callable[[float], ExitPolicy], lo: float, hi: float, probs: np.ndarray,
                         ladder: Ladder, budget: float, *, iterations: int = 40) -> tuple[ExitPolicy, float]:
    """Bisection on a one-parameter rule whose cost grows with the parameter (a max-prob
    threshold, BoF's β, ...): the largest parameter in [lo, hi] whose cost fits `budget`."""
    check_budget(budget, ladder)

    def cost(x: float) -> float:
        return simulate(make(x), probs, ladder).mean_cost

    if cost(lo) > budget:
        raise PolicyError(f"even the cheapest setting ({lo}) costs {cost(lo):,.0f} > budget {budget:,.0f}")
    if cost(hi) <= budget:
        return make(hi), hi
    for _ in range(iterations):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if cost(mid) <= budget else (lo, mid)
    return make(lo), lo
