"""Inputs for the edge agent: image files, folders, .tar.gz archives and numpy arrays.

Everything is read and checked before the first answer is computed. A file that cannot be
read, or does not fit the bundle, is set aside with the reason (`InputSet.errors`) and the
others are answered; when nothing at all is readable, one clear `InputError` names the
first file and why.

- an image file (.jpg .jpeg .png .bmp): one sample, id = the file name
- a folder: every image under it (recursively, sorted), id = the path inside the folder
- a .tar / .tar.gz / .tgz archive: every image member, id = the member name
- a .npy array: uint8 images [N, H, W, C] (or [N, H, W] with one channel, or one image
  [H, W, C]), or float inputs [N, C, H, W] already normalized; id = "name.npy:i"
- a .npz archive: its array "x" (else "images", else its only array) as above, and
  sample ids from an optional string array "ids"

Labels, where the inputs carry them (`InputSet.labels`, so `edge run` can say its
accuracy): the folder an image is in (`test/cat/0001.jpg` is a "cat"), or a .npz's
integer array "y" (else "labels").

Images are converted to the bundle's channels (L or RGB). A size that differs from the
bundle's input is refused unless `resize=True` (then bilinear resize).
"""

from __future__ import annotations

import io
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Mapping

import numpy as np

from splitexit.archive import IMAGE_SUFFIXES

__all__ = ["IMAGE_SUFFIXES", "InputError", "InputSet", "load_inputs"]

_ARCHIVE_SUFFIXES = (".tar", ".tar.gz", ".tgz")
_MODES = {1: "L", 3: "RGB"}


class InputError(ValueError):
    """An input that cannot be read or does not fit the bundle."""


@dataclass(frozen=True)
class InputSet:
    """Samples ready for `EdgeAgent.infer`: uint8 images [N, H, W, C] or normalized float
    inputs [N, C, H, W], with one id per sample."""

    ids: tuple[str, ...]
    data: np.ndarray
    errors: tuple[tuple[str, str], ...] = ()  # (sample id, why) of the inputs set aside
    # sample id -> its label as the inputs give it: a class folder's name, or a class index
    # ("3") from a .npz; whether it names one of the bundle's classes is the caller's check
    labels: Mapping[str, str] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.ids)

    def without(self, ids: set[str]) -> "InputSet":
        """The samples whose id is not in `ids` (e.g. answered by an interrupted run)."""
        keep = [i for i, sample_id in enumerate(self.ids) if sample_id not in ids]
        return InputSet(tuple(self.ids[i] for i in keep), self.data[keep], self.errors, self.labels)

    def batches(self, size: int) -> Iterator[tuple[tuple[str, ...], np.ndarray]]:
        for start in range(0, len(self.ids), size):
            yield self.ids[start:start + size], self.data[start:start + size]


def _decode(data: bytes, where: str, shape: tuple[int, int, int], resize: bool) -> np.ndarray:
    from PIL import Image, UnidentifiedImageError

    c, h, w = shape
    if c not in _MODES:
        raise InputError(f"the bundle takes {c}-channel inputs; images can feed 1 or 3 channels (use .npy)")
    try:
        with Image.open(io.BytesIO(data)) as img:
            if img.size != (w, h):
                if not resize:
                    raise InputError(f"{where}: image is {img.size[0]}x{img.size[1]}, the bundle takes {w}x{h} "
                                     f"(resize it, or pass --resize)")
                img = img.convert(_MODES[c]).resize((w, h), Image.Resampling.BILINEAR)
            pixels = np.asarray(img.convert(_MODES[c]), dtype=np.uint8)
    except InputError:
        raise
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        raise InputError(f"{where}: not a readable image ({type(exc).__name__}: {exc})") from None
    return pixels.reshape(h, w, c)


def _is_image(name: str) -> bool:
    return name.lower().endswith(IMAGE_SUFFIXES) and not Path(name).name.startswith(".")


def _iter_archive(path: Path) -> Iterator[tuple[str, bytes]]:
    """The images of an archive (splitexit.data's reader), with the edge's own error type."""
    from splitexit.archive import DataError, iter_archive

    try:
        yield from iter_archive(path, _is_image)
    except DataError as exc:
        raise InputError(str(exc)) from None


def _iter_folder(path: Path) -> Iterator[tuple[str, bytes | InputError]]:
    """(name, bytes) of the images in a folder; a file that cannot be read comes with the error."""
    for file in sorted(path.rglob("*")):
        name = file.relative_to(path).as_posix()
        if file.is_file() and _is_image(name):
            try:
                yield name, file.read_bytes()
            except OSError as exc:
                yield name, InputError(f"{file}: cannot read ({exc.strerror or exc})")


def _array(values: np.ndarray, where: str, shape: tuple[int, int, int]) -> np.ndarray:
    c, h, w = shape
    if values.dtype == np.uint8:
        if values.ndim == 3 and values.shape == (h, w, c):
            values = values[None]
        elif values.ndim == 3 and c == 1 and values.shape[1:] == (h, w):
            values = values[..., None]
        if values.ndim != 4 or values.shape[1:] != (h, w, c):
            raise InputError(f"{where}: uint8 images must be [N, {h}, {w}, {c}] for this bundle, "
                             f"got {list(values.shape)}")
        return np.ascontiguousarray(values)
    if values.dtype.kind == "f":
        if values.ndim == 3 and values.shape == (c, h, w):
            values = values[None]
        if values.ndim != 4 or values.shape[1:] != (c, h, w):
            raise InputError(f"{where}: float inputs must be normalized [N, {c}, {h}, {w}] for this bundle, "
                             f"got {list(values.shape)}")
        values = values.astype(np.float32)
        if not np.isfinite(values).all():
            raise InputError(f"{where}: {int((~np.isfinite(values)).sum())} NaN/inf values")
        return np.ascontiguousarray(values)
    raise InputError(f"{where}: arrays must be uint8 images or float inputs, got {values.dtype}")


def _load_numpy(path: Path, shape: tuple[int, int, int]) -> InputSet:
    try:
        if path.suffix == ".npy":
            values = np.load(path, allow_pickle=False)
            ids, labels = None, None
        else:
            with np.load(path, allow_pickle=False) as z:
                names = list(z.files)
                key = next((k for k in ("x", "images") if k in names), names[0] if len(names) == 1 else None)
                if key is None:
                    raise InputError(f"{path}: no array 'x' or 'images' among {names}")
                values = z[key]
                ids = [str(s) for s in z["ids"].tolist()] if "ids" in names else None
                label_key = next((k for k in ("y", "labels") if k in names), None)
                labels = z[label_key] if label_key is not None else None
    except InputError:
        raise
    except (OSError, ValueError, EOFError) as exc:  # also object arrays refused without pickle
        raise InputError(f"{path}: not a readable numpy file ({exc})") from None
    values = _array(values, str(path), shape)
    if ids is None:
        ids = [f"{path.name}:{i}" for i in range(len(values))]
    elif len(ids) != len(values):
        raise InputError(f"{path}: {len(ids)} ids for {len(values)} samples")
    known: dict[str, str] = {}
    if path.suffix == ".npz" and labels is not None:
        if labels.shape != (len(values),) or labels.dtype.kind not in "iu":
            raise InputError(f"{path}: labels must be integers [{len(values)}], got {labels.dtype} "
                             f"{list(labels.shape)}")
        known = {sample: str(int(y)) for sample, y in zip(ids, labels.tolist())}
    return InputSet(tuple(ids), values, labels=known)


def load_inputs(path: str | Path, input_shape: tuple[int, ...], *, resize: bool = False) -> InputSet:
    """Read every sample of `path` for a bundle taking inputs of `input_shape` [C, H, W]."""
    path = Path(path)
    if len(input_shape) != 3:
        raise InputError(f"the bundle's input shape {list(input_shape)} is not [C, H, W]")
    shape = (int(input_shape[0]), int(input_shape[1]), int(input_shape[2]))
    if not path.exists():
        raise InputError(f"{path}: no such file or folder")
    name = path.name.lower()
    if path.is_file() and name.endswith((".npy", ".npz")):
        inputs = _load_numpy(path, shape)
    else:
        if path.is_dir():
            members: Iterator[tuple[str, bytes | InputError]] = _iter_folder(path)
        elif name.endswith(_ARCHIVE_SUFFIXES):
            members = _iter_archive(path)
        elif _is_image(name):
            try:
                members = iter([(path.name, path.read_bytes())])
            except OSError as exc:
                raise InputError(f"{path}: cannot read ({exc.strerror or exc})") from None
        else:
            raise InputError(f"{path}: not an image, folder, .tar.gz archive, .npy or .npz file")
        ids: list[str] = []
        images: list[np.ndarray] = []
        errors: list[tuple[str, InputError]] = []
        for member, data in members:
            where = str(path / member) if path.is_dir() else f"{path}:{member}" if member != path.name else str(path)
            try:
                if isinstance(data, InputError):
                    raise data
                images.append(_decode(data, where, shape, resize))
            except InputError as exc:  # one bad file must not cost the others their answers
                errors.append((member, exc))
                continue
            ids.append(member)
        if not images:
            if errors:
                raise errors[0][1]
            raise InputError(f"{path}: no images ({', '.join(IMAGE_SUFFIXES)}) found")
        folders = {i: Path(i).parent.name for i in ids if Path(i).parent.name}
        inputs = InputSet(tuple(ids), np.stack(images), tuple((m, str(e)) for m, e in errors), folders)
    if len(inputs) == 0:
        raise InputError(f"{path}: no samples")
    return inputs
