from __future__ import annotations

from pathlib import Path

import pytest
import torch

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
