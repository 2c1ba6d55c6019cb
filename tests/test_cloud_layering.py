"""Layering and public API of splitexit.cloud."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import splitexit.cloud as cloud

CLOUD = Path(__file__).resolve().parents[1] / "cloud"
GRPC_MODULES = {"server.py", "servicer.py"}  # only the server and its servicer speak gRPC


def test_cloud_imports_neither_edge_nor_sim_and_grpc_only_in_server_modules() -> None:
    for path in CLOUD.rglob("*.py"):
        text = path.read_text()
        for part in ("splitexit.edge", "splitexit.sim"):
            assert part not in text, f"{path.name} imports {part}"
        if path.name not in GRPC_MODULES:
            assert "import grpc" not in text and "from grpc" not in text, f"{path.name} imports grpc"


def test_public_api_resolves() -> None:
    for name in cloud.__all__:
        assert getattr(cloud, name) is not None, name


def test_the_cli_entry_point_is_light() -> None:
    code = ("import sys, splitexit.cloud.cli; "
            "print(any(m in sys.modules for m in ('torch', 'grpc', 'zeroconf', 'prometheus_client')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
