"""EENet (Ilhan et al., WACV 2024; METHODS.md §3): a budget-constrained learned exit scheduler.

Per exit k a scoring function q_k (linear, no bias, sigmoid) estimates P(ŷ_k correct) from
X_k = [p_k, m_k, 1 − η_k, q_1..q_{k−1}], and an assignment function r_k (a small sigmoid MLP
on the same X_k) proposes how likely x should leave at k: a(x) = softmax over exits of r.
Both are fit offline on cached validation outputs; the mean assignment π sets per-exit
score thresholds by sequential quantiles, which is what makes the policy meet its budget.
At inference only the q weights and the thresholds are needed; the r weights ride along
so that π can be reported on any set.

Thresholds live on the logit of q rather than on q: the order is the same, but float32
sigmoids saturate to exactly 1.0 for confident rows, and ties at a threshold would let
more rows out than the quantile asked for, overshooting the budget's exit proportions.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Sequence

import numpy as np

from splitexit.policies.base import Decision, Ladder, PolicyError, State, as_probs, simulate
from splitexit.policies.budget import check_budget, sequential_thresholds
from splitexit.policies.rules import entropy

if TYPE_CHECKING:  # torch only trains the scheduler (`fit`); the rule itself is numpy
    import torch

Vector = tuple[float, ...]
Matrix = tuple[Vector, ...]


@dataclass(frozen=True)
class EENetConfig:
    """How `EENet.fit` trains. The paper's values are Adam lr 3e-5, wd 1e-2, batch 512,
    α_kl 1e-3, α_cost 1e-2, alternating q / r every 10 epochs; all are kept but lr.

    lr: at 3e-5 with ~5,000 validation rows (10 steps per epoch) the weights move ~3e-4 per
    epoch and converging takes thousands of epochs (minutes per restart on CPU); after 200
    epochs the scores are still near their random init (synthetic K=5, N=5,000: 58% vs
    67% accuracy at 30% of the full cost). 1e-2 converges in 200 epochs (2,000 Adam
    steps), so a K=5, N=5,000 fit with three restarts takes seconds; 3e-3 over 400 epochs
    lands on the same accuracy.

    temperature: a = softmax(r / T); T = 1 is the paper's. r is a sigmoid output in (0, 1),
    so at T = 1 no row can put more than e/(e + K − 1) of its assignment on one exit, and a
    tight budget is out of the training loss's reach; the post-fit cost shift λ (see
    `_calibrate`) is what lands π on such a budget. A smaller T lets r alone express a
    peaked π, but on synthetic outputs it chose worse proportions at tight budgets
    (T = 0.1: 65.4% vs 66.7% at 30% cost), so it is only an option."""

    lr: float = 1e-2
    weight_decay: float = 1e-2
    batch_size: int = 512
    epochs: int = 200
    period: int = 10  # epochs per phase: q (BCE), then r (KL + cost), then q, ...
    alpha_kl: float = 1e-3
    alpha_cost: float = 1e-2
    temperature: float = 1.0
    hidden_ratio: float = 0.5  # r's hidden width = ⌊ratio · dim X_k⌋ (at least 1)
    restarts: int = 3
    seed: int = 0
    # the fit-set cost is calibrated into [budget·(1 − cost_tol), budget]: never above the
    # budget (as MSDNet's "best q that fits"), and well inside ±3% so that a held-out set of
    # the same distribution stays inside ±3% too
    cost_tol: float = 0.005

    def __post_init__(self) -> None:
        positive = {"lr": self.lr, "batch_size": self.batch_size, "period": self.period,
                    "temperature": self.temperature, "restarts": self.restarts, "cost_tol": self.cost_tol}
        for name, value in positive.items():
            if not value > 0:
                raise PolicyError(f"EENetConfig.{name} must be > 0, got {value}")
        for name, value in {"weight_decay": self.weight_decay, "epochs": self.epochs,
                            "alpha_kl": self.alpha_kl, "alpha_cost": self.alpha_cost}.items():
            if value < 0:
                raise PolicyError(f"EENetConfig.{name} must be >= 0, got {value}")
        if not 0 < self.hidden_ratio <= 4:
            raise PolicyError(f"EENetConfig.hidden_ratio must be in (0, 4], got {self.hidden_ratio}")


def base_features(probs: np.ndarray) -> np.ndarray:
    """[..., C] → [..., C + 2]: p_k, m_k, 1 − η_k (the part of X_k that is not earlier scores)."""
    p = np.asarray(probs, dtype=np.float32)
    conf = p.max(-1, keepdims=True)
    eta = entropy(p)[..., None] / np.float32(math.log(p.shape[-1]))
    return np.concatenate([p, conf, 1 - eta], -1)


def _linear(x: Any, w: Any) -> Any:
    # a product-and-sum per row, not a matmul: a row's score must not depend on which
    # other rows share its batch (BLAS picks kernels by shape), or a row sitting on a
    # threshold could exit in the fit simulation and not at runtime. Arrays at runtime,
    # tensors (with gradients) in training.
    return (x * w).sum(-1)


def _sigmoid(x: np.ndarray) -> np.ndarray:
    with np.errstate(over="ignore"):  # exp(-x) = inf for very negative x: 1 / inf = 0, as it should
        return (1 / (1 + np.exp(-x))).astype(x.dtype)


def _softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def expected_cost(assignment: Any, costs: Sequence[float]) -> float:
    """E_x Σ_k a_k(x)·c_k for an assignment [N, K] (or proportions π [K]), in the costs' units."""
    a = np.asarray(assignment, dtype=np.float64)
    c = np.asarray(costs, dtype=np.float64)
    return float((a.reshape(-1, len(c)) * c).sum(-1).mean())


def cost_term(assignment: Any, costs: Any, budget: float) -> Any:
    """|E_x Σ_k a_k c_k − B| / B: the relative budget gap (unit-free; costs and budget in
    the same units)."""
    return abs((assignment * costs).sum(-1).mean() - budget) / budget  # tensors in training, arrays in tests


@dataclass(frozen=True)
class EENet:
    """Exit at the first k whose score logit ≥ thresholds[k]; the last exit always answers."""

    name: ClassVar[str] = "eenet"
    score_weights: Matrix  # per exit k: weights over X_k, length C + 2 + k
    thresholds: Vector  # per exit, on logit(q_k); last = -inf
    # assignment function per exit k: W1 [H_k][C + 2 + k], W2 [H_k]
    assign_w1: tuple[Matrix, ...] = ()
    assign_w2: Matrix = ()
    temperature: float = 1.0
    cost_shift: float = 0.0  # λ in a = softmax(r / T − λ·c̃), set by the budget calibration
    norm_costs: Vector = ()  # c̃_k = c_k / c_K, the costs the assignment was fit with
    proportions: Vector = ()  # π that set the thresholds (mean assignment on the fitting set)
    budget: float | None = None  # what it was fit to (ladder units), for the record

    def __post_init__(self) -> None:
        k = len(self.score_weights)
        if k < 1 or len(self.thresholds) != k:
            raise PolicyError(f"eenet needs one score weight vector and one threshold per exit, "
                              f"got {k} and {len(self.thresholds)}")
        classes = len(self.score_weights[0]) - 2
        for i, w in enumerate(self.score_weights):
            if len(w) != classes + 2 + i:
                raise PolicyError(f"eenet exit {i}: score weights need {classes + 2 + i} entries "
                                  f"(C + 2 + earlier exits), got {len(w)}")
        if self.assign_w1 and (len(self.assign_w1) != k or len(self.assign_w2) != k or len(self.norm_costs) != k):
            raise PolicyError("eenet: the assignment function needs W1, W2 and a cost for every exit")

    @property
    def num_exits(self) -> int:
        return len(self.score_weights)

    @property
    def num_classes(self) -> int:
        return len(self.score_weights[0]) - 2

    # ---- runtime -----------------------------------------------------------------------

    def init_state(self, rows: int, num_classes: int) -> State:
        if num_classes != self.num_classes:
            raise PolicyError(f"eenet was fit for {self.num_classes} classes, the outputs have {num_classes}")
        return {"scores": np.zeros((rows, self.num_exits), dtype=np.float32)}

    def decide(self, k: int, probs: np.ndarray, state: State) -> tuple[Decision, State]:
        if not 0 <= k < self.num_exits:
            raise PolicyError(f"eenet has {self.num_exits} exits, asked about exit {k}")
        if probs.shape[-1] != self.num_classes:
            raise PolicyError(f"eenet was fit for {self.num_classes} classes, exit {k} gives {probs.shape[-1]}")
        scores = state["scores"].copy()
        logit = self._score_logit(k, probs, scores)
        scores[:, k] = _sigmoid(logit)
        return Decision(logit >= self.thresholds[k]), {"scores": scores}

    def _score_logit(self, k: int, probs: np.ndarray, scores: np.ndarray) -> np.ndarray:
        """logit(q_k) [B] from exit k's outputs and the scores of the exits before it."""
        x = np.concatenate([base_features(probs), scores[:, :k]], -1)
        return _linear(x, np.asarray(self.score_weights[k], dtype=np.float32))

    # ---- offline -----------------------------------------------------------------------

    def score_logits(self, probs: Any) -> np.ndarray:
        """logit(q_k) for every exit and row of cached outputs probs [K, N, C] → [K, N]
        (float32, computed as `decide` computes them)."""
        p = _as_outputs(probs, self.num_exits, self.num_classes)
        scores = self.init_state(p.shape[1], p.shape[2])["scores"]
        logits = []
        for k in range(self.num_exits):
            logit = self._score_logit(k, p[k], scores)
            scores[:, k] = _sigmoid(logit)
            logits.append(logit)
        return np.stack(logits)

    def assignment_logits(self, probs: Any) -> np.ndarray:
        """r / T − λ·c̃ for every row and exit [N, K]; softmax over exits gives a(x)."""
        if not self.assign_w1:
            raise PolicyError("this eenet policy was stored without its assignment function")
        p = _as_outputs(probs, self.num_exits, self.num_classes)
        scores = _sigmoid(self.score_logits(p)).T  # [N, K]
        r = []
        for k in range(self.num_exits):
            x = np.concatenate([base_features(p[k]), scores[:, :k]], -1)
            hidden = _sigmoid(_linear(x[:, None, :], np.asarray(self.assign_w1[k], dtype=np.float32)))
            r.append(_sigmoid(_linear(hidden, np.asarray(self.assign_w2[k], dtype=np.float32))))
        shift = self.cost_shift * np.asarray(self.norm_costs, dtype=np.float32)
        return np.stack(r, -1) / np.float32(self.temperature) - shift.astype(np.float32)

    def assignment(self, probs: Any) -> np.ndarray:
        """a(x) [N, K]: the calibrated assignment distribution over exits."""
        return _softmax(self.assignment_logits(probs).astype(np.float64))

    def mean_assignment(self, probs: Any) -> np.ndarray:
        """π_k = mean over rows of a_k(x): the exit proportions the scheduler asks for, for
        reporting next to the realized exit histogram."""
        return self.assignment(probs).mean(0)

    def to_dict(self) -> dict[str, Any]:
        # ±inf are not JSON: store them as strings (as MSDNetBudget does)
        return {
            "score_weights": [list(w) for w in self.score_weights],
            "thresholds": [t if np.isfinite(t) else str(t) for t in self.thresholds],
            "assign_w1": [[list(row) for row in w] for w in self.assign_w1],
            "assign_w2": [list(w) for w in self.assign_w2],
            "temperature": self.temperature,
            "cost_shift": self.cost_shift,
            "norm_costs": list(self.norm_costs),
            "proportions": list(self.proportions),
            "budget": self.budget,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "EENet":
        return cls(
            score_weights=tuple(_vector(w) for w in data["score_weights"]),
            thresholds=_vector(data["thresholds"]),
            assign_w1=tuple(tuple(_vector(row) for row in w) for w in data.get("assign_w1") or ()),
            assign_w2=tuple(_vector(w) for w in data.get("assign_w2") or ()),
            temperature=float(data.get("temperature", 1.0)),
            cost_shift=float(data.get("cost_shift", 0.0)),
            norm_costs=_vector(data.get("norm_costs") or ()),
            proportions=_vector(data.get("proportions") or ()),
            budget=None if data.get("budget") is None else float(data["budget"]),
        )

    @classmethod
    def fit(cls, probs: np.ndarray, labels: np.ndarray, ladder: Ladder, budget: float,
            config: EENetConfig = EENetConfig()) -> "EENet":
        """Train the scheduler on cached (validation) outputs probs [K, N, C] and set its
        thresholds so that the average cost on this set is at most `budget` (ladder units)
        and within `config.cost_tol` below it. Every one of `config.restarts` seeded restarts is
        calibrated to the budget (`_calibrate`); the most accurate on this set is kept."""
        check_budget(budget, ladder)
        p, y = _check_fit_inputs(probs, labels, ladder)
        k_exits, n, _ = p.shape
        costs = ladder.cumulative().astype(np.float64)
        correct = p.argmax(-1) == y[None]  # [K, N]
        best: tuple[tuple[float, float], EENet] | None = None
        for restart in range(config.restarts):
            raw = _train(p, correct, costs, float(budget), config, config.seed + restart)
            policy = _calibrate(raw, p, correct, costs, float(budget), config.cost_tol)
            realized, acc = _realized(policy.thresholds, policy.score_logits(p).astype(np.float64), correct, costs)
            if not _meets(realized, budget, costs, 0.03):
                continue  # a restart whose quantiles cannot land on the budget (tiny N, ties)
            key = (acc, -abs(realized - _target(budget, costs, config.cost_tol)))
            if best is None or key > best[0]:
                best = (key, policy)
        if best is None:
            raise PolicyError(f"eenet: no restart met budget {budget:,.4g} within ±3% on this set "
                              f"({n} rows; too few rows or too many tied scores?)")
        policy = best[1]
        # the runtime path (simulate) must agree with the fast simulation used to calibrate
        got = simulate(policy, p, ladder).mean_cost
        if not _meets(got, budget, costs, 0.03):
            raise PolicyError(f"eenet: calibrated cost {got:,.4g} misses budget {budget:,.4g} by more than 3%")
        return policy


# ---- training ----------------------------------------------------------------------------


def _vector(values: Any) -> Vector:
    return tuple(float(v) for v in values)


def _as_outputs(probs: Any, k_exits: int, num_classes: int) -> np.ndarray:
    p = as_probs(probs)
    if p.ndim != 3 or p.shape[0] != k_exits or p.shape[2] != num_classes:
        raise PolicyError(f"eenet expects outputs [K={k_exits}, N, C={num_classes}], got {list(p.shape)}")
    return p


def _check_fit_inputs(probs: np.ndarray, labels: np.ndarray, ladder: Ladder) -> tuple[np.ndarray, np.ndarray]:
    arr = np.asarray(probs)
    if arr.ndim != 3:
        raise PolicyError(f"eenet.fit needs probabilities [K, N, C], got shape {arr.shape}")
    k_exits, n, classes = arr.shape
    if k_exits != ladder.num_exits:
        raise PolicyError(f"outputs have {k_exits} exits, the ladder {ladder.num_exits}")
    if n < 1 or classes < 2:
        raise PolicyError(f"eenet.fit needs at least one row and two classes, got N={n}, C={classes}")
    if not np.isfinite(arr).all() or (arr < 0).any():
        raise PolicyError("eenet.fit needs finite, non-negative probabilities (softmax outputs, not logits)")
    y = np.asarray(labels).reshape(-1)
    if len(y) != n:
        raise PolicyError(f"{len(y)} labels for {n} rows")
    return arr.astype(np.float32), y.astype(np.int64)


def _uniform(gen: "torch.Generator", shape: tuple[int, ...], fan_in: int) -> "torch.Tensor":
    import torch

    # nn.Linear's default init, drawn from a local generator
    bound = 1.0 / math.sqrt(fan_in)
    return ((torch.rand(shape, generator=gen) * 2 - 1) * bound).requires_grad_()


def _train(p: np.ndarray, correct: np.ndarray, costs: np.ndarray, budget: float,
           config: EENetConfig, seed: int) -> EENet:
    """One restart of the alternating q / r optimisation; thresholds are set afterwards."""
    import torch
    import torch.nn.functional as F

    k_exits, n, classes = p.shape
    gen = torch.Generator().manual_seed(seed)
    rng = np.random.default_rng(seed)
    dims = [classes + 2 + k for k in range(k_exits)]
    hidden = [max(1, int(config.hidden_ratio * d)) for d in dims]
    wq = [_uniform(gen, (d,), d) for d in dims]
    w1 = [_uniform(gen, (h, d), d) for h, d in zip(hidden, dims)]
    w2 = [_uniform(gen, (h,), h) for h in hidden]
    base = torch.from_numpy(base_features(p))  # [K, N, C + 2]
    target = torch.as_tensor(correct, dtype=torch.float32)  # [K, N]
    scale = float(costs[-1])
    norm_costs = torch.as_tensor(costs / scale, dtype=torch.float32)
    norm_budget = budget / scale
    # one optimizer per phase, so Adam's moments of the idle parameters stay untouched
    opt_q = torch.optim.Adam(wq, lr=config.lr, weight_decay=config.weight_decay)
    opt_r = torch.optim.Adam(w1 + w2, lr=config.lr, weight_decay=config.weight_decay)

    def forward(idx: torch.Tensor, train_q: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        logits: list[torch.Tensor] = []
        scores: list[torch.Tensor] = []
        r: list[torch.Tensor] = []
        for k in range(k_exits):
            x = torch.cat([base[k, idx], torch.stack(scores, -1) if k else base.new_zeros((len(idx), 0))], -1)
            with torch.set_grad_enabled(train_q):
                logit = _linear(x, wq[k])
            logits.append(logit)
            scores.append(torch.sigmoid(logit).detach())  # earlier scores enter X as data
            with torch.set_grad_enabled(not train_q):
                r.append(torch.sigmoid(_linear(torch.sigmoid(_linear(x[:, None, :], w1[k])), w2[k])))
        return torch.stack(logits, -1), torch.stack(scores, -1), torch.stack(r, -1)

    for epoch in range(config.epochs):
        train_q = (epoch // config.period) % 2 == 0
        order = torch.as_tensor(rng.permutation(n))
        for start in range(0, n, config.batch_size):
            idx = order[start:start + config.batch_size]
            logits, scores, r = forward(idx, train_q)
            if train_q:
                # BCE of q_k against 1[ŷ_k = y], each row weighted by its (detached)
                # assignment to exit k, normalized over the rows of the batch per exit
                a = torch.softmax(r / config.temperature, -1)
                weight = a / a.sum(0, keepdim=True)
                bce = F.binary_cross_entropy_with_logits(logits, target[:, idx].T, weight=weight, reduction="sum")
                loss, opt = bce / k_exits, opt_q
            else:
                log_a = torch.log_softmax(r / config.temperature, -1)
                t = scores / scores.sum(-1, keepdim=True)  # q normalized over exits
                # KL(a ‖ t) as METHODS.md writes it (the released code's
                # nn.KLDivLoss(log a, t) is the reverse, KL(t ‖ a))
                kl = (log_a.exp() * (log_a - t.clamp_min(1e-12).log())).sum(-1).mean()
                loss = config.alpha_kl * kl + config.alpha_cost * cost_term(log_a.exp(), norm_costs, norm_budget)
                opt = opt_r
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

    def export(w: torch.Tensor) -> Any:
        return tuple(_vector(row) for row in w.detach().tolist()) if w.ndim == 2 else _vector(w.detach().tolist())

    return EENet(
        score_weights=tuple(export(w) for w in wq),
        thresholds=(-math.inf,) * k_exits,
        assign_w1=tuple(export(w) for w in w1),
        assign_w2=tuple(export(w) for w in w2),
        temperature=config.temperature,
        norm_costs=_vector(norm_costs.tolist()),
        budget=budget,
    )


# ---- meeting the budget ------------------------------------------------------------------


def _target(budget: float, costs: np.ndarray, tol: float) -> float:
    """The middle of the calibration band [budget·(1 − tol), budget]; a budget above the
    last exit's cost cannot be spent, so aim at what can."""
    return min(float(budget) * (1 - tol / 2), float(costs[-1]))


def _meets(cost: float, budget: float, costs: np.ndarray, tol: float) -> bool:
    """Within ±tol of the budget, or anything when the budget exceeds the dearest exit."""
    return budget >= costs[-1] or abs(cost - budget) <= tol * budget


def _fits(cost: float, budget: float, costs: np.ndarray, tol: float) -> bool:
    """In the calibration band [budget·(1 − tol), budget] (anything when the budget exceeds
    the dearest exit): a budget is a ceiling, as for MSDNet's q."""
    return budget >= costs[-1] or budget * (1 - tol) <= cost <= budget


def _realized(thresholds: Sequence[float] | np.ndarray, logits: np.ndarray, correct: np.ndarray,
              costs: np.ndarray) -> tuple[float, float]:
    """Average cost and accuracy of "exit at the first k with logit ≥ t_k" on cached scores."""
    passes = logits >= np.asarray(thresholds, dtype=np.float64)[:, None]
    passes[-1] = True
    where = passes.argmax(0)
    cols = np.arange(logits.shape[1])
    return float(costs[where].mean()), float(correct[where, cols].mean())


def _calibrate(policy: EENet, p: np.ndarray, correct: np.ndarray, costs: np.ndarray,
               budget: float, tol: float) -> EENet:
    """Thresholds from π = mean assignment; if the realized cost is above the budget or
    more than `tol` below it, bisect the cost shift λ in a = softmax(r / T − λ·c̃) until it does not.
    The expected cost of every row's assignment falls monotonically in λ (its derivative
    is −Var_a(c̃)), so π slides from the last exit (λ → −∞) to the first (λ → +∞)."""
    logits = policy.score_logits(p).astype(np.float64)
    base = policy.assignment_logits(p).astype(np.float64)  # the learned r / T (the policy's shift is 0)
    c_norm = np.asarray(policy.norm_costs, dtype=np.float64)
    target = _target(budget, costs, tol)

    def at(shift: float) -> tuple[float, np.ndarray, np.ndarray]:
        pi = _softmax(base - shift * c_norm).mean(0)
        thresholds = sequential_thresholds(logits, pi)
        return _realized(thresholds, logits, correct, costs)[0], pi, thresholds

    cost, pi, thresholds = at(0.0)
    shift = 0.0
    if not _fits(cost, budget, costs, tol):
        # bracket: cost(lo) > target > cost(hi), then bisect
        step = 1.0
        lo, hi = (0.0, step) if cost > target else (-step, 0.0)
        while at(hi)[0] > target and hi < 1e6:
            lo, hi, step = hi, hi + 2 * step, 2 * step
        while at(lo)[0] < target and lo > -1e6:
            lo, hi, step = lo - 2 * step, lo, 2 * step
        best = (abs(cost - target), cost, pi, thresholds, shift)
        for _ in range(80):
            mid = (lo + hi) / 2
            cost, pi, thresholds = at(mid)
            if abs(cost - target) < best[0]:
                best = (abs(cost - target), cost, pi, thresholds, mid)
            if _fits(cost, budget, costs, tol):
                break
            lo, hi = (mid, hi) if cost > target else (lo, mid)
        _, cost, pi, thresholds, shift = best
    return EENet(
        score_weights=policy.score_weights, thresholds=_vector(thresholds), assign_w1=policy.assign_w1,
        assign_w2=policy.assign_w2, temperature=policy.temperature, cost_shift=float(shift),
        norm_costs=policy.norm_costs, proportions=_vector(pi), budget=float(budget),
    )
