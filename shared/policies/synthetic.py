"""Synthetic exit outputs shaped like a trained multi-exit network's: for tests, examples
and simulations that need [K, N, C] probabilities without a model."""

from __future__ import annotations

import numpy as np


def synthetic_outputs(k: int = 4, n: int = 2000, classes: int = 10, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(probs [K, N, C] float32, labels [N]): later exits are sharper and more often right,
    and a per-sample difficulty is shared by all exits (hard samples are hard everywhere)."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, classes, n)
    hard = rng.random(n)
    probs = []
    for i in range(k):
        skill = 0.5 + 0.5 * (i + 1) / k
        logits = rng.normal(size=(n, classes))
        logits[np.arange(n), labels] += 4.0 * skill * (1.2 - hard)
        z = logits * (1 + i)
        e = np.exp(z - z.max(-1, keepdims=True))
        probs.append(e / e.sum(-1, keepdims=True))
    return np.stack(probs).astype(np.float32), labels
