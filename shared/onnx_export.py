"""The edge part of a bundle as ONNX graphs, one segment per exit (what `OnnxEngine` runs).

Segment k runs the stages after exit k-1's stage up to exit k's stage, then exit k's head,
and returns (feature, probabilities); the last segment ends at the split and returns the
feature alone (or, when the split is an exit's stage, that exit's probabilities too). A
row that exits never enters the next segment: compute skipping survives the export. When
the split is an exit's stage, that exit's head is also exported alone (`head-S.onnx`):
the edge's fallback answer for rows that skipped it (Predictive Exit).

Exported with the `torch.onnx` exporter (dynamo, needs `onnx` and `onnxscript`) at opset
18 with a dynamic batch dimension. What it took:
- Logistic BoF heads (global, or 2x2 on an even map) are exported in an equivalent form
  built for the graph (`_BoFExport`):
  average pooling, a 1x1 convolution with the kernel's scalars folded in (ORT fuses the
  sigmoid into it and keeps it in its NCHWc layout), then the classifier before the
  normalization (a second 1x1 convolution to the class scores and the memberships' sum,
  their ratio summed over pixels): eight graph nodes where the training form's
  strided-slice pooling and batched matmuls gave 15-25, and every op after the codebook
  on C+1 channels instead of K. Head alone, against the form before it (normalize the
  K memberships, mean, linear), measured interleaved on a 2-core x86 VM: 13% faster at
  batch 1, 6-9% at 8-64.
- Other heads are traced as they are, with a batch of 2: `_pool_sum` takes a batch-1
  shortcut that would pin the batch dimension.
- `BoFHistogram` caches folded weights outside training: cleared around the trace so
  that neither a stale tensor is baked in nor a tracing tensor is left for eager use.
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from splitexit.manifest import OnnxSegment, sha256_file
from splitexit.models import BoFConfig, BoFHead, BoFHistogram, MultiExitNet

__all__ = ["OPSET", "ExportError", "export_edge_segments", "export_plain"]

OPSET = 18  # torch.onnx's native opset in torch 2.13 (others are version-converted)
MAX_BATCH = 4096


class ExportError(ValueError):
    """The edge part cannot be exported as ONNX segments."""


class _BoFExport(nn.Module):
    """A logistic BoF head (histogram + classifier) as ONNX Runtime runs it fast; the same
    function as `BoFHead.forward`, within float rounding.

    The histogram is mean_hw(s / (sum_k s + eps)) with s the codeword memberships, and the
    classifier is linear, so the classifier goes first: one 1x1 convolution maps s to
    the class scores per pixel plus the memberships' sum (+ eps, its bias), and the
    normalization divides those C+1 channels, not the K codewords: every op after the
    codebook touches C+1 channels instead of K. A 2x2 head has one block of C scores per
    cell (the classifier's columns for that cell's histogram, a quarter of its bias each):
    4C+1 channels, averaged over each cell, each block kept at its own cell."""

    own_cell: torch.Tensor

    def __init__(self, head: BoFHead, side: int) -> None:
        super().__init__()
        bof, cfg = head.bof, head.bof.config
        self.pool = _pool_factor(cfg, side)
        if side % self.pool:
            raise ExportError(f"a BoF head pooling a {side}-side map to {cfg.pool_to} (not a divisor)")
        assert bof.codebook.bias is not None
        pooled = side // self.pool
        self.grid = cfg.spatial == "2x2"
        cells = 4 if self.grid else 1
        # global: the ratio is summed over pixels, so the scores carry 1 / pixels; 2x2: each
        # cell's block is averaged over the cell's pixels by a pooling, nothing to carry
        pixels = 1 if self.grid else pooled ** 2
        self.classes = head.fc.out_features
        with torch.no_grad():
            d, k = bof.codebook.in_channels, bof.codebook.out_channels
            self.codebook = nn.Conv2d(d, k, 1)
            assert self.codebook.bias is not None
            self.codebook.weight.copy_(bof.codebook.weight * (2 * bof.a))  # tanh kernel = sigmoid of 2x
            self.codebook.bias.copy_(2 * (bof.a * bof.codebook.bias + bof.c))
            # channels 0..C-1: (W s + b (sum s + eps)) / pixels; channel C: sum s + eps. Their
            # ratio summed over pixels is W mean_hw(s / (sum s + eps)) + b, the head's logits.
            # the classifier's column k * cells + c reads codeword k of cell c
            weight = (head.fc.weight * head.fc.scale).view(self.classes, k, cells).permute(2, 0, 1)  # [cells, C, K]
            bias = (head.fc.bias / cells).expand(cells, -1)  # [cells, C]
            blocks = (weight + bias[..., None]).reshape(cells * self.classes, k) / pixels
            self.scores = nn.Conv2d(k, cells * self.classes + 1, 1)
            assert self.scores.bias is not None
            self.scores.weight.copy_(torch.cat([blocks, torch.ones(1, k)])[:, :, None, None])
            self.scores.bias.copy_(torch.cat([bias.reshape(-1) * cfg.eps / pixels, torch.full((1,), cfg.eps)]))
        if self.grid:
            self.cell_side = pooled // 2
            self.register_buffer("own_cell", torch.eye(4)[None, :, None, :], persistent=False)  # [1, block, 1, cell]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.pool > 1:
            x = F.avg_pool2d(x, self.pool)
        t = self.scores(torch.sigmoid(self.codebook(x)))
        channels = t.shape[1] - 1
        ratio = t[:, :channels] / t[:, channels:]
        if not self.grid:
            return ratio.sum(dim=(2, 3))
        per_cell = F.avg_pool2d(ratio, self.cell_side).reshape(-1, 4, self.classes, 4)  # [B, block, C, cell]
        return (per_cell * self.own_cell).sum(dim=(1, 3))


def _head_for_export(model: MultiExitNet, stage: int, side: int) -> nn.Module:
    """Exit `stage`'s head (the final head after the last stage) in its export form."""
    if stage == model.num_stages - 1:
        return model.head
    head = model.exits[str(stage)]
    if model.exit_classifier is not None:
        raise ExportError("hierarchical BoF exits carry histograms along depth: not exported")
    cfg = getattr(head, "config", None)
    if isinstance(head, BoFHead) and cfg is not None and cfg.kernel == "logistic" and _fits_export_form(cfg, side):
        return _BoFExport(head, side)
    return head  # traced as it is


def _pool_factor(cfg: BoFConfig, side: int) -> int:
    """The average pooling's kernel that takes a `side` map down to the head's `pool_to`."""
    return side // cfg.pool_to if cfg.pool_to is not None and side > cfg.pool_to else 1


def _fits_export_form(cfg: BoFConfig, side: int) -> bool:
    """Global heads always; 2x2 heads where the pooled map splits into four equal cells
    (adaptive pooling's overlapping cells are traced as they are)."""
    return cfg.spatial == "global" or (side // _pool_factor(cfg, side)) % 2 == 0


class _Segment(nn.Module):
    def __init__(self, stages: Sequence[nn.Module], head: nn.Module | None) -> None:
        super().__init__()
        self.stages = nn.ModuleList(stages)
        self.head = head

    def forward(self, x: torch.Tensor) -> Any:
        for stage in self.stages:
            x = stage(x)
        if self.head is None:
            return x
        return x, torch.softmax(self.head(x).float(), dim=-1)


class _HeadAlone(nn.Module):
    def __init__(self, head: nn.Module) -> None:
        super().__init__()
        self.head = head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.softmax(self.head(x).float(), dim=-1)


def _clear_bof_caches(model: nn.Module) -> None:
    for module in model.modules():
        if isinstance(module, BoFHistogram):
            module._cache = None


def _export(module: nn.Module, model: MultiExitNet, input_shape: tuple[int, ...], path: Path,
            outputs: list[str]) -> None:
    example = torch.randn(2, *input_shape)  # batch 2: batch 1 would pin the dimension (see module doc)
    _clear_bof_caches(model)
    logging.getLogger("torch.onnx").setLevel(logging.ERROR)
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the exporter's deprecation notices, not ours to act on
            torch.onnx.export(module.eval(), (example,), str(path), dynamo=True,
                              dynamic_shapes=({0: torch.export.Dim("batch", min=1, max=MAX_BATCH)},),
                              input_names=["x"], output_names=outputs, opset_version=OPSET,
                              external_data=False, optimize=True, verbose=False)
    except Exception as exc:  # the exporter raises many types; all mean "this graph did not export"
        raise ExportError(f"ONNX export of {path.name} failed: {type(exc).__name__}: {str(exc)[:300]}") from exc
    finally:
        _clear_bof_caches(model)


def export_edge_segments(model: MultiExitNet, split: int | Sequence[int], input_shape: tuple[int, ...],
                         out_dir: Path, *, heads: bool = True) -> list[OnnxSegment]:
    """Write the edge part (stages 0..split and their exits) of `model` as ONNX segments
    into `out_dir`; returns them in run order (the heads alone last, when there are any).

    `split` may be several split points: the segments then end at every exit up to the
    deepest and at every split, so that a run can stop at any of them. A split at the last
    stage puts the whole network on the device: the last segment ends with the final
    head. `heads=False` writes the same runs of stages without their exit heads (a
    benchmark's baseline: what the heads add inside the segments)."""
    try:
        import onnx  # noqa: F401 - the exporter needs it (and onnxscript); say so plainly
        import onnxscript  # noqa: F401
    except ImportError as exc:
        raise ExportError(f"exporting ONNX segments needs {exc.name}: pip install onnx onnxscript") from exc
    model = model.eval()
    splits = sorted({split} if isinstance(split, int) else set(split))
    if not splits or not 0 <= splits[0] or splits[-1] >= model.num_stages:
        raise ExportError(f"split must be a stage index in 0..{model.num_stages - 1}, got {split}")
    deepest = splits[-1]
    exits = [stage for stage in model.exit_points if stage <= deepest]
    if deepest == model.num_stages - 1:
        exits.append(deepest)  # the final head
    ends = sorted({*exits, *splits})
    shapes: dict[int, tuple[int, ...]] = {-1: tuple(input_shape)}
    with torch.no_grad():
        _, feats = model.forward_intermediates(torch.zeros(1, *input_shape), indices=ends, stop_early=True)
    shapes.update({stage: tuple(f.shape[1:]) for stage, f in zip(ends, feats)})
    files: list[OnnxSegment] = []
    first = 0
    for last in ends:
        final = last == model.num_stages - 1  # the final head stays in a heads=False baseline
        head = _head_for_export(model, last, shapes[last][-1]) if (heads or final) and last in exits else None
        segment = _Segment([model.stages[i] for i in range(first, last + 1)], head)
        name = f"edge-{first}-{last}{'' if heads else '-stages'}.onnx"
        in_shape = shapes[first - 1]  # the previous segment's output (-1: the network's input)
        _export(segment, model, in_shape, out_dir / name, ["feature", "probs"] if head else ["feature"])
        files.append(OnnxSegment(name, first, last, head is not None, in_shape, sha256_file(out_dir / name)))
        first = last + 1
    for cut in splits:  # the fallback for rows that skipped the exit at a cut
        if heads and cut in exits and cut < model.num_stages - 1:
            name = f"head-{cut}.onnx"
            _export(_HeadAlone(_head_for_export(model, cut, shapes[cut][-1])), model, shapes[cut],
                    out_dir / name, ["probs"])
            files.append(OnnxSegment(name, -1, cut, True, shapes[cut], sha256_file(out_dir / name)))
    return files


def export_plain(model: MultiExitNet, input_shape: tuple[int, ...], path: Path) -> None:
    """The whole network without exits (every stage, the final head, softmax) as one graph:
    the baseline the exits' cost is measured against."""
    _export(_HeadAlone(nn.Sequential(*model.stages, model.head)), model, input_shape, path, ["probs"])
