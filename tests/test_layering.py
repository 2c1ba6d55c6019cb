"""DESIGN.md's layering rules, checked on the import statements of every module of the
installed package (the syntax tree, not text: a docstring that names a module is no
import, and `from splitexit import edge` is one).

Lazy imports inside functions count too: they run when the function does, and a rule
that held only at import time would let the core reach into the edge at run time.
"""

from __future__ import annotations

import ast
import importlib.util
import pkgutil
import subprocess
import sys
import tomllib
from functools import cache
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PARTS = ("splitexit.edge", "splitexit.cloud", "splitexit.sim")
# who may speak gRPC: the transports and the server, and the generated stubs
GRPC_ALLOWED = {
    "splitexit.edge.transport.grpc_channel",
    "splitexit.cloud.server",
    "splitexit.cloud.servicer",
    "splitexit.cloud.kserve",  # the KServe v2 protocol's servicer
    "splitexit.sim.loadgen",
    "splitexit.proto.inference_pb2_grpc",
    "splitexit.proto.kserve_v2_pb2_grpc",
    "splitexit.proto.generate",
}
# part -> the parts it must not import
FORBIDDEN = {
    "core": PARTS,
    "splitexit.edge": ("splitexit.cloud", "splitexit.sim"),
    "splitexit.cloud": ("splitexit.edge", "splitexit.sim"),
    "splitexit.sim": (),
}


def _part(module: str) -> str:
    return next((p for p in PARTS if module == p or module.startswith(p + ".")), "core")


@cache
def _modules() -> dict[str, Path]:
    """Every module of the installed package and its file, package by package as
    pyproject.toml lists them (the editable install maps folders, so no single folder
    walk finds them all)."""
    packages = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]
    found: dict[str, Path] = {}
    for package in packages:
        spec = importlib.util.find_spec(package)
        assert spec is not None and spec.origin, package
        found[package] = Path(spec.origin)
        for info in pkgutil.iter_modules(spec.submodule_search_locations):
            if not info.ispkg:
                found[f"{package}.{info.name}"] = Path(spec.origin).parent / f"{info.name}.py"
    return found


def _imports(module: str, path: Path) -> set[str]:
    """The absolute names `module`'s import statements name, anywhere in the file."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from the package, `level - 1` packages up
                parent = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{parent}.{base}" if base else parent
            names.add(base)
            names.update(f"{base}.{alias.name}" for alias in node.names)  # may name a submodule
    return names


def test_the_package_has_the_modules_of_every_part() -> None:
    parts = {_part(m) for m in _modules()}
    assert parts == {"core", *PARTS}
    assert "splitexit.runtime" in _modules() and "splitexit.edge.agent" in _modules()


@pytest.mark.parametrize("part", sorted(FORBIDDEN))
def test_no_part_imports_a_part_it_must_not(part: str) -> None:
    broken = []
    for module, path in sorted(_modules().items()):
        if _part(module) != part:
            continue
        for name in _imports(module, path):
            if any(name == f or name.startswith(f + ".") for f in FORBIDDEN[part]):
                broken.append(f"{module} imports {name}")
    assert not broken


def test_only_the_transports_and_the_server_speak_grpc() -> None:
    speakers = {module for module, path in _modules().items()
                if any(name.split(".")[0] in ("grpc", "grpc_health", "grpc_reflection")
                       for name in _imports(module, path))}
    assert speakers <= GRPC_ALLOWED, speakers - GRPC_ALLOWED
    assert {"splitexit.edge.transport.grpc_channel", "splitexit.cloud.server"} <= speakers  # the rule checks something


def test_the_checker_sees_lazy_relative_and_from_package_imports_and_not_text(tmp_path: Path) -> None:
    source = tmp_path / "m.py"
    source.write_text("from splitexit import edge\n"
                      "def f():\n    from ..cloud import server\n    import grpc\n")
    assert {"splitexit.edge", "splitexit.cloud.server", "grpc"} <= _imports("splitexit.sim.m", source)
    source.write_text('"""Unlike splitexit.cloud, this imports nothing; import grpc."""\nx = "import grpc"\n')
    assert _imports("splitexit.sim.m", source) == set()


def test_the_core_cli_loads_no_torch() -> None:
    code = "import sys, splitexit, splitexit.cli; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
