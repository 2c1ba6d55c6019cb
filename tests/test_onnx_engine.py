"""The ONNX edge engine: a bundle exported with ONNX segments answers like the torch edge
(same exits and labels, probabilities within 1e-4) through the real agent, runs without
torch, and refuses a tampered segment, a segment of the wrong shape, a missing ONNX
Runtime and a bundle without segments, each with one clear error."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from splitexit.bundle import export_bundle, manifest_hash
from splitexit.edge import AgentConfig, EdgeAgent, InProcessTransport
from splitexit.edge.engine import OnnxEngine, open_edge
from splitexit.manifest import BundleError
from splitexit.policies import MaxProb, Patience
from splitexit.policies.predictive import Predictive

import splitexit_tests_edge_support as S  # noqa: E402  (registered by conftest.py)

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def net(tiny_net):
    return tiny_net


@pytest.fixture(scope="module")
def data(tiny_batch):
    return tiny_batch


def _export(tmp: Path, net, policy, split: int) -> Path:
    model, meta = net
    return export_bundle(tmp / f"onnx-{policy.name}-{split}", model, meta, split=split, policy=policy,
                         input_shape=S.SHAPE, name="tiny", edge_engine="onnx")


@pytest.fixture(scope="module")
def maxprob_bundle(net, data, tmp_path_factory) -> Path:
    return _export(tmp_path_factory.mktemp("onnx"), net, MaxProb(S.exit_thresholds(net[0], data[1])), 3)


def _answers(path: Path, images: np.ndarray, engine: str) -> list:
    handler = S.TailHandler(path)

    async def go() -> list:
        agent = EdgeAgent(path, InProcessTransport(handler, model_info=handler.model_info()),
                          config=AgentConfig(engine=engine, want_probabilities=True))
        try:
            return await agent.infer(images, [f"s{i}" for i in range(len(images))])
        finally:
            await agent.close()

    return asyncio.run(go())


def _assert_same(onnx: list, torch_: list) -> None:
    assert [(a.label, a.exit, a.route) for a in onnx] == [(a.label, a.exit, a.route) for a in torch_]
    # the rows answered on the device carry their probabilities (the test worker sends none)
    worst = max((abs(p - q) for a, b in zip(onnx, torch_) for (_, p), (_, q) in zip(a.top_k, b.top_k)), default=0.0)
    assert worst <= 1e-4


def test_the_onnx_edge_answers_as_the_torch_edge(maxprob_bundle: Path, data) -> None:
    images, _ = data
    onnx, torch_ = _answers(maxprob_bundle, images, "onnx"), _answers(maxprob_bundle, images, "torch")
    _assert_same(onnx, torch_)
    assert {a.route for a in onnx} == {"edge", "cloud"}  # rows left on the device and rows offloaded
    bundle, engine = open_edge(maxprob_bundle)  # auto: the segments
    assert isinstance(engine, OnnxEngine) and bundle.model is None


@pytest.mark.slow
@pytest.mark.parametrize("split", [1, 3])
@pytest.mark.parametrize("which", ["patience", "predictive"])
def test_policies_with_state_and_skipped_heads_agree(net, data, tmp_path: Path, which: str, split: int) -> None:
    model, _ = net
    images, x = data
    # Predictive Exit skips heads (and starts past exit 0): the split's head alone answers its fallback
    policy = Patience(1) if which == "patience" else Predictive(step_ms=(1.0,) * 6, threshold=S.median_threshold(
        model, x), l0=1)
    path = _export(tmp_path, net, policy, split)
    _assert_same(_answers(path, images, "onnx"), _answers(path, images, "torch"))


def _rewrite_manifest(path: Path, edit) -> None:
    manifest = json.loads((path / "manifest.json").read_text())
    edit(manifest)
    manifest["hash"] = manifest_hash(manifest)
    (path / "manifest.json").write_text(json.dumps(manifest))


def test_refusals(maxprob_bundle: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import shutil

    # a segment whose bytes changed: its hash no longer matches the manifest
    tampered = Path(shutil.copytree(maxprob_bundle, tmp_path / "tampered"))
    segment = tampered / "edge-0-1.onnx"
    segment.write_bytes(segment.read_bytes()[:-1] + b"\0")
    with pytest.raises(BundleError, match="edge-0-1.onnx: content hash mismatch"):
        open_edge(tampered, "onnx")

    # a segment swapped for another with consistent hashes: the graph takes the wrong input shape
    swapped = Path(shutil.copytree(maxprob_bundle, tmp_path / "swapped"))
    (swapped / "edge-0-1.onnx").write_bytes((swapped / "edge-2-2.onnx").read_bytes())

    def rehash(manifest: dict) -> None:
        import hashlib

        for entry in manifest["onnx"]["segments"]:
            entry["sha256"] = hashlib.sha256((swapped / entry["path"]).read_bytes()).hexdigest()

    _rewrite_manifest(swapped, rehash)
    with pytest.raises(BundleError, match=r"edge-0-1.onnx: takes input \['batch', 8, 8, 8\], the manifest says "
                                          r"\[batch, 1, 8, 8\]"):
        open_edge(swapped, "onnx")

    # no ONNX Runtime: --engine onnx says how to get it; auto falls back to torch
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    with pytest.raises(BundleError, match=r"needs onnxruntime.*pip install 'splitexit\[edge\]'"):
        open_edge(maxprob_bundle, "onnx")
    assert open_edge(maxprob_bundle, "auto")[0].model is not None
    monkeypatch.delitem(sys.modules, "onnxruntime")

    # a bundle exported without segments
    plain = Path(shutil.copytree(maxprob_bundle, tmp_path / "plain"))
    _rewrite_manifest(plain, lambda m: m.pop("onnx"))
    with pytest.raises(BundleError, match="has no ONNX segments"):
        open_edge(plain, "onnx")
    assert open_edge(plain)[0].model is not None  # auto: torch


def test_the_edge_path_imports_no_torch(maxprob_bundle: Path, data, tmp_path: Path) -> None:
    """The agent answers on ONNX Runtime in a process where torch, scikit-learn and the
    exporter cannot be imported (what the `edge` extra installs)."""
    images, _ = data
    np.save(tmp_path / "images.npy", images)
    import tarfile

    from PIL import Image

    folder = tmp_path / "pngs"  # an archive of images: the loader must not need torch either
    folder.mkdir()
    for i, image in enumerate(images[:6]):
        Image.fromarray(image[..., 0], "L").save(folder / f"{i}.png")
    with tarfile.open(tmp_path / "images.tar.gz", "w:gz") as tar:
        tar.add(folder, arcname="pngs")
    script = f"""
import sys
for name in ("torch", "sklearn", "safetensors", "onnx", "onnxscript", "scipy", "matplotlib"):
    sys.modules[name] = None
from splitexit.cli import main
code = main(["edge", "run", {str(maxprob_bundle)!r}, "--input", {str(tmp_path / 'images.npy')!r},
             "--out", {str(tmp_path / 'out.jsonl')!r}, "--engine", "onnx"])
code |= main(["edge", "run", {str(maxprob_bundle)!r}, "--input", {str(tmp_path / 'images.tar.gz')!r},
              "--out", {str(tmp_path / 'archive.jsonl')!r}, "--engine", "onnx", "--threads", "1"])
# a command of the full install says what it lacks instead of a traceback
assert main(["cloud", "serve", {str(maxprob_bundle)!r}]) == 2
assert not any(m == "torch" or m.startswith("torch.") for m in sys.modules if sys.modules[m] is not None)
sys.exit(code)
"""
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "PYTHONWARNINGS": "ignore"})
    assert run.returncode == 0, run.stderr[-2000:]
    rows = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert len(rows) == len(images) and all(r["route"] in ("edge", "degraded") for r in rows)
    assert len((tmp_path / "archive.jsonl").read_text().splitlines()) == 6


def _start_worker(bundle: Path) -> tuple[subprocess.Popen, str]:
    """A real cloud worker (`splitexit cloud serve`) on 127.0.0.1, in this environment."""
    proc = subprocess.Popen([sys.executable, "-m", "splitexit.cli", "cloud", "serve", str(bundle), "--host", "127.0.0.1",
                             "--port", "0", "--no-advertise", "--threads", "1", "--grace", "1"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if " on " not in line:
        proc.kill()
        raise RuntimeError(f"the worker did not start: {line} {proc.stderr.read() if proc.stderr else ''}")
    return proc, line.split(" on ", 1)[1].split()[0]


def _edge_run(python: str | Path, bundle: Path, images: Path, out: Path, worker: str, engine: str) -> list[dict]:
    run = subprocess.run([str(python), "-m", "splitexit.cli", "edge", "run", str(bundle), "--input", str(images),
                          "--worker", worker, "--engine", engine, "--probabilities", "--out", str(out)],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    return [json.loads(line) for line in out.read_text().splitlines()]


@pytest.mark.slow
def test_an_edge_install_without_torch_answers_as_the_torch_edge(maxprob_bundle: Path, data, tmp_path: Path) -> None:
    """A fresh virtual environment gets the checkout with its `edge` extra (no torch) and
    runs `splitexit edge run` on the ONNX bundle against a real worker (run from this
    environment); its answers equal the torch edge's."""
    images, _ = data
    np.save(tmp_path / "images.npy", images)
    venv = tmp_path / "edge-venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    python = venv / "bin" / "python"
    install = subprocess.run([str(python), "-m", "pip", "install", "--quiet", f"{ROOT}[edge]"],
                             capture_output=True, text=True, timeout=900)
    assert install.returncode == 0, install.stderr[-3000:]
    listed = subprocess.run([str(python), "-m", "pip", "list", "--format=freeze"], capture_output=True, text=True,
                            check=True).stdout.lower()
    assert "onnxruntime==" in listed and "torch==" not in listed and "scikit-learn" not in listed
    worker, address = _start_worker(maxprob_bundle)
    try:
        edge = _edge_run(python, maxprob_bundle, tmp_path / "images.npy", tmp_path / "onnx.jsonl", address, "onnx")
        reference = _edge_run(sys.executable, maxprob_bundle, tmp_path / "images.npy", tmp_path / "torch.jsonl",
                              address, "torch")
    finally:
        worker.terminate()
        worker.communicate(timeout=30)  # and its pipes closed
    assert [(r["label"], r["exit"], r["route"]) for r in edge] == [(r["label"], r["exit"], r["route"]) for r in reference]
    assert {r["route"] for r in edge} == {"edge", "cloud"}
    worst = max(abs(p - q) for a, b in zip(edge, reference) for (_, p), (_, q) in zip(a["top_k"], b["top_k"]))
    assert worst <= 1e-4
    # torch refuses on that install, saying what to install
    refused = subprocess.run([str(python), "-m", "splitexit.cli", "edge", "run", str(maxprob_bundle), "--input",
                              str(tmp_path / "images.npy"), "--engine", "torch", "--out", str(tmp_path / "x.jsonl")],
                             capture_output=True, text=True, timeout=120)
    assert refused.returncode == 2 and "the torch engine needs torch" in refused.stderr


@pytest.mark.parametrize("spatial", ["global", "2x2"])
@pytest.mark.parametrize(("side", "pool_to"), [(32, 4), (8, 4), (6, None)])
def test_the_bof_heads_export_form_computes_the_head(spatial: str, side: int, pool_to: int | None) -> None:
    """The graph form of a logistic BoF head (classifier before the normalization; a 2x2
    head's classifier one block per cell) gives the head's logits."""
    import torch

    from splitexit.models import BoFConfig, BoFHead
    from splitexit.onnx_export import _BoFExport

    torch.manual_seed(0)
    head = BoFHead(8, 10, BoFConfig(codewords=16, spatial=spatial, pool_to=pool_to)).eval()
    with torch.no_grad():
        head.bof.a.fill_(1.3), head.bof.c.fill_(-0.2), head.fc.bias.normal_()
        x = torch.randn(3, 8, side, side) * 2
        torch.testing.assert_close(_BoFExport(head, side)(x), head(x), rtol=1e-4, atol=1e-5)


def test_a_bundle_with_2x2_bof_heads_answers_on_onnx_as_on_torch(data, tmp_path: Path) -> None:
    """2x2 heads through the real agent, in their export form (the tiny network's exits see
    8-, 4- and 2-side maps, all even): the same exits, labels and probabilities."""
    from dataclasses import replace

    import torch

    from splitexit.checkpoint import CheckpointMeta
    from splitexit.models import BoFConfig, build_model

    images, x = data
    config = replace(S.CONFIG, bof=BoFConfig(spatial="2x2"))
    torch.manual_seed(0)
    model = build_model(config).eval()
    meta = CheckpointMeta(model=config, mean=(0.5,), std=(0.25,), classes=S.CLASSES)
    path = export_bundle(tmp_path / "onnx-2x2", model, meta, split=3, policy=MaxProb(S.exit_thresholds(model, x)),
                         input_shape=S.SHAPE, name="tiny-2x2", edge_engine="onnx")
    _assert_same(_answers(path, images, "onnx"), _answers(path, images, "torch"))
