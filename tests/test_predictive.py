from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pytest

from splitexit.energy import get_board
from splitexit.policies import POLICIES, Ladder, MaxProb, PolicyError, policy_from_dict, policy_to_dict, simulate
from splitexit.policies.base import Decision, State
from splitexit.policies.predictive import (
    Predictive, compare_all_exits, match_accuracy, predict_rounds, simulate_predictive,
)

TX2 = get_board("jetson-tx2-gpu")
C = 10
UNIFORM = np.full(C, 1.0 / C, dtype=np.float32)
CONFIDENT = np.eye(C, dtype=np.float32)[3] * 0.96 + 0.004  # max-prob 0.964, class 3
# softmax([2, 1, 0, 0, 1]): by hand, circular [1,1,1] rounds give logits [4,3,1,1,3],
# [10,8,5,5,8], [26,23,18,18,23] -> max-prob 0.545, 0.779, 0.909 (raw: 0.498)
MEDIUM = (np.exp([2.0, 1.0, 0.0, 0.0, 1.0]) / np.exp([2.0, 1.0, 0.0, 0.0, 1.0]).sum()).astype(np.float32)


def outputs(*rows: list[np.ndarray]) -> np.ndarray:
    """[K, N, C] from per-row lists of per-exit probability vectors."""
    return np.stack([np.stack(r) for r in rows], axis=1)


def synthetic(k: int = 10, n: int = 600, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Exits that grow more confident with depth; per-sample difficulty."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, C, n)
    difficulty = rng.uniform(0, 1, n)
    probs = np.zeros((k, n, C), dtype=np.float32)
    for i in range(k):
        logits = rng.normal(0, 1, (n, C))
        logits[np.arange(n), labels] += (i + 1) / k * 6 * (1 - difficulty) + 0.2
        e = np.exp(logits - logits.max(1, keepdims=True))
        probs[i] = e / e.sum(1, keepdims=True)
    return probs, labels


@dataclass
class Recording:
    """Wraps a policy and records which exits each call evaluated."""

    inner: Predictive
    seen: list[int] = field(default_factory=list)
    name = "recording"

    def init_state(self, rows: int, num_classes: int) -> State:
        return self.inner.init_state(rows, num_classes)

    def decide(self, k: int, probs: np.ndarray, state: State) -> tuple[Decision, State]:
        self.seen.append(k)
        return self.inner.decide(k, probs, state)

    def to_dict(self) -> dict[str, Any]:
        return self.inner.to_dict()


def test_prediction_engine_on_hand_made_probs() -> None:
    p = np.stack([UNIFORM, CONFIDENT])
    assert predict_rounds(p, 0.9).tolist() == [8, 0]  # uniform never passes: the longest jump
    assert predict_rounds(p, 0.9, max_rounds=3).tolist() == [3, 0]
    medium = MEDIUM[None, :]
    assert predict_rounds(medium, 0.9).item() == 3
    assert predict_rounds(medium, 0.75).item() == 2
    assert predict_rounds(medium, 0.5).item() == 1
    assert predict_rounds(medium, 0.45).item() == 0  # the rule fires already


def test_registered_and_round_trips() -> None:
    assert POLICIES["predictive"] is Predictive
    policy = Predictive(step_ms=(1.0, 2.0, 3.0), head_ms=(0.5, 0.5, 0.5), threshold=0.8, l0=1, max_rounds=5,
                        exits_per_round=2, board="rk3399-a72", dvfs=False, deadline=12.0)
    data = json.loads(json.dumps(policy_to_dict(policy)))
    assert data["params"]["board"] == "rk3399-a72"
    loaded = policy_from_dict(data)
    assert loaded == policy
    probs, labels = synthetic(k=3, n=50)
    a, b = simulate_predictive(policy, probs, labels), simulate_predictive(loaded, probs, labels)
    assert (a.exit_index == b.exit_index).all() and np.allclose(a.extra["energy_mj"], b.extra["energy_mj"])


@pytest.mark.parametrize("params, match", [
    (dict(threshold=0.0), "threshold"),
    (dict(threshold=1.5), "threshold"),
    (dict(threshold="high"), "threshold"),
    (dict(l0=-1), "l0"),
    (dict(l0=3), "past the last exit"),
    (dict(l0=True), "l0"),
    (dict(max_rounds=0), "max_rounds"),
    (dict(exits_per_round=0), "exits_per_round"),
    (dict(step_ms=()), "step_ms"),
    (dict(step_ms=(1.0, -1.0, 1.0)), "non-negative"),
    (dict(step_ms="abc"), "step_ms"),
    (dict(head_ms=(1.0,)), "one cost per exit"),
    (dict(board="pi5"), "unknown board"),
    (dict(deadline=2.5), "shorter than evaluating every exit"),
    (dict(deadline="soon"), "deadline"),
])
def test_bad_params_raise_policy_error(params: dict, match: str) -> None:
    base = dict(step_ms=(1.0, 1.0, 1.0))
    base.update(params)
    with pytest.raises(PolicyError, match=match):
        Predictive(**base)


def test_bad_inputs_raise_policy_error() -> None:
    with pytest.raises(PolicyError, match="bad parameters|threshold"):
        policy_from_dict({"name": "predictive", "params": {"step_ms": [1.0]}})  # no threshold
    with pytest.raises(PolicyError, match="unknown board"):
        policy_from_dict({"name": "predictive", "params": {"step_ms": [1.0], "threshold": 0.9, "board": "x"}})
    with pytest.raises(PolicyError, match="cascade"):
        Predictive.from_ladder(Ladder((1.0, 5.0), (0.0, 0.0), network=(0, 1)))
    with pytest.raises(PolicyError, match=r"\[K=3"):
        simulate_predictive(Predictive(step_ms=(1.0,) * 3), np.zeros((2, 4, C)))


def test_skipped_exits_are_not_evaluated() -> None:
    k = 10
    # row 0: uniform at exit 0 -> 8 rounds -> jump to exit 8, confident there;
    # row 1: confident at exit 0; row 2: uniform everywhere -> 0, 8, 9
    probs = outputs([UNIFORM] * 8 + [CONFIDENT, CONFIDENT], [CONFIDENT] * k, [UNIFORM] * k)
    policy = Predictive(step_ms=(1.0,) * k, head_ms=(0.25,) * k, threshold=0.9, dvfs=False)
    recording = Recording(policy)
    out = simulate(recording, probs, policy.ladder())  # type: ignore[arg-type]
    assert sorted(set(recording.seen)) == [0, 8, 9]
    assert out.exit_index.tolist() == [8, 0, 9]
    assert out.head_evals.tolist() == [2, 1, 3] == out.extra["evals"].tolist()
    assert out.extra["jump"].tolist() == [0, 0, 0]  # reset on exit
    # the cost account adds up: at f_max the policy's clock time is the ladder's cost
    assert np.allclose(out.extra["time_ms"], out.cost)
    assert np.allclose(out.cost, [8 * 1.0 + 0.25 * 1 + 1.0 + 0.25, 1.25, 10 + 0.75])
    assert np.allclose(out.extra["energy_mj"], TX2.power(TX2.f_max) * out.cost)
    assert (out.extra["min_freq_mhz"] == TX2.f_max).all()


def test_start_at_l0_skips_earlier_exits() -> None:
    probs, labels = synthetic(k=6, n=200)
    policy = Predictive(step_ms=(1.0,) * 6, head_ms=(0.5,) * 6, threshold=0.8, l0=3)
    out = simulate_predictive(policy, probs, labels)
    assert out.exit_index.min() >= 3
    assert (out.head_evals == out.extra["evals"]).all() and out.head_evals.max() <= 3
    # plain simulate starts rows at the policy's first_exit (L0) too: the same account
    plain = simulate(policy, probs, policy.ladder(), labels)
    assert (plain.exit_index == out.exit_index).all()
    assert (plain.head_evals == out.head_evals).all()
    assert np.allclose(plain.cost, out.cost)
    assert np.allclose(plain.extra["time_ms"], out.extra["time_ms"])


def test_dvfs_lowers_the_clock_for_a_long_jump() -> None:
    k = 10
    # five classes, so MEDIUM is the hand-computed case: 3 rounds at threshold 0.9; confident at exit 3
    uniform, confident = np.full(5, 0.2, dtype=np.float32), np.array([0.96, 0.01, 0.01, 0.01, 0.01], np.float32)
    probs = outputs([MEDIUM] + [uniform] * 2 + [confident] * 7)
    policy = Predictive(step_ms=(1.0,) * k, head_ms=(1.0,) * k, threshold=0.9)
    out = simulate_predictive(policy, probs)
    assert out.exit_index.tolist() == [3] and out.head_evals.tolist() == [2]
    # wanted f_max*3/9 = 433.5 -> 420.75; the deadline needs >= 1300.5*4/6 = 867 -> 930.75
    f = 930.75
    assert out.extra["min_freq_mhz"].tolist() == [f]
    t_first, t_jump = 2.0, 4.0 * TX2.f_max / f  # exit 0 at f_max; backbone 1..3 + head 3 at f
    assert out.extra["time_ms"][0] == pytest.approx(t_first + t_jump)
    assert out.extra["energy_mj"][0] == pytest.approx(TX2.power(TX2.f_max) * t_first + TX2.power(f) * t_jump)
    assert out.extra["time_ms"][0] <= policy.deadline_ms == 20.0
    # with free heads there is no slack to spend: the clock stays at f_max
    free = simulate_predictive(Predictive(step_ms=(1.0,) * k, threshold=0.9), probs)
    assert free.extra["min_freq_mhz"].tolist() == [TX2.f_max]
    # a looser deadline leaves more slack: the wanted f_max*3/9 -> 420.75 is allowed
    loose = simulate_predictive(Predictive(step_ms=(1.0,) * k, head_ms=(1.0,) * k, threshold=0.9, deadline=40.0),
                                probs)
    assert loose.extra["min_freq_mhz"].tolist() == [420.75]
    assert loose.extra["time_ms"][0] <= 40.0


@pytest.mark.parametrize("board", ["jetson-tx2-gpu", "jetson-tx2-cpu", "rk3399-a72", "rk3399-gpu"])
def test_never_misses_the_deadline(board: str) -> None:
    probs, labels = synthetic(k=8, n=300, seed=1)
    # adversarial rows: look hopeless at every exit but the last (every prediction is wrong)
    probs[:-1, :40] = UNIFORM
    rng = np.random.default_rng(2)
    for threshold, l0, heads in [(0.6, 0, 0.3), (0.9, 2, 1.0), (0.99, 1, 0.05), (0.8, 0, 0.0)]:
        step = tuple(rng.uniform(0.2, 2.0, 8))
        head = tuple(rng.uniform(0.0, heads, 8))
        policy = Predictive(step_ms=step, head_ms=head, threshold=threshold, l0=l0, board=board)
        out = simulate_predictive(policy, probs, labels)
        assert (out.extra["time_ms"] <= policy.deadline_ms * (1 + 1e-9)).all()
        levels = set(get_board(board).frequencies)
        assert set(out.extra["min_freq_mhz"].tolist()) <= levels


def test_energy_at_equal_deadline_beats_all_exits_at_full_clock() -> None:
    probs, labels = synthetic(k=10, n=600)
    policy = Predictive(step_ms=(1.0,) * 10, head_ms=(0.5,) * 10, threshold=0.8, l0=2)
    result = compare_all_exits(policy, probs, labels)
    pred, base = result.predictive, result.all_exits
    assert result.deadline_ms == pytest.approx(15.0)
    assert pred.deadline_met and base.deadline_met
    assert pred.head_evals < base.head_evals / 2
    assert pred.energy_mj < base.energy_mj and result.energy_saving > 0.1
    # the baseline runs at f_max throughout and idles until the deadline
    board = policy.board_spec
    assert base.active_energy_mj == pytest.approx(board.power(board.f_max) * base.time_ms)
    assert base.energy_mj == pytest.approx(base.active_energy_mj + board.p_idle_w * (15.0 - base.time_ms))


def test_search_matches_the_per_exit_rule_accuracy() -> None:
    probs, labels = synthetic(k=8, n=500)
    policy = Predictive(step_ms=(1.0,) * 8, head_ms=(0.5,) * 8, threshold=0.8)
    found = match_accuracy(probs, labels, policy, thresholds=np.linspace(0.5, 0.99, 8), l0s=[0, 1, 2])
    assert abs(found.predictive.accuracy - found.reference.accuracy) <= 0.002 + 1e-9
    assert found.candidates == 3 * 9  # the reference threshold joins the grid
    assert found.policy.threshold in set(np.linspace(0.5, 0.99, 8).tolist()) | {0.8}
    assert found.predictive.head_evals < found.reference.head_evals
    # starting at the last exit only reproduces the last exit's accuracy: no match there
    last = float((probs[-1].argmax(-1) == labels).mean())
    eager = simulate(MaxProb(threshold=0.3, fallback=False), probs, policy.ladder(), labels).acc
    assert abs(eager - last) > 0.002
    with pytest.raises(PolicyError, match="within"):
        match_accuracy(probs, labels, policy, reference_threshold=0.3, l0s=[7])


def test_search_can_refuse_settings_less_accurate_than_the_per_exit_rule() -> None:
    probs, labels = synthetic(k=8, n=500)
    policy = Predictive(step_ms=(1.0,) * 8, head_ms=(0.5,) * 8, threshold=0.8)
    grid = dict(thresholds=np.linspace(0.5, 0.99, 30), l0s=[0, 1, 2])
    either = match_accuracy(probs, labels, policy, tolerance=0.01, **grid)
    floor = match_accuracy(probs, labels, policy, tolerance=0.01, below=0.0, **grid)
    assert 0 <= floor.predictive.accuracy - floor.reference.accuracy <= 0.01 + 1e-9
    # the floor costs at least as much energy as the two-sided band, which may sit under the reference
    assert floor.predictive.energy_mj >= either.predictive.energy_mj
    with pytest.raises(PolicyError, match="below"):
        match_accuracy(probs, labels, policy, tolerance=0.01, below=0.02, **grid)
