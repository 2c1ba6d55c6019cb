"""The standard exit rules (METHODS.md §5): SDN max-prob, BranchyNet entropy, PABEE
patience, and the oracle bound."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar, Sequence

import numpy as np

from splitexit.policies.base import Decision, PolicyError, State


def entropy(probs: np.ndarray) -> np.ndarray:
    """H = -sum p log p per row (natural log), safe at p = 0."""
    return -(probs * np.log(np.maximum(probs, np.float32(1e-12)))).sum(-1)


def per_exit(values: float | Sequence[float], k: int) -> float:
    """A threshold that is either global (one number) or per exit (one per exit)."""
    if isinstance(values, (int, float)):
        return float(values)
    if k >= len(values):
        raise PolicyError(f"no threshold for exit {k}: {len(values)} given")
    return float(values[k])


def _thresholds(value: Any) -> float | tuple[float, ...]:
    if isinstance(value, (list, tuple)):
        return tuple(float(v) for v in value)
    return float(value)


@dataclass(frozen=True)
class MaxProb:
    """SDN: exit at the first exit with max-prob >= threshold; if none fires by the last
    exit, answer with the most confident output seen (`fallback`)."""

    name: ClassVar[str] = "maxprob"
    threshold: float | tuple[float, ...] = 0.9
    fallback: bool = True

    def init_state(self, rows: int, num_classes: int) -> State:
        return {"best_conf": np.full(rows, -1.0, dtype=np.float32),
                "best_exit": np.full(rows, -1, dtype=np.int64),
                "best_probs": np.zeros((rows, num_classes), dtype=np.float32)}

    def decide(self, k: int, probs: np.ndarray, state: State) -> tuple[Decision, State]:
        conf = probs.max(-1)
        exits = conf >= per_exit(self.threshold, k)
        if not self.fallback:
            return Decision(exits), state
        better = conf > state["best_conf"]
        best_conf = np.where(better, conf, state["best_conf"])
        best_exit = np.where(better, k, state["best_exit"])
        best_probs = np.where(better[:, None], probs, state["best_probs"])
        # rows exiting by their own confidence answer with exit k; at the last exit the
        # caller forces everyone out, and those answer with their most confident exit,
        # named as the exit that answered
        answer = np.where(exits[:, None], probs, best_probs)
        answer_exit = np.where(exits, k, best_exit)
        return (Decision(exits, answer=answer, answer_exit=answer_exit),
                {"best_conf": best_conf, "best_exit": best_exit, "best_probs": best_probs})

    def to_dict(self) -> dict[str, Any]:
        t = list(self.threshold) if isinstance(self.threshold, tuple) else self.threshold
        return {"threshold": t, "fallback": self.fallback}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "MaxProb":
        return cls(threshold=_thresholds(data["threshold"]), fallback=bool(data.get("fallback", True)))


@dataclass(frozen=True)
class Entropy:
    """BranchyNet: exit at the first exit whose entropy H_k < T_k."""

    name: ClassVar[str] = "entropy"
    threshold: float | tuple[float, ...] = 0.5
    normalized: bool = False  # compare H / log C (in [0, 1]) instead of H

    def init_state(self, rows: int, num_classes: int) -> State:
        return {}

    def decide(self, k: int, probs: np.ndarray, state: State) -> tuple[Decision, State]:
        h = entropy(probs)
        if self.normalized:
            h = h / math.log(probs.shape[-1])
        return Decision(h < per_exit(self.threshold, k)), state

    def to_dict(self) -> dict[str, Any]:
        t = list(self.threshold) if isinstance(self.threshold, tuple) else self.threshold
        return {"threshold": t, "normalized": self.normalized}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Entropy":
        return cls(threshold=_thresholds(data["threshold"]), normalized=bool(data.get("normalized", False)))


@dataclass(frozen=True)
class Patience:
    """PABEE: exit once `patience` + 1 consecutive evaluated exits agree on the label."""

    name: ClassVar[str] = "patience"
    patience: int = 1

    def __post_init__(self) -> None:
        if self.patience < 0:
            raise PolicyError(f"patience must be >= 0, got {self.patience}")

    def init_state(self, rows: int, num_classes: int) -> State:
        return {"label": np.full(rows, -1, dtype=np.int64), "streak": np.zeros(rows, dtype=np.int64)}

    def decide(self, k: int, probs: np.ndarray, state: State) -> tuple[Decision, State]:
        label = probs.argmax(-1)
        streak = np.where(label == state["label"], state["streak"] + 1, 0)
        return Decision(streak >= self.patience), {"label": label, "streak": streak}

    def to_dict(self) -> dict[str, Any]:
        return {"patience": self.patience}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Patience":
        return cls(patience=int(data["patience"]))


@dataclass(frozen=True)
class Oracle:
    """The bound: exit at the earliest exit that is right (needs the labels, so offline only)."""

    name: ClassVar[str] = "oracle"
    labels: np.ndarray | None = None

    def init_state(self, rows: int, num_classes: int) -> State:
        if self.labels is None or len(self.labels) != rows:
            raise PolicyError("the oracle needs the labels of exactly the rows it sees (offline only)")
        return {"label": np.asarray(self.labels, dtype=np.int64)}

    def decide(self, k: int, probs: np.ndarray, state: State) -> tuple[Decision, State]:
        return Decision(probs.argmax(-1) == state["label"]), state

    def to_dict(self) -> dict[str, Any]:
        raise PolicyError("the oracle is a bound computed with labels; it cannot be stored in a bundle")

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Oracle":
        raise PolicyError("the oracle is a bound computed with labels; it cannot be loaded from a bundle")
