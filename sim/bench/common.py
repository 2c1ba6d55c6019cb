"""What every benchmark needs: the recipe's data and models, cached exit outputs, ladders."""

from __future__ import annotations

import argparse
import os
import platform
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from splitexit.cli import CliError
from splitexit.cost import CostModel, cost_model
from splitexit.data import ArraySet, Dataset, Normalize
from splitexit.evaluate import ExitOutputs, cached_exit_outputs
from splitexit.reference import Recipe, Trained, recipe

STAT_SAMPLES = 5000  # training samples behind BoF's per-exit statistics (METHODS.md §1)


def log(message: str) -> None:
    print(message, flush=True)


def add_untrained_argument(parser: argparse.ArgumentParser) -> None:
    """`--untrained`, for benchmarks that only time the network (speed does not depend on
    the weights' values): no training run before the measurement."""
    parser.add_argument("--untrained", action="store_true",
                        help="time the recipe's edge network with its initial weights instead of training it first "
                             "(timing does not depend on the weights; accuracies in the output are meaningless)")


@dataclass
class BenchContext:
    recipe: Recipe
    cache_dir: Path
    out: Path
    quick: bool
    threads: int | None
    untrained: bool = False  # the edge network with its initial weights (timing benches' --untrained)
    _dataset: Dataset | None = None

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> "BenchContext":
        rec = recipe(args.quick, args.data)
        if not args.quick and args.data is None and not Path(rec.data).exists():
            raise CliError(f"reference data not found at {rec.data}: give --data PATH (or use --quick)")
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        return cls(rec, Path(args.cache_dir), out, bool(args.quick), args.threads,
                   untrained=bool(getattr(args, "untrained", False)))

    @property
    def dataset(self) -> Dataset:
        if self._dataset is None:
            log(f"data: {self.recipe.data}")
            self._dataset = self.recipe.load_data(self.cache_dir)
        return self._dataset

    @property
    def input_shape(self) -> tuple[int, int, int]:
        d = self.dataset
        return (d.in_chans, d.image_size, d.image_size)

    def edge(self) -> Trained:
        if self.untrained:
            log(f"edge network: {self.recipe.edge_model.arch}, untrained (initial weights: timing only)")
            return self.recipe.untrained_edge(self.dataset)
        log(f"edge network: {self.recipe.edge_model.arch} (trains once, then cached)")
        return self.recipe.train_edge(self.dataset, self.cache_dir, threads=self.threads)

    def cloud(self) -> Trained:
        log(f"cloud network: {self.recipe.cloud_model.arch} (trains once, then cached)")
        return self.recipe.train_cloud(self.dataset, self.cache_dir, threads=self.threads)

    def outputs(self, trained: Trained, split: str) -> ExitOutputs:
        """Every exit's probabilities over "val", "test" or "train_stats" (a fixed 5,000
        of the training split, for per-exit training statistics)."""
        data = self.stat_samples() if split == "train_stats" else getattr(self.dataset, split)
        normalize = Normalize(trained.meta.mean, trained.meta.std)
        return cached_exit_outputs(trained.model, data, normalize, cache_dir=self.cache_dir, tag=split)

    def stat_samples(self) -> ArraySet:
        train = self.dataset.train
        rng = np.random.default_rng(0)
        return train.subset(np.sort(rng.permutation(len(train))[: min(STAT_SAMPLES, len(train))]))

    def costs(self, trained: Trained, *, measure: bool = False, batch_size: int = 1) -> CostModel:
        return cost_model(trained.model, self.input_shape, measure=measure, batch_size=batch_size)

    def machine(self) -> dict[str, object]:
        import torch

        return {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                "torch": torch.__version__, "threads": torch.get_num_threads()}


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now (for a worker process told to listen there)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])
