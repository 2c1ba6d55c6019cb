"""The bundle manifest, read and checked without torch: what an edge device running the
ONNX engine loads (`splitexit.bundle` loads the torch weights on top of it).

A bundle is a directory:
    manifest.json       architecture, split(s), exits, policy, calibration, codec, hashes
    edge.safetensors    stages 0..split and their exits (no cloud weights)
    cloud.safetensors   stages split+1.. , their exits and the final head

A bundle may allow several split points (`splits`; `split` is the one to start with): the
edge file then holds stages up to the deepest, the cloud file stages after the shallowest
(the stages between are in both), and the agent can move its cut without a new bundle. A
split at the network's last stage keeps every stage and the final head on the device.
    large.safetensors   optional: the cascade's larger network (cloud side, raw input)
    edge-*.onnx         optional: the edge part as ONNX segments (`splitexit.onnx_export`)

The bundle hash is the SHA-256 of the canonical manifest (without its `hash` field), and
the manifest holds every file's SHA-256: one hash names the whole bundle, both sides check
it, and any change to a file or to the manifest is caught on load.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Mapping

if TYPE_CHECKING:
    from splitexit.models import ModelConfig
    from splitexit.policies import ExitPolicy

FORMAT = "splitexit-bundle"
VERSION = 1
MANIFEST = "manifest.json"
Part = Literal["edge", "cloud"]


class BundleError(ValueError):
    """A bundle that is missing, corrupt, tampered with or does not fit."""


def sha256_file(path: Path) -> str:
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


def _model_config(data: Mapping[str, Any], where: str) -> "ModelConfig":
    from splitexit.models import ModelConfig  # torch: only where a network is built

    try:
        return ModelConfig.from_dict(data)
    except (KeyError, TypeError, ValueError) as exc:
        raise BundleError(f"{where}: bad or missing 'model' ({type(exc).__name__}: {exc})") from exc


@dataclass(frozen=True)
class LargeNetwork:
    """The cascade's larger network as the manifest describes it (it runs on raw input)."""

    model_data: Mapping[str, Any]
    mean: tuple[float, ...]
    std: tuple[float, ...]

    @cached_property
    def model(self) -> "ModelConfig":
        return _model_config(self.model_data, "manifest 'large'")


@dataclass(frozen=True)
class OnnxSegment:
    """One ONNX graph of the edge part (`splitexit.onnx_export`): stages first..last, then
    the exit after `last` when `head`; a head alone has first = -1."""

    path: str  # relative to the bundle directory
    first: int
    last: int
    head: bool  # returns probabilities (after the feature, for a segment)
    input_shape: tuple[int, ...]  # one row's input
    sha256: str

    def to_dict(self) -> dict[str, Any]:
        return {"path": self.path, "first": self.first, "last": self.last, "head": self.head,
                "input_shape": list(self.input_shape), "sha256": self.sha256}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "OnnxSegment":
        return cls(str(data["path"]), int(data["first"]), int(data["last"]), bool(data["head"]),
                   tuple(int(d) for d in data["input_shape"]), str(data["sha256"]))

    @property
    def alone(self) -> bool:
        """A head alone (the fallback at the split), not a run of stages."""
        return self.first < 0


@dataclass(frozen=True, kw_only=True)
class Manifest:
    """manifest.json, read and checked: what the bundle holds and where its halves meet.
    `data` is the JSON as read, which the bundle hash covers."""

    name: str
    hash: str
    model_data: Mapping[str, Any]  # the network's ModelConfig as plain data (see `model`)
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
    onnx: tuple[OnnxSegment, ...] = ()  # the edge part as ONNX segments, when exported
    # every allowed split point, ascending (`split` among them), and the feature each gives;
    # a bundle of one split lists just it
    splits: tuple[int, ...] = ()
    feature_shapes: Mapping[int, tuple[int, ...]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.splits:  # one split: the fields that always existed say it all
            object.__setattr__(self, "splits", (self.split,))
            object.__setattr__(self, "feature_shapes", {self.split: self.feature_shape})
            return
        last = self.exits[-1] if self.exits else -1
        if list(self.splits) != sorted(set(self.splits)) or self.split not in self.splits:
            raise BundleError(f"splits {list(self.splits)} must be ascending, distinct and hold split {self.split}")
        if not 0 <= self.splits[0] < last or self.splits[-1] > last:
            raise BundleError(f"splits {list(self.splits)} must be stages in 0..{last}, one at least before "
                              f"the last")
        missing = [s for s in self.cloud_splits if s not in self.feature_shapes]
        if missing:
            raise BundleError(f"no feature shape for split {missing[0]}")

    @property
    def last_stage(self) -> int:
        return self.exits[-1]

    @property
    def cloud_splits(self) -> tuple[int, ...]:
        """The split points a worker takes features at (a split at the last stage sends nothing)."""
        return tuple(s for s in self.splits if s < self.last_stage)

    @property
    def edge_last(self) -> int:
        """The deepest stage the edge part holds."""
        return self.splits[-1]

    @property
    def cloud_first(self) -> int:
        """The split after which the cloud part's stages start."""
        return self.splits[0]

    def exits_through(self, split: int) -> tuple[int, ...]:
        """The ladder exits evaluated on the edge when cut after `split`."""
        return tuple(k for k in self.exits if k <= split)

    @cached_property
    def model(self) -> "ModelConfig":
        """The network's config (imports torch's side of splitexit: not on a torch-free edge)."""
        return _model_config(self.model_data, "manifest")

    @property
    def arch(self) -> str:
        return str(self.model_data.get("arch", "?"))

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
            model = dict(data["model"])
            large = None
            if "large" in data:
                field = "large"
                entry = data["large"]
                large = LargeNetwork(dict(entry["model"]), floats(entry["mean"]), floats(entry["std"]))
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
            field = "splits"
            values["splits"] = ints(data.get("splits", ()))
            values["feature_shapes"] = {int(k): ints(v) for k, v in data.get("feature_shapes", {}).items()}
            field = "onnx"
            values["onnx"] = tuple(OnnxSegment.from_dict(entry) for entry in data.get("onnx", {}).get("segments", ()))
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise BundleError(f"{where}: bad or missing {field!r} ({type(exc).__name__}: {exc})") from exc
        return cls(model_data=model, large=large, files=files, data=data, **values)


@dataclass(frozen=True)
class Bundle:
    """A loaded bundle part: the model (on the edge, only the stages it runs; see
    `splitexit.bundle.load_bundle`), its policy and everything the runtime needs to know."""

    path: Path
    manifest: Manifest
    part: Part
    model: Any  # a MultiExitNet (None on an edge that runs the ONNX segments instead)
    policy: "ExitPolicy"
    large: Any = None  # the cascade's larger network, a MultiExitNet (cloud part only)

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
    def splits(self) -> tuple[int, ...]:
        """Every split point the bundle allows (`split` is the one to start with)."""
        return self.manifest.splits

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


def checked_file(bundle: str | Path, entry: "WeightFile | OnnxSegment") -> Path:
    """A file the manifest lists, present and with its recorded hash (BundleError if not)."""
    file = Path(bundle) / entry.path
    if not file.is_file():
        raise BundleError(f"{file}: missing")
    if sha256_file(file) != entry.sha256:
        raise BundleError(f"{file}: content hash mismatch (corrupt or replaced)")
    return file
