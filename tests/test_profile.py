"""Device profiles: measured per stage on this machine, saved and read back, derived for
a device class with the source of the factor, and read by the planner."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from splitexit.bundle import export_bundle
from splitexit.checkpoint import CheckpointMeta
from splitexit.cli import main
from splitexit.models import ModelConfig, build_model
from splitexit.policies import MaxProb
from splitexit.profile import ProfileError, derived, load_profile

CONFIG = ModelConfig(arch="resnet14_tiny", in_chans=1, exit_after=(1, 2, 3, 4, 5))


@pytest.fixture
def bundle(tmp_path: Path) -> Path:
    model = build_model(CONFIG).eval()
    meta = CheckpointMeta(model=CONFIG, mean=(0.5,), std=(0.25,), classes=tuple(str(i) for i in range(10)))
    return export_bundle(tmp_path / "b", model, meta, split=2, policy=MaxProb(0.5), input_shape=(1, 8, 8))


def test_profile_times_every_piece_and_reads_back(bundle: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "device.json"
    assert main(["profile", str(bundle), "--name", "dev", "--batch-sizes", "1,4", "--repeats", "3",
                 "--out", str(out)]) == 0
    profile = load_profile(out)
    assert profile.name == "dev" and profile.arch == "resnet14_tiny" and set(profile.times) == {1, 4}
    one = profile.at(1)
    assert len(one.stage_ms) == build_model(CONFIG).num_stages and set(one.exit_ms) == {1, 2, 3, 4, 5}
    assert all(t > 0 for t in one.stage_ms) and one.head_ms > 0
    assert "measured on" in profile.source and "wrote" in capsys.readouterr().out
    assert profile.at(2).stage_ms[0] == pytest.approx(profile.at(1).stage_ms[0] * 2)  # nearest, scaled

    slow = derived(profile, name="slow-board", factor=8.0, source="a published measurement")
    assert slow.at(1).backbone_ms() == pytest.approx(8 * one.backbone_ms())
    assert "x 8" in slow.source and "published" in slow.source
    with pytest.raises(ProfileError, match="source"):
        derived(profile, name="x", factor=2.0, source=" ")


def test_a_device_class_is_this_machine_scaled_with_its_source(bundle: Path, tmp_path: Path) -> None:
    out = tmp_path / "pi.json"
    assert main(["profile", str(bundle), "--as", "rpi4", "--repeats", "3", "--out", str(out)]) == 0
    pi = load_profile(out)
    assert pi.name == "rpi4-class" and "Raspberry Pi 4" in pi.source and "ncnn" in pi.source
    assert main(["profile", str(bundle), "--as", "toaster", "--out", str(out)]) == 2


def test_bad_profiles_are_refused(tmp_path: Path, bundle: Path) -> None:
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"format": "something else"}))
    with pytest.raises(ProfileError, match="not a splitexit-device-profile"):
        load_profile(bad)
    bad.write_text(json.dumps({"format": "splitexit-device-profile", "name": "x", "source": "y", "arch": "a",
                               "threads": 1, "batches": {"1": {"stage_ms": [1.0]}}}))
    with pytest.raises(ProfileError, match="KeyError"):
        load_profile(bad)
    assert main(["profile", str(bundle), "--batch-sizes", "0", "--out", str(tmp_path / "p.json")]) == 2
