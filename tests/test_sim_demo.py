"""The main job end to end: the digits network, the plan, bundles, a real worker process,
emulated links, and every strategy answering every input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from splitexit.cli import main

pytestmark = [pytest.mark.slow, pytest.mark.loopback]


def test_the_demo_runs_every_strategy_on_every_input(tmp_path: Path, capsys) -> None:
    out = tmp_path / "demo"
    assert main(["sim", "demo", "--epochs", "2", "--inputs", "12", "--link", "fios", "--out", str(out),
                 "--cache-dir", str(tmp_path / "cache")]) == 0
    result = json.loads((out / "demo.json").read_text())
    strategies = result["strategies"]
    assert set(strategies) == {"edge_only", "edge_exits", "cloud_only", "fixed_split", "adaptive"}
    for name, row in strategies.items():
        assert row["answered"] == row["inputs"] == 12 and row["degraded"] == 0, name
        assert row["p95_ms"] >= row["mean_ms"] * 0.5 > 0
    assert strategies["edge_only"]["bytes_up"] == 0 and strategies["edge_only"]["on_device"] == 1.0
    assert strategies["cloud_only"]["bytes_up"] > 100 and strategies["cloud_only"]["on_device"] == 0.0
    assert strategies["fixed_split"]["bytes_up"] > 0
    assert result["device"]["name"] == "rpi4-class" and "ncnn" in result["device"]["source"]
    assert (out / "demo.png").stat().st_size > 10_000
    printed = capsys.readouterr().out
    assert "strategy" in printed and "adaptive" in printed


def test_the_demo_refuses_an_unknown_link_or_device(tmp_path: Path, capsys) -> None:
    assert main(["sim", "demo", "--link", "dialup", "--out", str(tmp_path)]) == 2
    assert main(["sim", "demo", "--device", "abacus", "--out", str(tmp_path)]) == 2
    assert "unknown device" in capsys.readouterr().err
