"""Multi-exit models: built-in CIFAR ResNets, exit heads, and torch.fx cuts of any module."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from types import MappingProxyType
from typing import Any, Literal, Mapping

from torch import nn

from splitexit.models.heads import BoFConfig, BoFHead, BoFHistogram, HistogramClassifier, PoolLinearHead
from splitexit.models.multi_exit import MultiExitNet, NetPart, StageInfo
from splitexit.models.resnet import ClassifierHead, resnet_stages

__all__ = [
    "ARCHS",
    "ArchSpec",
    "BoFConfig",
    "BoFHead",
    "BoFHistogram",
    "ExitHead",
    "HistogramClassifier",
    "ModelConfig",
    "MultiExitNet",
    "NetPart",
    "PoolLinearHead",
    "StageInfo",
    "build_model",
    "check_exit_after",
    "default_exit_after",
]


@dataclass(frozen=True, kw_only=True)
class ArchSpec:
    """A built-in backbone: a CIFAR ResNet of this depth and these widths."""

    depth: int
    widths: tuple[int, ...]
    role: str  # what it is for, shown by `splitexit train --help`


# Built-in backbones. Read-only: a name means one architecture forever (checkpoints).
ARCHS: Mapping[str, ArchSpec] = MappingProxyType(
    {
        # tiny net for the embedded default (8x8 digits): 6 blocks, 5 exit points
        "resnet14_tiny": ArchSpec(depth=14, widths=(8, 16, 32), role="demo on 8x8 digits"),
        # the edge-size network: ResNet-20, 9 blocks, 8 exit points, ~41 M MACs
        "resnet20": ArchSpec(depth=20, widths=(16, 32, 64), role="edge"),
        # the larger cloud network of the cascade: ResNet-20 at twice the width (~4x MACs)
        "resnet20x2": ArchSpec(depth=20, widths=(32, 64, 128), role="cloud"),
        "resnet32": ArchSpec(depth=32, widths=(16, 32, 64), role="edge, deeper"),
        "resnet56": ArchSpec(depth=56, widths=(16, 32, 64), role="cloud, deep (EENet's)"),
    }
)

ExitHead = Literal["bof", "pool"]


@dataclass(frozen=True, kw_only=True)
class ModelConfig:
    """Everything needed to rebuild a model from its weights (stored in checkpoints)."""

    arch: str = "resnet20"
    num_classes: int = 10
    in_chans: int = 3
    exit_after: tuple[int, ...] = (2, 4, 6, 8)  # stage indices that get an exit head
    exit_head: ExitHead = "bof"
    bof: BoFConfig = field(default_factory=BoFConfig)
    hierarchical: bool = False  # BoF histograms added along depth, one shared classifier

    def __post_init__(self) -> None:
        if self.arch not in ARCHS:
            raise ValueError(f"unknown arch {self.arch!r}; built-in: {', '.join(ARCHS)}")
        if self.exit_head not in ("bof", "pool"):
            raise ValueError(f"exit_head must be 'bof' or 'pool', got {self.exit_head!r}")
        if self.hierarchical and self.exit_head != "bof":
            raise ValueError("hierarchical exits need exit_head='bof'")
        if list(self.exit_after) != sorted(set(self.exit_after)):
            raise ValueError(f"exit_after must be strictly increasing, got {self.exit_after}")
        if self.num_classes < 2 or self.in_chans < 1:
            raise ValueError("num_classes must be >= 2 and in_chans >= 1")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "ModelConfig":
        data = dict(data)
        data["exit_after"] = tuple(data.get("exit_after", ()))
        data["bof"] = BoFConfig(**data.get("bof", {}))
        return cls(**data)


def _num_stages(arch: str) -> int:
    """The stem and the blocks of `resnet_stages`, counted without building them (building
    would draw from torch's random generator and change every seeded model after it)."""
    spec = ARCHS[arch]
    return 1 + (spec.depth - 2) // 2


def default_exit_after(arch: str) -> tuple[int, ...]:
    """Exits after every other stage from stage 2 up to the one before the last: resnet20's
    (2, 4, 6, 8), fitted to any built-in depth."""
    if arch not in ARCHS:
        raise ValueError(f"unknown arch {arch!r}; built-in: {', '.join(ARCHS)}")
    return tuple(range(2, _num_stages(arch) - 1, 2))


def check_exit_after(arch: str, exit_after: tuple[int, ...]) -> None:
    """ValueError unless every exit point is a stage of `arch` before its last (cheap:
    callers check before they decode any data)."""
    if arch not in ARCHS:
        raise ValueError(f"unknown arch {arch!r}; built-in: {', '.join(ARCHS)}")
    last = _num_stages(arch) - 2
    bad = [k for k in exit_after if not 0 <= k <= last]
    if bad:
        raise ValueError(f"{arch} has exit points 0..{last} (default {list(default_exit_after(arch))}); got {bad}")


def build_model(config: ModelConfig) -> MultiExitNet:
    """A built-in backbone with exit heads sized from its feature_info."""
    spec = ARCHS[config.arch]
    stages, info = resnet_stages(depth=spec.depth, widths=spec.widths, in_chans=config.in_chans)
    check_exit_after(config.arch, config.exit_after)
    exits: dict[int, nn.Module] = {}
    for k in config.exit_after:
        chs = info[k].num_chs
        if config.hierarchical:
            exits[k] = BoFHistogram(chs, config.bof)
        elif config.exit_head == "bof":
            exits[k] = BoFHead(chs, config.num_classes, config.bof)
        else:
            exits[k] = PoolLinearHead(chs, config.num_classes)
    shared = HistogramClassifier(config.bof, config.num_classes) if config.hierarchical else None
    return MultiExitNet(
        stages, info, ClassifierHead(info[-1].num_chs, config.num_classes), exits, exit_classifier=shared
    )
