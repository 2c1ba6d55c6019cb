"""Bundles with their torch weights: exporting one, and loading a side of it to run in
torch (the cloud worker, the torch edge engine, planners). The manifest itself, its
checks and the `Bundle` record are `splitexit.manifest` (torch-free); see there for the
directory layout and the hashes.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch

from splitexit.checkpoint import CheckpointMeta
from splitexit.codec import CODECS
from splitexit.manifest import (
    FORMAT, MANIFEST, VERSION, Bundle, BundleError, LargeNetwork, Manifest, Part, WeightFile, sha256_file, checked_file,
    manifest_hash,
)
from splitexit.manifest import read_manifest as _read_manifest
from splitexit.models import MultiExitNet, build_model
from splitexit.policies import ExitPolicy, PolicyError, policy_from_dict, policy_to_dict

__all__ = [
    "Bundle", "BundleError", "LargeNetwork", "Manifest", "NotOnThisSide", "Part", "WeightFile", "export_bundle",
    "has_edge_weights", "load_bundle", "load_whole", "manifest_hash", "on_edge", "read_manifest",
]


class NotOnThisSide(torch.nn.Module):
    """Stands in for a module whose weights the loaded part does not carry (the cloud's
    stages on the edge): no random weights to run by mistake, and a clear error if called."""

    def __init__(self, name: str, part: str) -> None:
        super().__init__()
        self.name, self.part = name, part

    def forward(self, *args: Any) -> torch.Tensor:
        raise BundleError(f"{self.name} is not in the {self.part} part of the bundle")


def on_edge(key: str, split: int, last_stage: int | None = None) -> bool:
    """Does this parameter (`stages.N...`, `exits.N...`, `head...`) belong to the edge part
    of a cut after `split`? A cut at `last_stage` keeps everything on the edge."""
    if last_stage is not None and split >= last_stage:
        return True
    part, _, rest = key.partition(".")
    index = rest.partition(".")[0]
    return part in ("stages", "exits") and index.isdigit() and int(index) <= split


def export_bundle(out: str | Path, model: MultiExitNet, meta: CheckpointMeta, *, split: int, policy: ExitPolicy,
                  input_shape: tuple[int, int, int], name: str = "", codec: str = "fp32", calibration: Mapping[str, Any] | None = None,
                  large: tuple[MultiExitNet, CheckpointMeta] | None = None, network: tuple[int, ...] | None = None,
                  edge_engine: str | None = None, splits: Sequence[int] = ()) -> Path:
    """Write a bundle directory atomically (a temp dir renamed into place). `edge_engine`
    "onnx" also writes the edge part as ONNX segments (`splitexit.onnx_export`), which a
    device runs with ONNX Runtime and no torch. `splits`: further split points the bundle
    allows besides `split` (the agent may move its cut among them; the last stage means
    every stage on the device)."""
    from safetensors.torch import save_file

    out = Path(out)
    if meta.model.hierarchical:
        raise BundleError("hierarchical BoF exits carry running histograms across the split: not supported in bundles")
    last = model.num_stages - 1
    if not 0 <= split < last:
        raise BundleError(f"split must be a stage index in 0..{last - 1}, got {split}")
    bad = [s for s in splits if not 0 <= s <= last]
    if bad:
        raise BundleError(f"splits must be stage indices in 0..{last}, got {bad[0]}")
    allowed = sorted({split, *splits})
    if codec not in CODECS:
        raise BundleError(f"unknown codec {codec!r}; choose one of {', '.join(CODECS)}")
    if edge_engine not in (None, "torch", "onnx"):
        raise BundleError(f"unknown edge engine {edge_engine!r}; choose torch or onnx")
    exits = [*model.exit_points, model.num_stages - 1]
    network = network or ((0,) * len(exits) + ((1,) if large is not None else ()))
    if len(network) != len(exits) + (large is not None):
        raise BundleError(f"policy ladder of {len(network)} exits for a model with {len(exits)} exits"
                          f"{' and a larger network' if large else ''}")
    try:
        policy_entry = policy_to_dict(policy)
    except PolicyError as exc:
        raise BundleError(str(exc)) from exc
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    edge = {k: v for k, v in state.items() if on_edge(k, allowed[-1], last)}  # up to the deepest cut
    cloud = {k: v for k, v in state.items() if not on_edge(k, allowed[0])}  # after the shallowest
    in_shape = tuple(input_shape)
    with torch.no_grad():
        _, feats = model.eval().forward_intermediates(torch.zeros(1, *in_shape), indices=allowed, stop_early=True)
    shapes = {s: list(f.shape[1:]) for s, f in zip(allowed, feats)}
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        save_file(edge, str(tmp / "edge.safetensors"))
        save_file(cloud, str(tmp / "cloud.safetensors"))
        files = {"edge": "edge.safetensors", "cloud": "cloud.safetensors"}
        manifest: dict[str, Any] = {
            "format": FORMAT, "version": VERSION, "name": name or meta.model.arch,
            "model": meta.model.to_dict(), "split": split, "exits": exits,
            "edge_exits": [k for k in exits if k <= split], "cloud_exits": [k for k in exits if k > split],
            "input_shape": list(in_shape), "feature_shape": shapes[split],
            "mean": list(meta.mean), "std": list(meta.std), "classes": list(meta.classes),
            "policy": policy_entry, "ladder": {"network": list(network)},
            "calibration": dict(calibration or {}), "codec": codec,
        }
        if len(allowed) > 1:  # one split: the manifest stays as it always was
            manifest["splits"] = allowed
            manifest["feature_shapes"] = {str(s): shapes[s] for s in allowed if s < last}
        if large is not None:
            large_model, large_meta = large
            save_file({k: v.detach().contiguous() for k, v in large_model.state_dict().items()},
                      str(tmp / "large.safetensors"))
            files["large"] = "large.safetensors"
            manifest["large"] = {"model": large_meta.model.to_dict(), "mean": list(large_meta.mean),
                                 "std": list(large_meta.std)}
        if edge_engine == "onnx":
            from splitexit.onnx_export import OPSET, ExportError, export_edge_segments

            try:
                segments = export_edge_segments(model, allowed, in_shape, tmp)
            except ExportError as exc:
                raise BundleError(str(exc)) from exc
            manifest["onnx"] = {"opset": OPSET, "segments": [s.to_dict() for s in segments]}
        manifest["files"] = {part: {"path": f, "sha256": sha256_file(tmp / f)} for part, f in files.items()}
        manifest["hash"] = manifest_hash(manifest)
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True))
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def read_manifest(path: str | Path) -> Manifest:
    """The manifest, checked: format, version, its own hash and its fields, the network's
    config included (`splitexit.manifest.read_manifest` checks all but that, without torch)."""
    manifest = _read_manifest(path)
    manifest.model  # noqa: B018 - parsed here so that a bad config fails on read
    if manifest.large is not None:
        manifest.large.model  # noqa: B018
    return manifest


def load_bundle(path: str | Path, part: Part, *, expect_hash: str | None = None) -> Bundle:
    """Load one side of a bundle; every file it needs is checked against the manifest.

    The edge part builds only what it runs: the stages after the split, their exits and
    the final head are `NotOnThisSide` placeholders (no weights)."""
    from safetensors.torch import load_file

    path = Path(path)
    manifest = read_manifest(path)
    if expect_hash is not None and manifest.hash != expect_hash:
        raise BundleError(f"{path}: bundle hash {manifest.hash[:12]} is not the expected {expect_hash[:12]}")
    if part not in ("edge", "cloud"):
        raise BundleError(f"part must be 'edge' or 'cloud', got {part!r}")
    config = manifest.model
    try:
        policy = policy_from_dict(dict(manifest.policy))
    except (KeyError, TypeError, ValueError) as exc:
        raise BundleError(f"{path}: bad model or policy in the manifest ({exc})") from exc

    def weights(name: str) -> dict[str, torch.Tensor]:
        entry = manifest.files.get(name)
        if entry is None:
            raise BundleError(f"{path}: the manifest lists no {name} weights")
        file = checked_file(path, entry)
        try:
            return load_file(str(file))
        except Exception as exc:  # safetensors raises its own types
            raise BundleError(f"{file}: unreadable weights ({exc})") from exc

    model = build_model(config)
    tensors = weights(part)
    # the edge holds stages up to its deepest cut, the cloud those after its shallowest
    split = manifest.edge_last if part == "edge" else manifest.cloud_first
    last = manifest.last_stage if part == "edge" else None
    expected = {k for k in model.state_dict() if on_edge(k, split) == (part == "edge") or (last == split)}
    if expected != set(tensors):
        raise BundleError(f"{path}: {part} weights do not fit {config.arch} split after stage {split}")
    if part == "edge" and split < manifest.last_stage:
        _keep_edge_side(model, split)
    try:
        model.load_state_dict(tensors, strict=part == "edge")
    except RuntimeError as exc:
        raise BundleError(f"{path}: {part} weights do not fit {config.arch}: {str(exc).splitlines()[0]}") from exc
    large = None
    if part == "cloud" and manifest.large is not None and "large" in manifest.files:
        large = build_model(manifest.large.model)
        try:
            large.load_state_dict(weights("large"), strict=True)
        except RuntimeError as exc:
            raise BundleError(f"{path}: larger network weights do not fit: {str(exc).splitlines()[0]}") from exc
        large.eval()
    return Bundle(path, manifest, part, model.eval(), policy, large)


def has_edge_weights(path: str | Path) -> bool:
    """Does this bundle directory hold its edge weights file (a cloud worker's copy may not)?"""
    entry = read_manifest(path).files.get("edge")
    return entry is not None and (Path(path) / entry.path).is_file()


def load_whole(path: str | Path) -> Bundle:
    """The cloud part with the edge weights loaded too: the whole network, for a worker
    that runs raw input from stage 0 or a planner that measures every exit. A present but
    corrupt edge file is an error (BundleError), not a silent downgrade."""
    bundle = load_bundle(path, "cloud")
    edge = load_bundle(path, "edge", expect_hash=bundle.hash)
    bundle.model.load_state_dict(edge.model.state_dict(), strict=False)  # the edge part holds only its own weights
    return bundle


def _keep_edge_side(model: MultiExitNet, split: int) -> None:
    """Replace what runs after the split (stages, their exits, the final head) with
    placeholders, in place: the edge part holds only the weights it runs."""
    for i in range(split + 1, model.num_stages):
        model.stages[i] = NotOnThisSide(f"stage {i}", "edge")
    for key in list(model.exits):
        if int(key) > split:
            model.exits[key] = NotOnThisSide(f"the exit after stage {key}", "edge")
    model.head = NotOnThisSide("the final head", "edge")
