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
from splitexit.codec import CODECS
from splitexit.models import ModelConfig, MultiExitNet, build_model
from splitexit.policies import ExitPolicy, PolicyError, policy_from_dict, policy_to_dict

FORMAT = "splitexit-bundle"
VERSION = 1
MANIFEST = "manifest.json"
Part = Literal["edge", "cloud"]


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
class WeightFile:
    path: str  # relative to the bundle directory
    sha256: str


@dataclass(frozen=True)
class LargeNetwork:
    """The cascade's larger network as the manifest describes it (it runs on raw input)."""

    model: ModelConfig
    mean: tuple[float, ...]
    std: tuple[float, ...]


@dataclass(frozen=True, kw_only=True)
class Manifest:
    """manifest.json, read and checked: what the bundle holds and where its halves meet.
    `data` is the JSON as read, which the bundle hash covers."""

    name: str
    hash: str
    model: ModelConfig
    split: int  # the cut: stages 0..split run on the edge
    exits: tuple[int, ...]  # stage index of each exit of this network's ladder, the final head last
    edge_exits: tuple[int, ...]  # those at or before the split
    cloud_exits: tuple[int, ...]
    network: tuple[int, ...]  # network id per ladder exit (0 = this network, 1 = the cascade's larger one)
    input_shape: tuple[int, ...]
    feature_shape: tuple[int, ...]  # one sample's feature at the split (what an offload carries)
    mean: tuple[float, ...]
    std: tuple[float, ...]
    classes: tuple[str, ...]
    policy: Mapping[str, Any]  # policy_to_dict's entry
    calibration: Mapping[str, Any]
    codec: str
    files: Mapping[str, WeightFile]  # "edge", "cloud", optionally "large"
    large: LargeNetwork | None
    data: Mapping[str, Any]

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], where: str = "manifest") -> "Manifest":
        """Raises BundleError naming the field that is missing or of the wrong type."""
        def ints(value: Any) -> tuple[int, ...]:
            return tuple(int(v) for v in value)

        def floats(value: Any) -> tuple[float, ...]:
            return tuple(float(v) for v in value)

        field = "?"
        try:
            field = "model"
            model = ModelConfig.from_dict(data["model"])
            large = None
            if "large" in data:
                field = "large"
                entry = data["large"]
                large = LargeNetwork(ModelConfig.from_dict(entry["model"]), floats(entry["mean"]), floats(entry["std"]))
            field = "files"
            files = {part: WeightFile(str(f["path"]), str(f["sha256"])) for part, f in data["files"].items()}
            values: dict[str, Any] = {}
            for field, read in (("name", str), ("hash", str), ("split", int), ("exits", ints), ("edge_exits", ints),
                                ("cloud_exits", ints), ("input_shape", ints), ("feature_shape", ints),
                                ("mean", floats), ("std", floats), ("codec", str), ("policy", dict),
                                ("calibration", dict)):
                values[field] = read(data[field])
            field = "classes"
            values["classes"] = tuple(str(c) for c in data["classes"])
            field = "ladder"
            values["network"] = ints(data["ladder"]["network"])
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise BundleError(f"{where}: bad or missing {field!r} ({type(exc).__name__}: {exc})") from exc
        return cls(model=model, large=large, files=files, data=data, **values)


@dataclass(frozen=True)
class Bundle:
    """A loaded bundle part: the model (on the edge, only the stages it runs; see
    `load_bundle`), its policy and everything the runtime needs to know."""

    path: Path
    manifest: Manifest
    part: Part
    model: MultiExitNet
    policy: ExitPolicy
    large: MultiExitNet | None = None  # the cascade's larger network (cloud part only)

    @property
    def hash(self) -> str:
        return self.manifest.hash

    @property
    def name(self) -> str:
        return self.manifest.name

    @property
    def split(self) -> int:
        return self.manifest.split

    @property
    def codec(self) -> str:
        return self.manifest.codec

    @property
    def input_shape(self) -> tuple[int, ...]:
        return self.manifest.input_shape

    @property
    def feature_shape(self) -> tuple[int, ...]:
        """Shape of one sample's feature at the split (what an offload carries)."""
        return self.manifest.feature_shape

    @property
    def classes(self) -> tuple[str, ...]:
        return self.manifest.classes

    @property
    def mean(self) -> tuple[float, ...]:
        return self.manifest.mean

    @property
    def std(self) -> tuple[float, ...]:
        return self.manifest.std

    @property
    def network(self) -> tuple[int, ...]:
        """Network id per ladder exit (0 = this network, 1 = the cascade's larger one)."""
        return self.manifest.network


class NotOnThisSide(torch.nn.Module):
    """Stands in for a module whose weights the loaded part does not carry (the cloud's
    stages on the edge): no random weights to run by mistake, and a clear error if called."""

    def __init__(self, name: str, part: str) -> None:
        super().__init__()
        self.name, self.part = name, part

    def forward(self, *args: Any) -> torch.Tensor:
        raise BundleError(f"{self.name} is not in the {self.part} part of the bundle")


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


def read_manifest(path: str | Path) -> Manifest:
    """The manifest, checked: format, version, its own hash and its fields."""
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
    return Manifest.from_dict(manifest, str(file))


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
        file = path / entry.path
        if not file.is_file():
            raise BundleError(f"{file}: missing")
        if _sha256(file) != entry.sha256:
            raise BundleError(f"{file}: content hash mismatch (corrupt or replaced)")
        try:
            return load_file(str(file))
        except Exception as exc:  # safetensors raises its own types
            raise BundleError(f"{file}: unreadable weights ({exc})") from exc

    model = build_model(config)
    tensors = weights(part)
    split = manifest.split
    expected = {k for k in model.state_dict() if on_edge(k, split) == (part == "edge")}
    if expected != set(tensors):
        raise BundleError(f"{path}: {part} weights do not fit {config.arch} split after stage {split}")
    if part == "edge":
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
