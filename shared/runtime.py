"""Running a multi-exit network on a batch with real compute skipping.

`ExitRunner.run` takes a batch through a range of stages; at each exit it evaluates the
head only on the rows the policy wants evaluated there, asks the policy (through
`policies.step`, as the offline simulator does), answers the rows that exit and drops them
from the batch, so later stages run on fewer rows (BranchyNet's row masking). The edge
agent runs stages 0..split and ships what is left (feature + policy state); the cloud
worker resumes from split+1 with that state. Same code, same decisions, on both sides.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from splitexit.policies import ExitPolicy, PolicyError, State, step
from splitexit.policies.base import first_exit

NEXT_EXIT = "_next_exit"  # per-row: the exit (ladder index) the row evaluates next
EVALUATED = "_evaluated"  # per-row: exit heads evaluated so far
# per-row: the most confident exit evaluated so far (max-prob), its index and output: what
# the edge answers, flagged degraded, when the cloud cannot
BEST_CONF, BEST_EXIT, BEST_PROBS = "_best_conf", "_best_exit", "_best_probs"
RUNTIME_STATE = (NEXT_EXIT, EVALUATED, BEST_CONF, BEST_EXIT, BEST_PROBS)


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
    state: State  # per-row policy state, NEXT_EXIT and EVALUATED included


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


class ExitRunner:
    """A MultiExitNet (or the part of one a bundle carries) with a policy over its exits.

    `exit_stages[k]` is the stage after which ladder exit k sits; the last entry is the
    final head (after the last stage). `network[k]` marks exits of other networks (a
    cascade's larger network): a row sent there leaves this runner as `escalate`.
    """

    def __init__(self, model, policy: ExitPolicy, *, num_classes: int, network: tuple[int, ...] | None = None) -> None:
        self.model = model
        self.policy = policy
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

    def initial_state(self, rows: int) -> State:
        state = self.policy.init_state(rows, self.num_classes)
        state[NEXT_EXIT] = torch.full((rows,), first_exit(self.policy, self.num_exits), dtype=torch.long)
        state[EVALUATED] = torch.zeros(rows, dtype=torch.long)
        state[BEST_CONF] = torch.full((rows,), -1.0)
        state[BEST_EXIT] = torch.full((rows,), -1, dtype=torch.long)
        state[BEST_PROBS] = torch.zeros(rows, self.num_classes)
        return state

    def _exit_probs(self, stage: int, k: int, feature: torch.Tensor) -> torch.Tensor:
        if k == len(self.exit_stages) - 1:
            logits = self.model.head(feature)
        else:
            logits = self.model.exit_logits(stage, feature)
        return logits.float().softmax(-1)

    @torch.inference_mode()
    def run(self, x: torch.Tensor, *, start: int = 0, stop: int | None = None, state: State | None = None,
            rows: torch.Tensor | None = None) -> RunResult:
        """Run stages start..stop (inclusive; default to the last, final head included) on
        `x`, the input of stage `start`. `state` continues an earlier run (None = fresh).

        At small batches every torch op costs microseconds whatever its size, so the common
        case (every row left evaluates this exit, one network) takes whole tensors and no
        row indices; rows skipping an exit (Predictive Exit) or bound for another network
        take the indexed path."""
        stop = self.model.num_stages - 1 if stop is None else stop
        n = x.shape[0]
        rows = torch.arange(n) if rows is None else rows
        if state is None:
            state = self.initial_state(n)
        else:
            state = {k: v.clone() for k, v in state.items()}
            missing = [name for name in (NEXT_EXIT, EVALUATED) if name not in state]
            if missing:
                raise PolicyError(f"continued run without the runtime's per-row state {missing}")
            if any(name not in state for name in (BEST_CONF, BEST_EXIT, BEST_PROBS)):
                fresh = self.initial_state(n)
                for name in (BEST_CONF, BEST_EXIT, BEST_PROBS):  # optional on the wire: the edge keeps its own
                    state.setdefault(name, fresh[name])
        answered: list[Answered] = []
        escalated: list[Pending] = []
        one_network, net_ids = self._one_network, self._net_ids
        own = len(self.exit_stages) - 1  # index of this network's final head
        feature = x
        if not one_network:
            # rows that arrive already bound for another network (a cascade's larger one) leave first
            arrived_away = net_ids[state[NEXT_EXIT].clamp_min(0)] != self.network[0]
            if bool(arrived_away.any()):
                escalated.append(Pending(rows[arrived_away], feature[arrived_away],
                                         {n: v[arrived_away] for n, v in state.items()}))
                keep = ~arrived_away
                rows, feature = rows[keep], feature[keep]
                state = {name: value[keep] for name, value in state.items()}
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
                want = state[NEXT_EXIT] == k
                if bool(want.all()):
                    sel = None
                elif bool(want.any()):
                    sel = torch.nonzero(want).flatten()
                else:
                    continue
            probs = self._exit_probs(stage, k, _take(feature, sel))
            sub = {name: _take(value, sel) for name, value in state.items() if not name.startswith("_")}
            decision, update = step(self.policy, k, probs, sub, self.num_exits)
            for name, value in update.items():
                _put(state, name, sel, value)
            evaluated = _take(state[EVALUATED], sel) + 1
            _put(state, EVALUATED, sel, evaluated)
            conf, best = probs.amax(-1), _take(state[BEST_CONF], sel)
            better = conf > best
            _put(state, BEST_CONF, sel, torch.where(better, conf, best))
            _put(state, BEST_EXIT, sel, _take(state[BEST_EXIT], sel).masked_fill(better, k))
            _put(state, BEST_PROBS, sel, torch.where(better[:, None], probs, _take(state[BEST_PROBS], sel)))
            _put(state, NEXT_EXIT, sel, decision.next_exit.masked_fill(decision.exit, -1))
            left = bool(decision.exit.any())
            if left:
                leave = decision.exit
                who = _take(rows, sel)[leave]
                answered.append(Answered(who, decision.answer[leave], torch.full((len(who),), k, dtype=torch.long),
                                         evaluated[leave]))
            if one_network and not left:
                continue  # nobody left and nobody can be bound elsewhere: the batch stays whole
            # rows that left, or that the policy sends to another network, leave the batch
            nxt = state[NEXT_EXIT]
            keep = nxt >= 0
            if not one_network:
                away = keep & (net_ids[nxt.clamp_min(0)] != self.network[0])
                if bool(away.any()):
                    escalated.append(Pending(rows[away], feature[away], {n: v[away] for n, v in state.items()}))
                keep &= ~away
            if not bool(keep.all()):
                rows, feature = rows[keep], feature[keep]
                state = {name: value[keep] for name, value in state.items()}
        escalate = None
        if escalated:
            escalate = Pending(torch.cat([e.rows for e in escalated]), torch.empty(0),
                               {n: torch.cat([e.state[n] for e in escalated]) for n in escalated[0].state})
        pending = Pending(rows, feature, state) if len(rows) else None
        return RunResult(answered, pending, escalate)


def _take(value: torch.Tensor, sel: torch.Tensor | None) -> torch.Tensor:
    """The selected rows (all of them, without a copy, when `sel` is None)."""
    return value if sel is None else value[sel]


def _put(state: State, name: str, sel: torch.Tensor | None, value: torch.Tensor) -> None:
    """Write the selected rows of a state entry (the whole entry, rebound, when `sel` is None)."""
    if name not in state:
        raise PolicyError(f"policy state {name!r} was not created by init_state")
    if sel is None:
        state[name] = value
    else:
        state[name][sel] = value
