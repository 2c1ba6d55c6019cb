"""Running a multi-exit network on a batch with real compute skipping.

`ExitRunner.run` takes a batch through a range of stages; at each exit it evaluates the
head only on the rows the policy wants evaluated there, asks the policy (through
`policies.step`, as the offline simulator does), answers the rows that exit and drops them
from the batch, so later stages run on fewer rows (BranchyNet's row masking). The edge
agent runs stages 0..split and ships what is left (feature + `RowState`); the cloud
worker resumes from split+1 with that state. Same code, same decisions, on both sides.

The network's compute is an `Engine`: `TorchEngine` runs a MultiExitNet eagerly (the
cloud, training, tests), `splitexit.edge.engine.OnnxEngine` runs a bundle's exported
ONNX segments on a device without torch. The bookkeeping here (row selection, policy
state, answers) is numpy whatever the engine: torch is imported only by `TorchEngine`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Mapping, Protocol, Sequence

import numpy as np

from splitexit.policies import ExitPolicy, PolicyError, State, step
from splitexit.policies.base import first_exit
from splitexit.wire import BEST_CONF, BEST_EXIT, BEST_PROBS, BEST_STATE, EVALUATED, NEXT_EXIT

if TYPE_CHECKING:
    import torch

# RowState's runtime fields and their names on the wire (`InferRequest.policy_state`,
# beside the policy's own names): the one schema both sides encode and decode.
_WIRE_NAMES = {"next_exit": NEXT_EXIT, "evaluated": EVALUATED,
               "best_conf": BEST_CONF, "best_exit": BEST_EXIT, "best_probs": BEST_PROBS}


class Engine(Protocol):
    """The compute an ExitRunner drives: a network's stages and its exit heads. Features
    are the engine's own type (a torch tensor, a numpy array) with the rows first;
    probabilities are always float32 numpy arrays."""

    @property
    def num_stages(self) -> int: ...

    @property
    def exit_points(self) -> Sequence[int]:
        """Stages followed by an exit head, ascending (the final head not included)."""
        ...

    def advance(self, feature: Any, start: int, stop: int, *, head: bool,
                rows: np.ndarray | None) -> tuple[Any, np.ndarray | None]:
        """Stages start..stop on every row of `feature`; with `head`, then the head after
        stage `stop` (the final head after the last stage) on `rows` of the result (None =
        all). Returns (stage stop's output, probabilities [len(rows), C] or None)."""
        ...

    def take(self, feature: Any, rows: np.ndarray) -> Any:
        """The rows of a feature (indices or a boolean mask)."""
        ...

    def from_array(self, x: np.ndarray) -> Any:
        """A float32 array [B, ...] as this engine's feature type (the network's input)."""
        ...

    def exit_probs(self, stage: int, feature: Any) -> np.ndarray:
        """The head after `stage` alone on a feature (an edge's fallback answer)."""
        ...


class TorchEngine:
    """A MultiExitNet run eagerly by torch (the reference engine; the cloud's)."""

    def __init__(self, model: Any) -> None:
        self.model = model

    @property
    def num_stages(self) -> int:
        return int(self.model.num_stages)

    @property
    def exit_points(self) -> Sequence[int]:
        return list(self.model.exit_points)

    def advance(self, feature: "torch.Tensor", start: int, stop: int, *, head: bool,
                rows: np.ndarray | None) -> tuple["torch.Tensor", np.ndarray | None]:
        import torch

        with torch.inference_mode():
            for stage in range(start, stop + 1):
                feature = self.model.stages[stage](feature)
            if not head:
                return feature, None
            return feature, self._probs(stop, feature if rows is None else self.take(feature, rows))

    def _probs(self, stage: int, feature: "torch.Tensor") -> np.ndarray:
        if stage == self.model.num_stages - 1:
            logits = self.model.head(feature)
        else:
            logits = self.model.exit_logits(stage, feature)
        return logits.float().softmax(-1).numpy()

    def take(self, feature: "torch.Tensor", rows: np.ndarray) -> "torch.Tensor":
        import torch

        return feature[torch.from_numpy(np.asarray(rows))]

    def from_array(self, x: np.ndarray) -> "torch.Tensor":
        import torch

        return torch.from_numpy(x)

    def exit_probs(self, stage: int, feature: "torch.Tensor") -> np.ndarray:
        import torch

        with torch.inference_mode():
            return self._probs(stage, feature)


@dataclass(eq=False)
class RowState:
    """Where each row of a run stands: the runtime's record beside the exit policy's own
    per-row state. Every array has the rows first.

    Mutable on purpose: the runner updates the rows of an exit in place, and a continued
    run (the cloud after the edge) works on a copy (`clone`).
    """

    next_exit: np.ndarray  # int64 [n]: ladder index of the exit the row evaluates next; -1 once answered
    evaluated: np.ndarray  # int64 [n]: exit heads evaluated so far
    # the most confident exit evaluated so far (max-prob): what the edge answers, flagged
    # degraded, when the cloud cannot
    best_conf: np.ndarray  # float32 [n]: its top probability; -1 = none yet
    best_exit: np.ndarray  # int64 [n]: its ladder index; -1 = none yet
    best_probs: np.ndarray  # float32 [n, C]: its output
    policy: State  # the policy's own entries (ExitPolicy.init_state), by the policy's names

    def __len__(self) -> int:
        return int(self.next_exit.shape[0])

    def _arrays(self) -> dict[str, np.ndarray]:
        return {name: getattr(self, name) for name in _WIRE_NAMES}

    def map(self, fn: Callable[[np.ndarray], np.ndarray]) -> "RowState":
        """A new state with `fn` applied to every array (e.g. a row selection)."""
        return RowState(**{name: fn(value) for name, value in self._arrays().items()},
                        policy={name: fn(value) for name, value in self.policy.items()})

    def take(self, rows: np.ndarray) -> "RowState":
        """The state of `rows` (indices or a boolean mask), copied."""
        return self.map(lambda value: value[rows])

    def clone(self) -> "RowState":
        return self.map(np.copy)

    def put(self, rows: np.ndarray, other: "RowState") -> None:
        """Write `other` (one row per entry of `rows`) into these rows, in place."""
        for name, value in other._arrays().items():
            getattr(self, name)[rows] = value
        for name, value in other.policy.items():
            self.policy[name][rows] = value

    @staticmethod
    def cat(states: Sequence["RowState"]) -> "RowState":
        """The rows of `states`, one after another (all of one policy)."""
        first = states[0]
        return RowState(**{name: np.concatenate([getattr(s, name) for s in states]) for name in _WIRE_NAMES},
                        policy={name: np.concatenate([s.policy[name] for s in states]) for name in first.policy})

    def split(self, counts: Sequence[int]) -> list["RowState"]:
        """Consecutive pieces of `counts` rows each (views, no copy)."""
        bounds = np.cumsum(counts)[:-1]
        pieces = {name: np.split(value, bounds) for name, value in self._arrays().items()}
        policy = {name: np.split(value, bounds) for name, value in self.policy.items()}
        return [RowState(**{name: p[j] for name, p in pieces.items()}, policy={name: p[j] for name, p in policy.items()})
                for j in range(len(counts))]

    def to_wire(self, *, include_best: bool = True) -> dict[str, np.ndarray]:
        """The entries as `InferRequest.policy_state` names them: the policy's names and the
        runtime's (`RUNTIME_STATE`); the BEST_* ones only with `include_best`."""
        runtime = {wire: getattr(self, name) for name, wire in _WIRE_NAMES.items()
                   if include_best or wire not in BEST_STATE}
        return {**self.policy, **runtime}

    @staticmethod
    def from_wire(entries: Mapping[str, np.ndarray], fresh: "RowState") -> "RowState":
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

    rows: np.ndarray  # int64 [n]
    probs: np.ndarray  # float32 [n, C]
    exit_index: np.ndarray  # int64 [n]: ladder index of the exit that answered
    evaluated: np.ndarray  # int64 [n]: exit heads evaluated for the row


@dataclass(frozen=True)
class Pending:
    """Rows still undecided after the stages run: what an offload request carries."""

    rows: np.ndarray  # int64 [m]
    feature: Any  # [m, ...] output of the last stage run (the engine's type)
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
        return Answered(*(np.concatenate([getattr(a, f) for a in self.answered])
                          for f in ("rows", "probs", "exit_index", "evaluated")))


# rows -> (those of them whose larger-network input could be had, that input): a cascade's
# larger network runs on raw input, which only the caller has (decoded, normalized its way)
LargerInput = Callable[[np.ndarray], tuple[np.ndarray, "torch.Tensor"]]


class ExitRunner:
    """A network's engine (or the part of one a bundle carries) with a policy over its
    exits, and a cascade's larger network where this side holds it.

    `model`: an `Engine`, or a MultiExitNet (run by a `TorchEngine`).
    `exit_stages[k]` is the stage after which ladder exit k sits; the last entry is the
    final head (after the last stage). `network[k]` marks exits of other networks (a
    cascade's larger network, whose final head ends the ladder): a row sent there is run
    on it when the runner has it (`larger`, a torch module) and the run is given its input
    (`larger_input`), and otherwise leaves the run as `escalate`.
    """

    def __init__(self, model: Any, policy: ExitPolicy, *, num_classes: int, network: tuple[int, ...] | None = None,
                 larger: Any = None) -> None:
        self.engine: Engine = model if hasattr(model, "advance") else TorchEngine(model)
        self.policy = policy
        self.larger = larger
        self.num_classes = num_classes
        self.num_stages = self.engine.num_stages
        self.exit_stages = [*self.engine.exit_points, self.num_stages - 1]
        own = len(self.exit_stages)
        self.network = network or (0,) * own
        if len(self.network) < own:
            raise PolicyError(f"network ids for {len(self.network)} exits, the model has {own}")
        self.num_exits = len(self.network)  # the policy's ladder (may extend past this net)
        self._one_network = len(set(self.network)) == 1  # no row can be bound for another network
        self._net_ids = np.asarray(self.network, dtype=np.int64)
        self._exit_at = {stage: k for k, stage in enumerate(self.exit_stages)}
        self._segments: dict[tuple[int, int], list[tuple[int, int]]] = {}  # (start, stop) -> segments()

    @property
    def initial_next(self) -> int:
        """The exit a fresh row evaluates first."""
        return first_exit(self.policy, self.num_exits)

    def initial_state(self, rows: int) -> RowState:
        return RowState(
            next_exit=np.full(rows, self.initial_next, dtype=np.int64),
            evaluated=np.zeros(rows, dtype=np.int64),
            best_conf=np.full(rows, -1.0, dtype=np.float32),
            best_exit=np.full(rows, -1, dtype=np.int64),
            best_probs=np.zeros((rows, self.num_classes), dtype=np.float32),
            policy=self.policy.init_state(rows, self.num_classes),
        )

    def segments(self, start: int, stop: int) -> list[tuple[int, int]]:
        """The (first, last) stage runs of `run(start, stop)`: each ends at an exit, the
        last at `stop` (what an engine of exported segments must hold)."""
        found = self._segments.get((start, stop))
        if found is None:  # once per (start, stop): `run` asks at every batch
            ends = sorted({stage for stage in self.exit_stages if start <= stage <= stop} | {stop})
            found = self._segments[(start, stop)] = list(zip([start, *(e + 1 for e in ends[:-1])], ends))
        return found

    def run(self, x: Any, *, start: int = 0, stop: int | None = None, state: RowState | None = None,
            rows: np.ndarray | None = None, larger_input: LargerInput | None = None) -> RunResult:
        """Run stages start..stop (inclusive; default to the last, final head included) on
        `x`, the input of stage `start` (the engine's feature type). `state` continues an
        earlier run (None = fresh; the caller's copy is left as it was). Rows bound for the
        larger network (on arrival or by a decision here) run on it when `larger_input`
        gives their input.

        The common case (every row left evaluates this exit, one network) takes whole
        arrays and no row indices; rows skipping an exit (Predictive Exit) or bound for
        another network take the indexed path."""
        engine = self.engine
        stop = self.num_stages - 1 if stop is None else stop
        n = x.shape[0]
        rows = np.arange(n) if rows is None else np.asarray(rows)
        fresh = state is None
        state = self.initial_state(n) if state is None else state.clone()
        answered: list[Answered] = []
        escalated: list[Pending] = []
        one_network, net_ids = self._one_network, self._net_ids
        own = len(self.exit_stages) - 1  # index of this network's final head
        feature = x
        if not one_network:
            # rows that arrive already bound for another network (a cascade's larger one) leave first
            arrived_away = net_ids[np.maximum(state.next_exit, 0)] != self.network[0]
            if bool(arrived_away.any()):
                escalated.append(Pending(rows[arrived_away], None, state.take(arrived_away)))
                keep = ~arrived_away
                rows, feature, state = rows[keep], engine.take(feature, keep), state.take(keep)
        # the next exit of every row when they all share one (a fresh run, and after any step
        # whose policy named no next exit per row): no array to compare at the next exit
        uniform: int | None = self.initial_next if fresh else None
        # exits' outputs on the current rows not yet noted in state.best_*: only rows that
        # stay undecided need them (the answer if the cloud cannot give one), so they are
        # noted once, at the end, and not at every exit for rows that leave on the device
        unnoted: list[tuple[int, np.ndarray]] = []
        for first, last in self.segments(start, stop):
            if len(rows) == 0:
                break
            k = self._exit_at.get(last)
            sel: np.ndarray | None = None
            if k is not None and not (k == own and self.num_exits == own + 1):  # else: the ladder's end takes all
                if uniform is not None:
                    k = k if uniform == k else None
                else:
                    want = state.next_exit == k
                    if not bool(want.all()):
                        sel = np.flatnonzero(want) if bool(want.any()) else None
                        k = k if sel is not None else None  # no row evaluates this exit
            feature, probs = engine.advance(feature, first, last, head=k is not None, rows=sel)
            if k is None or probs is None:
                continue
            sub = {name: _take(value, sel) for name, value in state.policy.items()}
            decision, update = step(self.policy, k, probs, sub, self.num_exits)
            if k == self.num_exits - 1 and sel is None:
                # the ladder's last exit answers every row left: no state to keep for any of them
                answered.append(Answered(rows, decision.answer, _exits(decision.answer_exit, len(rows)),
                                         state.evaluated + 1))
                rows = rows[:0]
                break
            for name, value in update.items():
                if name not in state.policy:
                    raise PolicyError(f"policy state {name!r} was not created by init_state")
                state.policy[name] = _put(state.policy[name], sel, value)
            evaluated = _take(state.evaluated, sel) + 1
            state.evaluated = _put(state.evaluated, sel, evaluated)
            if sel is None:
                unnoted.append((k, probs))
            else:  # an indexed step: what is owed first, for every row, then this exit's rows
                _note_best(state, unnoted)
                unnoted = []
                _note_best(state, [(k, probs)], sel)
            state.next_exit = _put(state.next_exit, sel, np.where(decision.exit, -1, decision.next_exit))
            # rows that stay all go to one exit only if all were here and the policy named one
            uniform = decision.next_exit if sel is None and isinstance(decision.next_exit, int) else None
            left = bool(decision.exit.any())
            if left:
                leave = decision.exit
                who = _take(rows, sel)[leave]
                answered.append(Answered(who, decision.answer[leave],
                                         _exits(decision.answer_exit, len(leave))[leave], evaluated[leave]))
            if one_network and not left:
                continue  # nobody left and nobody can be bound elsewhere: the batch stays whole
            # rows that left, or that the policy sends to another network, leave the batch
            nxt = state.next_exit
            keep = nxt >= 0
            if not one_network:
                away = keep & (net_ids[np.maximum(nxt, 0)] != self.network[0])
                if bool(away.any()):
                    _note_best(state, unnoted)  # escalated rows carry their best too
                    unnoted = []
                    escalated.append(Pending(rows[away], None, state.take(away)))
                keep &= ~away
            if not bool(keep.all()):
                rows, feature, state = rows[keep], engine.take(feature, keep), state.take(keep)
                unnoted = [(j, p[keep]) for j, p in unnoted]
        escalate = None
        if escalated:
            escalate = Pending(np.concatenate([e.rows for e in escalated]), None,
                               RowState.cat([e.state for e in escalated]))
            if self.larger is not None and larger_input is not None:
                escalate = self._run_larger(escalate, larger_input, answered)
        pending = None
        if len(rows):
            _note_best(state, unnoted)
            pending = Pending(rows, feature, state)
        return RunResult(answered, pending, escalate)

    def _run_larger(self, bound: Pending, larger_input: LargerInput, answered: list[Answered]) -> Pending | None:
        """The larger network on the rows of `bound` whose input can be had, all in one
        call; the policy decides at the ladder's last exit (its final head) as in an
        unsplit run. Returns the rows left without input (None when none is)."""
        import torch

        assert self.larger is not None
        have, x = larger_input(bound.rows)
        if len(have):
            position = {int(r): j for j, r in enumerate(bound.rows.tolist())}
            sel = np.asarray([position[int(r)] for r in have.tolist()], dtype=np.int64)
            with torch.inference_mode():
                probs = self.larger(x).float().softmax(-1).numpy()
            k = self.num_exits - 1
            decision, _ = step(self.policy, k, probs, {n: v[sel] for n, v in bound.state.policy.items()},
                               self.num_exits)
            answered.append(Answered(have, decision.answer, _exits(decision.answer_exit, len(have)),
                                     bound.state.evaluated[sel] + 1))
        left = ~np.isin(bound.rows, have)
        if not bool(left.any()):
            return None
        return Pending(bound.rows[left], None, bound.state.take(left))


def _note_best(state: RowState, outputs: Sequence[tuple[int, np.ndarray]], sel: np.ndarray | None = None) -> None:
    """Note each (exit k, its probabilities), in order, as the best answer so far of the
    rows `sel` (all: None) where it is more confident (max-prob) than the one before."""
    for k, probs in outputs:
        conf, best = probs.max(-1), _take(state.best_conf, sel)
        better = conf > best
        state.best_conf = _put(state.best_conf, sel, np.where(better, conf, best))
        state.best_exit = _put(state.best_exit, sel, np.where(better, k, _take(state.best_exit, sel)))
        state.best_probs = _put(state.best_probs, sel, np.where(better[:, None], probs, _take(state.best_probs, sel)))


def _exits(answer_exit: np.ndarray | int, rows: int) -> np.ndarray:
    """The answering exit of each of `rows` rows (one for all, or one per row)."""
    return np.full(rows, answer_exit, dtype=np.int64) if isinstance(answer_exit, int) else answer_exit


def _take(value: np.ndarray, sel: np.ndarray | None) -> np.ndarray:
    """The selected rows (all of them, without a copy, when `sel` is None)."""
    return value if sel is None else value[sel]


def _put(value: np.ndarray, sel: np.ndarray | None, rows: np.ndarray) -> np.ndarray:
    """`value` with the selected rows set to `rows` (in place), or `rows` itself when
    `sel` is None (every row: rebound, no copy)."""
    if sel is None:
        return rows
    value[sel] = rows
    return value
