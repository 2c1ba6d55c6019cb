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


@pytest.fixture
def cache_dir(tmp_path: Path) -> Path:
    return tmp_path / "cache"


@pytest.fixture
def reference_cifar() -> Path:
    """The reference CIFAR-10 archive beside the project (CI has it at ../shared/data)."""
    if not REFERENCE_CIFAR.exists():
        pytest.skip(f"reference CIFAR-10 archive not found at {REFERENCE_CIFAR}")
    return REFERENCE_CIFAR
