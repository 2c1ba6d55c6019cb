from __future__ import annotations

import io
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from splitexit.data import (
    ArraySet,
    DataError,
    Normalize,
    augment,
    iterate_batches,
    load_dataset,
    load_digits,
    load_image_tree,
    load_numpy,
)

CLASSES = ("cat", "dog", "frog")


def _jpeg(seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)).save(buf, format="JPEG")
    return buf.getvalue()


def _write_tree(root: Path, per_class: dict[str, int]) -> None:
    for split, n in per_class.items():
        for c in CLASSES:
            folder = root / split / c
            folder.mkdir(parents=True)
            for i in range(n):
                (folder / f"{i:04d}.jpg").write_bytes(_jpeg(hash((split, c, i)) % 10_000))


def _write_archive(path: Path, per_class: dict[str, int]) -> Path:
    with tarfile.open(path, "w:gz") as tar:
        for split, n in per_class.items():
            for c in CLASSES:
                for i in range(n):
                    data = _jpeg(i)
                    info = tarfile.TarInfo(f"{split}/{c}/{i:04d}.jpg")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
    return path


def test_archive_in_split_class_layout_is_read_with_a_deterministic_validation_split(tmp_path: Path) -> None:
    archive = _write_archive(tmp_path / "toy.tar.gz", {"train": 10, "test": 4})
    a = load_image_tree(archive, val_size=6, cache_dir=tmp_path / "cache")
    assert a.classes == CLASSES and a.in_chans == 3 and a.image_size == 8
    assert (len(a.train), len(a.val), len(a.test)) == (24, 6, 12)
    assert np.bincount(a.val.labels).tolist() == [2, 2, 2]  # stratified
    assert np.bincount(a.test.labels).tolist() == [4, 4, 4]
    b = load_image_tree(archive, val_size=6, cache_dir=tmp_path / "cache")  # from the decoded cache
    assert list((tmp_path / "cache" / "data").glob("*.npz"))
    np.testing.assert_array_equal(a.val.images, b.val.images)
    np.testing.assert_array_equal(a.train.labels, b.train.labels)


def test_folder_layout_matches_archive_layout(tmp_path: Path) -> None:
    _write_tree(tmp_path / "tree", {"train": 5, "test": 2})
    ds = load_dataset(str(tmp_path / "tree"), val_size=3)
    assert ds.classes == CLASSES and len(ds.train) + len(ds.val) == 15 and len(ds.test) == 6


def test_corrupt_archive_is_refused_with_a_clear_error(tmp_path: Path) -> None:
    archive = _write_archive(tmp_path / "toy.tar.gz", {"train": 10, "test": 4})
    truncated = tmp_path / "truncated.tar.gz"
    truncated.write_bytes(archive.read_bytes()[: archive.stat().st_size // 2])
    with pytest.raises(DataError, match="truncated.tar.gz: corrupt or unreadable archive"):
        load_image_tree(truncated)
    garbage = tmp_path / "garbage.tar.gz"
    garbage.write_bytes(b"not an archive at all" * 100)
    with pytest.raises(DataError, match="corrupt or unreadable archive"):
        load_image_tree(garbage)


def test_unreadable_image_names_the_file(tmp_path: Path) -> None:
    _write_tree(tmp_path / "tree", {"train": 3, "test": 1})
    (tmp_path / "tree" / "train" / "dog" / "0001.jpg").write_bytes(b"\xff\xd8 broken jpeg")
    with pytest.raises(DataError, match=r"train/dog/0001.jpg: not a readable image"):
        load_image_tree(tmp_path / "tree")


def test_missing_split_and_missing_path_are_clear_errors(tmp_path: Path) -> None:
    _write_tree(tmp_path / "only-train", {"train": 3})
    with pytest.raises(DataError, match="expected train/<class>/ and test/<class>/"):
        load_image_tree(tmp_path / "only-train")
    with pytest.raises(DataError, match="no such file"):
        load_image_tree(tmp_path / "nowhere.tar.gz")


def test_numpy_arrays(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    path = tmp_path / "arrays.npz"
    np.savez(path, train_x=rng.integers(0, 255, (50, 6, 6, 1), dtype=np.uint8), train_y=np.arange(50) % 5,
             test_x=rng.integers(0, 255, (10, 6, 6, 1), dtype=np.uint8), test_y=np.arange(10) % 5)
    ds = load_numpy(path, val_size=10)
    assert ds.num_classes == 5 and len(ds.train) == 40 and len(ds.val) == 10 and ds.in_chans == 1
    np.savez(tmp_path / "bad.npz", train_x=np.zeros((3, 2, 2, 1), np.uint8))
    with pytest.raises(DataError, match="missing array"):
        load_numpy(tmp_path / "bad.npz")
    np.savez(tmp_path / "float.npz", train_x=np.zeros((3, 2, 2, 1)), train_y=np.zeros(3), test_x=np.zeros((1, 2, 2, 1)),
             test_y=np.zeros(1))
    with pytest.raises(DataError, match="uint8"):
        load_numpy(tmp_path / "float.npz")


def test_grey_images_stay_one_channel_and_grey_arrays_are_taken(tmp_path: Path) -> None:
    """A grey data set (JPEGs in mode L, or [N, H, W] arrays) trains a 1-channel model: it
    was silently made RGB (and such a model then failed on the loader), and grey arrays
    were refused. Grey among colour images is made RGB, so one data set has one shape."""
    rng = np.random.default_rng(0)

    def grey_jpeg() -> bytes:
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 255, (8, 8), dtype=np.uint8), "L").save(buf, format="JPEG")
        return buf.getvalue()

    for split, n in (("train", 5), ("test", 2)):
        for c in CLASSES:
            (tmp_path / "grey" / split / c).mkdir(parents=True)
            for i in range(n):
                (tmp_path / "grey" / split / c / f"{i}.jpg").write_bytes(grey_jpeg())
    grey = load_dataset(str(tmp_path / "grey"), val_size=3)
    assert grey.in_chans == 1 and grey.train.images.shape[1:] == (8, 8, 1)
    (tmp_path / "grey" / "train" / "cat" / "colour.jpg").write_bytes(_jpeg(1))  # one colour image among them
    mixed = load_dataset(str(tmp_path / "grey"), val_size=3)
    assert mixed.in_chans == 3
    np.savez(tmp_path / "grey.npz", train_x=rng.integers(0, 255, (20, 28, 28), dtype=np.uint8),
             train_y=np.arange(20) % 2, test_x=rng.integers(0, 255, (4, 28, 28), dtype=np.uint8),
             test_y=np.arange(4) % 2)
    arrays = load_numpy(tmp_path / "grey.npz", val_size=4)
    assert arrays.in_chans == 1 and arrays.image_size == 28


def test_digits_splits_are_disjoint_and_deterministic() -> None:
    a, b = load_digits(), load_digits()
    assert (len(a.train), len(a.val), len(a.test)) == (1137, 300, 360)
    np.testing.assert_array_equal(a.val.labels, b.val.labels)
    sets = [{img.tobytes() + bytes([label]) for img, label in zip(s.images, s.labels)} for s in (a.train, a.test)]
    # a few digits repeat pixel-for-pixel in the original data; the splits must not share many
    assert len(sets[0] & sets[1]) <= 3


def test_augmentation_crops_and_flips_in_torch() -> None:
    x = torch.arange(2 * 1 * 4 * 4, dtype=torch.float32).view(2, 1, 4, 4)
    g = torch.Generator().manual_seed(0)
    out = augment(x, pad=2, flip=True, generator=g)
    assert out.shape == x.shape
    flipped = augment(x, pad=0, flip=True, generator=torch.Generator().manual_seed(1))
    for i in range(2):  # each row is either untouched or mirrored
        assert torch.equal(flipped[i], x[i]) or torch.equal(flipped[i], x[i].flip(-1))
    data = ArraySet(np.full((3, 4, 4, 3), 255, np.uint8), np.zeros(3, np.int64))
    (batch, labels), = list(iterate_batches(data, Normalize((0.5,) * 3, (0.25,) * 3), batch_size=8))
    assert batch.shape == (3, 3, 4, 4) and torch.allclose(batch, torch.full_like(batch, 2.0))


def test_a_flip_mask_flips_exactly_the_images_it_names_whatever_the_shuffle() -> None:
    images = np.random.default_rng(0).integers(0, 256, (6, 4, 4, 3), dtype=np.uint8)  # no image is symmetric
    data = ArraySet(images, np.arange(6))  # the label says which image a row is
    normalize = Normalize((0.5,) * 3, (0.25,) * 3)
    plain = normalize(torch.from_numpy(images))
    flips = torch.tensor([True, False, False, True, True, False])
    for batch, labels in iterate_batches(data, normalize, batch_size=4, shuffle=True, augment_flip=True,
                                         flips=flips, generator=torch.Generator().manual_seed(3)):
        for row, i in zip(batch, labels.tolist()):
            assert torch.equal(row, plain[i].flip(-1) if flips[i] else plain[i])


@pytest.mark.data
def test_reference_cifar_archive_has_the_expected_layout(reference_cifar: Path) -> None:
    from splitexit.data import _split_class, iter_archive

    seen = {}
    for i, (name, data) in enumerate(iter_archive(reference_cifar, _split_class)):
        seen[_split_class(name)] = Image.open(io.BytesIO(data)).size
        if i >= 200:
            break
    assert all(size == (32, 32) for size in seen.values())
    assert {split for split, _ in seen} <= {"train", "test"}

