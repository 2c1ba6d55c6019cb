"""The one interface every exit rule implements, and the offline simulator that runs it.

A policy sees exit k's probabilities for the rows of a batch that evaluated exit k, plus
its own per-row state from earlier exits, and returns which rows exit (and, optionally,
which exit each remaining row should evaluate next: Predictive Exit skips heads, a cascade
policy may jump straight to the larger network). The edge agent, the cloud worker and the
offline evaluator all drive policies through `step`, so a rule behaves the same everywhere.

Exits are numbered 0..K-1 in this module (position in the ladder, not the stage index);
exit K-1 is the final one and always answers.

The rules are numpy, the one implementation wherever they run: the torch engine hands
them its exit outputs as arrays (a view, no copy, on CPU), and a torch-free edge (the
ONNX Runtime engine) runs them as they are. At the batch sizes an edge sees numpy's
per-op cost (~1 µs) is also well below eager torch's (~6 µs).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol, Sequence

import numpy as np

from splitexit.arrays import to_numpy

State = dict[str, np.ndarray]  # per-row arrays, first dimension = rows


@dataclass(frozen=True, slots=True)  # slots: built at every exit of every batch, ~0.4 us less each
class Decision:
    """What a policy says about the rows that evaluated exit k."""

    exit: np.ndarray  # bool [B]: answer with exit k
    # int64 [B]: for rows that go on, the next exit to evaluate (> k); None = k + 1
    next_exit: np.ndarray | None = None
    # float32 [B, C]: what exiting rows answer with, where not exit k's own output (SDN's
    # most-confident fallback answers with an earlier exit); None = `probs`
    answer: np.ndarray | None = None
    # int64 [B]: the ladder index of the exit whose output `answer` is (where not k), so an
    # answer names the exit it really came from; None = k
    answer_exit: np.ndarray | None = None


@dataclass(frozen=True, slots=True)  # slots: built at every exit of every batch, ~0.4 us less each
class Step:
    """A decision with every field resolved, as `step` returns it: the rows that exit, the
    next exit of every row (in k+1..K-1), and the answer of every row."""

    exit: np.ndarray  # bool [B]
    # int64 [B], or one int for every row (the common case: k + 1, no array to build; it
    # broadcasts wherever the runtimes use it)
    next_exit: np.ndarray | int
    answer: np.ndarray  # float32 [B, C]
    answer_exit: np.ndarray | int  # int64 [B], or k for every row: the exit each answer comes from


class ExitPolicy(Protocol):
    """An exit rule. Implementations are small dataclasses of plain parameters."""

    name: ClassVar[str]

    def init_state(self, rows: int, num_classes: int) -> State:
        """Per-row state before exit 0, every entry it will ever update (empty for
        stateless rules)."""
        ...

    def decide(self, k: int, probs: np.ndarray, state: State) -> tuple[Decision, State]:
        """Rows of `probs` [B, C] (float32) evaluated exit k; return the decision and the new
        state. Never write into `state`: the runtime may hand over its own arrays, uncopied."""
        ...

    def to_dict(self) -> dict[str, Any]:
        """Plain data (JSON/msgpack-able) for a bundle manifest; `from_dict` inverts it."""
        ...


class PolicyError(ValueError):
    """A policy cannot be built, fit or loaded as asked."""


@dataclass(frozen=True)
class Ladder:
    """The exits a policy chooses among, with what reaching each costs (MACs or ms).

    `net_cost[k]` is the backbone cost of exit k's network from its input up to exit k's
    point; `head_cost[k]` the cost of evaluating exit k's head. `network[k]` names the
    network each exit belongs to: moving to an exit of another network (a cascade's larger
    network, run on the raw input) starts that network from scratch.
    """

    net_cost: tuple[float, ...]
    head_cost: tuple[float, ...]
    network: tuple[int, ...] = ()
    names: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        k = len(self.net_cost)
        if k < 1 or len(self.head_cost) != k:
            raise PolicyError(f"ladder needs K >= 1 exits with one head cost each, got {k} and {len(self.head_cost)}")
        if not self.network:
            object.__setattr__(self, "network", (0,) * k)
        if not self.names:
            object.__setattr__(self, "names", tuple(f"exit{i}" for i in range(k)))
        if len(self.network) != k or len(self.names) != k:
            raise PolicyError("network and names need one entry per exit")

    @property
    def num_exits(self) -> int:
        return len(self.net_cost)

    def cumulative(self) -> np.ndarray:
        """c_k: cost of leaving at exit k when every exit before it was evaluated in order."""
        costs, spent = [], 0.0
        prev = -1
        for k in range(self.num_exits):
            spent += self.step_cost(prev, k) + self.head_cost[k]
            costs.append(spent)
            prev = k
        return np.asarray(costs)

    def step_cost(self, prev: int, k: int) -> float:
        """Backbone cost of moving on from exit `prev` (-1 = the input) to exit k's point."""
        if prev < 0 or self.network[prev] != self.network[k]:
            return float(self.net_cost[k])
        return float(self.net_cost[k] - self.net_cost[prev])

    @classmethod
    def from_cumulative(cls, cumulative: Sequence[float], head_cost: Sequence[float] | None = None) -> "Ladder":
        """A one-network ladder from c_k (head costs folded into the backbone if not given)."""
        heads = list(head_cost) if head_cost is not None else [0.0] * len(cumulative)
        net, heads_so_far = [], 0.0
        for c, h in zip(cumulative, heads):
            net.append(float(c) - heads_so_far - h)
            heads_so_far += h
        return cls(tuple(net), tuple(float(h) for h in heads))


@dataclass(frozen=True)
class Outcome:
    """A policy run over a whole set (offline): where each sample left and what it cost."""

    exit_index: np.ndarray  # [N] exit the sample left at (what it cost)
    label: np.ndarray  # [N] the answer
    cost: np.ndarray  # [N] cost spent per sample
    head_evals: np.ndarray  # [N] exit heads evaluated per sample
    correct: np.ndarray | None = None  # [N] bool, when labels were given
    extra: dict[str, np.ndarray] = field(default_factory=dict)  # the policy's final state
    # [N] exit whose output answered (an earlier one for a most-confident fallback); None = exit_index
    answer_exit: np.ndarray | None = None

    @property
    def acc(self) -> float:
        if self.correct is None:
            raise PolicyError("no labels: accuracy unknown")
        return float(self.correct.mean())

    @property
    def mean_cost(self) -> float:
        return float(self.cost.mean())

    def exit_hist(self, num_exits: int) -> np.ndarray:
        return np.bincount(self.exit_index, minlength=num_exits) / len(self.exit_index)


def first_exit(policy: ExitPolicy, num_exits: int) -> int:
    """The first exit a policy evaluates: 0, unless it defines `first_exit(num_exits)`
    (Predictive Exit starts at its L0 and never pays for the heads before it)."""
    start = getattr(policy, "first_exit", None)
    return 0 if start is None else min(max(int(start(num_exits)), 0), num_exits - 1)


def step(policy: ExitPolicy, k: int, probs: np.ndarray, state: State, num_exits: int) -> tuple[Step, State]:
    """One policy decision with the rules every caller relies on: the last exit always
    answers, and `next_exit` for continuing rows lies in k+1..K-1."""
    decision, new_state = policy.decide(k, probs, state)
    exits = np.asarray(decision.exit, dtype=bool)
    if k == num_exits - 1:
        exits = np.ones_like(exits)
    # this runs at every exit of every batch: the common case builds no array
    nxt: np.ndarray | int = min(k + 1, num_exits - 1)
    if decision.next_exit is not None:
        nxt = np.clip(np.asarray(decision.next_exit, dtype=np.int64), k + 1, num_exits - 1)
    answer = probs if decision.answer is None else decision.answer
    answer_exit: np.ndarray | int = k if decision.answer_exit is None else np.asarray(decision.answer_exit, np.int64)
    return Step(exits, nxt, answer, answer_exit), new_state


def _select(state: State, rows: np.ndarray) -> State:
    return {name: value[rows] for name, value in state.items()}


def _assign(state: State, rows: np.ndarray, update: State) -> None:
    for name, value in update.items():
        if name not in state:
            raise PolicyError(f"policy state {name!r} was not created by init_state")
        state[name][rows] = value


def as_probs(probs: Any) -> np.ndarray:
    """Exit outputs as the rules take them: a float32 array (a torch tensor's CPU values
    or a list), without a copy where they already are one."""
    return np.asarray(to_numpy(probs), dtype=np.float32)


def simulate(policy: ExitPolicy, probs: Any, ladder: Ladder, labels: np.ndarray | None = None) -> Outcome:
    """Run `policy` over cached outputs probs [K, N, C] exactly as a runtime would: rows
    move through the exits, evaluate the ones the policy asks for, and leave when it says."""
    p = as_probs(probs)
    num_exits, n, num_classes = p.shape
    if num_exits != ladder.num_exits:
        raise PolicyError(f"outputs have {num_exits} exits, the ladder {ladder.num_exits}")
    state = policy.init_state(n, num_classes)
    exit_index = np.full(n, -1, dtype=np.int64)
    cost = np.zeros(n, dtype=np.float64)
    head_evals = np.zeros(n, dtype=np.int64)
    label = np.zeros(n, dtype=np.int64)
    answer_exit = np.full(n, -1, dtype=np.int64)
    at = np.full(n, -1, dtype=np.int64)  # the last exit point each row reached
    target = np.full(n, first_exit(policy, num_exits), dtype=np.int64)  # next exit each row evaluates
    for k in range(num_exits):
        rows = np.flatnonzero((exit_index < 0) & (target == k))
        if len(rows) == 0:
            continue
        # backbone cost to get here from wherever each row last was
        prev = at[rows]
        for j in np.unique(prev).tolist():
            cost[rows[prev == j]] += ladder.step_cost(j, k)
        cost[rows] += ladder.head_cost[k]
        head_evals[rows] += 1
        at[rows] = k
        decision, update = step(policy, k, p[k, rows], _select(state, rows), num_exits)
        _assign(state, rows, update)
        exit_index[rows[decision.exit]] = k
        label[rows[decision.exit]] = decision.answer[decision.exit].argmax(-1)
        answer_exit[rows[decision.exit]] = np.broadcast_to(decision.answer_exit, decision.exit.shape)[decision.exit]
        target[rows] = decision.next_exit
    assert bool((exit_index >= 0).all()), "every row leaves by the last exit"
    correct = None if labels is None else label == np.asarray(labels)
    # the policy's final per-row state rides along (e.g. Predictive Exit's energy account)
    extra = {name: np.asarray(value) for name, value in state.items()}
    return Outcome(exit_index, label, cost, head_evals, correct, extra, answer_exit)
