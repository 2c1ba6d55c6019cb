"""Regenerate the committed gRPC/protobuf code: `python -m splitexit.proto.generate`.

Runs grpc_tools.protoc (the `grpcio-tools` version pinned in the `test` extra of
pyproject.toml, so output is reproducible) on every `.proto` file of this package and
writes `<name>_pb2.py`, `<name>_pb2.pyi` and `<name>_pb2_grpc.py` next to it.

The include root is the folder that holds `splitexit/`, so each `.proto` is compiled
under the same path as its import name (`splitexit/proto/inference.proto`). protoc
therefore emits `from splitexit.proto import inference_pb2` in the gRPC module, which is
already correct: no import rewriting. `generate` checks this, so a `.proto` moved to
another folder fails here rather than at import time on a device.

tests/test_proto.py regenerates into a temporary folder and fails if the committed files
differ.
"""

from __future__ import annotations

import argparse
import re
import shutil
import sys
import tempfile
from pathlib import Path
from types import ModuleType
from typing import Sequence

__all__ = ["PACKAGE_DIR", "GenerateError", "generate", "main"]

PACKAGE_DIR = Path(__file__).resolve().parent
# The folder holding `splitexit/`: protos/ in the repository, site-packages when installed.
_INCLUDE_ROOT = PACKAGE_DIR.parents[1]
_PACKAGE = "splitexit.proto"
_SUFFIXES = ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py")


class GenerateError(RuntimeError):
    """protoc failed, or produced something this package cannot import."""


def _protoc() -> tuple[ModuleType, Path]:
    """grpc_tools' protoc entry point and the folder of its bundled well-known types."""
    try:
        import grpc_tools
        from grpc_tools import protoc
    except ImportError as exc:  # a runtime-only install has no generator
        raise GenerateError(
            "grpcio-tools is not installed; install the test extra: pip install -e '.[test]'"
        ) from exc
    return protoc, Path(grpc_tools.__file__).resolve().parent / "_proto"


def _check_imports(path: Path) -> None:
    """Generated modules must import each other package-absolute (`from splitexit.proto
    import x_pb2`); a bare `import x_pb2` only works from inside this folder."""
    for line in path.read_text().splitlines():
        match = re.match(r"(?:from\s+([\w.]+)\s+)?import\s+\w+_pb2\b", line)
        if match is None or (match.group(1) or "").startswith("google.protobuf"):
            continue
        if match.group(1) != _PACKAGE:
            raise GenerateError(f"{path.name}: generated import is not from {_PACKAGE}: {line.strip()!r}")


def generate(out_dir: Path | None = None) -> list[Path]:
    """Compile every `.proto` of this package into `out_dir` (default: this package).

    Returns the written files, sorted. Raises GenerateError with protoc's message.
    """
    out_dir = PACKAGE_DIR if out_dir is None else Path(out_dir)
    protos = sorted(PACKAGE_DIR.glob("*.proto"))
    if not protos:
        raise GenerateError(f"no .proto files in {PACKAGE_DIR}")
    protoc, well_known = _protoc()
    rel = [str(p.relative_to(_INCLUDE_ROOT)) for p in protos]
    written: list[Path] = []
    # protoc writes into <out>/splitexit/proto/; build there, then copy the files out.
    with tempfile.TemporaryDirectory() as tmp:
        args = [
            "grpc_tools.protoc",
            f"--proto_path={_INCLUDE_ROOT}",
            f"--proto_path={well_known}",  # google/protobuf/*.proto, should a file import one
            f"--python_out={tmp}",
            f"--pyi_out={tmp}",
            f"--grpc_python_out={tmp}",
            *rel,
        ]
        code = protoc.main(args)
        if code != 0:
            raise GenerateError(f"protoc failed (exit {code}) on {', '.join(rel)}; its message is above")
        out_dir.mkdir(parents=True, exist_ok=True)
        for proto, name in zip(protos, rel):
            built = Path(tmp) / Path(name).parent
            for suffix in _SUFFIXES:
                src = built / (proto.stem + suffix)
                if not src.is_file():
                    raise GenerateError(f"protoc did not write {src.name}")
                _check_imports(src)
                dst = out_dir / src.name
                shutil.copyfile(src, dst)
                written.append(dst)
    return sorted(written)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m splitexit.proto.generate",
        description="Regenerate the committed protobuf/gRPC code of splitexit.proto.",
    )
    parser.add_argument("--out", type=Path, default=None, help="output folder (default: the package folder)")
    args = parser.parse_args(argv)
    try:
        files = generate(args.out)
    except GenerateError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    for path in files:
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
