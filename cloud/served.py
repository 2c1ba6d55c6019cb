"""A cloud bundle loaded for serving, and how its rows are answered.

- `ServedModel.load(path)`: a cloud bundle ready to serve (tail runner, state spec,
  optional edge weights for raw-input-only requests, the cascade's larger network).
- `ServedModel.run_batch(parsed_requests)`: one tail call for a batch, answers per request
  (runs in the batcher's compute thread).

How a row is answered (see also `splitexit.wire` for the formats):
1. With a feature: the tail runs from `split + 1`, resuming the row's `RowState` (none
   sent = the policy starts fresh at the first cloud exit).
   Without one (raw input only; needs the bundle's edge weights on this worker): the
   whole network runs from stage 0 on the decoded input, normalized with the bundle's
   mean/std.
2. A row the policy sends to the cascade's larger network (RunResult.escalate, or a
   next exit that already names it) runs that network on its decoded raw input, when the
   request carries one, normalized with the larger network's mean/std; the policy then
   decides at the ladder's last exit (the larger network's final head) as in an unsplit
   run. Without raw input the row is answered with the most confident exit it evaluated
   (the edge's too when it sent its best exit), flagged `degraded`; a row that
   arrives already bound for the larger network without raw input runs this network's
   remaining exits first, also flagged `degraded`.
3. RowResult.exit_index is the stage index of the answering exit in RowResult.network
   (the model name, or `splitexit.wire.larger_network_name(model)`).

A batch that fails as a whole is re-run request by request, so one bad request (e.g. a
policy state whose values the policy cannot use) fails alone and never its batch-mates.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import torch

from splitexit.bundle import Bundle, BundleError, has_edge_weights, load_bundle, load_whole
from splitexit.cloud.errors import RequestError
from splitexit.cloud.requests import Parsed, ServiceLimits, decode_bodies
from splitexit.codec import CODECS
from splitexit.policies import PolicyError
from splitexit.proto import PROTOCOL_VERSION
from splitexit.proto import inference_pb2 as pb
from splitexit.runtime import ExitRunner, RowState
from splitexit.wire import (
    RAW_FORMATS, StateField, WireError, decode_raw_input, larger_network_name, state_spec, top_classes,
)

__all__ = ["ServedModel", "load_models", "model_info"]


@dataclass(eq=False)
class ServedModel:
    """A cloud bundle loaded for serving."""

    bundle: Bundle
    runner: ExitRunner
    can_start_raw: bool  # the edge weights are loaded too: raw-input-only requests work
    spec: dict[str, StateField] = field(init=False, repr=False)  # what policy_state must hold

    def __post_init__(self) -> None:
        self.spec = state_spec(self.runner)
        self.own_exits = len(self.runner.exit_stages)  # ladder exits of this network, final head included
        self.splits = self.bundle.manifest.cloud_splits  # the cuts whose features this worker takes
        # per split (-1: raw input), the ladder index of the first exit on this side
        self._first_cloud = {s: len(self.bundle.manifest.exits_through(s)) for s in (-1, *self.splits)}
        self.num_classes = len(self.bundle.classes)
        self._mean = torch.tensor(self.bundle.mean, dtype=torch.float32).view(1, -1, 1, 1)
        self._std = torch.tensor(self.bundle.std, dtype=torch.float32).view(1, -1, 1, 1)
        large = self.bundle.manifest.large
        self._large_stage = self.bundle.large.num_stages - 1 if self.bundle.large is not None else -1
        self._large_mean = torch.tensor(large.mean if large else self.bundle.mean, dtype=torch.float32).view(1, -1, 1, 1)
        self._large_std = torch.tensor(large.std if large else self.bundle.std, dtype=torch.float32).view(1, -1, 1, 1)

    @property
    def name(self) -> str:
        return self.bundle.name

    @property
    def hash(self) -> str:
        return self.bundle.hash

    @property
    def raw_formats(self) -> tuple[str, ...]:
        """Raw input is of use with a larger network or with the edge weights loaded."""
        return RAW_FORMATS if (self.bundle.large is not None or self.can_start_raw) else ()

    @classmethod
    def load(cls, path: str | Path) -> "ServedModel":
        """Load the cloud part of a bundle, plus its edge weights when the directory has
        them (they let raw-input-only requests run the whole network). Raises BundleError."""
        path = Path(path)
        can_start_raw = has_edge_weights(path)
        bundle = load_whole(path) if can_start_raw else load_bundle(path, "cloud")
        try:
            runner = ExitRunner(bundle.model, bundle.policy, num_classes=len(bundle.classes), network=bundle.network,
                                larger=bundle.large)
        except PolicyError as exc:
            raise BundleError(f"{path}: the policy does not fit the model ({exc})") from exc
        return cls(bundle, runner, can_start_raw)

    def model_spec(self) -> pb.ModelSpec:
        return pb.ModelSpec(
            name=self.name, bundle_hash=self.hash, arch=self.bundle.manifest.model.arch,
            splits=[pb.SplitPoint(split=s, feature_shape=self.bundle.manifest.feature_shapes[s]) for s in self.splits],
            input_shape=self.bundle.input_shape, classes=self.bundle.classes, codecs=CODECS,
            raw_formats=self.raw_formats,
        )

    def first_cloud(self, split: int) -> int:
        """Ladder index of the first exit after `split` (-1: raw input, the first exit)."""
        return self._first_cloud[split]

    def fresh_state(self, rows: int, *, split: int) -> RowState:
        """State of rows that arrive after stage `split` (-1: raw input) without any: the
        policy starts at the first exit it would evaluate on this side."""
        state = self.runner.initial_state(rows)
        if split >= 0:
            state.next_exit = np.maximum(state.next_exit, self.first_cloud(split))
        return state

    def warm_up(self) -> None:
        """Run the tail (and the larger network) once on a dummy row: first-call costs
        (allocator, kernels, lazy init) are paid before the worker says SERVING."""
        for split in self.splits:
            feature = torch.zeros(1, *self.bundle.manifest.feature_shapes[split])
            item = Parsed(model=self, request_id="warm-up", sample_ids=("0",), rows=1, feature=feature,
                          state=self.fresh_state(1, split=split), key=("warm-up", split), split=split)
            out = self.run_batch([item])[0]
            if isinstance(out, Exception):
                raise out
        if self.bundle.large is not None:
            with torch.inference_mode():
                self.bundle.large(torch.zeros(1, *self.bundle.input_shape))

    # -- compute (in the batcher's thread) -----------------------------------------------
    def run_batch(self, items: Sequence[Parsed]) -> list["list[pb.RowResult] | RequestError"]:
        """Answers for a batch of parsed requests of this model (one key). Bodies left
        undecoded by `parse_request(..., defer_decode=True)` are decoded here first, a
        batch's together; a request that fails to decode fails alone. A whole-batch
        failure is retried request by request so that it fails only the request at fault."""
        decoded = decode_bodies(self, items)
        live = [i for i, d in enumerate(decoded) if isinstance(d, Parsed)]
        out: list[list[pb.RowResult] | RequestError] = [d if isinstance(d, RequestError) else [] for d in decoded]
        if live:
            for i, answer in zip(live, self._run_isolated([decoded[i] for i in live])):  # type: ignore[misc]
                out[i] = answer
        return out

    def _run_isolated(self, items: Sequence[Parsed]) -> list["list[pb.RowResult] | RequestError"]:
        try:
            return self._run(items)
        except Exception as exc:
            if len(items) == 1:
                return [_compute_error(exc)]
        out: list[list[pb.RowResult] | RequestError] = []
        for item in items:
            try:
                out.extend(self._run([item]))
            except Exception as exc:
                out.append(_compute_error(exc))
        return out

    def _normalize(self, images: np.ndarray, *, large: bool) -> torch.Tensor:
        """uint8 [B, H, W, C] -> float [B, C, H, W] with the network's mean/std."""
        x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float().div_(255.0)
        return (x - self._large_mean) / self._large_std if large else (x - self._mean) / self._std

    def _raw(self, item: Parsed, rows: Sequence[int] | None = None) -> np.ndarray:
        items = item.raw_items or ()
        picked = items if rows is None else [items[r] for r in rows]
        return decode_raw_input(item.raw_format or "", picked, self.bundle.input_shape)

    @torch.inference_mode()
    def _run(self, items: Sequence[Parsed]) -> list["list[pb.RowResult] | RequestError"]:
        results: list[list[pb.RowResult] | RequestError | None] = [None] * len(items)
        inputs: dict[int, torch.Tensor] = {}
        images: dict[int, np.ndarray] = {}  # decoded raw input, reused for escalation
        for i, item in enumerate(items):
            if item.feature is not None:  # one key: all of a batch start alike
                inputs[i] = item.feature
                continue
            try:
                images[i] = self._raw(item)
            except WireError as exc:
                results[i] = RequestError("INVALID_ARGUMENT", str(exc))
                continue
            inputs[i] = self._normalize(images[i], large=False)
        live = [i for i in inputs]
        if not live:
            return results  # type: ignore[return-value]
        counts = np.asarray([items[i].rows for i in live])
        owner = np.repeat(np.asarray(live), counts)  # [N] item index of each row
        first_row = {i: int(o) for i, o in zip(live, np.cumsum(counts) - counts)}
        x = torch.cat([inputs[i] for i in live])  # [N, ...]
        state = RowState.cat([items[i].row_state for i in live])
        n = x.shape[0]
        has_raw = np.repeat(np.asarray([items[i].raw_items is not None for i in live], dtype=bool), counts)

        probs = np.zeros((n, self.num_classes), dtype=np.float32)
        exit_stage = np.full(n, -1, dtype=np.int64)
        by_large = np.zeros(n, dtype=bool)
        degraded = np.zeros(n, dtype=bool)
        done = np.zeros(n, dtype=bool)

        # Rows whose policy already chose the larger network go there when they can (the
        # runner sends them on arrival); those without raw input cannot: they run this
        # network's remaining exits instead, degraded.
        stuck = (state.next_exit >= self.own_exits) & ~has_raw
        state.next_exit[stuck] = self.first_cloud(items[0].split)
        degraded |= stuck

        def larger_input(rows: np.ndarray) -> tuple[np.ndarray, torch.Tensor]:
            """The larger network's input for those of `rows` whose request sent raw input;
            a request whose raw input does not decode fails alone."""
            xs, have = [], []
            for i in sorted(set(owner[rows].tolist())):
                if items[i].raw_items is None or results[i] is not None:
                    continue
                mine = rows[owner[rows] == i]
                local = (mine - first_row[i]).tolist()
                try:
                    pixels = images[i][local] if i in images else self._raw(items[i], local)
                except WireError as exc:
                    results[i] = RequestError("INVALID_ARGUMENT", str(exc))
                    continue
                xs.append(self._normalize(pixels, large=True))
                have.append(mine)
            if not have:
                return np.empty(0, dtype=np.int64), torch.empty(0)
            return np.concatenate(have), torch.cat(xs)

        start = items[0].split + 1  # one key, one split; a raw input's is -1
        result = self.runner.run(x, start=start, state=state, rows=np.arange(n), larger_input=larger_input)
        merged = result.merged()
        if merged is not None:
            large = merged.exit_index >= self.own_exits
            own_stage = np.asarray(self.runner.exit_stages)[np.minimum(merged.exit_index, self.own_exits - 1)]
            probs[merged.rows] = merged.probs
            exit_stage[merged.rows] = np.where(large, self._large_stage, own_stage)
            by_large[merged.rows] = large
            done[merged.rows] = True
        for left in (result.escalate, result.pending):  # no raw input (or no larger network): best exit, degraded
            if left is None:
                continue
            for j, r in enumerate(left.rows.tolist()):
                if results[int(owner[r])] is not None:  # its request already failed
                    continue
                k = int(left.state.best_exit[j])
                if not 0 <= k < self.own_exits:
                    results[int(owner[r])] = RequestError(
                        "INTERNAL", "a row left for the larger network without any exit evaluated")
                    continue
                probs[r], exit_stage[r] = left.state.best_probs[j], self.runner.exit_stages[k]
                degraded[r], done[r] = True, True
        return self._answers(items, live, first_row, results, probs, exit_stage, by_large, degraded)

    def _answers(self, items, live, first_row, results, probs, exit_stage, by_large, degraded):
        conf, label = probs.max(-1), probs.argmax(-1)
        large_name = larger_network_name(self.name)
        label_l, conf_l, stage_l = label.tolist(), conf.tolist(), exit_stage.tolist()
        large_l, degraded_l = by_large.tolist(), degraded.tolist()
        for i in live:
            if results[i] is not None:
                continue
            item = items[i]
            k = self.num_classes if item.top_k <= 0 else min(item.top_k, self.num_classes)
            rows = []
            for j in range(item.rows):
                r = first_row[i] + j
                row = pb.RowResult(sample_id=item.sample_ids[j], label=label_l[r], confidence=conf_l[r],
                                   exit_index=stage_l[r], network=large_name if large_l[r] else self.name,
                                   degraded=degraded_l[r])
                if item.want_probabilities:
                    row.top_k.extend(pb.ClassScore(class_index=c, probability=p) for c, p in top_classes(probs[r], k))
                rows.append(row)
            results[i] = rows
        return results


def _compute_error(exc: Exception) -> RequestError:
    if isinstance(exc, RequestError):
        return exc
    if isinstance(exc, (PolicyError, IndexError, ValueError, RuntimeError)):
        # The request's structure was validated; what remains is a value the policy cannot use.
        return RequestError("INVALID_ARGUMENT", f"the exit policy cannot resume from this request's state "
                                                f"({type(exc).__name__}: {str(exc)[:200]})")
    return RequestError("INTERNAL", f"{type(exc).__name__}: {str(exc)[:200]}")


def load_models(paths: Sequence[str | Path]) -> dict[tuple[str, str], ServedModel]:
    """Served models keyed by (name, bundle hash). Raises BundleError (also for a bundle
    given twice)."""
    models: dict[tuple[str, str], ServedModel] = {}
    for path in paths:
        model = ServedModel.load(path)
        if (model.name, model.hash) in models:
            raise BundleError(f"{path}: bundle {model.name} {model.hash[:12]} is given twice")
        models[(model.name, model.hash)] = model
    return models


def model_info(models: Mapping[tuple[str, str], ServedModel], limits: ServiceLimits, worker_id: str) -> pb.ModelInfo:
    return pb.ModelInfo(
        protocol_version=PROTOCOL_VERSION,
        models=[m.model_spec() for _, m in sorted(models.items())],
        limits=pb.Limits(max_message_bytes=limits.max_message_bytes, max_batch_rows=limits.max_request_rows),
        worker_id=worker_id,
    )
