"""EENet's learned scheduler: the decision rule on hand-made outputs, meeting a budget on
synthetic outputs (fitting set and held out), manifest round trips, and the cost term's
units against the authors' released CIFAR-10 run (METHODS.md §3)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from splitexit.policies import (
    POLICIES, Ladder, MSDNetBudget, PolicyError, policy_from_dict, policy_to_dict, sequential_thresholds, simulate,
)
from splitexit.policies.eenet import EENet, EENetConfig, cost_term, expected_cost
from splitexit.policies.synthetic import synthetic_outputs

# small enough that a fit takes well under a second; the defaults are for ~5,000 rows
FAST = EENetConfig(epochs=40, restarts=2)
LADDER = Ladder.from_cumulative([1.0, 2.0, 3.0, 4.0])




def two_class(conf: list[float]) -> np.ndarray:
    return np.asarray([[c, 1 - c] for c in conf], dtype=np.float32)


def hand_made() -> EENet:
    """3 exits, 2 classes. Exit 0 scores its max-prob m_0 (exit if m_0 >= 0.9); exit 1
    scores only the earlier score, 10·q_0 = 10·sigmoid(m_0) (exit if m_0 >= 0.7)."""
    return EENet(
        score_weights=((0.0, 0.0, 1.0, 0.0), (0.0, 0.0, 0.0, 0.0, 10.0), (0.0,) * 6),
        thresholds=(0.9, 10 / (1 + math.exp(-0.7)), -math.inf),
    )


def test_decision_rule_on_hand_made_outputs() -> None:
    # exit 0's confidence decides everything; exits 1 and 2 are unsure (0.5) for all rows
    probs = np.stack([two_class([0.95, 0.8, 0.6]), two_class([0.5] * 3), two_class([0.5] * 3)])
    out = simulate(hand_made(), probs, Ladder.from_cumulative([1.0, 2.0, 3.0]), labels=np.zeros(3, dtype=int))
    assert out.exit_index.tolist() == [0, 1, 2]
    assert out.cost.tolist() == [1.0, 2.0, 3.0]
    # the state holds q_k = sigmoid(score logit) of every exit a row evaluated
    scores = out.extra["scores"]
    assert scores[0, 0] == pytest.approx(1 / (1 + math.exp(-0.95)))
    assert scores[0, 1] == 0.0  # row 0 left at exit 0
    assert scores[1, 1] == pytest.approx(1 / (1 + math.exp(-10 / (1 + math.exp(-0.8)))))
    # a threshold of +inf never fires; the last exit answers anyway
    closed = EENet(score_weights=hand_made().score_weights, thresholds=(math.inf, math.inf, math.inf))
    assert simulate(closed, probs, Ladder.from_cumulative([1.0, 2.0, 3.0])).exit_index.tolist() == [2, 2, 2]


def test_decide_refuses_outputs_it_was_not_fit_for() -> None:
    policy = hand_made()
    with pytest.raises(PolicyError, match="2 classes"):
        policy.init_state(4, 3)
    with pytest.raises(PolicyError, match="2 classes"):
        policy.decide(0, np.full((4, 3), 1 / 3, dtype=np.float32), policy.init_state(4, 2))
    with pytest.raises(PolicyError, match="entries"):
        EENet(score_weights=((0.0,) * 4, (0.0,) * 4), thresholds=(0.0, -math.inf))


@pytest.mark.parametrize("fraction", [0.3, 0.5, 0.7])
def test_fit_meets_budget_on_fitting_and_held_out_sets(fraction: float) -> None:
    val_p, val_y = synthetic_outputs(seed=0)
    # held out at the benchmark's size, so its own sampling noise stays well under 3%
    test_p, test_y = synthetic_outputs(n=5000, seed=1)
    budget = fraction * float(LADDER.cumulative()[-1])
    policy = EENet.fit(val_p, val_y, LADDER, budget, FAST)
    fit_out = simulate(policy, val_p, LADDER, val_y)
    assert fit_out.mean_cost == pytest.approx(budget, rel=0.03)
    # a ceiling: at most the budget on the fitting set, and within cost_tol below it
    assert budget * (1 - FAST.cost_tol) - 1e-6 <= fit_out.mean_cost <= budget + 1e-6
    held_out = simulate(policy, test_p, LADDER, test_y)
    assert held_out.mean_cost == pytest.approx(budget, rel=0.03)
    # the exit histogram on the fitting set follows the proportions that set the thresholds
    np.testing.assert_allclose(fit_out.exit_hist(4), policy.proportions, atol=2 / len(val_y))
    # learned scores order rows at least about as well as max-prob with the same proportions
    conf = val_p.max(-1)
    maxprob = MSDNetBudget(tuple(float(t) for t in sequential_thresholds(conf, policy.proportions)))
    assert held_out.acc >= simulate(maxprob, test_p, LADDER, test_y).acc - 0.02
    assert held_out.acc > (test_p[0].argmax(-1) == test_y).mean()  # beats always-first


def test_mean_assignment_reports_pi() -> None:
    val_p, val_y = synthetic_outputs(seed=0)
    policy = EENet.fit(val_p, val_y, LADDER, 2.0, FAST)
    pi = policy.mean_assignment(val_p)
    assert pi.shape == (4,) and pi.sum() == pytest.approx(1.0)
    np.testing.assert_allclose(pi, policy.proportions, atol=1e-4)  # calibrated on this set
    assert expected_cost(pi, LADDER.cumulative()) == pytest.approx(2.0, rel=0.03)
    assert policy.assignment(val_p).shape == (len(val_y), 4)


def test_fit_is_deterministic() -> None:
    val_p, val_y = synthetic_outputs(n=1000, seed=0)
    config = EENetConfig(epochs=20, restarts=1, seed=3)
    assert EENet.fit(val_p, val_y, LADDER, 2.0, config) == EENet.fit(val_p, val_y, LADDER, 2.0, config)


def test_round_trip_and_registry_give_identical_decisions() -> None:
    val_p, val_y = synthetic_outputs(seed=0)
    test_p, _ = synthetic_outputs(seed=1)
    policy = EENet.fit(val_p, val_y, LADDER, 2.0, FAST)
    assert POLICIES["eenet"] is EENet
    data = json.loads(json.dumps(policy_to_dict(policy)))  # plain JSON: ±inf as strings
    assert data["name"] == "eenet" and data["params"]["thresholds"][-1] == "-inf"
    loaded = policy_from_dict(data)
    assert isinstance(loaded, EENet) and loaded == policy
    assert EENet.from_dict(policy.to_dict()) == policy
    np.testing.assert_array_equal(simulate(loaded, test_p, LADDER).exit_index,
                                  simulate(policy, test_p, LADDER).exit_index)
    with pytest.raises(PolicyError, match="eenet"):
        policy_from_dict({"name": "eenet", "params": {"thresholds": [0.0]}})


def test_budget_above_the_dearest_exit_is_met_by_anything() -> None:
    val_p, val_y = synthetic_outputs(n=500, seed=0)
    policy = EENet.fit(val_p, val_y, LADDER, 10.0, EENetConfig(epochs=20, restarts=1))
    assert simulate(policy, val_p, LADDER).mean_cost <= 4.0


def test_refuses_impossible_budget_and_bad_outputs() -> None:
    val_p, val_y = synthetic_outputs(n=200, seed=0)
    with pytest.raises(PolicyError, match="below the cheapest"):
        EENet.fit(val_p, val_y, LADDER, 0.5, FAST)
    with pytest.raises(PolicyError, match="exits"):
        EENet.fit(val_p[:3], val_y, LADDER, 2.0, FAST)
    with pytest.raises(PolicyError, match="labels"):
        EENet.fit(val_p, val_y[:10], LADDER, 2.0, FAST)
    with pytest.raises(PolicyError, match="non-negative"):
        EENet.fit(np.log(val_p), val_y, LADDER, 2.0, FAST)
    with pytest.raises(PolicyError, match="lr"):
        EENetConfig(lr=0.0)


def test_cost_term_units_match_the_authors_run() -> None:
    # CIFAR-10, ResNet-56, 3 exits at (2.31, 4.15, 4.93) ms, budget 2.5 ms → π ≈ (0.88, 0.09, 0.03)
    costs = np.array([2.31, 4.15, 4.93])
    pi = np.array([[0.88, 0.09, 0.03]])
    assert expected_cost(pi, costs.tolist()) == pytest.approx(2.5, rel=0.03)
    gap = float(cost_term(pi, costs, 2.5))
    assert gap < 0.03
    # unit-free: the same gap in costs normalized by the last exit's, as the fit trains with
    assert float(cost_term(pi, costs / 4.93, 2.5 / 4.93)) == pytest.approx(gap)
    # an assignment that sends everyone to the last exit is far over budget
    assert float(cost_term(np.array([[0.0, 0.0, 1.0]]), costs, 2.5)) > 0.9
