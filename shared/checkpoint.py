"""Checkpoints: weights in safetensors (never pickle) with a JSON metadata block that
holds everything needed to rebuild the model and its input normalization."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from splitexit.models import ModelConfig, MultiExitNet, build_model

META_KEY = "splitexit"


class CheckpointError(ValueError):
    """A checkpoint that is missing, corrupt or does not fit its model."""


@dataclass(frozen=True, kw_only=True)
class CheckpointMeta:
    model: ModelConfig
    mean: tuple[float, ...]
    std: tuple[float, ...]
    classes: tuple[str, ...]
    extra: dict[str, Any] = field(default_factory=dict)  # training config, history, timings

    def to_json(self) -> str:
        return json.dumps(
            {"model": self.model.to_dict(), "mean": self.mean, "std": self.std, "classes": self.classes,
             "extra": self.extra}
        )

    @classmethod
    def from_json(cls, text: str) -> "CheckpointMeta":
        data = json.loads(text)
        return cls(model=ModelConfig.from_dict(data["model"]), mean=tuple(data["mean"]), std=tuple(data["std"]),
                   classes=tuple(data["classes"]), extra=data.get("extra", {}))


def save_checkpoint(path: str | Path, model: MultiExitNet, meta: CheckpointMeta) -> Path:
    """Write atomically: a crash never leaves a half-written checkpoint under `path`."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp), metadata={META_KEY: meta.to_json()})
    os.replace(tmp, path)
    return path


def read_meta(path: str | Path) -> CheckpointMeta:
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
    except Exception as exc:  # safetensors raises its own error types for bad headers
        raise CheckpointError(f"{path}: not a readable safetensors checkpoint ({exc})") from exc
    if META_KEY not in meta:
        raise CheckpointError(f"{path}: safetensors file without splitexit metadata")
    try:
        return CheckpointMeta.from_json(meta[META_KEY])
    except (KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(f"{path}: bad splitexit metadata ({exc})") from exc


def load_checkpoint(path: str | Path) -> tuple[MultiExitNet, CheckpointMeta]:
    """The model (in eval mode) and its metadata."""
    from safetensors.torch import load_file

    meta = read_meta(path)
    model = build_model(meta.model)
    try:
        state = load_file(str(path))
    except Exception as exc:
        raise CheckpointError(f"{path}: corrupt tensor data ({exc})") from exc
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise CheckpointError(f"{path}: weights do not fit {meta.model.arch}: {str(exc).splitlines()[0]}") from exc
    return model.eval(), meta


def load_tensors(path: str | Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path))
