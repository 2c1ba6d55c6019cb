"""MultiExitNet: ordered stages, exit heads after chosen stages, and a final head.

Parameter names are the checkpoint format and never change: `stages.N` (N = stage
index), `exits.N` (the exit after stage N), `head` (the final classifier), and
`exit_classifier` (the classifier shared by hierarchical BoF exits).

A split "after stage k" puts stages 0..k (and the exits after them) on the edge and the
rest on the cloud: `split_head(k)` / `split_tail(k)`, with
`split_tail(k)(split_head(k)(x)) == model(x)`. (`head` is taken by the final classifier,
hence the `split_` prefix.)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Mapping, Sequence

import torch
from torch import nn


def _scaled_gradient(x: torch.Tensor, scale: float) -> torch.Tensor:
    """`x` itself forward; backward, the gradient through this alias is scaled by `scale`.
    A hook on a view costs one multiply in the backward pass, where `x.detach() + scale *
    (x - x.detach())` cost elementwise passes both ways (a training step of the reference
    edge network at 32 px: 316 ms median, the same as without exit_grad, against 332 ms)."""
    alias = x.view_as(x)
    if alias.requires_grad:
        alias.register_hook(lambda grad: grad * scale)
    return alias


@dataclass(frozen=True)
class StageInfo:
    """timm-like feature_info entry for one stage's output."""

    num_chs: int
    reduction: int  # input side / output side
    module: str  # e.g. "stages.3"


class MultiExitNet(nn.Module):
    def __init__(
        self,
        stages: Sequence[nn.Module],
        feature_info: Sequence[StageInfo],
        head: nn.Module,
        exits: Mapping[int, nn.Module] | None = None,
        *,
        exit_classifier: nn.Module | None = None,
    ) -> None:
        super().__init__()
        if len(stages) != len(feature_info):
            raise ValueError(f"{len(stages)} stages but {len(feature_info)} feature_info entries")
        exits = dict(exits or {})
        bad = [k for k in exits if not 0 <= k < len(stages) - 1]
        if bad:
            raise ValueError(f"exit points {bad} out of range: an exit sits after stage 0..{len(stages) - 2}")
        self.stages = nn.ModuleList(stages)
        self.feature_info = list(feature_info)
        self.exits = nn.ModuleDict({str(k): exits[k] for k in sorted(exits)})
        self.head = head
        # Hierarchical BoF: exits yield histograms that are averaged along depth and
        # classified by one shared classifier (same histogram space at every exit).
        self.exit_classifier = exit_classifier

    # --- structure -----------------------------------------------------------------
    @property
    def num_stages(self) -> int:
        return len(self.stages)

    @property
    def exit_points(self) -> list[int]:
        """Stage indices that carry an exit head, ascending (the final head not included)."""
        return [int(k) for k in self.exits]

    @property
    def num_exits(self) -> int:
        """K: the exit heads plus the final head."""
        return len(self.exits) + 1

    def _check_split(self, k: int) -> None:
        if not 0 <= k < self.num_stages:
            raise ValueError(f"split point {k} out of range 0..{self.num_stages - 1}")

    # --- forward passes --------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Final-head logits of the backbone (no exits evaluated)."""
        for stage in self.stages:
            x = stage(x)
        return self.head(x)

    def forward_intermediates(
        self, x: torch.Tensor, indices: Iterable[int] | None = None, *, stop_early: bool = False
    ) -> tuple[torch.Tensor | None, list[torch.Tensor]]:
        """Run the stages, returning (final logits, [outputs of the stages in `indices`]).

        With stop_early the run ends after the last requested stage and the logits are
        None: that is exactly "run the edge part".
        """
        wanted = sorted(set(range(self.num_stages) if indices is None else indices))
        for k in wanted:
            self._check_split(k)
        last = wanted[-1] if (stop_early and wanted) else self.num_stages - 1
        features: list[torch.Tensor] = []
        for i in range(last + 1):
            x = self.stages[i](x)
            if i in wanted:
                features.append(x)
        return (None if stop_early else self.head(x)), features

    def exit_logits(self, k: int, feature: torch.Tensor, state: list[torch.Tensor] | None = None) -> torch.Tensor:
        """Logits of the exit after stage k from that stage's output.

        `state` carries the running histograms of hierarchical exits (pass the same
        list along depth); plain exits ignore it.
        """
        exit_head = self.exits[str(k)]
        if self.exit_classifier is None:
            return exit_head(feature)
        hist = exit_head(feature)
        if state is None:
            return self.exit_classifier(hist)
        state.append(hist)
        return self.exit_classifier(torch.stack(state).mean(0))

    def forward_exits(self, x: torch.Tensor, *, exit_grad: float = 1.0) -> list[torch.Tensor]:
        """Logits of every exit in order, the final head last: K tensors [B, C].

        `exit_grad` scales the gradient that the exits send back into the stages (their
        own heads get it whole); the values are unchanged.
        """
        outputs: list[torch.Tensor] = []
        state: list[torch.Tensor] = []
        for i, stage in enumerate(self.stages):
            x = stage(x)
            if str(i) in self.exits:
                outputs.append(self.exit_logits(i, x if exit_grad == 1.0 else _scaled_gradient(x, exit_grad), state))
        outputs.append(self.head(x))
        return outputs

    # --- split ---------------------------------------------------------------------
    def split_head(self, k: int) -> "NetPart":
        """Stages 0..k and the exits after them: the edge part (shares parameters)."""
        self._check_split(k)
        return NetPart(self, range(0, k + 1), with_head=False)

    def split_tail(self, k: int) -> "NetPart":
        """Stages k+1.. , their exits and the final head: the cloud part."""
        self._check_split(k)
        return NetPart(self, range(k + 1, self.num_stages), with_head=True)


class NetPart(nn.Module):
    """A contiguous slice of a MultiExitNet whose parameter names match the full net's
    (`stages.N`, `exits.N`, `head`), so its state_dict is a subset of the full one."""

    def __init__(self, net: MultiExitNet, stage_range: range, *, with_head: bool) -> None:
        super().__init__()
        self.stage_indices = list(stage_range)
        self.stages = nn.ModuleDict({str(i): net.stages[i] for i in self.stage_indices})
        self.exits = nn.ModuleDict({k: m for k, m in net.exits.items() if int(k) in self.stage_indices})
        self.exit_classifier = net.exit_classifier if len(self.exits) else None
        self.head = net.head if with_head else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for stage in self.stages.values():
            x = stage(x)
        return x if self.head is None else self.head(x)
