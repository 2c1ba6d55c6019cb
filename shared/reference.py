"""The reference models on CIFAR-10 that the benchmarks share.

One place names their configurations, so `splitexit bench ...` and `splitexit bench models`
hit the same training cache entries (keyed by configuration): whichever runs first trains,
the others load.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

from splitexit.data import Dataset
from splitexit.models import ModelConfig, MultiExitNet
from splitexit.checkpoint import CheckpointMeta
from splitexit.train import TrainConfig, train_cached

# The edge-size network: ResNet-20 with BoF exits after blocks 2, 4, 6 and 8, trained jointly.
EDGE_MODEL = ModelConfig(arch="resnet20", exit_after=(2, 4, 6, 8), exit_head="bof")
EDGE_TRAIN = TrainConfig(epochs=30, exit_weight=0.5, distill=0.5)

# The larger cloud network of the cascade: ResNet-20 at twice the width, no exits.
CLOUD_MODEL = ModelConfig(arch="resnet20x2", exit_after=())
CLOUD_TRAIN = TrainConfig(epochs=12)

# Exit heads alone on the trained edge backbone (frozen), at every block: BoF vs pooling.
HEAD_EXITS = (1, 2, 3, 4, 5, 6, 7, 8)
HEAD_TRAIN = TrainConfig(mode="exits", epochs=8, lr=0.05, weight_decay=1e-4)


@dataclass(frozen=True)
class Trained:
    model: MultiExitNet
    meta: CheckpointMeta
    path: Path


def quick(cfg: TrainConfig) -> TrainConfig:
    """The `--quick` form of a training config: one epoch (used on small data by CI)."""
    return replace(cfg, epochs=1)


def train_edge(dataset: Dataset, cache_dir: Path, *, epochs: int | None = None, threads: int | None = None) -> Trained:
    cfg = replace(EDGE_TRAIN, epochs=epochs or EDGE_TRAIN.epochs, threads=threads)
    return Trained(*train_cached(EDGE_MODEL, cfg, dataset, cache_dir=cache_dir))


def train_cloud(dataset: Dataset, cache_dir: Path, *, epochs: int | None = None, threads: int | None = None) -> Trained:
    cfg = replace(CLOUD_TRAIN, epochs=epochs or CLOUD_TRAIN.epochs, threads=threads)
    return Trained(*train_cached(CLOUD_MODEL, cfg, dataset, cache_dir=cache_dir))


def train_head_variant(dataset: Dataset, cache_dir: Path, edge: Trained, head: str, *, epochs: int | None = None,
                       threads: int | None = None) -> Trained:
    """Exit heads of kind `head` ("bof" or "pool") at every block of the frozen edge backbone."""
    model_cfg = replace(EDGE_MODEL, exit_after=HEAD_EXITS, exit_head=head)
    cfg = replace(HEAD_TRAIN, epochs=epochs or HEAD_TRAIN.epochs, threads=threads)
    return Trained(*train_cached(model_cfg, cfg, dataset, cache_dir=cache_dir, init=edge.path))
