"""The single-hyperparameter exit rule of Passalis et al. (METHODS.md §1).

Each exit is measured against its own typical confidence: on ~5,000 training samples a
per-exit statistic μ_k is computed once, and at inference a row exits at the first k with
conf_k(x) > β·μ_k (or conf_k(x) > μ_k + β·σ_k for the "mean + β·std" form). β is the one
knob: larger β, fewer early exits, higher accuracy.

The paper's exact statistic is unverified, so it is a choice here:
- "maxprob" (default): conf = max softmax probability, μ = its mean at exit k;
- "margin": conf = top-1 minus top-2 probability, μ = its mean;
- "maxprob_std": conf = max probability, threshold μ_k + β·σ_k.
(A max-*logit* statistic needs the heads' raw logits, which the policy interface does not
carry: policies see probabilities, the same on every device and after any codec.)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import numpy as np

from splitexit.policies.base import Decision, PolicyError, State

Statistic = Literal["maxprob", "margin", "maxprob_std"]
STATISTICS: tuple[Statistic, ...] = ("maxprob", "margin", "maxprob_std")


def confidence(probs: np.ndarray, statistic: Statistic) -> np.ndarray:
    """conf(x) per row for a statistic (the margin for "margin", max-prob otherwise)."""
    p = np.asarray(probs)
    if statistic == "margin":
        top2 = np.partition(p, p.shape[-1] - 2, axis=-1)[..., -2:]
        return top2[..., 1] - top2[..., 0]
    return p.max(-1)


@dataclass(frozen=True)
class BoFBeta:
    name: ClassVar[str] = "bof_beta"
    beta: float
    mean: tuple[float, ...]  # μ_k per exit
    std: tuple[float, ...]  # σ_k per exit (used by "maxprob_std")
    statistic: Statistic = "maxprob"

    def __post_init__(self) -> None:
        if self.statistic not in STATISTICS:
            raise PolicyError(f"unknown statistic {self.statistic!r}; choose one of {', '.join(STATISTICS)}")
        if len(self.mean) != len(self.std) or not self.mean:
            raise PolicyError("need one mean and one std per exit")
        if not np.isfinite(self.beta):
            raise PolicyError(f"beta must be finite, got {self.beta}")

    def threshold(self, k: int) -> float:
        if k >= len(self.mean):
            raise PolicyError(f"no statistic for exit {k}: fit on {len(self.mean)} exits")
        if self.statistic == "maxprob_std":
            return self.mean[k] + self.beta * self.std[k]
        return self.beta * self.mean[k]

    def init_state(self, rows: int, num_classes: int) -> State:
        return {}

    def decide(self, k: int, probs: np.ndarray, state: State) -> tuple[Decision, State]:
        return Decision(confidence(probs, self.statistic) > self.threshold(k)), state

    def with_beta(self, beta: float) -> "BoFBeta":
        return BoFBeta(beta=float(beta), mean=self.mean, std=self.std, statistic=self.statistic)

    def to_dict(self) -> dict[str, Any]:
        return {"beta": self.beta, "mean": list(self.mean), "std": list(self.std), "statistic": self.statistic}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "BoFBeta":
        return cls(beta=float(data["beta"]), mean=tuple(float(v) for v in data["mean"]),
                   std=tuple(float(v) for v in data["std"]), statistic=data.get("statistic", "maxprob"))

    @classmethod
    def fit(cls, train_probs: np.ndarray, beta: float = 1.0, statistic: Statistic = "maxprob") -> "BoFBeta":
        """μ_k, σ_k from exit outputs [K, N, C] on training samples (~5,000 of them)."""
        if statistic not in STATISTICS:
            raise PolicyError(f"unknown statistic {statistic!r}; choose one of {', '.join(STATISTICS)}")
        conf = confidence(np.asarray(train_probs), statistic).astype(np.float64)  # [K, N]
        return cls(beta=float(beta), mean=tuple(conf.mean(1).tolist()), std=tuple(conf.std(1, ddof=1).tolist()),
                   statistic=statistic)

    def beta_range(self) -> tuple[float, float]:
        """β from "everyone exits at exit 0" to "no one exits before the last exit"."""
        if self.statistic == "maxprob_std":
            return -10.0, 10.0
        return 0.0, 1.0 / max(min(self.mean[:-1] or self.mean), 1e-6) + 1e-6
