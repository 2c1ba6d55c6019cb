"""Data sets: the embedded default (scikit-learn's handwritten digits), image folders and
`.tar.gz` archives in `split/class/file.jpg` layout, and numpy arrays.

Images are decoded once into uint8 arrays [N, H, W, C] (cached on disk for archives);
augmentation and normalization run in torch on whole batches.
"""

from __future__ import annotations

import hashlib
import io
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
import torch.nn.functional as F

from splitexit.archive import IMAGE_SUFFIXES, DataError, iter_archive


@dataclass(frozen=True)
class ArraySet:
    """Images as uint8 [N, H, W, C] and integer labels [N]."""

    images: np.ndarray
    labels: np.ndarray

    def __post_init__(self) -> None:
        if self.images.ndim != 4 or self.images.dtype != np.uint8:
            raise DataError(f"images must be uint8 [N, H, W, C], got {self.images.dtype} {self.images.shape}")
        if self.labels.shape != (len(self.images),):
            raise DataError(f"{len(self.images)} images but labels of shape {self.labels.shape}")

    def __len__(self) -> int:
        return len(self.images)

    def subset(self, index: np.ndarray) -> "ArraySet":
        return ArraySet(self.images[index], self.labels[index])


@dataclass(frozen=True)
class Dataset:
    """Deterministic train / validation / test splits, class names and channel statistics."""

    name: str
    train: ArraySet
    val: ArraySet
    test: ArraySet
    classes: tuple[str, ...]
    mean: tuple[float, ...]  # per channel, in [0, 1], from the training split
    std: tuple[float, ...]

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def in_chans(self) -> int:
        return int(self.train.images.shape[-1])

    @property
    def image_size(self) -> int:
        return int(self.train.images.shape[1])


def _carve_validation(train: ArraySet, val_size: int, seed: int) -> tuple[ArraySet, ArraySet]:
    """Hold out `val_size` training samples, stratified by class, with a fixed seed."""
    if not 0 < val_size < len(train):
        raise DataError(f"validation size {val_size} must be in 1..{len(train) - 1}")
    rng = np.random.default_rng(seed)
    classes = np.unique(train.labels)
    per_class = val_size // len(classes)
    val_idx: list[np.ndarray] = []
    for c in classes:
        members = np.flatnonzero(train.labels == c)
        val_idx.append(rng.permutation(members)[:per_class])
    chosen = np.concatenate(val_idx)
    if len(chosen) < val_size:  # remainder when val_size is not a multiple of the classes
        rest = np.setdiff1d(np.arange(len(train)), chosen)
        chosen = np.concatenate([chosen, rng.permutation(rest)[: val_size - len(chosen)]])
    mask = np.zeros(len(train), dtype=bool)
    mask[chosen] = True
    return train.subset(np.flatnonzero(~mask)), train.subset(np.sort(chosen))


def _stats(images: np.ndarray) -> tuple[tuple[float, ...], tuple[float, ...]]:
    flat = images.reshape(-1, images.shape[-1]).astype(np.float64) / 255.0
    return tuple(float(v) for v in flat.mean(0)), tuple(float(v) for v in flat.std(0))


def make_dataset(
    name: str, train: ArraySet, test: ArraySet, classes: tuple[str, ...], *, val_size: int, seed: int = 0
) -> Dataset:
    train, val = _carve_validation(train, val_size, seed)
    mean, std = _stats(train.images)
    return Dataset(name, train, val, test, classes, mean, std)


# --- the embedded default --------------------------------------------------------------
def load_digits(*, seed: int = 0) -> Dataset:
    """scikit-learn's 1,797 handwritten digits (8x8, one channel): ships with the package."""
    from sklearn.datasets import load_digits as sk_digits

    bunch = sk_digits()
    images = np.round(bunch.images * (255.0 / 16.0)).astype(np.uint8)[..., None]  # [N, 8, 8, 1]
    labels = bunch.target.astype(np.int64)
    order = np.random.default_rng(seed).permutation(len(images))
    n_test = 360
    test, train = order[:n_test], order[n_test:]
    classes = tuple(str(d) for d in range(10))
    return make_dataset(
        "digits", ArraySet(images[train], labels[train]), ArraySet(images[test], labels[test]), classes,
        val_size=300, seed=seed,
    )


# --- image folders and archives --------------------------------------------------------
def _decode(data: bytes, where: str) -> np.ndarray:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data)) as img:
            # grey stays one channel (a 1-channel model trains on it); anything else is RGB
            if img.mode in ("1", "L", "LA", "I", "I;16", "F"):
                return np.asarray(img.convert("L"), dtype=np.uint8)[..., None]
            return np.asarray(img.convert("RGB"), dtype=np.uint8)
    except (UnidentifiedImageError, OSError, ValueError) as exc:
        raise DataError(f"{where}: not a readable image ({exc})") from exc


def _split_class(member: str) -> tuple[str, str] | None:
    """'train/cat/0001.jpg' -> ('train', 'cat'); None for anything else."""
    parts = Path(member).parts
    if len(parts) < 3 or not member.lower().endswith(IMAGE_SUFFIXES):
        return None
    return parts[-3], parts[-2]


def _iter_folder(path: Path) -> Iterator[tuple[str, bytes]]:
    for file in sorted(path.rglob("*")):
        name = file.relative_to(path).as_posix()
        if file.is_file() and _split_class(name):
            yield name, file.read_bytes()


def _read_splits(path: Path) -> dict[str, dict[str, list[tuple[str, np.ndarray]]]]:
    members = iter_archive(path, _split_class) if path.is_file() else _iter_folder(path)
    splits: dict[str, dict[str, list[tuple[str, np.ndarray]]]] = {}
    for name, data in members:
        split, cls = _split_class(name)  # type: ignore[misc]
        splits.setdefault(split, {}).setdefault(cls, []).append((name, _decode(data, f"{path}:{name}")))
    return splits


def _to_arrays(split: dict[str, list[tuple[str, np.ndarray]]], classes: tuple[str, ...], where: str) -> ArraySet:
    images: list[np.ndarray] = []
    labels: list[int] = []
    for label, cls in enumerate(classes):
        for _, img in sorted(split.get(cls, []), key=lambda item: item[0]):
            images.append(img)
            labels.append(label)
    if len({img.shape[-1] for img in images}) > 1:  # grey among colour: the grey ones as RGB
        images = [np.repeat(img, 3, axis=-1) if img.shape[-1] == 1 else img for img in images]
    shapes = {img.shape for img in images}
    if len(shapes) != 1:
        raise DataError(f"{where}: images of different sizes {sorted(shapes)[:3]}; resize them to one size first")
    return ArraySet(np.stack(images), np.asarray(labels, dtype=np.int64))


def _fingerprint(path: Path) -> str:
    stat = path.stat()
    return hashlib.sha256(f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}".encode()).hexdigest()[:16]


def load_image_tree(path: str | Path, *, val_size: int = 5000, seed: int = 0, cache_dir: Path | None = None) -> Dataset:
    """A folder or .tar.gz with `train/<class>/*.jpg` and `test/<class>/*.jpg`.

    Decoded arrays of an archive are cached in `cache_dir` (keyed by path, size, mtime).
    """
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: no such file or folder")
    cache_file = None
    if cache_dir is not None and path.is_file():
        cache_file = Path(cache_dir) / "data" / f"{path.name}-{_fingerprint(path)}.npz"
    if cache_file is not None and cache_file.exists():
        with np.load(cache_file, allow_pickle=False) as z:
            train = ArraySet(z["train_x"], z["train_y"])
            test = ArraySet(z["test_x"], z["test_y"])
            classes = tuple(str(c) for c in z["classes"])
    else:
        splits = _read_splits(path)
        if "train" not in splits or "test" not in splits:
            found = ", ".join(sorted(splits)) or "no images in split/class/file layout"
            raise DataError(f"{path}: expected train/<class>/ and test/<class>/ images; found {found}")
        classes = tuple(sorted(set(splits["train"]) | set(splits["test"])))
        train = _to_arrays(splits["train"], classes, f"{path}:train")
        test = _to_arrays(splits["test"], classes, f"{path}:test")
        if cache_file is not None:
            cache_file.parent.mkdir(parents=True, exist_ok=True)
            tmp = cache_file.with_suffix(".tmp.npz")
            np.savez(tmp, train_x=train.images, train_y=train.labels, test_x=test.images, test_y=test.labels,
                     classes=np.asarray(classes))
            tmp.replace(cache_file)  # never leave a half-written cache
    name = path.name.removesuffix(".tar.gz").removesuffix(".tgz")
    return make_dataset(name, train, test, classes, val_size=min(val_size, len(train) // 5), seed=seed)


def load_numpy(path: str | Path, *, val_size: int = 5000, seed: int = 0) -> Dataset:
    """An .npz with uint8 `train_x` [N,H,W,C] (or [N,H,W], grey), `train_y`, `test_x`, `test_y`
    (and optional `classes`)."""
    path = Path(path)
    try:
        with np.load(path, allow_pickle=False) as z:
            arrays = {k: z[k] for k in ("train_x", "train_y", "test_x", "test_y")}
            classes = tuple(str(c) for c in z["classes"]) if "classes" in z else None
    except KeyError as exc:
        raise DataError(f"{path}: missing array {exc}; need train_x, train_y, test_x, test_y") from exc
    except (OSError, ValueError) as exc:
        raise DataError(f"{path}: not a readable .npz ({exc})") from exc
    for key in ("train_x", "test_x"):  # grey images [N, H, W]: one channel
        if arrays[key].ndim == 3:
            arrays[key] = arrays[key][..., None]
    train = ArraySet(arrays["train_x"], arrays["train_y"].astype(np.int64))
    test = ArraySet(arrays["test_x"], arrays["test_y"].astype(np.int64))
    n_classes = int(max(train.labels.max(), test.labels.max())) + 1
    classes = classes or tuple(str(i) for i in range(n_classes))
    return make_dataset(path.stem, train, test, classes, val_size=min(val_size, len(train) // 5), seed=seed)


def load_dataset(spec: str, *, val_size: int = 5000, seed: int = 0, cache_dir: Path | None = None) -> Dataset:
    """'digits' (embedded default), a .npz file, or an image folder / archive."""
    if spec == "digits":
        return load_digits(seed=seed)
    if spec.endswith(".npz"):
        return load_numpy(spec, val_size=val_size, seed=seed)
    return load_image_tree(spec, val_size=val_size, seed=seed, cache_dir=cache_dir)


# --- batches in torch ------------------------------------------------------------------
@dataclass(frozen=True)
class Normalize:
    mean: tuple[float, ...]
    std: tuple[float, ...]

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 [B, H, W, C] -> normalized float [B, C, H, W]."""
        x = images.permute(0, 3, 1, 2).float().div_(255.0)
        mean = torch.tensor(self.mean).view(1, -1, 1, 1)
        std = torch.tensor(self.std).view(1, -1, 1, 1)
        return (x - mean) / std


def augment(x: torch.Tensor, *, pad: int, flip: bool, generator: torch.Generator,
            flip_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Random crop with (reflect) padding and horizontal flip of a batch [B, C, H, W]: each
    image at random, or those `flip_mask` [B] names."""
    b, c, h, w = x.shape
    if pad > 0:
        padded = F.pad(x, (pad, pad, pad, pad), mode="reflect")
        dy = torch.randint(0, 2 * pad + 1, (b,), generator=generator)
        dx = torch.randint(0, 2 * pad + 1, (b,), generator=generator)
        rows = (dy[:, None] + torch.arange(h))[:, None, :, None]  # [B, 1, H, 1]
        cols = (dx[:, None] + torch.arange(w))[:, None, None, :]  # [B, 1, 1, W]
        x = padded[torch.arange(b)[:, None, None, None], torch.arange(c)[None, :, None, None], rows, cols]
    if flip:
        mask = torch.rand(b, generator=generator) < 0.5 if flip_mask is None else flip_mask
        x = torch.where(mask.view(-1, 1, 1, 1), x.flip(-1), x)
    return x


def iterate_batches(
    data: ArraySet,
    normalize: Normalize,
    *,
    batch_size: int,
    shuffle: bool = False,
    augment_pad: int = 0,
    augment_flip: bool = False,
    generator: torch.Generator | None = None,
    channels_last: bool = False,
    flips: torch.Tensor | None = None,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(inputs [B, C, H, W], labels [B]) batches; the last batch may be smaller. `flips`
    [len(data)] names the images to flip in this pass (with `augment_flip`); None: each at random."""
    generator = generator or torch.Generator().manual_seed(0)
    n = len(data)
    order = torch.randperm(n, generator=generator).numpy() if shuffle else np.arange(n)
    images = torch.from_numpy(data.images)
    labels = torch.from_numpy(data.labels)
    for start in range(0, n, batch_size):
        idx = torch.from_numpy(order[start : start + batch_size])
        x = normalize(images[idx])
        if augment_pad or augment_flip:
            x = augment(x, pad=augment_pad, flip=augment_flip, generator=generator,
                        flip_mask=None if flips is None else flips[idx])
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        yield x, labels[idx]

