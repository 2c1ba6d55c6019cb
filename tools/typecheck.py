"""Type-check the whole `splitexit` package with mypy.

The package is assembled from several top-level folders (`[tool.setuptools.package-dir]`
in pyproject.toml: shared/ is `splitexit`, edge/ is `splitexit.edge`, ...). An editable
install reaches them through an import hook that type checkers do not run, so this script
lays the package out as one tree of symbolic links under .cache/typecheck/ (from the
mapping itself, so the two never disagree) and runs mypy on it. Paths in mypy's messages
are then `splitexit/...`; the line says which folder that is.

    python tools/typecheck.py        # exit status: mypy's
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TREE = ROOT / ".cache" / "typecheck"


def package_dirs() -> dict[str, Path]:
    """Each listed package's folder: its own entry in the mapping, or its parent's folder
    and its last name (as setuptools resolves it)."""
    setuptools = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    mapping = setuptools["package-dir"]
    dirs: dict[str, Path] = {}
    for name in sorted(setuptools["packages"], key=lambda n: n.count(".")):  # parents first
        parent, _, last = name.rpartition(".")
        dirs[name] = ROOT / mapping[name] if name in mapping else dirs[parent] / last
    return dirs


def lay_out(dirs: dict[str, Path]) -> Path:
    """Links every module file of each package into TREE/<package path>/."""
    if TREE.exists():
        shutil.rmtree(TREE)
    for name, folder in dirs.items():
        target = TREE.joinpath(*name.split("."))
        target.mkdir(parents=True, exist_ok=True)
        for file in folder.iterdir():
            if file.suffix in (".py", ".pyi") or file.name == "py.typed":
                (target / file.name).symlink_to(file)
    return TREE


def main() -> int:
    tree = lay_out(package_dirs())
    command = [sys.executable, "-m", "mypy", "--config-file", str(ROOT / "pyproject.toml"), "-p", "splitexit"]
    return subprocess.call(command, cwd=tree)


if __name__ == "__main__":
    sys.exit(main())
