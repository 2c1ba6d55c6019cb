"""Bolukbasi et al.'s bottom-up exit / network-selection policy on synthetic outputs: the
trade-off moves with λ, hand-made cases where the right rule is known, the cascade's jump
and its cost accounting, manifest round trips and refused parameters."""

from __future__ import annotations

import json
import math
from dataclasses import replace

import numpy as np
import pytest

from splitexit.policies import POLICIES, Bolukbasi, Ladder, PolicyError, policy_from_dict, policy_to_dict, simulate
from splitexit.policies.bolukbasi import (
    NO_JUMP, cascade_ladder, cascade_report, exit_features, jump_targets, objective, select_lambda, stack_cascade,
    sweep_lambda,
)
from splitexit.policies.synthetic import synthetic_outputs

LADDER = Ladder.from_cumulative([1.0, 2.0, 3.0, 4.0])




def peaked(top: np.ndarray, conf: np.ndarray, classes: int = 4) -> np.ndarray:
    """Rows [N, C] whose top class is `top[i]` with probability `conf[i]`, the rest even."""
    rows = np.repeat(((1 - conf) / (classes - 1))[:, None], classes, 1)
    rows[np.arange(len(top)), top] = conf
    return rows.astype(np.float32)


def synthetic_cascade(n: int = 2000, seed: int = 3) -> tuple[np.ndarray, np.ndarray, Ladder]:
    """A 3-exit edge network, then a larger network 10× the edge's cost that is more accurate."""
    probs, labels = synthetic_outputs(k=4, n=n, seed=seed)
    ladder = cascade_ladder([1.0, 2.0, 3.0], [0.1, 0.1, 0.1], 30.0)
    return stack_cascade(probs[:3], probs[3:]), labels, ladder


def test_features_are_sorted_probabilities_entropy_and_margins() -> None:
    f = exit_features(np.array([[0.1, 0.7, 0.2]], dtype=np.float32))
    h = -(0.1 * math.log(0.1) + 0.7 * math.log(0.7) + 0.2 * math.log(0.2)) / math.log(3)
    expected = [0.7, 0.2, 0.1, h, 0.5, math.log(3.5)]
    assert f.shape == (1, 6) and f[0].tolist() == pytest.approx(expected, rel=1e-5)
    assert exit_features(np.array([[0.4, 0.6]], dtype=np.float32)).shape == (1, 6)  # fewer classes than top_k


def test_lambda_zero_never_loses_accuracy_to_the_final_exit() -> None:
    probs, labels = synthetic_outputs()
    final_acc = (probs[-1].argmax(-1) == labels).mean()
    out = simulate(Bolukbasi.fit(probs, labels, LADDER, 0.0), probs, LADDER, labels)
    assert out.acc >= final_acc
    assert out.mean_cost < LADDER.cumulative()[-1]  # and it does exit early
    cascade, cascade_labels, ladder = synthetic_cascade()
    out = simulate(Bolukbasi.fit(cascade, cascade_labels, ladder, 0.0), cascade, ladder, cascade_labels)
    assert out.acc >= (cascade[-1].argmax(-1) == cascade_labels).mean()


def test_huge_lambda_exits_everything_at_the_first_exit() -> None:
    probs, labels = synthetic_outputs()
    out = simulate(Bolukbasi.fit(probs, labels, LADDER, 1000.0), probs, LADDER, labels)
    assert out.exit_hist(4)[0] >= 0.99
    assert out.acc == pytest.approx((probs[0].argmax(-1) == labels).mean(), abs=0.01)


def test_accuracy_and_cost_fall_as_lambda_grows() -> None:
    probs, labels = synthetic_outputs()
    lams = [0.0, 0.1, 0.3, 0.6, 1.0, 3.0]
    runs = [simulate(p, probs, LADDER, labels) for p in sweep_lambda(probs, labels, LADDER, lams)]
    costs = [r.mean_cost for r in runs]
    accs = [r.acc for r in runs]
    slack = 0.02 * LADDER.cumulative()[-1]  # a learned rule is only monotone up to noise
    assert all(b <= a + slack for a, b in zip(costs, costs[1:])), costs
    assert all(b <= a + 0.01 for a, b in zip(accs, accs[1:])), accs
    assert costs[-1] < 0.6 * costs[0] and accs[-1] < accs[0] - 0.05


@pytest.mark.parametrize("mode", ["guard", "tune"])
@pytest.mark.parametrize("lam", [0.0, 0.05, 0.3, 1.0])
def test_fitted_objective_beats_the_static_strategies(lam: float, mode: str) -> None:
    """The realized objective on the fitting set is no worse than exiting every row at exit 0
    or at the last exit: what the fit computed is what the runtime does."""
    for probs, labels, ladder in [(*synthetic_outputs(), LADDER), synthetic_cascade()]:
        policy = Bolukbasi.fit(probs, labels, ladder, lam, thresholds=mode)  # type: ignore[arg-type]
        scale = ladder.cumulative()[-1]
        errors = (probs.argmax(-1) != labels).mean(1)
        first = errors[0] + lam * ladder.cumulative()[0] / scale
        last = errors[-1] + lam * 1.0
        assert objective(policy, probs, labels, ladder) <= min(first, last) + 1e-9


def test_learns_to_exit_exactly_the_rows_exit_0_gets_right() -> None:
    """Exit 0 is confident and right on class 0, unsure and wrong elsewhere; exit 1 is
    always right: class 0 leaves at exit 0, everyone else at exit 1."""
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 4, 400)
    first = np.where(labels == 0, 0, (labels + 1) % 4)
    exit0 = peaked(first, np.where(labels == 0, 0.9, 0.5) + rng.uniform(-0.03, 0.03, 400))
    later = peaked(labels, rng.uniform(0.55, 0.95, 400))
    probs = np.stack([exit0, later, later])
    ladder = Ladder.from_cumulative([1.0, 2.0, 3.0])
    for mode in ("guard", "tune", "plain"):
        policy = Bolukbasi.fit(probs, labels, ladder, 0.1, thresholds=mode)
        out = simulate(policy, probs, ladder, labels)
        assert out.exit_index.tolist() == np.where(labels == 0, 0, 1).tolist()
        assert out.acc == 1.0


def cascade_case(seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray, Ladder]:
    """Three kinds of rows over edge exits 0-2 and the larger network (exit 3), all of which
    the larger network gets right: "easy" (edge right everywhere, confident), "edge-useless"
    (edge wrong everywhere, flat at exit 0) and "medium" (edge wrong at exit 0, right from
    exit 1)."""
    rng = np.random.default_rng(seed)
    n = 300
    kind = np.repeat([0, 1, 2], n // 3)
    labels = rng.integers(0, 4, n)
    wrong = (labels + 1) % 4
    jitter = rng.uniform(-0.03, 0.03, n)
    edge0 = peaked(np.where(kind == 0, labels, wrong), np.choose(kind, [0.9, 0.3, 0.6]) + jitter)
    edge_later = peaked(np.where(kind == 1, wrong, labels), np.where(kind == 1, 0.5, 0.9) + jitter)
    large = peaked(labels, 0.9 + jitter)
    probs = stack_cascade(np.stack([edge0, edge_later, edge_later]), large)
    return probs, labels, kind, cascade_ladder([1.0, 2.0, 3.0], [0.1, 0.1, 0.1], 10.0, large_head_cost=0.2)


def test_cascade_ladder_and_stacking() -> None:
    probs, _, _, ladder = cascade_case()
    assert probs.shape == (4, 300, 4)
    assert ladder.network == (0, 0, 0, 1) and ladder.names[-1] == "large"
    assert ladder.cumulative().tolist() == pytest.approx([1.1, 2.2, 3.3, 13.5])
    assert ladder.step_cost(0, 3) == 10.0  # the larger network starts from the raw input
    assert jump_targets(ladder) == (3, 3, NO_JUMP)  # exit 2's "continue" already is the larger network
    assert stack_cascade(probs[:3], probs[3]).shape == (4, 300, 4)  # [N, C] for the larger one works too


def test_jumps_to_the_larger_network_when_the_edge_is_useless() -> None:
    probs, labels, kind, ladder = cascade_case()
    policy = Bolukbasi.fit(probs, labels, ladder, 0.5)
    assert policy.jump_to == (3, 3, NO_JUMP)
    out = simulate(policy, probs, ladder, labels)
    assert out.acc == 1.0
    assert out.exit_index.tolist() == np.choose(kind, [0, 3, 1]).tolist()
    useless = kind == 1
    # evaluated exit 0, then only the larger network: edge stages 1-2 and their heads unpaid
    assert (out.head_evals[useless] == 2).all()
    jumped = ladder.cumulative()[0] + ladder.step_cost(0, 3) + ladder.head_cost[3]
    assert out.cost[useless] == pytest.approx(np.full(useless.sum(), jumped))
    assert jumped < ladder.cumulative()[3]
    assert out.cost[kind == 0] == pytest.approx(ladder.cumulative()[0])
    assert out.cost[kind == 2] == pytest.approx(ladder.cumulative()[1])
    # without the jump those rows pay the whole edge first
    plain = Bolukbasi.fit(probs, labels, ladder, 0.5, jump=False)
    assert plain.jump_to == (NO_JUMP,) * 3
    walked = simulate(plain, probs, ladder, labels)
    assert walked.cost[useless] == pytest.approx(np.full(useless.sum(), ladder.cumulative()[3]))
    assert objective(policy, probs, labels, ladder) < objective(plain, probs, labels, ladder)
    report = cascade_report(policy, probs, labels, ladder)
    assert report.skip_rate == pytest.approx(useless.mean())


def test_cascade_report_and_lambda_choice() -> None:
    probs, labels, ladder = synthetic_cascade()
    policies = sweep_lambda(probs, labels, ladder, [0.0, 0.01, 0.03, 0.1, 0.3, 1.0, 3.0])
    chosen = select_lambda(policies, probs, labels, ladder, tolerance=0.01)
    report = cascade_report(chosen, probs, labels, ladder)
    assert report.acc_change >= -0.01
    assert report.reference_cost == 30.0 and report.speedup == pytest.approx(30.0 / report.mean_cost)
    assert report.speedup > 1.5  # the edge answers most rows
    for other in policies:  # nothing within the tolerance is faster
        r = cascade_report(other, probs, labels, ladder)
        assert r.acc_change < -0.01 or r.speedup <= report.speedup
    json.dumps(report.to_dict(), allow_nan=False)
    with pytest.raises(PolicyError, match="no λ keeps accuracy"):
        select_lambda(policies[-1:], probs, labels, ladder, tolerance=0.0)


@pytest.mark.parametrize("lam", [0.0, 0.5, 1000.0])
def test_manifest_round_trip_keeps_decisions(lam: float) -> None:
    probs, labels, _, ladder = cascade_case()
    policy = Bolukbasi.fit(probs, labels, ladder, lam)
    data = json.loads(json.dumps(policy_to_dict(policy), allow_nan=False))  # strict JSON, ±inf as strings
    loaded = policy_from_dict(data)
    assert isinstance(loaded, Bolukbasi) and loaded == policy
    assert POLICIES["bolukbasi"] is Bolukbasi
    a, b = simulate(policy, probs, ladder, labels), simulate(loaded, probs, ladder, labels)
    assert a.exit_index.tolist() == b.exit_index.tolist() and a.cost.tolist() == b.cost.tolist()
    assert a.label.tolist() == b.label.tolist()


def test_bad_parameters_are_refused() -> None:
    good = Bolukbasi.fit(*cascade_case()[:2], cascade_case()[3], 0.5).to_dict()
    bad = [
        {**good, "coef": [[1.0, 2.0]] * 3},  # wrong feature count
        {**good, "intercept": [0.0]},  # one per exit
        {**good, "threshold": ["nan", 0.0, 0.0]},
        {**good, "jump_to": [1, 3, -1]},  # a "jump" to the next exit is no jump
        {**good, "jump_to": [3, 3, 3]},  # jump_coef missing for exit 2 ... and 3 is exit 2's next exit
        {**good, "jump_coef": [[], [], []]},
        {**good, "lam": -1.0},
        {**good, "loss": "hinge"},
        {**good, "top_k": 0},
        {k: v for k, v in good.items() if k != "coef"},
        {**good, "coef": "abc"},
    ]
    for params in bad:
        with pytest.raises(PolicyError):
            policy_from_dict({"name": "bolukbasi", "params": params})
    probs, labels = synthetic_outputs(n=50)
    with pytest.raises(PolicyError, match="exits"):
        Bolukbasi.fit(probs, labels, Ladder.from_cumulative([1.0, 2.0]), 0.1)
    with pytest.raises(PolicyError, match="lam"):
        Bolukbasi.fit(probs, labels, LADDER, -0.1)
    with pytest.raises(PolicyError, match="labels"):
        Bolukbasi.fit(probs, labels + 100, LADDER, 0.1)
    with pytest.raises(PolicyError, match="loss"):
        Bolukbasi.fit(probs, labels, LADDER, 0.1, loss="hinge")  # type: ignore[arg-type]
    with pytest.raises(PolicyError, match="thresholds mode"):
        Bolukbasi.fit(probs, labels, LADDER, 0.1, thresholds="best")  # type: ignore[arg-type]
    with pytest.raises(PolicyError, match="cost order"):
        Bolukbasi.fit(probs, labels, Ladder((1.0, 2.0, 3.0, 4.0), (0.0,) * 4, network=(0, 1, 0, 1)), 0.1)
    with pytest.raises(PolicyError, match="larger network"):
        cascade_ladder([1.0, 2.0], None, 0.0)
    with pytest.raises(PolicyError, match="same N and C"):
        stack_cascade(probs[:3], probs[3, :10])
    policy = Bolukbasi.fit(probs, labels, LADDER, 0.1)
    with pytest.raises(PolicyError, match="fit for 4 exits"):
        policy.decide(5, probs[0], {})


def test_nll_loss_is_supported_and_recorded() -> None:
    probs, labels = synthetic_outputs(n=500)
    policy = Bolukbasi.fit(probs, labels, LADDER, 0.2, loss="nll")
    assert policy.loss == "nll" and policy_from_dict(policy_to_dict(policy)) == policy
    never = replace(policy, threshold=(math.inf,) * 3)  # every row runs to the last exit
    assert objective(policy, probs, labels, LADDER) <= objective(never, probs, labels, LADDER) + 1e-9
