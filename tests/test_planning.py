"""`splitexit plan` on a bundle: measured exit behaviour and times, every static route in
the table, the choice and its reason, and clear refusals."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from splitexit.bundle import export_bundle
from splitexit.checkpoint import CheckpointMeta
from splitexit.cli import main
from splitexit.models import ModelConfig, build_model
from splitexit.policies import MaxProb
from splitexit.profile import derived, load_profile

CONFIG = ModelConfig(arch="resnet14_tiny", in_chans=1, exit_after=(1, 2, 3, 4, 5))


@pytest.fixture(scope="module")
def bundle(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    model = build_model(CONFIG).eval()
    meta = CheckpointMeta(model=CONFIG, mean=(0.5,), std=(0.25,), classes=tuple(str(i) for i in range(10)))
    return export_bundle(tmp_path_factory.mktemp("b") / "tiny", model, meta, split=2, policy=MaxProb(0.3),
                         input_shape=(1, 8, 8))


def _plan(bundle: Path, tmp_path: Path, *extra: str) -> tuple[int, dict | None]:
    out = tmp_path / "plan.json"
    code = main(["plan", str(bundle), "--cache-dir", str(tmp_path / "cache"), "--out", str(out), *extra])
    return code, json.loads(out.read_text()) if out.exists() else None


def test_plan_ranks_every_route_and_says_why(bundle: Path, tmp_path: Path, capsys) -> None:
    code, result = _plan(bundle, tmp_path, "--link", "lte")
    assert code == 0 and result is not None
    routes = {c["route"] for c in result["candidates"]}
    assert {"edge_only", "edge_exits", "cloud_only", "split", "adaptive"} <= routes
    times = [c["expected_ms"] for c in result["candidates"]]
    assert result["choice"]["plan"] == result["candidates"][0]["plan"] and times[0] == min(times)
    assert result["rtt_ms"] == 70.0 and result["up_mbps"] == 5.85
    out = capsys.readouterr().out
    assert "choice:" in out and "the fastest plan" in out


def test_a_device_far_slower_than_the_worker_on_a_fast_link_sends_to_the_cloud(bundle: Path, tmp_path: Path) -> None:
    assert main(["profile", str(bundle), "--repeats", "3", "--out", str(tmp_path / "here.json")]) == 0
    here = load_profile(tmp_path / "here.json")
    slow = derived(here, name="very-slow-board", factor=1e5, source="a hand-made profile for this test")
    slow.save(tmp_path / "slow.json")
    code, result = _plan(bundle, tmp_path, "--link", "fios", "--rtt-ms", "1", "--device", str(tmp_path / "slow.json"),
                         "--cloud", str(tmp_path / "here.json"))
    assert code == 0 and result is not None
    assert result["candidates"][0]["route"] == "cloud_only"
    assert result["device"]["name"] == "very-slow-board"


def test_plan_for_energy_names_its_figures(bundle: Path, tmp_path: Path, capsys) -> None:
    code, result = _plan(bundle, tmp_path, "--link", "lte", "--objective", "energy", "--device-power", "6.4,2.7")
    assert code == 0 and result is not None and result["objective"] == "energy"
    energies = [c["energy_mj"] for c in result["candidates"]]
    assert all(e is not None and e > 0 for e in energies) and energies[0] == min(energies)
    assert "lte radio of Huang et al., MobiSys 2012" in result["energy"]
    assert "the least energy plan" in capsys.readouterr().out
    assert _plan(bundle, tmp_path, "--link", "lte", "--objective", "energy")[0] == 2
    assert "--objective energy needs --device-power" in capsys.readouterr().err
    assert _plan(bundle, tmp_path, "--link", "cable", "--objective", "energy", "--device-power", "6,2")[0] == 2
    assert "no radio power known for the link 'cable'" in capsys.readouterr().err


def test_bad_plan_requests_are_refused(bundle: Path, tmp_path: Path, capsys) -> None:
    assert _plan(bundle, tmp_path, "--link", "carrier-pigeon")[0] == 2
    assert "not a link profile" in capsys.readouterr().err
    assert _plan(bundle, tmp_path, "--link", "lte", "--accuracy-floor", "0.5", "--latency-target", "9")[0] == 2
