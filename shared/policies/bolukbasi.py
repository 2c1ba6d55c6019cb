"""Adaptive early exit and network selection of Bolukbasi, Wang, Dekel and Saligrama
(ICML 2017; METHODS.md §2).

Objective: minimize E[ loss(ŷ_{k(x)}, y) + λ·T(x) ], T = cost spent on x, in units of the
ladder's last cumulative cost (so λ is unit-free: λ = 1 prices running every exit of the
ladder like one error). The policy is learned bottom-up from the deepest decision: with
V_{K-1} = loss_{K-1} and, for k = K-2 .. 0,

    C_exit = loss_k
    C_cont = λ·τ(k → k+1) + V_{k+1}     # realized cost of the already-fitted policies below
    γ_k    = weighted logistic regression on (features_k, 1[C_exit <= C_cont], |C_exit - C_cont|)
    V_k    = C_exit where γ_k exits, else C_cont

Network selection: where the next network of a cascade (a larger network run on the raw
input, `Ladder.network`) starts more than one exit ahead, exit k has a third option, jump
straight to it. That choice is learned first, by a second weighted classifier δ_k on
(1[C_jump <= C_cont], |C_jump - C_cont|) with C_jump = λ·τ(k → j) + V_j; γ_k then weighs
exiting against the realized cost of going on, C_go = C_jump where δ_k jumps, else C_cont.
Both reduce to the paper's weighted binary problem, and the jump reaches the runtime
through `Decision.next_exit`.

Decision thresholds (`thresholds=`): a row exits where γ > 0.5, i.e. its logit > 0, as in
the paper ("plain"). By default ("guard") a stage falls back to a constant rule (always /
never) where that is cheaper on the fitting set than its classifier: as "never exit" and
"never jump" are then always within reach, the fitted policy's realized objective on the
fitting set is never worse than running every exit in order, nor than exiting every row
at exit 0, and with λ = 0 it is never less accurate than the final exit. "tune" moves each
threshold to its fitting-set optimum; on held-out synthetic outputs that overfits slightly
(+0.001 objective), so it is not the default.

Features per exit (probabilities only, so they are the same on every device): the top
`top_k` probabilities, entropy / log C, the top-two margin and log(p_1 / p_2). The exit
index is implicit: each exit has its own classifier.
"""

from __future__ import annotations

import functools
import math
import warnings
from dataclasses import dataclass
from typing import Any, Callable, ClassVar, Literal, Sequence

import numpy as np

from splitexit.policies.base import Decision, Ladder, PolicyError, State, simulate
from splitexit.policies.rules import entropy

Loss = Literal["zero_one", "nll"]
LOSSES: tuple[Loss, ...] = ("zero_one", "nll")
# how each classifier's threshold on its logit is set on the fitting set (module docstring)
ThresholdMode = Literal["guard", "tune", "plain"]
THRESHOLD_MODES: tuple[ThresholdMode, ...] = ("guard", "tune", "plain")
# λ = 0 (accuracy only) up to "one error is worth ten full ladders"
DEFAULT_LAMBDAS: tuple[float, ...] = (0.0, *np.geomspace(1e-3, 10.0, 25).tolist())
NO_JUMP = -1
_LOG_FLOOR = 1e-7  # float32 probabilities below this are noise; bounds log(p1/p2)


def num_features(top_k: int) -> int:
    return top_k + 3


def exit_features(probs: np.ndarray, top_k: int = 3) -> np.ndarray:
    """features [B, top_k + 3] (float32) of one exit's probabilities [B, C]."""
    p = np.asarray(probs, dtype=np.float32)
    rows, classes = p.shape
    width = max(top_k, 2)
    ranked = -np.sort(-p, axis=-1)[:, :width]  # [B, <=width], descending
    if ranked.shape[1] < width:  # fewer classes than features: the missing ones have no mass
        ranked = np.concatenate([ranked, np.zeros((rows, width - ranked.shape[1]), np.float32)], -1)
    top, second = ranked[:, :top_k], ranked[:, 1]
    h = entropy(p) / np.float32(math.log(classes)) if classes > 1 else np.zeros(rows, np.float32)
    floor = np.float32(_LOG_FLOOR)
    log_ratio = np.log(np.maximum(top[:, 0], floor)) - np.log(np.maximum(second, floor))
    return np.concatenate([top, h[:, None], (top[:, 0] - second)[:, None], log_ratio[:, None]], -1)


def _score(features: np.ndarray, coef: Sequence[float], intercept: float) -> np.ndarray:
    """The classifier's logit per row, float64 so that thresholds (midpoints between float32
    scores) compare exactly. Row-wise sum, not a matmul: a row's score must not depend on
    which other rows share its batch, or the runtime could disagree with the fit."""
    w = np.asarray(coef, dtype=np.float32)
    return ((features * w).sum(-1) + np.float32(intercept)).astype(np.float64)


def exit_losses(probs: np.ndarray, labels: np.ndarray, loss: Loss = "zero_one") -> np.ndarray:
    """loss(ŷ_k, y) per exit and row, [K, N] float64; argmax in float32, as `simulate`."""
    p = np.asarray(probs, dtype=np.float32)
    y = np.asarray(labels, dtype=np.int64)
    if loss == "zero_one":
        return (p.argmax(-1) != y).astype(np.float64)
    if loss == "nll":
        picked = np.take_along_axis(p, np.broadcast_to(y, p.shape[:-1])[..., None], -1)[..., 0]
        return -np.log(np.maximum(picked.astype(np.float64), 1e-12))
    raise PolicyError(f"unknown loss {loss!r}; choose one of {', '.join(LOSSES)}")


def jump_targets(ladder: Ladder) -> tuple[int, ...]:
    """Per exit 0..K-2, the first exit of the next network where that is not simply k + 1
    (the exits a policy may skip to), else NO_JUMP."""
    net = ladder.network
    if any(b < a for a, b in zip(net, net[1:])):
        raise PolicyError(f"networks must follow each other in cost order (each one's exits together), got {net}")
    targets = []
    for k in range(ladder.num_exits - 1):
        j = next((i for i in range(k + 1, ladder.num_exits) if net[i] != net[k]), NO_JUMP)
        targets.append(j if j > k + 1 else NO_JUMP)
    return tuple(targets)


def _cost_scale(ladder: Ladder) -> float:
    scale = float(ladder.cumulative()[-1])
    if not np.isfinite(scale) or scale <= 0:
        raise PolicyError(f"the ladder's total cost must be positive, got {scale}")
    return scale


def _tau(ladder: Ladder, k: int, j: int) -> float:
    """Cost of going on from exit k to evaluate exit j (backbone step plus j's head)."""
    return ladder.step_cost(k, j) + float(ladder.head_cost[j])


def _finite(values: Sequence[float], what: str) -> tuple[float, ...]:
    out = tuple(float(v) for v in values)
    if not all(np.isfinite(out)):
        raise PolicyError(f"{what} must be finite, got {list(out)}")
    return out


def _numbers(values: Sequence[float], what: str) -> tuple[float, ...]:
    out = tuple(float(v) for v in values)
    if any(np.isnan(out)):
        raise PolicyError(f"{what} must be numbers (±inf allowed), got {list(out)}")
    return out


def _json_float(x: float) -> float | str:
    return x if np.isfinite(x) else str(x)  # ±inf are not JSON: "inf" / "-inf"


@dataclass(frozen=True)
class _Choice:
    """One fitted binary decision (exit vs go on, or jump vs continue): yes iff
    coef·features + intercept > threshold."""

    coef: tuple[float, ...]
    intercept: float
    threshold: float
    yes: np.ndarray  # bool [N] on the fitting set, exactly as `decide` will say


def _best_threshold(scores: np.ndarray, c_yes: np.ndarray, c_no: np.ndarray) -> float:
    """The threshold on the logit with the least realized cost Σ(yes ? c_yes : c_no); 0
    (the classifier's own γ > 0.5) when that is optimal, else the optimum nearest to 0."""
    n = len(scores)
    order = np.argsort(scores, kind="stable")
    s, yes, no = scores[order], c_yes[order], c_no[order]
    # cost[i]: the i lowest scores say no, the rest yes
    cost = np.concatenate([[0.0], np.cumsum(no)]) + (yes.sum() - np.concatenate([[0.0], np.cumsum(yes)]))
    candidates = np.concatenate([[-np.inf], (s[:-1] + s[1:]) / 2, [np.inf]])
    valid = np.ones(n + 1, dtype=bool)
    valid[1:n] = s[1:] > s[:-1]  # a threshold can only fall between distinct scores
    best = cost[valid].min()
    tol = 1e-9 * max(1.0, abs(best))
    if cost[int(np.searchsorted(s, 0.0, side="right"))] <= best + tol:
        return 0.0
    ok = valid & (cost <= best + tol)
    return float(candidates[ok][np.argmin(np.abs(candidates[ok]))])


def _choose_threshold(scores: np.ndarray, c_yes: np.ndarray, c_no: np.ndarray, mode: ThresholdMode) -> float:
    if mode == "tune":
        return _best_threshold(scores, c_yes, c_no)
    if mode == "guard":
        # the classifier's own rule unless a constant one (always / never) is cheaper on the
        # fitting set: three candidates cannot overfit, yet each stage is then never worse
        # than either static choice
        options = {0.0: np.where(scores > 0.0, c_yes, c_no).sum(), -np.inf: c_yes.sum(), np.inf: c_no.sum()}
        best = min(options.values())
        return next(t for t, cost in options.items() if cost <= best + 1e-9 * max(1.0, abs(best)))
    return 0.0


def _fit_choice(features: np.ndarray, c_yes: np.ndarray, c_no: np.ndarray, *, C: float,
                thresholds: ThresholdMode, max_iter: int) -> _Choice:
    """Weighted binary classifier: label 1[c_yes <= c_no], weight |c_yes - c_no|."""
    from sklearn.exceptions import ConvergenceWarning  # fitting only: a device runs the rule alone
    from sklearn.linear_model import LogisticRegression

    label = c_yes <= c_no
    weight = np.abs(c_yes - c_no)
    used = weight > 0  # ties cost the same either way: they teach nothing
    f = features.shape[1]
    if not used.any() or label[used].all() or not label[used].any():
        # one answer is never worse: a constant rule (ties go to "yes", as the paper's <=)
        always = bool(label[used].all()) if used.any() else True
        threshold = -np.inf if always else np.inf
        return _Choice((0.0,) * f, 0.0, threshold, np.full(len(label), always))
    x = features.astype(np.float64)[used]
    w = weight[used] / weight[used].mean()  # so that C means the same at every λ
    # standardized features, so that C's L2 penalty weighs every feature alike (top
    # probabilities near 1 barely vary; the log-ratio spans tens). One that hardly varies
    # stays unscaled: dividing by a tiny spread would make the float32 logits cancel.
    mean, std = x.mean(0), x.std(0)
    std[std < 1e-4] = 1.0
    model = LogisticRegression(C=C, max_iter=max_iter)
    with warnings.catch_warnings():
        # an unconverged fit is still a usable rule (and "guard" checks it against constants)
        warnings.simplefilter("ignore", ConvergenceWarning)
        model.fit((x - mean) / std, label[used].astype(np.int64), sample_weight=w)
    # back to raw features: the stored rule is plain coefficients on `exit_features`
    raw = model.coef_[0] / std
    coef = tuple(float(v) for v in raw)
    intercept = float(model.intercept_[0] - raw @ mean)
    scores = _score(features, coef, intercept)
    threshold = _choose_threshold(scores, c_yes, c_no, thresholds)
    return _Choice(coef, intercept, threshold, scores > threshold)


@dataclass(frozen=True)
class _Prepared:
    """What every λ of a sweep shares: features and losses of the fitting set."""

    features: tuple[np.ndarray, ...]  # per exit, [N, F] float32
    losses: np.ndarray  # [K, N]
    ladder: Ladder
    jumps: tuple[int, ...]
    scale: float
    top_k: int
    loss: Loss


def _prepare(probs: np.ndarray, labels: np.ndarray, ladder: Ladder, top_k: int, loss: Loss) -> _Prepared:
    p = np.asarray(probs)
    y = np.asarray(labels)
    if p.ndim != 3:
        raise PolicyError(f"probs must be [K, N, C], got shape {p.shape}")
    k, n, c = p.shape
    if k != ladder.num_exits:
        raise PolicyError(f"outputs have {k} exits, the ladder {ladder.num_exits}")
    if n < 1 or c < 1:
        raise PolicyError(f"need at least one row and one class, got shape {p.shape}")
    if y.shape != (n,) or not np.issubdtype(y.dtype, np.integer):
        raise PolicyError(f"labels must be [N={n}] integers, got shape {y.shape} ({y.dtype})")
    if y.min() < 0 or y.max() >= c:
        raise PolicyError(f"labels must lie in 0..{c - 1}, got {y.min()}..{y.max()}")
    if not np.isfinite(p).all():
        raise PolicyError("probs contain NaN or inf")
    if top_k < 1:
        raise PolicyError(f"top_k must be >= 1, got {top_k}")
    t = p.astype(np.float32)
    return _Prepared(features=tuple(exit_features(t[i], top_k) for i in range(k)),
                     losses=exit_losses(t, y, loss), ladder=ladder, jumps=jump_targets(ladder),
                     scale=_cost_scale(ladder), top_k=top_k, loss=loss)


@dataclass(frozen=True)
class Bolukbasi:
    """Per-exit weighted logistic rules: at exit k (< K-1) a row exits iff
    coef[k]·f + intercept[k] > threshold[k]; a row that goes on evaluates jump_to[k] iff
    jump_to[k] != NO_JUMP and jump_coef[k]·f + jump_intercept[k] > jump_threshold[k], else
    exit k+1. The last exit always answers and has no parameters."""

    name: ClassVar[str] = "bolukbasi"
    coef: tuple[tuple[float, ...], ...]  # [K-1][F]
    intercept: tuple[float, ...]  # [K-1]
    threshold: tuple[float, ...] = ()  # [K-1] on the logit; () = 0 (γ > 0.5)
    jump_to: tuple[int, ...] = ()  # [K-1] exit to skip to, NO_JUMP where none; () = none
    jump_coef: tuple[tuple[float, ...], ...] = ()  # [K-1][F], or [] where jump_to is NO_JUMP
    jump_intercept: tuple[float, ...] = ()
    jump_threshold: tuple[float, ...] = ()
    lam: float = 0.0  # what it was fit for, per unit of the ladder's total cost
    top_k: int = 3
    loss: Loss = "zero_one"

    def __post_init__(self) -> None:
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 1:
            raise PolicyError(f"top_k must be an integer >= 1, got {self.top_k!r}")
        if self.loss not in LOSSES:
            raise PolicyError(f"unknown loss {self.loss!r}; choose one of {', '.join(LOSSES)}")
        if not np.isfinite(self.lam) or self.lam < 0:
            raise PolicyError(f"lam must be finite and >= 0, got {self.lam}")
        self._set("lam", float(self.lam))
        d, f = len(self.coef), num_features(self.top_k)
        coef = tuple(_finite(c, f"coef[{k}]") for k, c in enumerate(self.coef))
        if any(len(c) != f for c in coef):
            raise PolicyError(f"each exit needs {f} coefficients (top_k={self.top_k}), got {[len(c) for c in coef]}")
        self._set("coef", coef)
        self._set("intercept", self._per_exit(self.intercept, "intercept", _finite, None))
        self._set("threshold", self._per_exit(self.threshold, "threshold", _numbers, 0.0))
        jump_to = tuple(int(j) for j in self.jump_to) if self.jump_to else (NO_JUMP,) * d
        if len(jump_to) != d:
            raise PolicyError(f"jump_to needs one entry per exit but the last ({d}), got {len(jump_to)}")
        for k, j in enumerate(jump_to):
            if j != NO_JUMP and not k + 1 < j <= d:
                raise PolicyError(f"jump_to[{k}] = {j}: a jump from exit {k} must land in {k + 2}..{d} "
                                  f"(or be {NO_JUMP} for none)")
        self._set("jump_to", jump_to)
        jump_coef = tuple(_finite(c, f"jump_coef[{k}]") for k, c in enumerate(self.jump_coef)) or ((),) * d
        if len(jump_coef) != d:
            raise PolicyError(f"jump_coef needs one entry per exit but the last ({d}), got {len(jump_coef)}")
        for k, (j, c) in enumerate(zip(jump_to, jump_coef)):
            if len(c) != (0 if j == NO_JUMP else f):
                raise PolicyError(f"jump_coef[{k}] needs {0 if j == NO_JUMP else f} coefficients "
                                  f"(jump_to[{k}] = {j}), got {len(c)}")
        self._set("jump_coef", jump_coef)
        self._set("jump_intercept", self._per_exit(self.jump_intercept, "jump_intercept", _finite, 0.0))
        self._set("jump_threshold", self._per_exit(self.jump_threshold, "jump_threshold", _numbers, 0.0))

    def _set(self, field: str, value: Any) -> None:
        object.__setattr__(self, field, value)  # normalize lists to tuples on a frozen instance

    def _per_exit(self, values: Sequence[float], what: str, check: Callable[[Sequence[float], str], tuple[float, ...]],
                  default: float | None) -> tuple[float, ...]:
        d = len(self.coef)
        if not values and default is not None:
            return (default,) * d
        out = check(values, what)
        if len(out) != d:
            raise PolicyError(f"{what} needs one entry per exit but the last ({d}), got {len(out)}")
        return out

    @property
    def num_exits(self) -> int:
        return len(self.coef) + 1

    def init_state(self, rows: int, num_classes: int) -> State:
        return {}

    def decide(self, k: int, probs: np.ndarray, state: State) -> tuple[Decision, State]:
        rows = probs.shape[0]
        if k == self.num_exits - 1:
            return Decision(np.ones(rows, dtype=bool)), state
        if not 0 <= k < self.num_exits:
            raise PolicyError(f"exit {k} out of range: this policy was fit for {self.num_exits} exits")
        features = exit_features(probs, self.top_k)
        exits = _score(features, self.coef[k], self.intercept[k]) > self.threshold[k]
        target = self.jump_to[k]
        if target == NO_JUMP:
            return Decision(exits), state
        jump = _score(features, self.jump_coef[k], self.jump_intercept[k]) > self.jump_threshold[k]
        next_exit = np.where(jump, target, k + 1)
        return Decision(exits, next_exit=next_exit), state

    def to_dict(self) -> dict[str, Any]:
        return {
            "lam": self.lam, "top_k": self.top_k, "loss": self.loss,
            "coef": [list(c) for c in self.coef], "intercept": list(self.intercept),
            "threshold": [_json_float(t) for t in self.threshold],
            "jump_to": list(self.jump_to), "jump_coef": [list(c) for c in self.jump_coef],
            "jump_intercept": list(self.jump_intercept),
            "jump_threshold": [_json_float(t) for t in self.jump_threshold],
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Bolukbasi":
        missing = [key for key in ("coef", "intercept") if key not in data]
        if missing:
            raise PolicyError(f"bolukbasi policy: missing {', '.join(missing)}")
        return cls(
            coef=tuple(tuple(float(v) for v in c) for c in data["coef"]),
            intercept=tuple(float(v) for v in data["intercept"]),
            threshold=tuple(float(v) for v in data.get("threshold", ())),
            jump_to=tuple(int(j) for j in data.get("jump_to", ())),
            jump_coef=tuple(tuple(float(v) for v in c) for c in data.get("jump_coef", ())),
            jump_intercept=tuple(float(v) for v in data.get("jump_intercept", ())),
            jump_threshold=tuple(float(v) for v in data.get("jump_threshold", ())),
            lam=float(data.get("lam", 0.0)), top_k=int(data.get("top_k", 3)), loss=data.get("loss", "zero_one"),
        )

    @classmethod
    def fit(cls, probs: np.ndarray, labels: np.ndarray, ladder: Ladder, lam: float, *, top_k: int = 3,
            loss: Loss = "zero_one", jump: bool = True, thresholds: ThresholdMode = "guard", C: float = 1.0,
            max_iter: int = 500) -> "Bolukbasi":
        """Fit bottom-up on cached outputs probs [K, N, C] of a split that did not train the
        heads. `jump=False` drops the skip-to-the-next-network option; `thresholds` as in the
        module docstring."""
        if loss not in LOSSES:
            raise PolicyError(f"unknown loss {loss!r}; choose one of {', '.join(LOSSES)}")
        return _fit(_prepare(probs, labels, ladder, top_k, loss), lam, jump=jump, thresholds=thresholds,
                    C=C, max_iter=max_iter)


def _fit(prep: _Prepared, lam: float, *, jump: bool, thresholds: ThresholdMode, C: float, max_iter: int) -> Bolukbasi:
    lam = float(lam)
    if not np.isfinite(lam) or lam < 0:
        raise PolicyError(f"lam must be finite and >= 0, got {lam}")
    if not C > 0:
        raise PolicyError(f"C (inverse regularization) must be > 0, got {C}")
    if thresholds not in THRESHOLD_MODES:
        raise PolicyError(f"unknown thresholds mode {thresholds!r}; choose one of {', '.join(THRESHOLD_MODES)}")
    ladder, losses, num_exits = prep.ladder, prep.losses, prep.ladder.num_exits
    fit_choice = functools.partial(_fit_choice, C=C, thresholds=thresholds, max_iter=max_iter)
    value = np.zeros_like(losses)  # V_k: realized cost-to-go once exit k has been evaluated
    value[-1] = losses[-1]
    exit_rules: dict[int, _Choice] = {}
    jump_rules: dict[int, _Choice] = {}
    for k in range(num_exits - 2, -1, -1):
        c_exit = losses[k]
        c_go = lam * _tau(ladder, k, k + 1) / prep.scale + value[k + 1]
        target = prep.jumps[k] if jump else NO_JUMP
        if target != NO_JUMP:
            c_jump = lam * _tau(ladder, k, target) / prep.scale + value[target]
            rule = fit_choice(prep.features[k], c_jump, c_go)
            jump_rules[k] = rule
            c_go = np.where(rule.yes, c_jump, c_go)
        exit_rules[k] = fit_choice(prep.features[k], c_exit, c_go)
        value[k] = np.where(exit_rules[k].yes, c_exit, c_go)
    exits = [exit_rules[k] for k in range(num_exits - 1)]
    jumps = [jump_rules.get(k) for k in range(num_exits - 1)]
    return Bolukbasi(
        coef=tuple(r.coef for r in exits), intercept=tuple(r.intercept for r in exits),
        threshold=tuple(r.threshold for r in exits),
        jump_to=tuple(NO_JUMP if r is None else prep.jumps[k] for k, r in enumerate(jumps)),
        jump_coef=tuple(() if r is None else r.coef for r in jumps),
        jump_intercept=tuple(0.0 if r is None else r.intercept for r in jumps),
        jump_threshold=tuple(0.0 if r is None else r.threshold for r in jumps),
        lam=lam, top_k=prep.top_k, loss=prep.loss,
    )


def sweep_lambda(probs: np.ndarray, labels: np.ndarray, ladder: Ladder, lams: Sequence[float] | None = None, *,
                 top_k: int = 3, loss: Loss = "zero_one", jump: bool = True, thresholds: ThresholdMode = "guard",
                 C: float = 1.0, max_iter: int = 500) -> list[Bolukbasi]:
    """One fitted policy per λ (the trade-off curve), in the order given (default
    DEFAULT_LAMBDAS); features and losses are computed once."""
    if loss not in LOSSES:
        raise PolicyError(f"unknown loss {loss!r}; choose one of {', '.join(LOSSES)}")
    lams = DEFAULT_LAMBDAS if lams is None else tuple(lams)
    if not lams:
        raise PolicyError("need at least one λ to sweep")
    prep = _prepare(probs, labels, ladder, top_k, loss)
    return [_fit(prep, lam, jump=jump, thresholds=thresholds, C=C, max_iter=max_iter) for lam in lams]


def objective(policy: Bolukbasi, probs: np.ndarray, labels: np.ndarray, ladder: Ladder) -> float:
    """The realized E[loss + λ·T] of `policy` on a set (T in units of the ladder's total cost)."""
    out = simulate(policy, probs, ladder, labels)
    losses = exit_losses(probs, labels, policy.loss)[out.exit_index, np.arange(len(out.exit_index))]
    return float((losses + policy.lam * out.cost / _cost_scale(ladder)).mean())


# --- network selection over a cascade -------------------------------------------------------


def cascade_ladder(edge_net_cost: Sequence[float], edge_head_cost: Sequence[float] | None, large_cost: float, *,
                   large_head_cost: float = 0.0, names: Sequence[str] = ()) -> Ladder:
    """The cascade's ladder: the edge network's exits (network 0, its final exit included;
    `edge_net_cost[k]` = backbone cost from the input to exit k, as `Ladder.net_cost`; from
    cumulative costs use `Ladder.from_cumulative(c).net_cost`), then the larger network's
    output (network 1, run on the raw input: reaching it costs `large_cost` whatever the
    edge already spent)."""
    net = _finite(edge_net_cost, "edge_net_cost")
    heads = _finite(edge_head_cost if edge_head_cost is not None else [0.0] * len(net), "edge_head_cost")
    if not net or len(heads) != len(net):
        raise PolicyError(f"need >= 1 edge exit with one head cost each, got {len(net)} and {len(heads)}")
    if any(c < 0 for c in (*net, *heads, large_head_cost)) or any(b < a for a, b in zip(net, net[1:])):
        raise PolicyError(f"costs must be >= 0 and the edge's backbone costs non-decreasing, got {list(net)}")
    if not np.isfinite(large_head_cost):
        raise PolicyError(f"the larger network's head cost must be finite, got {large_head_cost}")
    if not np.isfinite(large_cost) or large_cost <= 0:
        raise PolicyError(f"the larger network's cost must be positive, got {large_cost}")
    if not names:
        names = (*(f"edge{k}" for k in range(len(net))), "large")
    return Ladder(net_cost=(*net, float(large_cost)), head_cost=(*heads, float(large_head_cost)),
                  network=(0,) * len(net) + (1,), names=tuple(names))


def stack_cascade(edge_probs: np.ndarray, large_probs: np.ndarray) -> np.ndarray:
    """Cached outputs of a cascade: edge [K_edge, N, C] and larger network [1, N, C] (or
    [N, C]) → [K_edge + 1, N, C], in `cascade_ladder`'s order."""
    edge = np.asarray(edge_probs)
    large = np.asarray(large_probs)
    if large.ndim == 2:
        large = large[None]
    if edge.ndim != 3 or large.ndim != 3 or large.shape[0] != 1 or edge.shape[1:] != large.shape[1:]:
        raise PolicyError(f"need edge [K, N, C] and larger network [1, N, C] with the same N and C, "
                          f"got {edge.shape} and {np.asarray(large_probs).shape}")
    return np.concatenate([edge, large.astype(edge.dtype, copy=False)], 0)


def reference_cost(ladder: Ladder) -> float:
    """Cost of the last network alone (its own input to the final exit): the larger network
    of a cascade, or the whole network of a one-network ladder."""
    last = ladder.num_exits - 1
    return ladder.step_cost(-1, last) + float(ladder.head_cost[last])


@dataclass(frozen=True)
class CascadeReport:
    """A policy on a set against the last network alone."""

    lam: float
    acc: float
    reference_acc: float  # the final exit (the larger network) on every row
    mean_cost: float
    reference_cost: float
    exit_hist: tuple[float, ...]  # share of rows answered by each exit
    skip_rate: float  # share of rows that skipped an exit (jumped to the larger network)

    @property
    def speedup(self) -> float:
        return self.reference_cost / self.mean_cost

    @property
    def acc_change(self) -> float:
        return self.acc - self.reference_acc

    def to_dict(self) -> dict[str, Any]:
        return {"lam": self.lam, "acc": self.acc, "reference_acc": self.reference_acc, "acc_change": self.acc_change,
                "mean_cost": self.mean_cost, "reference_cost": self.reference_cost, "speedup": self.speedup,
                "exit_hist": list(self.exit_hist), "skip_rate": self.skip_rate}


def cascade_report(policy: Bolukbasi, probs: np.ndarray, labels: np.ndarray, ladder: Ladder) -> CascadeReport:
    """Speedup over the larger network alone (its cost / the mean cascade cost) and the
    accuracy change, on one set."""
    out = simulate(policy, probs, ladder, labels)
    final_errors = exit_losses(np.asarray(probs)[-1:], labels, "zero_one")[0]  # argmax as `simulate` takes it
    return CascadeReport(lam=policy.lam, acc=out.acc, reference_acc=float(1.0 - final_errors.mean()),
                         mean_cost=out.mean_cost,
                         reference_cost=reference_cost(ladder),
                         exit_hist=tuple(float(h) for h in out.exit_hist(ladder.num_exits)),
                         skip_rate=float((out.head_evals < out.exit_index + 1).mean()))


def select_lambda(policies: Sequence[Bolukbasi], probs: np.ndarray, labels: np.ndarray, ladder: Ladder, *,
                  tolerance: float = 0.01) -> Bolukbasi:
    """The policy with the best speedup whose accuracy on this (fitting/validation) set is at
    most `tolerance` below the larger network alone; ties go to the more accurate."""
    if not policies:
        raise PolicyError("no policies to choose from")
    if not np.isfinite(tolerance) or tolerance < 0:
        raise PolicyError(f"tolerance must be finite and >= 0, got {tolerance}")
    best: tuple[float, float, int] | None = None
    for i, policy in enumerate(policies):
        report = cascade_report(policy, probs, labels, ladder)
        if report.acc_change >= -tolerance - 1e-12:
            key = (report.speedup, report.acc, -i)
            best = key if best is None or key > best else best
    if best is None:
        raise PolicyError(f"no λ keeps accuracy within {tolerance:.2%} of the larger network alone on this set")
    return policies[-best[2]]
