"""Public API and light entry point of splitexit.cloud (its layering: test_layering.py)."""

from __future__ import annotations

import subprocess
import sys

import splitexit.cloud as cloud

def test_public_api_resolves() -> None:
    for name in cloud.__all__:
        assert getattr(cloud, name) is not None, name


def test_the_cli_entry_point_is_light() -> None:
    code = ("import sys, splitexit.cloud.cli; "
            "print(any(m in sys.modules for m in ('torch', 'grpc', 'zeroconf', 'prometheus_client')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
