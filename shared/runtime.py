"""Running a multi-exit network on a batch with real compute skipping.

`ExitRunner.run` takes a batch through a range of stages; at each exit it evaluates the
head only on the rows the policy wants evaluated there, asks the policy (through
`policies.step`, as the offline simulator does), answers the rows that exit and drops them
from the batch, so later stages run on fewer rows (BranchyNet's row masking). The edge
agent runs stages 0..split and ships what is left (feature + `RowState`); the cloud
worker resumes from split+1 with that state. Same code, same decisions, on both sides.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Mapping, Sequence

import torch

from splitexit.policies import ExitPolicy, PolicyError, State, step
from splitexit.policies.base import first_exit
from splitexit.wire import BEST_CONF, BEST_EXIT, BEST_PROBS, BEST_STATE, EVALUATED, NEXT_EXIT

# RowState's runtime fields and their names on the wire (`InferRequest.policy_state`,
# beside the policy's own names): the one schema both sides encode and decode.
_WIRE_NAMES = {"next_exit": NEXT_EXIT, "evaluated": EVALUATED,
               "best_conf": BEST_CONF, "best_exit": BEST_EXIT, "best_probs": BEST_PROBS}


@dataclass(eq=False)
class RowState:
    """Where each row of a run stands: the runtime's record beside the exit policy's own
    per-row state. Every tensor has the rows first.

    Mutable on purpose: the runner updates the rows of an exit in place, and a continued
    run (the cloud after the edge) works on a copy (`clone`).
    """

    next_exit: torch.Tensor  # long [n]: ladder index of the exit the row evaluates next; -1 once answered
    evaluated: torch.Tensor  # long [n]: exit heads evaluated so far
    # the most confident exit evaluated so far (max-prob): what the edge answers, flagged
    # degraded, when the cloud cannot
    best_conf: torch.Tensor  # float [n]: its top probability; -1 = none yet
    best_exit: torch.Tensor  # long [n]: its ladder index; -1 = none yet
    best_probs: torch.Tensor  # float [n, C]: its output
    policy: State  # the policy's own entries (ExitPolicy.init_state), by the policy's names

    def __len__(self) -> int:
        return int(self.next_exit.shape[0])

    def _tensors(self) -> dict[str, torch.Tensor]:
        return {name: getattr(self, name) for name in _WIRE_NAMES}

    def map(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> "RowState":
        """A new state with `fn` applied to every tensor (e.g. a row selection)."""
        return RowState(**{name: fn(value) for name, value in self._tensors().items()},
                        policy={name: fn(value) for name, value in self.policy.items()})

    def take(self, rows: torch.Tensor) -> "RowState":
        """The state of `rows` (indices or a boolean mask), copied."""
        return self.map(lambda value: value[rows])

    def clone(self) -> "RowState":
        return self.map(torch.Tensor.clone)

    def put(self, rows: torch.Tensor, other: "RowState") -> None:
        """Write `other` (one row per entry of `rows`) into these rows, in place."""
        for name, value in other._tensors().items():
            getattr(self, name)[rows] = value
        for name, value in other.policy.items():
            self.policy[name][rows] = value

    @staticmethod
    def cat(states: Sequence["RowState"]) -> "RowState":
        """The rows of `states`, one after another (all of one policy)."""
        first = states[0]
        return RowState(**{name: torch.cat([getattr(s, name) for s in states]) for name in _WIRE_NAMES},
                        policy={name: torch.cat([s.policy[name] for s in states]) for name in first.policy})

    def split(self, counts: Sequence[int]) -> list["RowState"]:
        """Consecutive pieces of `counts` rows each (views, no copy)."""
        pieces = {name: value.split(list(counts)) for name, value in self._tensors().items()}
        policy = {name: value.split(list(counts)) for name, value in self.policy.items()}
        return [RowState(**{name: p[j] for name, p in pieces.items()}, policy={name: p[j] for name, p in policy.items()})
                for j in range(len(counts))]

    def to_wire(self, *, include_best: bool = True) -> dict[str, torch.Tensor]:
        """The entries as `InferRequest.policy_state` names them: the policy's names and the
        runtime's (`RUNTIME_STATE`); the BEST_* ones only with `include_best`."""
        runtime = {wire: getattr(self, name) for name, wire in _WIRE_NAMES.items()
                   if include_best or wire not in BEST_STATE}
        return {**self.policy, **runtime}

    @staticmethod
    def from_wire(entries: Mapping[str, torch.Tensor], fresh: "RowState") -> "RowState":
        """A state from wire entries (validated by `splitexit.wire.decode_policy_state`);
        the optional BEST_* entries the sender left out are taken from `fresh`."""
        missing = [wire for wire in (NEXT_EXIT, EVALUATED) if wire not in entries]
        if missing:
            raise PolicyError(f"continued run without the runtime's per-row state {missing}")
        runtime = {name: entries[wire] if wire in entries else getattr(fresh, name) for name, wire in _WIRE_NAMES.items()}
        policy = {name: value for name, value in entries.items() if name not in _WIRE_NAMES.values()}
        return RowState(**runtime, policy=policy)


@dataclass(frozen=True)
class Answered:
    """Rows that left at an exit: their positions in the original batch and the answer."""

    rows: torch.Tensor  # long [n]
    probs: torch.Tensor  # float [n, C]
    exit_index: torch.Tensor  # long [n]: ladder index of the exit that answered
    evaluated: torch.Tensor  # long [n]: exit heads evaluated for the row


@dataclass(frozen=True)
class Pending:
    """Rows still undecided after the stages run: what an offload request carries."""

    rows: torch.Tensor  # long [m]
    feature: torch.Tensor  # [m, ...] output of the last stage run
    state: RowState


@dataclass(frozen=True)
class RunResult:
    answered: list[Answered] = field(default_factory=list)
    pending: Pending | None = None
    # rows the policy sends to another network: it runs on their raw input, so no feature
    escalate: Pending | None = None

    def merged(self) -> Answered | None:
        if not self.answered:
            return None
        return Answered(*(torch.cat([getattr(a, f) for a in self.answered])
                          for f in ("rows", "probs", "exit_index", "evaluated")))


# rows -> (those of them whose larger-network input could be had, that input): a cascade's
# larger network runs on raw input, which only the caller has (decoded, normalized its way)
LargerInput = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


class ExitRunner:
    """A MultiExitNet (or the part of one a bundle carries) with a policy over its exits,
    and a cascade's larger network where this side holds it.

    `exit_stages[k]` is the stage after which ladder exit k sits; the last entry is the
    final head (after the last stage). `network[k]` marks exits of other networks (a
    cascade's larger network, whose final head ends the ladder): a row sent there is run
    on it when the runner has it (`larger`) and the run is given its input
    (`larger_input`), and otherwise leaves the run as `escalate`.
    """

    def __init__(self, model, policy: ExitPolicy, *, num_classes: int, network: tuple[int, ...] | None = None,
                 larger: torch.nn.Module | None = None) -> None:
        self.model = model
        self.policy = policy
        self.larger = larger
        self.num_classes = num_classes
        self.exit_stages = [*model.exit_points, model.num_stages - 1]
        own = len(self.exit_stages)
        self.network = network or (0,) * own
        if len(self.network) < own:
            raise PolicyError(f"network ids for {len(self.network)} exits, the model has {own}")
        self.num_exits = len(self.network)  # the policy's ladder (may extend past this net)
        self._one_network = len(set(self.network)) == 1  # no row can be bound for another network
        self._net_ids = torch.tensor(self.network, dtype=torch.long)
        self._exit_at = {stage: k for k, stage in enumerate(self.exit_stages[:-1])}

    def initial_state(self, rows: int) -> RowState:
        return RowState(
            next_exit=torch.full((rows,), first_exit(self.policy, self.num_exits), dtype=torch.long),
            evaluated=torch.zeros(rows, dtype=torch.long),
            best_conf=torch.full((rows,), -1.0),
            best_exit=torch.full((rows,), -1, dtype=torch.long),
            best_probs=torch.zeros(rows, self.num_classes),
            policy=self.policy.init_state(rows, self.num_classes),
        )

    def _exit_probs(self, stage: int, k: int, feature: torch.Tensor) -> torch.Tensor:
        if k == len(self.exit_stages) - 1:
            logits = self.model.head(feature)
        else:
            logits = self.model.exit_logits(stage, feature)
        return logits.float().softmax(-1)

    @torch.inference_mode()
    def run(self, x: torch.Tensor, *, start: int = 0, stop: int | None = None, state: RowState | None = None,
            rows: torch.Tensor | None = None, larger_input: LargerInput | None = None) -> RunResult:
        """Run stages start..stop (inclusive; default to the last, final head included) on
        `x`, the input of stage `start`. `state` continues an earlier run (None = fresh;
        the caller's copy is left as it was). Rows bound for the larger network (on arrival
        or by a decision here) run on it when `larger_input` gives their input.

        At small batches every torch op costs microseconds whatever its size, so the common
        case (every row left evaluates this exit, one network) takes whole tensors and no
        row indices; rows skipping an exit (Predictive Exit) or bound for another network
        take the indexed path."""
        stop = self.model.num_stages - 1 if stop is None else stop
        n = x.shape[0]
        rows = torch.arange(n) if rows is None else rows
        state = self.initial_state(n) if state is None else state.clone()
        answered: list[Answered] = []
        escalated: list[Pending] = []
        one_network, net_ids = self._one_network, self._net_ids
        own = len(self.exit_stages) - 1  # index of this network's final head
        feature = x
        if not one_network:
            # rows that arrive already bound for another network (a cascade's larger one) leave first
            arrived_away = net_ids[state.next_exit.clamp_min(0)] != self.network[0]
            if bool(arrived_away.any()):
                escalated.append(Pending(rows[arrived_away], feature[arrived_away], state.take(arrived_away)))
                keep = ~arrived_away
                rows, feature, state = rows[keep], feature[keep], state.take(keep)
        for stage in range(start, stop + 1):
            if len(rows) == 0:
                break
            feature = self.model.stages[stage](feature)
            k = self._exit_at.get(stage, own if stage == self.model.num_stages - 1 else None)
            if k is None:
                continue
            if k == own and self.num_exits == own + 1:
                sel: torch.Tensor | None = None  # the last exit of the ladder takes everyone left
            else:
                want = state.next_exit == k
                if bool(want.all()):
                    sel = None
                elif bool(want.any()):
                    sel = torch.nonzero(want).flatten()
                else:
                    continue
            probs = self._exit_probs(stage, k, _take(feature, sel))
            sub = {name: _take(value, sel) for name, value in state.policy.items()}
            decision, update = step(self.policy, k, probs, sub, self.num_exits)
            for name, value in update.items():
                if name not in state.policy:
                    raise PolicyError(f"policy state {name!r} was not created by init_state")
                state.policy[name] = _put(state.policy[name], sel, value)
            evaluated = _take(state.evaluated, sel) + 1
            state.evaluated = _put(state.evaluated, sel, evaluated)
            conf, best = probs.amax(-1), _take(state.best_conf, sel)
            better = conf > best
            state.best_conf = _put(state.best_conf, sel, torch.where(better, conf, best))
            state.best_exit = _put(state.best_exit, sel, _take(state.best_exit, sel).masked_fill(better, k))
            state.best_probs = _put(state.best_probs, sel,
                                    torch.where(better[:, None], probs, _take(state.best_probs, sel)))
            state.next_exit = _put(state.next_exit, sel, decision.next_exit.masked_fill(decision.exit, -1))
            left = bool(decision.exit.any())
            if left:
                leave = decision.exit
                who = _take(rows, sel)[leave]
                answered.append(Answered(who, decision.answer[leave], torch.full((len(who),), k, dtype=torch.long),
                                         evaluated[leave]))
            if one_network and not left:
                continue  # nobody left and nobody can be bound elsewhere: the batch stays whole
            # rows that left, or that the policy sends to another network, leave the batch
            nxt = state.next_exit
            keep = nxt >= 0
            if not one_network:
                away = keep & (net_ids[nxt.clamp_min(0)] != self.network[0])
                if bool(away.any()):
                    escalated.append(Pending(rows[away], feature[away], state.take(away)))
                keep &= ~away
            if not bool(keep.all()):
                rows, feature, state = rows[keep], feature[keep], state.take(keep)
        escalate = None
        if escalated:
            escalate = Pending(torch.cat([e.rows for e in escalated]), torch.empty(0),
                               RowState.cat([e.state for e in escalated]))
            if self.larger is not None and larger_input is not None:
                escalate = self._run_larger(escalate, larger_input, answered)
        pending = Pending(rows, feature, state) if len(rows) else None
        return RunResult(answered, pending, escalate)

    def _run_larger(self, bound: Pending, larger_input: LargerInput, answered: list[Answered]) -> Pending | None:
        """The larger network on the rows of `bound` whose input can be had, all in one
        call; the policy decides at the ladder's last exit (its final head) as in an
        unsplit run. Returns the rows left without input (None when none is)."""
        assert self.larger is not None
        have, x = larger_input(bound.rows)
        if len(have):
            position = {int(r): j for j, r in enumerate(bound.rows.tolist())}
            sel = torch.tensor([position[int(r)] for r in have], dtype=torch.long)
            probs = self.larger(x).float().softmax(-1)
            k = self.num_exits - 1
            decision, _ = step(self.policy, k, probs, {n: v[sel] for n, v in bound.state.policy.items()},
                               self.num_exits)
            answered.append(Answered(have, decision.answer, torch.full((len(have),), k, dtype=torch.long),
                                     bound.state.evaluated[sel] + 1))
        left = ~torch.isin(bound.rows, have)
        if not bool(left.any()):
            return None
        return Pending(bound.rows[left], bound.feature, bound.state.take(left))


def _take(value: torch.Tensor, sel: torch.Tensor | None) -> torch.Tensor:
    """The selected rows (all of them, without a copy, when `sel` is None)."""
    return value if sel is None else value[sel]


def _put(value: torch.Tensor, sel: torch.Tensor | None, rows: torch.Tensor) -> torch.Tensor:
    """`value` with the selected rows set to `rows` (in place), or `rows` itself when
    `sel` is None (every row: rebound, no copy)."""
    if sel is None:
        return rows
    value[sel] = rows
    return value
