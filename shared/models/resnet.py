"""CIFAR-style ResNets (He et al. 2016, §4.2) cut into one stage per residual block.

Stage 0 is the stem (3x3 conv, BN, ReLU); stages 1..3n are the basic blocks, so a
ResNet-20 has 10 stages and 9 exit points after its blocks.
"""

from __future__ import annotations

import torch
from torch import nn

from splitexit.models.multi_exit import StageInfo


class BasicBlock(nn.Module):
    def __init__(self, in_chs: int, out_chs: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_chs, out_chs, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_chs)
        self.conv2 = nn.Conv2d(out_chs, out_chs, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_chs)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_chs != out_chs:
            # projection shortcut (option B): one tensor still crosses each block boundary
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_chs, out_chs, 1, stride=stride, bias=False), nn.BatchNorm2d(out_chs)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return torch.relu(out + self.shortcut(x))


class Stem(nn.Sequential):
    def __init__(self, in_chans: int, width: int) -> None:
        super().__init__(nn.Conv2d(in_chans, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU())


class ClassifierHead(nn.Module):
    """Global average pool + linear: the final head."""

    def __init__(self, in_chs: int, num_classes: int) -> None:
        super().__init__()
        self.fc = nn.Linear(in_chs, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))


def resnet_stages(
    *, depth: int, widths: tuple[int, ...], in_chans: int
) -> tuple[list[nn.Module], list[StageInfo]]:
    """Stem + basic blocks of a CIFAR ResNet of `depth` = 6n + 2 (for 3 widths)."""
    per_stage, rest = divmod(depth - 2, 2 * len(widths))
    if rest or per_stage < 1:
        raise ValueError(f"depth must be {2 * len(widths)}n + 2 for {len(widths)} widths, got {depth}")
    stages: list[nn.Module] = [Stem(in_chans, widths[0])]
    info = [StageInfo(widths[0], 1, "stages.0")]
    in_chs, reduction = widths[0], 1
    for group, width in enumerate(widths):
        for block in range(per_stage):
            stride = 2 if (group > 0 and block == 0) else 1
            reduction *= stride
            stages.append(BasicBlock(in_chs, width, stride))
            info.append(StageInfo(width, reduction, f"stages.{len(stages) - 1}"))
            in_chs = width
    return stages, info
