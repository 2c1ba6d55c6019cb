"""The engine that runs a bundle's head on the device, and loading a bundle with it.

- `OnnxEngine`: the bundle's exported ONNX segments (`splitexit export --edge-engine
  onnx`) run by ONNX Runtime. Needs neither torch nor the safetensors weights: this is
  what the `splitexit[edge]` install runs.
- torch (`splitexit.runtime.TorchEngine`): the bundle's weights in eager PyTorch; the
  reference, and the choice for bundles exported without segments.

`open_edge(path, "auto")` picks ONNX when the bundle has segments (and ONNX Runtime is
installed), torch otherwise.

ONNX Runtime settings, chosen by measurement on a 2-core x86 VM (see `bench overhead`):
one intra-op thread by default (the rows of an edge batch are few: a second thread saved
nothing at batch 1 and the agent's event loop wants the other core; raise `threads` for
large batches on a many-core device), sequential execution (a segment is a chain), every
graph optimization (fusions and the NCHWc layout, faster at every batch size measured).
No I/O binding: the inputs are numpy arrays already on the CPU, and pre-bound buffers
saved nothing measurable on a real segment (255 vs 270 us at batch 1).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Mapping, Sequence

import numpy as np

from splitexit.manifest import Bundle, BundleError, OnnxSegment, checked_file, read_manifest

if TYPE_CHECKING:
    from splitexit.runtime import Engine

__all__ = ["ENGINES", "EngineName", "OnnxEngine", "open_edge"]

log = logging.getLogger(__name__)

EngineName = Literal["auto", "onnx", "torch"]
ENGINES: tuple[str, ...] = ("auto", "onnx", "torch")


def _onnxruntime() -> Any:
    try:
        import onnxruntime
    except ImportError:
        raise BundleError("the onnx engine needs onnxruntime, which is not installed: "
                          "pip install 'splitexit[edge]' (or run with --engine torch)") from None
    return onnxruntime


class OnnxEngine:
    """A bundle's edge segments in ONNX Runtime sessions (see the module docstring)."""

    def __init__(self, bundle_path: str | Path, segments: Sequence[OnnxSegment], *, exits: Sequence[int],
                 input_shape: Sequence[int], feature_shapes: Mapping[int, Sequence[int]], threads: int = 1) -> None:
        ort = _onnxruntime()
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.log_severity_level = 3  # errors only: ORT's notices are not the operator's business
        self._exit_points = tuple(exits[:-1])
        self._num_stages = int(exits[-1]) + 1
        self._segments: dict[tuple[int, int], tuple[Any, bool]] = {}
        self._chains: dict[tuple[int, int], list[tuple[Any, bool]]] = {}  # runs across several segments
        self._heads: dict[int, Any] = {}
        expected = tuple(input_shape)
        for segment in segments:
            file = checked_file(bundle_path, segment)
            try:
                session = ort.InferenceSession(str(file), options, providers=["CPUExecutionProvider"])
            except Exception as exc:  # ORT raises its own types for a graph it cannot load
                raise BundleError(f"{file}: not a loadable ONNX graph ({type(exc).__name__}: {exc})") from None
            _check_input(file, session, segment.input_shape)
            if segment.alone:
                self._heads[segment.last] = session
                continue
            if segment.input_shape != expected:
                raise BundleError(f"{file}: takes rows of shape {list(segment.input_shape)}, but the segment "
                                  f"before it gives {list(expected)}")
            self._segments[(segment.first, segment.last)] = (session, segment.head)
            expected = tuple(int(d) for d in session.get_outputs()[0].shape[1:])
            want = feature_shapes.get(segment.last)
            if want is not None and expected != tuple(want):
                raise BundleError(f"{file}: gives features of shape {list(expected)}, the manifest's feature "
                                  f"at split {segment.last} is {list(want)}")
        ends = {last for _, last in self._segments}
        missing = sorted(set(feature_shapes) - ends)
        if missing:
            raise BundleError(f"{bundle_path}: no ONNX segment ends at split {missing[0]}")

    @property
    def num_stages(self) -> int:
        return self._num_stages

    @property
    def exit_points(self) -> Sequence[int]:
        return self._exit_points

    def advance(self, feature: np.ndarray, start: int, stop: int, *, head: bool,
                rows: np.ndarray | None) -> tuple[np.ndarray, np.ndarray | None]:
        found = self._segments.get((start, stop))
        if found is None:  # a run across a split the policy has no exit at: a chain of segments
            *before, found = self._chain(start, stop)
            for session, _ in before:
                feature = session.run(None, {"x": feature})[0]
        session, has_head = found
        outputs = session.run(None, {"x": feature})
        if not head:
            return outputs[0], None
        if not has_head:
            raise BundleError(f"the ONNX segment for stages {start}..{stop} has no exit head")
        probs = outputs[1]
        return outputs[0], probs if rows is None else probs[rows]

    def _chain(self, start: int, stop: int) -> list[tuple[Any, bool]]:
        chain = self._chains.get((start, stop))
        if chain is None:
            by_first = {first: (last, found) for (first, last), found in self._segments.items()}
            chain, at = [], start
            while at <= stop and at in by_first:
                last, found = by_first[at]
                chain.append(found)
                at = last + 1
            if at != stop + 1:
                raise BundleError(f"the bundle has no ONNX segments for stages {start}..{stop} "
                                  f"(it has {sorted(self._segments)})")
            self._chains[(start, stop)] = chain
        return chain

    def take(self, feature: np.ndarray, rows: np.ndarray) -> np.ndarray:
        return feature[rows]

    def from_array(self, x: np.ndarray) -> np.ndarray:
        return x

    def exit_probs(self, stage: int, feature: np.ndarray) -> np.ndarray:
        session = self._heads.get(stage)
        if session is None:
            raise BundleError(f"the bundle has no ONNX graph of the exit after stage {stage} alone")
        return session.run(None, {"x": feature})[0]


def _check_input(file: Path, session: Any, row_shape: tuple[int, ...]) -> None:
    """The graph takes [batch, *row_shape] float32 rows as the manifest says."""
    inputs = session.get_inputs()
    if len(inputs) != 1 or inputs[0].name != "x" or inputs[0].type != "tensor(float)":
        raise BundleError(f"{file}: expected one float input 'x', got "
                          f"{[(i.name, i.type) for i in inputs]}")
    shape = inputs[0].shape
    if len(shape) != len(row_shape) + 1 or tuple(shape[1:]) != row_shape or isinstance(shape[0], int):
        raise BundleError(f"{file}: takes input {shape}, the manifest says [batch, {', '.join(map(str, row_shape))}]")


def open_edge(path: str | Path, engine: EngineName = "auto", *, threads: int = 1) -> tuple[Bundle, "Engine"]:
    """The edge part of a bundle and the engine that runs it. "auto": ONNX when the bundle
    has segments and onnxruntime is installed, else torch. Raises BundleError."""
    from splitexit.policies import policy_from_dict

    if engine not in ENGINES:
        raise BundleError(f"unknown engine {engine!r}; choose one of {', '.join(ENGINES)}")
    manifest = read_manifest(path)
    if engine == "auto":
        engine = "onnx" if manifest.onnx else "torch"
        if engine == "onnx":
            try:
                _onnxruntime()
            except BundleError:
                log.warning("the bundle has ONNX segments but onnxruntime is not installed: running torch")
                engine = "torch"
    if engine == "torch":
        try:
            from splitexit.bundle import load_bundle
            from splitexit.runtime import TorchEngine
        except ImportError as exc:
            raise BundleError(f"the torch engine needs {exc.name}, which is not installed "
                              "(a bundle exported with --edge-engine onnx runs without it)") from None
        bundle = load_bundle(path, "edge")
        return bundle, TorchEngine(bundle.model)
    if not manifest.onnx:
        raise BundleError(f"{path}: the bundle has no ONNX segments (export it with --edge-engine onnx)")
    try:
        policy = policy_from_dict(dict(manifest.policy))
    except (KeyError, TypeError, ValueError) as exc:
        raise BundleError(f"{path}: bad policy in the manifest ({exc})") from exc
    onnx = OnnxEngine(path, manifest.onnx, exits=manifest.exits, input_shape=manifest.input_shape,
                      feature_shapes=manifest.feature_shapes, threads=threads)
    return Bundle(Path(path), manifest, "edge", None, policy), onnx
