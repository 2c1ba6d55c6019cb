"""A standard gRPC command-line client (buf curl, which uses server reflection) lists the
service and calls GetModelInfo on a real worker process with no .proto files at hand.

`make test` installs buf from the npm registry into .tools/ when npm is there; without it
this test is skipped and says so.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from splitexit.bundle import export_bundle
from splitexit.checkpoint import CheckpointMeta
from splitexit.models import ModelConfig, build_model
from splitexit.policies import MaxProb

pytestmark = pytest.mark.loopback
ROOT = Path(__file__).resolve().parents[1]
CONFIG = ModelConfig(arch="resnet14_tiny", in_chans=1, exit_after=(1, 2, 3))


def _buf() -> str:
    found = shutil.which("buf") or next((str(p) for p in [ROOT / ".tools/node_modules/.bin/buf"] if p.exists()), None)
    if found is None:
        pytest.skip("buf (a gRPC CLI client) is not installed: `make test` installs it with npm")
    return found


def test_buf_curl_lists_the_service_and_calls_get_model_info(tmp_path: Path) -> None:
    buf = _buf()
    torch.manual_seed(0)
    meta = CheckpointMeta(model=CONFIG, mean=(0.5,), std=(0.25,), classes=tuple(str(i) for i in range(10)))
    bundle = export_bundle(tmp_path / "tiny", build_model(CONFIG).eval(), meta, split=1, policy=MaxProb(0.5),
                           input_shape=(1, 8, 8), name="tiny")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "splitexit.cli", "cloud", "serve", str(bundle), "--host",
                             "127.0.0.1", "--port", "0", "--no-advertise", "--threads", "1"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        line = proc.stdout.readline()
        assert " on 127.0.0.1:" in line, (line, proc.stderr.read())
        url = "http://" + line.split(" on ")[1].split()[0]
        curl = [buf, "curl", "--protocol", "grpc", "--http2-prior-knowledge"]
        listed = subprocess.run([*curl, "--list-services", url], capture_output=True, text=True, timeout=60)
        assert listed.returncode == 0, listed.stderr
        assert "splitexit.v1.SplitInference" in listed.stdout.split()
        called = subprocess.run([*curl, "--data", "{}", f"{url}/splitexit.v1.SplitInference/GetModelInfo"],
                                capture_output=True, text=True, timeout=60)
        assert called.returncode == 0, called.stderr
        info = json.loads(called.stdout)
        assert info["models"][0]["name"] == "tiny" and len(info["models"][0]["bundleHash"]) == 64
    finally:
        proc.terminate()
        proc.wait(timeout=20)
        proc.stdout.close()
        proc.stderr.close()
