"""Cost model of a MultiExitNet for one sample: MACs per stage / exit head / final head,
feature bytes at each split point, and (optionally) measured milliseconds on this machine.

MACs come from torch's own flop counter (`torch.utils.flop_counter.FlopCounterMode`),
MACs = flops / 2. That counter only counts matmul- and convolution-like ops (conv, mm,
addmm, bmm, attention); elementwise ops (ReLU, tanh, normalization, BatchNorm in eval,
pooling, softmax) and biases are not counted. For the CIFAR ResNets and the exit heads
here those are a rounding error; the numbers match the usual "MACs" of the literature
(ResNet-20 with projection shortcuts: 40,813,184).

Conventions:
- stage k is `model.stages[k]`; a split "after stage k" puts stages 0..k and the exits
  after them on the edge (`MultiExitNet.split_head(k)`).
- `exit_macs` is keyed by the stage index the exit sits after (`model.exit_points`), so a
  caller can pick a subset of exits; `to_dict` writes the keys as strings (JSON objects).
- the exit cost of a hierarchical BoF exit includes the shared classifier once: that is
  what `model.exit_logits(k, ...)` runs at every exit.

This module does not import torch at import time: a planner or the virtual simulator can
load a saved cost model (`CostModel.from_dict`) without it.
"""

from __future__ import annotations

import functools
import statistics
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Mapping, Sequence

if TYPE_CHECKING:  # torch only where a model is analysed
    import torch

    from splitexit.models import MultiExitNet
    from splitexit.policies.base import Ladder

__all__ = ["CostModel", "Timings", "cost_model", "format_cost_table", "measure_ms"]

FP32, FP16, INT8 = 4, 2, 1  # bytes per element


@dataclass(frozen=True, kw_only=True)
class Timings:
    """Median wall-clock milliseconds of one call on a batch of `batch_size` samples."""

    stage_ms: tuple[float, ...]
    exit_ms: dict[int, float]  # keyed by the stage index the exit sits after
    head_ms: float
    batch_size: int


@dataclass(frozen=True, kw_only=True)
class CostModel:
    """Per-sample costs of a MultiExitNet (see the module docstring for conventions)."""

    stage_macs: tuple[int, ...]  # MACs of stage k on its real input, one sample
    exit_macs: dict[int, int]  # exit after stage k -> MACs of evaluating it
    head_macs: int  # the final head
    feature_bytes: tuple[int, ...]  # fp32 bytes of stage k's output, one sample
    input_bytes: int  # fp32 bytes of one input sample
    # Measured on the machine that built this model (None when not measured): median ms
    # of one call on a batch of `batch_size` samples.
    stage_ms: tuple[float, ...] | None = None
    exit_ms: dict[int, float] | None = None
    head_ms: float | None = None
    batch_size: int = 1

    def __post_init__(self) -> None:
        n = len(self.stage_macs)
        if len(self.feature_bytes) != n:
            raise ValueError(f"{n} stages but {len(self.feature_bytes)} feature sizes")
        bad = [k for k in self.exit_macs if not 0 <= k < n - 1]
        if bad:
            raise ValueError(f"exit points {bad} out of range 0..{n - 2}")
        if self.stage_ms is not None and len(self.stage_ms) != n:
            raise ValueError(f"{n} stages but {len(self.stage_ms)} stage timings")
        if self.exit_ms is not None and set(self.exit_ms) != set(self.exit_macs):
            raise ValueError(f"exit timings for {sorted(self.exit_ms)}, exits at {sorted(self.exit_macs)}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")

    # --- structure -------------------------------------------------------------------
    @property
    def num_stages(self) -> int:
        return len(self.stage_macs)

    @property
    def exit_points(self) -> list[int]:
        """Stage indices that carry an exit head, ascending."""
        return sorted(self.exit_macs)

    @property
    def measured(self) -> bool:
        return self.stage_ms is not None

    def _exits(self, exit_points: Sequence[int] | None) -> list[int]:
        points = self.exit_points if exit_points is None else list(exit_points)
        if points != sorted(set(points)):
            raise ValueError(f"exit_points must be strictly increasing, got {points}")
        missing = [k for k in points if k not in self.exit_macs]
        if missing:
            raise ValueError(f"no exit after stage(s) {missing}; exits at {self.exit_points}")
        return points

    def _check_stage(self, k: int) -> None:
        if not 0 <= k < self.num_stages:
            raise ValueError(f"stage {k} out of range 0..{self.num_stages - 1}")

    # --- MACs ------------------------------------------------------------------------
    @property
    def total_macs(self) -> int:
        """The backbone: every stage and the final head, no exit heads."""
        return sum(self.stage_macs) + self.head_macs

    def cumulative_exit_macs(self, exit_points: Sequence[int] | None = None) -> list[int]:
        """c_1..c_K: MACs of reaching and evaluating exit k with every earlier exit head of
        `exit_points` evaluated too (METHODS.md); the last entry is the final head, i.e.
        `total_macs` plus all the exit heads. Default: every exit of the model."""
        points = self._exits(exit_points)
        costs: list[int] = []
        spent, done = 0, 0  # MACs so far, stages run so far
        for k in points:
            spent += sum(self.stage_macs[done : k + 1]) + self.exit_macs[k]
            done = k + 1
            costs.append(spent)
        costs.append(spent + sum(self.stage_macs[done:]) + self.head_macs)
        return costs

    def edge_macs(self, split: int, exit_points: Sequence[int] | None = None) -> int:
        """The edge part of a split after stage `split`: stages 0..split and the exits
        (of `exit_points`, default all) after them."""
        self._check_stage(split)
        exits = sum(self.exit_macs[k] for k in self._exits(exit_points) if k <= split)
        return sum(self.stage_macs[: split + 1]) + exits

    def cloud_macs(self, split: int) -> int:
        """The cloud part of a split after stage `split`: the remaining stages and the final
        head (exits on the cloud side are not evaluated there)."""
        self._check_stage(split)
        return sum(self.stage_macs[split + 1 :]) + self.head_macs

    def exit_ladder(self, exit_points: Sequence[int] | None = None, *, unit: str = "macs") -> "Ladder":
        """The exits (`exit_points`, default all, then the final head) as a policy Ladder:
        backbone cost up to each exit point and each exit head's own cost, in MACs or in
        measured milliseconds per sample (`unit="ms"`, needs a measured cost model)."""
        from splitexit.policies.base import Ladder

        points = self._exits(exit_points)
        stages: tuple[float, ...]
        exits: Mapping[int, float]
        head: float
        if unit == "macs":
            stages, exits, head = self.stage_macs, self.exit_macs, self.head_macs
        elif unit == "ms":
            if self.stage_ms is None or self.exit_ms is None or self.head_ms is None:
                raise ValueError("a budget in ms needs measured timings (cost_model(..., measure=True))")
            per = 1.0 / self.batch_size
            stages = tuple(t * per for t in self.stage_ms)
            exits = {k: t * per for k, t in self.exit_ms.items()}
            head = self.head_ms * per
        else:
            raise ValueError(f"unit must be 'macs' or 'ms', got {unit!r}")
        net = [float(sum(stages[: k + 1])) for k in points] + [float(sum(stages) + head)]
        heads = [float(exits[k]) for k in points] + [0.0]
        names = tuple(f"exit@{k}" for k in points) + ("final",)
        return Ladder(net_cost=tuple(net), head_cost=tuple(heads), names=names)

    # --- bytes -----------------------------------------------------------------------
    def bytes_at(self, k: int, bytes_per_element: int = FP32) -> int:
        """Bytes of stage k's output for one sample (4: fp32, 2: fp16, 1: int8)."""
        self._check_stage(k)
        return self.feature_bytes[k] // FP32 * bytes_per_element

    def numel_at(self, k: int) -> int:
        self._check_stage(k)
        return self.feature_bytes[k] // FP32

    # --- serialization ---------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: lists for tuples, str keys for the exit dicts."""
        return {
            "stage_macs": list(self.stage_macs),
            "exit_macs": {str(k): v for k, v in sorted(self.exit_macs.items())},
            "head_macs": self.head_macs,
            "feature_bytes": list(self.feature_bytes),
            "input_bytes": self.input_bytes,
            "stage_ms": None if self.stage_ms is None else list(self.stage_ms),
            "exit_ms": None if self.exit_ms is None else {str(k): v for k, v in sorted(self.exit_ms.items())},
            "head_ms": self.head_ms,
            "batch_size": self.batch_size,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "CostModel":
        stage_ms, exit_ms = data.get("stage_ms"), data.get("exit_ms")
        head_ms = data.get("head_ms")
        return cls(
            stage_macs=tuple(int(v) for v in data["stage_macs"]),
            exit_macs={int(k): int(v) for k, v in data["exit_macs"].items()},
            head_macs=int(data["head_macs"]),
            feature_bytes=tuple(int(v) for v in data["feature_bytes"]),
            input_bytes=int(data["input_bytes"]),
            stage_ms=None if stage_ms is None else tuple(float(v) for v in stage_ms),
            exit_ms=None if exit_ms is None else {int(k): float(v) for k, v in exit_ms.items()},
            head_ms=None if head_ms is None else float(head_ms),
            batch_size=int(data.get("batch_size", 1)),
        )


# --- analysis of a model ---------------------------------------------------------------
def _stage_inputs(model: "MultiExitNet", x: "torch.Tensor") -> list["torch.Tensor"]:
    """[input of stage 0, output of stage 0, ..., output of the last stage]."""
    tensors = [x]
    for i, stage in enumerate(model.stages):
        out = stage(tensors[-1])
        if not hasattr(out, "numel"):
            raise TypeError(f"stage {i} returned {type(out).__name__}; a split point must carry one tensor")
        tensors.append(out)
    return tensors


def _example(model: "MultiExitNet", input_shape: tuple[int, int, int], batch_size: int) -> "torch.Tensor":
    import torch

    if len(input_shape) != 3:
        raise ValueError(f"input_shape must be (C, H, W), got {tuple(input_shape)}")
    param = next(model.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    dtype = param.dtype if param is not None else torch.float32
    return torch.zeros(batch_size, *input_shape, device=device, dtype=dtype)


def _macs(fn: Callable[[], object]) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops() // 2


def measure_ms(
    model: "MultiExitNet",
    input_shape: tuple[int, int, int],
    *,
    batch_size: int = 1,
    repeats: int = 20,
    warmup: int = 3,
) -> Timings:
    """Median wall-clock ms of each stage, each exit head and the final head on a batch of
    `batch_size`, each run on its real input, under torch.inference_mode on the model's
    device (synchronized on CUDA). Uses torch's current thread settings."""
    import torch

    if batch_size < 1 or repeats < 1 or warmup < 0:
        raise ValueError("batch_size and repeats must be >= 1, warmup >= 0")
    param = next(model.parameters(), None)
    sync = torch.cuda.synchronize if param is not None and param.is_cuda else (lambda: None)

    def median_ms(fn: Callable[[], object]) -> float:
        for _ in range(warmup):
            fn()
        times = []
        for _ in range(repeats):
            sync()
            start = time.perf_counter()
            fn()
            sync()
            times.append((time.perf_counter() - start) * 1e3)
        return statistics.median(times)

    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            xs = _stage_inputs(model, _example(model, input_shape, batch_size))
            stage_ms = tuple(median_ms(functools.partial(model.stages[i], xs[i])) for i in range(model.num_stages))
            exit_ms = {k: median_ms(functools.partial(model.exit_logits, k, xs[k + 1])) for k in model.exit_points}
            head_ms = median_ms(lambda: model.head(xs[-1]))
    finally:
        model.train(was_training)
    return Timings(stage_ms=stage_ms, exit_ms=exit_ms, head_ms=head_ms, batch_size=batch_size)


def cost_model(
    model: "MultiExitNet",
    input_shape: tuple[int, int, int],
    *,
    measure: bool = False,
    batch_size: int = 1,
) -> CostModel:
    """MACs and fp32 feature bytes for one sample of shape (C, H, W); with `measure`, also
    the median ms per stage / exit / head on a batch of `batch_size` (see `measure_ms`)."""
    import torch

    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            x = _example(model, input_shape, 1)
            xs = _stage_inputs(model, x)  # xs[k] is stage k's input, xs[k + 1] its output
            stage_macs = tuple(_macs(functools.partial(model.stages[i], xs[i])) for i in range(model.num_stages))
            exit_macs = {k: _macs(functools.partial(model.exit_logits, k, xs[k + 1])) for k in model.exit_points}
            head_macs = _macs(lambda: model.head(xs[-1]))
    finally:
        model.train(was_training)
    timings = measure_ms(model, input_shape, batch_size=batch_size) if measure else None
    return CostModel(
        stage_macs=stage_macs,
        exit_macs=exit_macs,
        head_macs=head_macs,
        feature_bytes=tuple(t.numel() * FP32 for t in xs[1:]),
        input_bytes=x.numel() * FP32,
        stage_ms=None if timings is None else timings.stage_ms,
        exit_ms=None if timings is None else timings.exit_ms,
        head_ms=None if timings is None else timings.head_ms,
        batch_size=batch_size,
    )


def format_cost_table(cost: CostModel, exit_points: Sequence[int] | None = None) -> str:
    """Plain-text table, one row per stage: MACs (M), cumulative backbone MACs (M), fp32 KB
    of the output, the exit's MACs (M) if an exit of `exit_points` sits there, and ms if
    measured; then the final head and the cumulative exit costs c_k."""
    points = cost._exits(exit_points)
    timed = cost.measured
    cols = ["stage", "MACs M", "cum M", "out KB", "exit M"] + (["ms", "exit ms"] if timed else [])
    rows = [cols]
    cum = 0
    for k, macs in enumerate(cost.stage_macs):
        cum += macs
        row = [str(k), f"{macs / 1e6:.3f}", f"{cum / 1e6:.3f}", f"{cost.bytes_at(k) / 1024:.1f}"]
        row.append(f"{cost.exit_macs[k] / 1e6:.4f}" if k in points else "-")
        if timed:
            assert cost.stage_ms is not None and cost.exit_ms is not None
            row.append(f"{cost.stage_ms[k]:.3f}")
            row.append(f"{cost.exit_ms[k]:.3f}" if k in points else "-")
        rows.append(row)
    head = ["head", f"{cost.head_macs / 1e6:.4f}", f"{cost.total_macs / 1e6:.3f}", "-", "-"]
    if timed:
        head += [f"{cost.head_ms:.3f}" if cost.head_ms is not None else "-", "-"]
    rows.append(head)
    widths = [max(len(r[i]) for r in rows) for i in range(len(cols))]
    lines = ["  ".join(cell.rjust(w) for cell, w in zip(r, widths)) for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    c_k = ", ".join(f"{c / 1e6:.3f}" for c in cost.cumulative_exit_macs(points))
    lines.append(f"input {cost.input_bytes / 1024:.1f} KB fp32; exits at {points}; c_k (M MACs): {c_k}")
    if timed:
        lines.append(f"ms: median of one call on a batch of {cost.batch_size}")
    return "\n".join(lines)
