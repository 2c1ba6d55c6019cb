"""What the runtime benchmarks (`wire`, `serve`) share: the reference edge network exported
as a bundle with a policy fitted on the validation split, the rows its head leaves for the
cloud on the test split, and a real cloud worker (`splitexit.cloud.server`) serving on an
event loop of its own in a background thread.
"""

from __future__ import annotations

import asyncio
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Coroutine, Mapping, TypeVar

import numpy as np
import torch

from splitexit.bundle import Bundle, export_bundle, load_bundle
from splitexit.calibrate import FitInputs, FitOptions, describe_fit, fit_policy
from splitexit.cli import CliError
from splitexit.cloud.server import CloudServer, ServerConfig, build_server
from splitexit.cloud.served import ServedModel
from splitexit.data import ArraySet, Normalize
from splitexit.policies import ExitPolicy
from splitexit.reference import Trained
from splitexit.runtime import ExitRunner, Pending, RowState
from splitexit.sim.bench.common import BenchContext, log

T = TypeVar("T")

DEFAULT_POLICY = "bof_beta"
DEFAULT_BUDGET = 0.5  # of the full network's MACs, as in BENCH.md's at_budget


@dataclass(frozen=True)
class SplitBundle:
    """The edge network exported at `split` with a policy fitted on validation."""

    path: Path
    trained: Trained  # the whole network (the in-process reference runs on it)
    policy: ExitPolicy
    split: int
    fit: dict[str, Any]  # describe_fit's entry: the policy and how it did on validation

    def edge(self) -> Bundle:
        return load_bundle(self.path, "edge")

    def summary(self) -> dict[str, Any]:
        m = self.edge().manifest
        return {"split": self.split, "feature_shape": list(m.feature_shape), "edge_exits": list(m.edge_exits),
                "cloud_exits": list(m.cloud_exits), "policy": self.fit}


def add_bundle_arguments(parser: Any, *, split_default: str = "the last edge exit") -> None:
    parser.add_argument("--split", type=int, default=None,
                        help=f"stage after which the network is cut (default: {split_default})")
    parser.add_argument("--policy", default=DEFAULT_POLICY, help="exit policy fitted on validation (default: %(default)s)")
    parser.add_argument("--budget", type=float, default=DEFAULT_BUDGET,
                        help="the policy's average MACs as a fraction of the full network's (default: %(default)s)")


def default_split(trained: Trained) -> int:
    """After the last exit: every exit runs on the edge, the cloud runs what is left."""
    model = trained.model
    return model.exit_points[-1] if model.exit_points else model.num_stages - 2


def last_stages_split(trained: Trained, stages: int = 2) -> int:
    """The cut before the network's last `stages` stages in the ResNet sense (runs of
    blocks at one resolution): BENCH.md's reference tail, "its last two stages", is
    stages 4..9 of the ResNet-20 (split 3). Falls back to `default_split` for a network
    with fewer resolutions."""
    model = trained.model
    reductions = [info.reduction for info in model.feature_info]
    starts = [i for i in range(1, len(reductions)) if reductions[i] != reductions[i - 1]]
    if len(starts) < stages:
        return default_split(trained)
    return starts[-stages] - 1


def split_bundle(ctx: BenchContext, out_dir: Path, *, split: int | None, policy: str, budget: float,
                 default: Callable[[Trained], int] = default_split) -> SplitBundle:
    """Fit `policy` on validation at `budget` x the full network's MACs and export the
    trained edge network cut after `split` (None: `default(network)`) into `out_dir`."""
    trained = ctx.edge()
    model = trained.model.eval()
    split = default(trained) if split is None else split
    if not 0 <= split < model.num_stages - 1:
        raise CliError(f"--split must be a stage index in 0..{model.num_stages - 2}, got {split}")
    if not 0 < budget <= 1:
        raise CliError(f"--budget is a fraction of the full network's MACs in (0, 1], got {budget}")
    costs = ctx.costs(trained)
    full = float(costs.total_macs)
    stats = ctx.outputs(trained, "train_stats") if policy == "bof_beta" else None
    inputs = FitInputs(ctx.outputs(trained, "val"), costs.exit_ladder(), stats)
    fitted = fit_policy(policy, inputs, FitOptions(budget=budget * full))
    entry = describe_fit(fitted, inputs, full)
    entry["budget_frac"] = budget
    v = entry["validation"]
    log(f"policy {policy} at {budget} x full MACs: validation acc {v['acc']:.4f} at {v['cost_frac']:.3f} x full")
    path = export_bundle(out_dir / "bundle", model, trained.meta, split=split, policy=fitted,
                         input_shape=ctx.input_shape, name=trained.meta.model.arch, calibration=v)
    return SplitBundle(path, trained, fitted, split, entry)


def normalized(trained: Trained, data: ArraySet) -> torch.Tensor:
    return Normalize(trained.meta.mean, trained.meta.std)(torch.from_numpy(data.images))


def reference_answers(bundle: SplitBundle, data: ArraySet, *, batch_size: int = 500) -> tuple[np.ndarray, np.ndarray]:
    """(label, exit stage) per row of the whole network under the bundle's policy, in this
    process: what a split run must reproduce."""
    model = bundle.trained.model.eval()
    runner = ExitRunner(model, bundle.policy, num_classes=len(bundle.trained.meta.classes))
    stages = np.asarray(runner.exit_stages)
    labels = np.full(len(data), -1, dtype=np.int64)
    exits = np.full(len(data), -1, dtype=np.int64)
    for start in range(0, len(data), batch_size):
        x = normalized(bundle.trained, data.subset(np.arange(start, min(start + batch_size, len(data)))))
        merged = runner.run(x).merged()
        assert merged is not None  # the final head answers every row
        rows = merged.rows + start
        labels[rows] = merged.probs.argmax(-1)
        exits[rows] = stages[merged.exit_index]
    return labels, exits


def pending_rows(bundle: SplitBundle, data: ArraySet, *, batch_size: int = 500) -> Pending:
    """The rows of `data` that the bundle's edge part leaves undecided, with their feature
    at the split and their policy state: exactly what edge agents offload."""
    edge = bundle.edge()
    runner = ExitRunner(edge.model, edge.policy, num_classes=len(edge.classes), network=edge.network)
    parts: list[Pending] = []
    for start in range(0, len(data), batch_size):
        index = np.arange(start, min(start + batch_size, len(data)))
        pending = runner.run(normalized(bundle.trained, data.subset(index)), stop=edge.split).pending
        if pending is not None:
            parts.append(Pending(pending.rows + start, pending.feature, pending.state))
    if not parts:
        raise CliError("the policy answers every test row on the edge: nothing reaches the cloud "
                       "(raise --budget or choose another --split)")
    return Pending(np.concatenate([p.rows for p in parts]), torch.cat([p.feature for p in parts]),
                   RowState.cat([p.state for p in parts]))


class WorkerThread:
    """A cloud worker (`build_server`) on an event loop of its own in a daemon thread, so
    that a benchmark's own loop (an edge agent's, a timer's) never shares it.

    Use as a context manager; `address` is where it listens (127.0.0.1, a free port).
    """

    def __init__(self, config: ServerConfig, models: Mapping[tuple[str, str], ServedModel]) -> None:
        self._config = config
        self._models = models
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="splitexit-bench-worker", daemon=True)
        self._server: CloudServer | None = None

    @property
    def server(self) -> CloudServer:
        if self._server is None:
            raise RuntimeError("the worker is not started")
        return self._server

    @property
    def address(self) -> str:
        return self.server.address

    def call(self, coro: Coroutine[Any, Any, T], timeout: float | None = 120.0) -> T:
        """Run a coroutine on the worker's loop and wait for its result."""
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout)

    async def _start(self) -> CloudServer:
        server = build_server(self._config, self._models)  # inside the loop that runs it
        await server.start()
        return server

    def __enter__(self) -> "WorkerThread":
        self._thread.start()
        try:
            self._server = self.call(self._start())
        except BaseException:
            self._shutdown()
            raise
        return self

    def _shutdown(self) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(30)
        if not self._thread.is_alive():
            self._loop.close()

    def __exit__(self, *exc: object) -> None:
        try:
            if self._server is not None:
                self.call(self._server.stop(), timeout=60)
        finally:
            self._shutdown()
