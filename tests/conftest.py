from __future__ import annotations

from pathlib import Path

import importlib.util
import sys

import pytest
import torch

# Shared helpers of the edge tests, importable by name although pytest runs with
# --import-mode=importlib (which puts no test folder on sys.path).
_EDGE_SUPPORT = "splitexit_tests_edge_support"
if _EDGE_SUPPORT not in sys.modules:
    _spec = importlib.util.spec_from_file_location(_EDGE_SUPPORT, Path(__file__).with_name("edge_support.py"))
    sys.modules[_EDGE_SUPPORT] = importlib.util.module_from_spec(_spec)
    _spec.loader.exec_module(sys.modules[_EDGE_SUPPORT])

REFERENCE_CIFAR = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "cifar10-jpg.tar.gz"


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.fixture(scope="module")
def tiny_net():
    """The edge tests' tiny model with sharpened random heads, and its checkpoint meta."""
    return sys.modules[_EDGE_SUPPORT].tiny_model()


@pytest.fixture(scope="module")
def tiny_batch(tiny_net):
    """48 uint8 images for the tiny model, and the same normalized."""
    return sys.modules[_EDGE_SUPPORT].batch(tiny_net[1], 48)


@pytest.fixture
def cache_dir(tmp_path: Path) -> Path:
    return tmp_path / "cache"


@pytest.fixture
def reference_cifar() -> Path:
    """The reference CIFAR-10 archive beside the project (CI has it at ../shared/data)."""
    if not REFERENCE_CIFAR.exists():
        pytest.skip(f"reference CIFAR-10 archive not found at {REFERENCE_CIFAR}")
    return REFERENCE_CIFAR


@pytest.fixture(scope="module")
def bench_dirs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(cache, out) shared by a test module: its quick models train once, every bench reuses them."""
    root = tmp_path_factory.mktemp("bench")
    return root / "cache", root / "out"


@pytest.fixture(scope="module")
def quick_bench(bench_dirs: tuple[Path, Path]):
    """quick_bench(name, *extra): run `splitexit bench NAME --quick` in bench_dirs, return its JSON."""
    import json

    from splitexit.cli import main

    def run(name: str, *extra: str) -> dict:
        cache, out = bench_dirs
        assert main(["bench", name, "--quick", "--cache-dir", str(cache), "--out", str(out), *extra]) == 0
        return json.loads((out / f"{name}.json").read_text())

    return run
