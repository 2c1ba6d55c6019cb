"""Bundles: what an edge device and a cloud worker load.

A bundle is a directory:
    manifest.json       architecture, split, exits, policy, calibration, codec, hashes
    edge.safetensors    stages 0..split and their exits (no cloud weights)
    cloud.safetensors   stages split+1.. , their exits and the final head
    large.safetensors   optional: the cascade's larger network (cloud side, raw input)

The bundle hash is the SHA-256 of the canonical manifest (without its `hash` field), and
the manifest holds every weight file's SHA-256: one hash names the whole bundle, both sides
check it, and any change to a file or to the manifest is caught on load.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Mapping

import torch

from splitexit.checkpoint import CheckpointMeta
from splitexit.models import ModelConfig, MultiExitNet, build_model
from splitexit.policies import ExitPolicy, PolicyError, policy_from_dict, policy_to_dict

FORMAT = "splitexit-bundle"
VERSION = 1
MANIFEST = "manifest.json"
Part = Literal["edge", "cloud"]
CODECS = ("fp32", "fp16", "int8", "int8-per-channel")


class BundleError(ValueError):
    """A bundle that is missing, corrupt, tampered with or does not fit."""


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def manifest_hash(manifest: Mapping[str, Any]) -> str:
    body = {k: v for k, v in manifest.items() if k != "hash"}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


@dataclass(frozen=True)
class Bundle:
    """A loaded bundle part: the model (only this part's weights are real), its policy and
    everything the runtime needs to know."""

    path: Path
    manifest: dict[str, Any]
    part: Part
    model: MultiExitNet
    policy: ExitPolicy
    large: MultiExitNet | None = None  # the cascade's larger network (cloud part only)

    @property
    def hash(self) -> str:
        return str(self.manifest["hash"])

    @property
    def name(self) -> str:
        return str(self.manifest["name"])

    @property
    def split(self) -> int:
        return int(self.manifest["split"])

    @property
    def codec(self) -> str:
        return str(self.manifest["codec"])

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.manifest["input_shape"])

    @property
    def feature_shape(self) -> tuple[int, ...]:
        """Shape of one sample's feature at the split (what an offload carries)."""
        return tuple(self.manifest["feature_shape"])

    @property
    def classes(self) -> tuple[str, ...]:
        return tuple(self.manifest["classes"])

    @property
    def mean(self) -> tuple[float, ...]:
        return tuple(self.manifest["mean"])

    @property
    def std(self) -> tuple[float, ...]:
        return tuple(self.manifest["std"])

    @property
    def network(self) -> tuple[int, ...]:
        """Network id per ladder exit (0 = this network, 1 = the cascade's larger one)."""
        return tuple(self.manifest["ladder"]["network"])


def on_edge(key: str, split: int) -> bool:
    """Does this parameter (`stages.N...`, `exits.N...`, `head...`) belong to the edge part?"""
    part, _, rest = key.partition(".")
    index = rest.partition(".")[0]
    return part in ("stages", "exits") and index.isdigit() and int(index) <= split


def export_bundle(out: str | Path, model: MultiExitNet, meta: CheckpointMeta, *, split: int, policy: ExitPolicy,
                  input_shape: tuple[int, int, int], name: str = "", codec: str = "fp32", calibration: Mapping[str, Any] | None = None,
                  large: tuple[MultiExitNet, CheckpointMeta] | None = None, network: tuple[int, ...] | None = None,
                  ) -> Path:
    """Write a bundle directory atomically (a temp dir renamed into place)."""
    from safetensors.torch import save_file

    out = Path(out)
    if meta.model.hierarchical:
        raise BundleError("hierarchical BoF exits carry running histograms across the split: not supported in bundles")
    if not 0 <= split < model.num_stages - 1:
        raise BundleError(f"split must be a stage index in 0..{model.num_stages - 2}, got {split}")
    if codec not in CODECS:
        raise BundleError(f"unknown codec {codec!r}; choose one of {', '.join(CODECS)}")
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
    edge = {k: v for k, v in state.items() if on_edge(k, split)}
    cloud = {k: v for k, v in state.items() if not on_edge(k, split)}
    in_shape = tuple(input_shape)
    with torch.no_grad():
        _, feats = model.eval().forward_intermediates(torch.zeros(1, *in_shape), indices=[split], stop_early=True)
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
            "input_shape": list(in_shape), "feature_shape": list(feats[0].shape[1:]),
            "mean": list(meta.mean), "std": list(meta.std), "classes": list(meta.classes),
            "policy": policy_entry, "ladder": {"network": list(network)},
            "calibration": dict(calibration or {}), "codec": codec,
        }
        if large is not None:
            large_model, large_meta = large
            save_file({k: v.detach().contiguous() for k, v in large_model.state_dict().items()},
                      str(tmp / "large.safetensors"))
            files["large"] = "large.safetensors"
            manifest["large"] = {"model": large_meta.model.to_dict(), "mean": list(large_meta.mean),
                                 "std": list(large_meta.std)}
        manifest["files"] = {part: {"path": f, "sha256": _sha256(tmp / f)} for part, f in files.items()}
        manifest["hash"] = manifest_hash(manifest)
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True))
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def read_manifest(path: str | Path) -> dict[str, Any]:
    """The manifest, checked: format, version and its own hash."""
    path = Path(path)
    file = path / MANIFEST
    if not file.is_file():
        raise BundleError(f"{path}: not a bundle (no {MANIFEST})")
    try:
        manifest = json.loads(file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BundleError(f"{file}: unreadable manifest ({exc})") from exc
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise BundleError(f"{file}: not a {FORMAT} manifest")
    if manifest.get("version") != VERSION:
        raise BundleError(f"{file}: bundle version {manifest.get('version')!r}, this splitexit reads {VERSION}")
    if manifest.get("hash") != manifest_hash(manifest):
        raise BundleError(f"{file}: manifest hash mismatch (edited or corrupt)")
    return manifest


def load_bundle(path: str | Path, part: Part, *, expect_hash: str | None = None) -> Bundle:
    """Load one side of a bundle; every file it needs is checked against the manifest."""
    from safetensors.torch import load_file

    path = Path(path)
    manifest = read_manifest(path)
    if expect_hash is not None and manifest["hash"] != expect_hash:
        raise BundleError(f"{path}: bundle hash {manifest['hash'][:12]} is not the expected {expect_hash[:12]}")
    if part not in ("edge", "cloud"):
        raise BundleError(f"part must be 'edge' or 'cloud', got {part!r}")
    try:
        config = ModelConfig.from_dict(manifest["model"])
        policy = policy_from_dict(manifest["policy"])
    except (KeyError, TypeError, ValueError) as exc:
        raise BundleError(f"{path}: bad model or policy in the manifest ({exc})") from exc

    def weights(name: str) -> dict[str, torch.Tensor]:
        entry = manifest["files"].get(name)
        if entry is None:
            raise BundleError(f"{path}: the manifest lists no {name} weights")
        file = path / entry["path"]
        if not file.is_file():
            raise BundleError(f"{file}: missing")
        if _sha256(file) != entry["sha256"]:
            raise BundleError(f"{file}: content hash mismatch (corrupt or replaced)")
        try:
            return load_file(str(file))
        except Exception as exc:  # safetensors raises its own types
            raise BundleError(f"{file}: unreadable weights ({exc})") from exc

    model = build_model(config)
    tensors = weights(part)
    split = int(manifest["split"])
    expected = {k for k in model.state_dict() if on_edge(k, split) == (part == "edge")}
    if expected != set(tensors):
        raise BundleError(f"{path}: {part} weights do not fit {config.arch} split after stage {split}")
    try:
        model.load_state_dict(tensors, strict=False)
    except RuntimeError as exc:
        raise BundleError(f"{path}: {part} weights do not fit {config.arch}: {str(exc).splitlines()[0]}") from exc
    large = None
    if part == "cloud" and "large" in manifest["files"]:
        large = build_model(ModelConfig.from_dict(manifest["large"]["model"]))
        try:
            large.load_state_dict(weights("large"), strict=True)
        except RuntimeError as exc:
            raise BundleError(f"{path}: larger network weights do not fit: {str(exc).splitlines()[0]}") from exc
        large.eval()
    return Bundle(path, manifest, part, model.eval(), policy, large)
