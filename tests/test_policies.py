"""Exit rules on hand-made outputs where the right answer is known, budget calibration on
synthetic outputs, and manifest round trips."""

from __future__ import annotations

import json

import numpy as np
import pytest

from splitexit.policies import (
    POLICIES, BoFBeta, Entropy, Ladder, MaxProb, MSDNetBudget, Oracle, Patience, PolicyError, check_budget,
    fit_scalar_to_budget, policy_from_dict, policy_to_dict, sequential_thresholds, simulate,
)
from splitexit.policies.predictive import Predictive
from splitexit.policies.synthetic import synthetic_outputs as make_synthetic


def one_hot_ish(labels: list[int], conf: list[float], classes: int = 4) -> np.ndarray:
    """Rows whose top class is `labels[i]` with probability `conf[i]`, the rest spread evenly."""
    rows = []
    for label, c in zip(labels, conf):
        row = np.full(classes, (1 - c) / (classes - 1))
        row[label] = c
        rows.append(row)
    return np.asarray(rows, dtype=np.float32)


def synthetic_outputs(k: int = 4, n: int = 4000, classes: int = 10, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    return make_synthetic(k, n, classes, seed)


LADDER = Ladder.from_cumulative([1.0, 2.0, 3.0, 4.0])


def test_maxprob_exits_at_first_confident_exit_and_falls_back_to_most_confident() -> None:
    # row 0 confident at exit 1; row 1 never confident: its best was exit 0 (0.8), label 2
    probs = np.stack([
        one_hot_ish([0, 2], [0.5, 0.8]),
        one_hot_ish([0, 1], [0.95, 0.6]),
        one_hot_ish([1, 3], [0.99, 0.5]),
        one_hot_ish([1, 3], [0.99, 0.7]),
    ])
    out = simulate(MaxProb(0.9), probs, LADDER, labels=np.array([0, 2]))
    assert out.exit_index.tolist() == [1, 3]
    assert out.label.tolist() == [0, 2]  # row 1 answers with exit 0's label, not the last exit's
    assert out.acc == 1.0
    assert out.cost.tolist() == [2.0, 4.0]
    plain = simulate(MaxProb(0.9, fallback=False), probs, LADDER, labels=np.array([0, 2]))
    assert plain.label.tolist() == [0, 3]


def test_entropy_and_per_exit_thresholds() -> None:
    probs = np.stack([one_hot_ish([0, 1], [0.97, 0.4])] * 4)
    out = simulate(Entropy(0.3), probs, LADDER)
    assert out.exit_index.tolist() == [0, 3]
    # a per-exit threshold that only exit 2 can pass
    out = simulate(Entropy((0.0, 0.0, 2.0, 0.0)), probs, LADDER)
    assert out.exit_index.tolist() == [2, 2]


def test_patience_waits_for_agreeing_exits() -> None:
    labels_per_exit = [[0, 0], [0, 1], [0, 1], [1, 2]]  # [exit][row]
    probs = np.stack([one_hot_ish(ls, [0.6, 0.6]) for ls in labels_per_exit])
    out = simulate(Patience(1), probs, LADDER)
    assert out.exit_index.tolist() == [1, 2]  # row 0: exits 0, 1 agree; row 1: exits 1, 2
    out = simulate(Patience(2), probs, LADDER)
    assert out.exit_index.tolist() == [2, 3]
    with pytest.raises(PolicyError):
        Patience(-1)


def test_oracle_is_the_earliest_correct_exit_and_bounds_every_policy() -> None:
    probs, labels = synthetic_outputs()
    ladder = Ladder.from_cumulative([1, 2, 3, 4])
    oracle = simulate(Oracle(labels), probs, ladder, labels)
    assert oracle.acc == pytest.approx((probs.argmax(-1) == labels).any(0).mean())
    for policy in (MaxProb(0.8), Entropy(0.5), Patience(1)):
        assert simulate(policy, probs, ladder, labels).acc <= oracle.acc
    with pytest.raises(PolicyError, match="labels"):
        simulate(Oracle(labels[:10]), probs, ladder, labels)


def test_cost_counts_backbone_and_every_evaluated_head() -> None:
    ladder = Ladder(net_cost=(10.0, 20.0, 30.0), head_cost=(1.0, 2.0, 0.0))
    assert ladder.cumulative().tolist() == [11.0, 23.0, 33.0]
    probs = np.stack([one_hot_ish([0], [0.3])] * 3)
    out = simulate(MaxProb(0.9), probs, ladder)
    assert out.cost.tolist() == [33.0] and out.head_evals.tolist() == [3]


def test_sequential_thresholds_take_the_requested_shares() -> None:
    rng = np.random.default_rng(0)
    scores = rng.random((3, 1000))
    t = sequential_thresholds(scores, [0.5, 0.3, 0.2])
    first = scores[0] >= t[0]
    second = ~first & (scores[1] >= t[1])
    assert first.sum() == 500 and second.sum() == 300
    assert t[-1] == -np.inf
    with pytest.raises(PolicyError):
        sequential_thresholds(scores, [0.5, 0.5])


@pytest.mark.parametrize("fraction", [0.3, 0.5, 0.7])
def test_msdnet_budget_meets_the_budget_on_held_out_data(fraction: float) -> None:
    val_probs, val_labels = synthetic_outputs(seed=1)
    test_probs, test_labels = synthetic_outputs(seed=2)
    ladder = Ladder(net_cost=(25.0, 50.0, 75.0, 100.0), head_cost=(0.5, 0.5, 0.5, 0.0))
    budget = fraction * 100.0
    policy = MSDNetBudget.fit(val_probs, val_labels, ladder, budget)
    val = simulate(policy, val_probs, ladder, val_labels)
    test = simulate(policy, test_probs, ladder, test_labels)
    assert val.mean_cost <= budget
    assert test.mean_cost == pytest.approx(budget, rel=0.05)


def test_budget_below_the_cheapest_exit_is_refused() -> None:
    probs, labels = synthetic_outputs()
    with pytest.raises(PolicyError, match="cheapest exit"):
        MSDNetBudget.fit(probs, labels, LADDER, 0.5)
    with pytest.raises(PolicyError, match="cheapest exit"):
        check_budget(0.99, LADDER)


def test_bisection_finds_the_largest_threshold_that_fits() -> None:
    probs, labels = synthetic_outputs()
    policy, t = fit_scalar_to_budget(lambda x: MaxProb(x, fallback=False), 0.0, 1.0, probs, LADDER, 2.0)
    assert simulate(policy, probs, LADDER).mean_cost <= 2.0
    assert simulate(MaxProb(t + 0.01, fallback=False), probs, LADDER).mean_cost > 2.0


def test_bof_beta_uses_each_exits_own_statistic() -> None:
    # exit 0 is typically 0.5 confident, exit 1 typically 0.9: the same 0.7 is "confident"
    # for exit 0 and "unsure" for exit 1 at beta = 1
    policy = BoFBeta(beta=1.0, mean=(0.5, 0.9, 0.9), std=(0.1, 0.05, 0.05))
    probs = np.stack([one_hot_ish([0, 1], [0.7, 0.4]), one_hot_ish([0, 1], [0.7, 0.7]),
                      one_hot_ish([0, 1], [0.7, 0.7])])
    out = simulate(policy, probs, Ladder.from_cumulative([1, 2, 3]))
    assert out.exit_index.tolist() == [0, 2]
    std_rule = BoFBeta(beta=2.0, mean=(0.5, 0.9, 0.9), std=(0.1, 0.05, 0.05), statistic="maxprob_std")
    assert std_rule.threshold(0) == pytest.approx(0.7)


@pytest.mark.parametrize("statistic", ["maxprob", "margin", "maxprob_std"])
def test_bof_beta_trades_cost_for_accuracy_monotonically(statistic: str) -> None:
    train, _ = synthetic_outputs(seed=3)
    probs, labels = synthetic_outputs(seed=4)
    base = BoFBeta.fit(train, statistic=statistic)
    lo, hi = base.beta_range()
    costs, accs = [], []
    for beta in np.linspace(lo, hi, 12):
        out = simulate(base.with_beta(beta), probs, LADDER, labels)
        costs.append(out.mean_cost)
        accs.append(out.acc)
    assert all(b >= a for a, b in zip(costs, costs[1:]))
    assert costs[0] == pytest.approx(1.0) and costs[-1] == pytest.approx(4.0)
    assert accs[-1] > accs[0]
    with pytest.raises(PolicyError, match="statistic"):
        BoFBeta.fit(train, statistic="median")  # type: ignore[arg-type]


EXAMPLES = [
    MaxProb(0.8), MaxProb((0.5, 0.6, 0.7, 0.0), fallback=False), Entropy(0.4, normalized=True), Patience(2),
    BoFBeta(beta=1.1, mean=(0.5, 0.6, 0.7, 0.8), std=(0.1, 0.1, 0.1, 0.1), statistic="margin"),
    MSDNetBudget(thresholds=(0.9, 0.8, 0.7, -np.inf), q=0.5, budget=2.0),
]


@pytest.mark.parametrize("policy", [*EXAMPLES, Predictive(step_ms=(1.0,) * 4, threshold=0.6, l0=1)])
def test_decide_leaves_its_input_state_alone(policy) -> None:
    # the exit runner hands a policy its own state tensors, uncopied, when every row is there
    probs, _ = synthetic_outputs(n=64)
    state = policy.init_state(64, probs.shape[2])
    for k in range(probs.shape[0]):
        before = {name: value.copy() for name, value in state.items()}
        _, new_state = policy.decide(k, probs[k], state)
        assert all(np.array_equal(state[name], before[name]) for name in before), (policy.name, k)
        state = new_state


@pytest.mark.parametrize("policy", EXAMPLES)
def test_manifest_round_trip_keeps_decisions(policy) -> None:
    probs, _ = synthetic_outputs(n=500)
    data = json.loads(json.dumps(policy_to_dict(policy)))  # plain data only
    again = policy_from_dict(data)
    assert again == policy
    assert np.array_equal(simulate(again, probs, LADDER).exit_index, simulate(policy, probs, LADDER).exit_index)


def test_bad_manifests_are_refused_clearly() -> None:
    assert "maxprob" in POLICIES and "bof_beta" in POLICIES
    with pytest.raises(PolicyError, match="unknown policy"):
        policy_from_dict({"name": "magic"})
    with pytest.raises(PolicyError, match="bad parameters"):
        policy_from_dict({"name": "maxprob", "params": {}})
    with pytest.raises(PolicyError, match="object with a 'name'"):
        policy_from_dict(["maxprob"])  # type: ignore[arg-type]
    with pytest.raises(PolicyError, match="bounds|labels"):
        policy_to_dict(Oracle(np.zeros(3)))


def test_ladder_and_outputs_must_agree() -> None:
    probs, _ = synthetic_outputs(k=3, n=10)
    with pytest.raises(PolicyError, match="3 exits"):
        simulate(MaxProb(0.5), probs, LADDER)
    with pytest.raises(PolicyError):
        Ladder(net_cost=(1.0, 2.0), head_cost=(0.0,))
