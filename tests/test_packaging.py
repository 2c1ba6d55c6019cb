"""The explicit package list in pyproject.toml must match the folders on disk."""

from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _setuptools_config() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]


def test_package_list_equals_folders_on_disk() -> None:
    config = _setuptools_config()
    listed = set(config["packages"])
    package_dir = config["package-dir"]
    on_disk: set[str] = set()
    for root_name in ("splitexit", "splitexit.edge", "splitexit.cloud", "splitexit.sim", "splitexit.proto"):
        base = ROOT / package_dir[root_name]
        for init in base.rglob("__init__.py"):
            rel = init.parent.relative_to(base)
            if "__pycache__" in rel.parts:
                continue
            on_disk.add(".".join((root_name, *rel.parts)))
    assert listed == on_disk, f"listed only: {listed - on_disk}; on disk only: {on_disk - listed}"
    for name in listed:
        assert name in package_dir or name.rsplit(".", 1)[0] in listed, f"{name} has no folder mapping"


def test_every_mapped_folder_exists() -> None:
    for name, folder in _setuptools_config()["package-dir"].items():
        assert (ROOT / folder / "__init__.py").is_file(), f"{name} -> {folder} has no __init__.py"


def test_import_splitexit_does_not_import_torch() -> None:
    code = "import sys, splitexit, splitexit.cli; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_public_api_lists_existing_names() -> None:
    import splitexit.models as models

    for name in models.__all__:
        assert hasattr(models, name), name
    assert (ROOT / "shared" / "py.typed").is_file()
