"""Reading image archives (`.tar`, `.tar.gz`) member by member, without torch: the data
sets of `splitexit.data` and the edge's inputs (`splitexit.edge.inputs`) share it."""

from __future__ import annotations

import tarfile
from pathlib import Path
from typing import Callable, Iterator

__all__ = ["IMAGE_SUFFIXES", "DataError", "iter_archive"]

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp")


class DataError(ValueError):
    """A data set that cannot be read: the message says which file and why."""


def iter_archive(path: Path, keep: Callable[[str], object]) -> Iterator[tuple[str, bytes]]:
    """(member name, bytes) of the regular files of a tar(.gz) archive that `keep` accepts;
    a corrupt or unreadable archive is a DataError that says so."""
    try:
        with tarfile.open(path, "r:*") as tar:
            for member in tar:
                if member.isfile() and keep(member.name):
                    handle = tar.extractfile(member)
                    if handle is None:
                        raise DataError(f"{path}: cannot read member {member.name}")
                    yield member.name, handle.read()
    except (tarfile.TarError, EOFError, OSError, ValueError) as exc:
        # zlib/gzip errors surface as OSError/EOFError from the stream
        raise DataError(f"{path}: corrupt or unreadable archive ({exc})") from exc
