"""A network of the user's own (an nn.Module defined here, not in the package) through the
whole path from the CLI: train (with exits), eval, calibrate, export, `cloud serve` and
`edge run` over gRPC, with the deployed answers equal to the whole network's offline
answers under the same policy (issue 20). No pickle anywhere: the architecture travels as
the import path of its factory; the ONNX edge runs without it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

import splitexit_tests_edge_support as S  # registered by conftest.py
from splitexit.cli import main

pytestmark = pytest.mark.slow

USER_CODE = textwrap.dedent('''
    from torch import nn


    class TinyCNN(nn.Module):
        """Three conv blocks and a linear classifier: nothing splitexit knows about."""

        def __init__(self, num_classes: int, in_chans: int) -> None:
            super().__init__()
            self.conv1, self.bn1, self.act1 = nn.Conv2d(in_chans, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU()
            self.conv2, self.bn2, self.act2 = nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.BatchNorm2d(16), nn.ReLU()
            self.conv3, self.bn3, self.act3 = nn.Conv2d(16, 32, 3, stride=2, padding=1), nn.BatchNorm2d(32), nn.ReLU()
            self.pool, self.fc = nn.AdaptiveAvgPool2d(1), nn.Linear(32, num_classes)

        def forward(self, x):
            x = self.act1(self.bn1(self.conv1(x)))
            x = self.act2(self.bn2(self.conv2(x)))
            x = self.act3(self.bn3(self.conv3(x)))
            return self.fc(self.pool(x).flatten(1))


    def build(num_classes: int, in_chans: int) -> nn.Module:
        return TinyCNN(num_classes, in_chans)
''')


def _cli(*argv: str, env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "splitexit.cli", *argv], capture_output=True, text=True, env=env,
                          cwd=cwd, timeout=300)


def test_a_network_of_ones_own_goes_from_training_to_served_answers(tmp_path: Path, monkeypatch, capsys) -> None:
    import torch

    from splitexit.bundle import load_whole
    from splitexit.data import Normalize, load_dataset
    from splitexit.runtime import ExitRunner

    code_dir = tmp_path / "usercode"
    code_dir.mkdir()
    (code_dir / "mynets.py").write_text(USER_CODE)
    monkeypatch.syspath_prepend(str(code_dir))
    cache, ckpt = tmp_path / "cache", tmp_path / "mine.safetensors"

    assert main(["train", "--data", "digits", "--module", "mynets:build", "--list-nodes"]) == 0
    nodes = capsys.readouterr().out.split()
    assert nodes[:3] == ["conv1", "bn1", "act1"] and "act2" in nodes and "fc" in nodes
    assert main(["train", "--data", "digits", "--module", "mynets:build", "--cut-after", "act1,act2",
                 "--epochs", "15", "--batch-size", "64", "--lr", "0.1", "--cache-dir", str(cache),
                 "--out", str(ckpt)]) == 0
    assert "exits after stages [0, 1]" in capsys.readouterr().out
    assert main(["eval", str(ckpt), "--data", "digits", "--cache-dir", str(cache), "--out", str(tmp_path / "ev")]) == 0
    policy = tmp_path / "policy.json"
    assert main(["calibrate", str(ckpt), "--data", "digits", "--policy", "maxprob", "--threshold", "0.7",
                 "--cache-dir", str(cache), "--out", str(policy)]) == 0
    bundle = tmp_path / "bundle"
    assert main(["export", str(ckpt), "--policy", str(policy), "--split", "0", "--out", str(bundle)]) == 0
    assert "ONNX edge segments" in capsys.readouterr().out

    test = load_dataset("digits").test
    np.save(tmp_path / "test.npy", test.images)
    with_code = {**os.environ, "PYTHONPATH": os.pathsep.join([str(code_dir), os.environ.get("PYTHONPATH", "")])}
    without_code = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    with S.cloud_worker(bundle, env=with_code, cwd=tmp_path) as address:
        # the edge, on ONNX Runtime, runs without the user's code (another folder, no PYTHONPATH)
        out = tmp_path / "answers.jsonl"
        run = _cli("edge", "run", str(bundle), "--input", str(tmp_path / "test.npy"), "--worker", address,
                   "--out", str(out), env=without_code, cwd=Path("/"))
        assert run.returncode == 0, run.stderr[-2000:]
    answers = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(answers) == len(test.labels) and {a["route"] for a in answers} == {"edge", "cloud"}

    whole = load_whole(bundle)  # the offline reference: the whole network, the same policy
    runner = ExitRunner(whole.model, whole.policy, num_classes=len(whole.classes))
    with torch.inference_mode():
        merged = runner.run(Normalize(whole.mean, whole.std)(torch.from_numpy(test.images))).merged()
    assert merged is not None
    want = {int(r): (int(p.argmax()), runner.exit_stages[k])
            for r, p, k in zip(merged.rows, merged.probs, merged.exit_index)}
    got = {int(a["sample_id"].rsplit(":", 1)[1]): (a["label"], a["exit"]) for a in answers}
    assert got == want
    accuracy = np.mean([got[i][0] == y for i, y in enumerate(test.labels.tolist())])
    assert accuracy > 0.5, accuracy  # it learned something: digits, 15 epochs
