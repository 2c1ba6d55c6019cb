"""Multi-exit models: built-in CIFAR ResNets, exit heads, and torch.fx cuts of any module."""

from __future__ import annotations

import importlib
import os
import sys
from dataclasses import asdict, dataclass, field
from types import MappingProxyType
from typing import Any, Callable, Literal, Mapping

import torch
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
    "load_factory",
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
    """Everything needed to rebuild a model from its weights (stored in checkpoints).

    A built-in backbone is named by `arch`. A network of the user's own is named by
    `module`, the import path of a factory ("package.module:function", called as
    `function(num_classes=..., in_chans=...)` and returning an `nn.Module` whose output
    is the logits), and cut into stages after the torch.fx nodes `cut_after`; `arch` is
    then only its label. The code travels as that import path, never as a pickle: every
    process that rebuilds the torch model (training, the cloud worker) must be able to
    import it; the ONNX edge does not need it."""

    arch: str = "resnet20"
    num_classes: int = 10
    in_chans: int = 3
    exit_after: tuple[int, ...] = (2, 4, 6, 8)  # stage indices that get an exit head
    exit_head: ExitHead = "bof"
    bof: BoFConfig = field(default_factory=BoFConfig)
    hierarchical: bool = False  # BoF histograms added along depth, one shared classifier
    module: str = ""  # "package.module:factory" of a user's network; "" = the built-in `arch`
    cut_after: tuple[str, ...] = ()  # with `module`: the torch.fx node names it is cut after
    input_size: int = 0  # with `module`: the input's side in pixels (traces the stages' shapes)

    def __post_init__(self) -> None:
        if self.module:
            if not self.cut_after or self.input_size < 1:
                raise ValueError("a network of your own (module) needs cut_after (node names) and input_size")
            if self.hierarchical:
                raise ValueError("hierarchical exits need a built-in backbone")
            if any(not 0 <= k < len(self.cut_after) for k in self.exit_after):
                raise ValueError(f"{self.arch} cut after {len(self.cut_after)} nodes has exit points "
                                 f"0..{len(self.cut_after) - 1}; got {list(self.exit_after)}")
        elif self.arch not in ARCHS:
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
        """Plain data; the fields of a network of one's own only when it is one, so that a
        built-in network's dict (and the training cache key made from it) is what it was
        before those fields existed."""
        data = asdict(self)
        if not self.module:
            for name in ("module", "cut_after", "input_size"):
                del data[name]
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "ModelConfig":
        data = dict(data)
        data["exit_after"] = tuple(data.get("exit_after", ()))
        data["cut_after"] = tuple(data.get("cut_after", ()))
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


def load_factory(path: str) -> Callable[..., nn.Module]:
    """The factory named by "package.module:function". The module is imported as usual;
    failing that, from the current folder too (as `python -m` would find it)."""
    name, sep, attr = path.partition(":")
    if not sep or not name or not attr:
        raise ValueError(f"a network of your own is named 'package.module:factory', got {path!r}")
    try:
        module = importlib.import_module(name)
    except ImportError:
        if os.getcwd() in sys.path:
            raise ValueError(f"cannot import {name!r} (for {path!r}): install it, or put its folder on "
                             f"PYTHONPATH") from None
        sys.path.append(os.getcwd())
        try:
            module = importlib.import_module(name)
        except ImportError as exc:
            raise ValueError(f"cannot import {name!r} (for {path!r}): {exc}; install it, or put its folder on "
                             f"PYTHONPATH") from None
    factory = getattr(module, attr, None)
    if not callable(factory):
        raise ValueError(f"{name} has no function {attr!r} (for {path!r})")
    return factory


def _exit_head(config: ModelConfig, info: StageInfo) -> nn.Module:
    if config.exit_head == "bof":
        return BoFHead(info.num_chs, config.num_classes, config.bof)
    return PoolLinearHead(info.num_chs, config.num_classes)


def _build_own(config: ModelConfig) -> MultiExitNet:
    """The user's network (`config.module`) cut after `config.cut_after`, exits added."""
    from splitexit.models.fx_cut import multi_exit_from_module

    net = load_factory(config.module)(num_classes=config.num_classes, in_chans=config.in_chans)
    if not isinstance(net, nn.Module):
        raise ValueError(f"{config.module} returned a {type(net).__name__}, not a torch.nn.Module")
    example = torch.zeros(2, config.in_chans, config.input_size, config.input_size)
    cut = multi_exit_from_module(net, config.cut_after, example)
    info = list(cut.feature_info)
    return MultiExitNet(list(cut.stages), info, nn.Identity(), {k: _exit_head(config, info[k]) for k in config.exit_after})


def build_model(config: ModelConfig) -> MultiExitNet:
    """A built-in backbone (or the user's network, `config.module`) with exit heads sized
    from its feature_info."""
    if config.module:
        return _build_own(config)
    spec = ARCHS[config.arch]
    stages, info = resnet_stages(depth=spec.depth, widths=spec.widths, in_chans=config.in_chans)
    check_exit_after(config.arch, config.exit_after)
    exits: dict[int, nn.Module] = {}
    for k in config.exit_after:
        exits[k] = BoFHistogram(info[k].num_chs, config.bof) if config.hierarchical else _exit_head(config, info[k])
    shared = HistogramClassifier(config.bof, config.num_classes) if config.hierarchical else None
    return MultiExitNet(
        stages, info, ClassifierHead(info[-1].num_chs, config.num_classes), exits, exit_classifier=shared
    )
