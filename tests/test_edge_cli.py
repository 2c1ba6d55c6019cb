"""`splitexit edge run|refine` in-process: JSON lines and traces out, a real worker on
127.0.0.1, spool + refine, and every error path: one line, exit 2, nothing half-written."""

from __future__ import annotations

import asyncio
import io
import json
from concurrent import futures
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from PIL import Image

from splitexit.cli import build_parser, main
from splitexit.edge import read_results, read_trace
from splitexit.policies import MaxProb
from splitexit.proto import inference_pb2_grpc as pb_grpc


import splitexit_tests_edge_support as S  # noqa: E402  (registered by conftest.py)

pytestmark = pytest.mark.loopback  # servers on 127.0.0.1 only
N = 12


class SyncServicer(pb_grpc.SplitInferenceServicer):
    """A blocking servicer (its own threads), so the CLI's asyncio.run owns the main thread."""

    def __init__(self, handler) -> None:
        self.handler = handler

    def Infer(self, request, context):
        try:
            return asyncio.run(self.handler(request))
        except S.StatusError as exc:
            context.abort(grpc.StatusCode[exc.code], str(exc))

    def GetModelInfo(self, request, context):
        return self.handler.model_info()


@pytest.fixture(scope="module")
def bundle(tmp_path_factory) -> Path:
    model, meta = S.tiny_model()
    from splitexit.data import Normalize
    import torch

    x = Normalize(meta.mean, meta.std)(torch.from_numpy(S.images(48)))
    return S.export(tmp_path_factory.mktemp("b"), model, meta, MaxProb(S.exit_thresholds(model, x)))


@pytest.fixture
def worker(bundle: Path):
    handler = S.TailHandler(bundle)
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    pb_grpc.add_SplitInferenceServicer_to_server(SyncServicer(handler), server)
    health_servicer = health.HealthServicer()
    health_servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        yield handler, f"127.0.0.1:{port}"
    finally:
        server.stop(None).wait()


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    out = tmp_path / "imgs"
    out.mkdir()
    for i, pixels in enumerate(S.images(N)):
        buf = io.BytesIO()
        Image.fromarray(pixels[..., 0], "L").save(buf, format="PNG")
        (out / f"{i:02d}.png").write_bytes(buf.getvalue())
    return out


def _run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    try:
        code = main(list(argv))
    except SystemExit as exc:  # argparse errors
        code = int(exc.code or 0)
    out, err = capsys.readouterr()
    return code, out, err


def test_edge_is_a_subcommand() -> None:
    assert "edge" in build_parser().format_help()


def test_run_offline_writes_jsonl_and_a_trace(bundle: Path, folder: Path, tmp_path: Path, capsys) -> None:
    out, trace = tmp_path / "results.jsonl", tmp_path / "trace.msgpack"
    code, _, err = _run(capsys, "edge", "run", str(bundle), "--input", str(folder), "--out", str(out),
                        "--trace", str(trace), "--batch-size", "5")
    assert code == 0, err
    rows = list(read_results(out))
    assert [r["sample_id"] for r in rows] == [f"{i:02d}.png" for i in range(N)]
    assert set(rows[0]) >= {"sample_id", "label", "class_name", "confidence", "exit", "network", "route", "reason",
                            "latency_ms"}
    assert {r["route"] for r in rows} <= {"edge", "degraded"}
    assert all(r["reason"] == "no_worker" for r in rows if r["route"] == "degraded")
    records = list(read_trace(trace))
    assert [r["rows"] for r in records] == [5, 5, 2]
    assert sum(r["route"]["edge"] + r["route"]["degraded"] for r in records) == N
    assert all(set(r["timings_ms"]) == {"prepare", "head", "encode", "offload", "total"} for r in records)
    assert f"{N} answers" in err


def test_run_with_a_worker_then_spool_and_refine(bundle: Path, folder: Path, worker, tmp_path: Path,
                                                 capsys) -> None:
    handler, address = worker
    out = tmp_path / "results.jsonl"
    code, _, err = _run(capsys, "edge", "run", str(bundle), "--input", str(folder), "--out", str(out),
                        "--worker", address, "--codec", "fp16", "--latency-budget-ms", "5000",
                        "--trace", str(tmp_path / "t.msgpack"))
    assert code == 0, err
    assert "shares this machine's" in err and "start the worker with `--threads" in err  # one machine: say so
    rows = list(read_results(out))
    assert {r["route"] for r in rows} == {"edge", "cloud"}
    assert all(r["worker"] == "tail" for r in rows if r["route"] == "cloud")
    (record,) = read_trace(tmp_path / "t.msgpack")
    assert record["bytes_up"] > 0 and record["workers"] == ["tail"]

    handler.fail = "UNAVAILABLE"  # the worker is draining: rows degrade and are spooled
    spool = tmp_path / "spool"
    code, _, err = _run(capsys, "edge", "run", str(bundle), "--input", str(folder), "--out", str(out),
                        "--worker", address, "--spool", str(spool), "--batch-size", "4")
    assert code == 0, err
    degraded = {r["sample_id"] for r in read_results(out) if r["route"] == "degraded"}
    assert degraded and all(r["spooled"] for r in read_results(out) if r["route"] == "degraded")
    # a flipped bit in the first spooled request costs that request only
    from splitexit.edge import Spool

    entries = Spool(spool).entries()
    assert len(entries) >= 2
    log = spool / "spool.log"
    data = bytearray(log.read_bytes())
    data[40] ^= 0x01
    log.write_bytes(bytes(data))
    handler.fail = None
    updates = tmp_path / "updates.jsonl"
    code, _, err = _run(capsys, "edge", "refine", str(bundle), "--spool", str(spool), "--worker", address,
                        "--out", str(updates))
    assert code == 0, err
    refined = list(read_results(updates))
    assert {r["sample_id"] for r in refined} == degraded - set(entries[0].sample_ids)
    assert all(r["update"] and r["route"] == "cloud" for r in refined)
    assert "0 requests left" in err and "1 damaged spool records" in err


def test_numpy_and_archive_inputs(bundle: Path, folder: Path, tmp_path: Path, capsys) -> None:
    import tarfile

    np.save(tmp_path / "x.npy", S.images(7))
    archive = tmp_path / "x.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(folder, arcname="imgs")
    for source, n in ((tmp_path / "x.npy", 7), (archive, N)):
        out = tmp_path / f"{source.name}.jsonl"
        code, _, err = _run(capsys, "edge", "run", str(bundle), "--input", str(source), "--out", str(out))
        assert code == 0, err
        assert len(list(read_results(out))) == n


def _tampered(bundle: Path, tmp_path: Path) -> Path:
    import shutil

    copy = tmp_path / "tampered"
    shutil.copytree(bundle, copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["split"] = 3
    (copy / "manifest.json").write_text(json.dumps(manifest))
    return copy


@pytest.mark.parametrize("case, message", [
    ("missing bundle", "not a bundle"),
    ("tampered bundle", "manifest hash mismatch"),
    ("missing input", "no such file or folder"),
    ("unreadable input", "bad.png: not a readable image"),
    ("bad worker", "bad worker address"),
    ("bad budget", "expected milliseconds > 0"),
    ("missing token", "cannot read the token"),
    ("cert without key", "mTLS needs both --tls-cert and --tls-key"),
    ("no out dir", "no such directory"),
    ("out is a directory", "is a directory"),
    ("refine no spool", "not a spool"),
    ("refine no worker", "refine needs a worker"),
])
def test_error_paths_are_one_line_exit_2_and_write_nothing(bundle: Path, folder: Path, tmp_path: Path, capsys,
                                                           case: str, message: str) -> None:
    out = tmp_path / "out" / "results.jsonl"
    out.parent.mkdir()
    run = ["edge", "run", str(bundle), "--input", str(folder), "--out", str(out)]
    argv = {
        "missing bundle": ["edge", "run", str(tmp_path / "nope"), "--input", str(folder), "--out", str(out)],
        "tampered bundle": ["edge", "run", str(_tampered(bundle, tmp_path)), "--input", str(folder), "--out", str(out)],
        "missing input": ["edge", "run", str(bundle), "--input", str(tmp_path / "none"), "--out", str(out)],
        "unreadable input": ["edge", "run", str(bundle), "--input", str(folder / "bad.png"), "--out", str(out)],
        "bad worker": run + ["--worker", "localhost"],
        "bad budget": run + ["--latency-budget-ms", "-5"],
        "missing token": run + ["--worker", "127.0.0.1:1", "--token-file", str(tmp_path / "token")],
        "cert without key": run + ["--worker", "127.0.0.1:1", "--tls-cert", str(tmp_path / "c.pem")],
        "no out dir": ["edge", "run", str(bundle), "--input", str(folder), "--out", str(tmp_path / "x" / "r.jsonl")],
        "out is a directory": ["edge", "run", str(bundle), "--input", str(folder), "--out", str(out.parent)],
        "refine no spool": ["edge", "refine", str(bundle), "--spool", str(tmp_path), "--worker", "127.0.0.1:1",
                            "--out", str(out)],
        "refine no worker": ["edge", "refine", str(bundle), "--spool", str(tmp_path / "s"), "--out", str(out)],
    }[case]
    if case == "unreadable input":  # alone: nothing to answer (among others, see the test below)
        (folder / "bad.png").write_bytes(b"\x89PNG broken")
    if case == "refine no worker":
        (tmp_path / "s").mkdir()
        (tmp_path / "s" / "spool.log").write_bytes(b"")
    code, stdout, err = _run(capsys, *argv)
    assert code == 2
    assert message in err
    lines = [line for line in err.splitlines() if line.strip()]
    if "usage:" not in err:  # argparse prints its usage, then the one error line
        assert len(lines) == 1 and lines[0].startswith("splitexit: error:"), err
    assert list(out.parent.iterdir()) == []  # no results, no temporary file


def test_unreadable_inputs_are_named_and_the_others_answered(bundle: Path, folder: Path, tmp_path: Path,
                                                             capsys) -> None:
    (folder / "bad.png").write_bytes(b"\x89PNG broken")
    Image.new("L", (9, 9)).save(folder / "zz.png")
    out = tmp_path / "results.jsonl"
    code, _, err = _run(capsys, "edge", "run", str(bundle), "--input", str(folder), "--out", str(out))
    assert code == 1, err  # finished, but not every input has an answer
    assert sorted(r["sample_id"] for r in read_results(out)) == [f"{i:02d}.png" for i in range(N)]
    assert "bad.png: not a readable image" in err and "zz.png: image is 9x9" in err
    assert f"2 of {N + 2} inputs could not be read" in err


def test_an_interrupted_run_resumes_and_answers_each_input_once(bundle: Path, folder: Path, tmp_path: Path,
                                                                capsys, monkeypatch: pytest.MonkeyPatch) -> None:
    from splitexit.edge.agent import EdgeAgent

    infer = EdgeAgent.infer
    computed: list[str] = []

    async def counting(self, batch, ids=None):
        if len(computed) >= 5:
            raise KeyboardInterrupt  # Ctrl-C after the first batch
        computed.extend(ids)
        return await infer(self, batch, ids)

    monkeypatch.setattr(EdgeAgent, "infer", counting)
    out = tmp_path / "results.jsonl"
    argv = ["edge", "run", str(bundle), "--input", str(folder), "--out", str(out), "--batch-size", "5"]
    code, _, err = _run(capsys, *argv)
    assert code == 130 and not out.exists()
    assert len(list(read_results(tmp_path / "results.jsonl.partial"))) == 5
    monkeypatch.setattr(EdgeAgent, "infer", infer)
    code, _, err = _run(capsys, *argv)
    assert code == 0, err
    assert f"resuming: 5 answers kept from {out}.partial, {N - 5} inputs left" in err
    assert sorted(r["sample_id"] for r in read_results(out)) == [f"{i:02d}.png" for i in range(N)]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["imgs", "results.jsonl"]


@pytest.mark.slow
def test_run_discovers_a_worker_on_loopback(bundle: Path, folder: Path, worker, tmp_path: Path, capsys) -> None:
    import socket

    from zeroconf import IPVersion, ServiceInfo, Zeroconf

    handler, address = worker
    port = int(address.rsplit(":", 1)[1])
    bundle_hash = S.load_bundle(bundle, "edge").hash
    zc = Zeroconf(interfaces=["127.0.0.1"], ip_version=IPVersion.V4Only)
    info = ServiceInfo("_splitexit._tcp.local.", "cli-test._splitexit._tcp.local.", port=port, server="cli.local.",
                       addresses=[socket.inet_aton("127.0.0.1")], properties={"hashes": bundle_hash})
    try:
        zc.register_service(info)
        out = tmp_path / "results.jsonl"
        code, _, err = _run(capsys, "edge", "run", str(bundle), "--input", str(folder), "--out", str(out),
                            "--discover", "--interface", "127.0.0.1", "--discover-wait", "10")
    finally:
        zc.unregister_all_services()
        zc.close()
    assert code == 0, err
    assert "cloud" in {r["route"] for r in read_results(out)} and handler.calls > 0
    assert "no cloud worker confirmed" not in err  # found, probed and confirmed before the first batch


def test_a_torch_edge_beside_its_worker_takes_half_the_cores(monkeypatch) -> None:
    """Edge and worker on one machine: the torch edge at torch's default would take every
    core, as would the worker, and each would slow the other several times over."""
    import argparse
    import os

    import torch

    from splitexit.edge.cli import share_cores
    from splitexit.runtime import TorchEngine

    before = torch.get_num_threads()
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(4)))
    try:
        engine = TorchEngine(S.tiny_model()[0])
        args = argparse.Namespace(worker=["127.0.0.1:5"], threads=None, engine_threads=1)
        note = share_cores(args, engine)
        assert torch.get_num_threads() == 2 and note is not None and "`--threads 2`" in note
        assert share_cores(argparse.Namespace(worker=["10.0.0.7:5"], threads=None, engine_threads=1), engine) is None
        assert "`--threads 3`" in (share_cores(argparse.Namespace(worker=["localhost:5"], threads=None,
                                                                  engine_threads=1), object()) or "")
    finally:
        torch.set_num_threads(before)


def test_run_says_its_accuracy_when_the_inputs_carry_labels(bundle: Path, tmp_path: Path, capsys) -> None:
    """Class folders (test/c3/x.png) or a .npz's labels: `edge run` prints its accuracy on
    them, counted from the answers it wrote (issue 20); unlabelled inputs print none."""
    images = S.images(12)
    for i, pixels in enumerate(images):
        folder = tmp_path / "set" / "test" / S.CLASSES[i % 3]
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(pixels[..., 0], "L").save(folder / f"{i:02d}.png")
    out = tmp_path / "folders.jsonl"
    code, _, err = _run(capsys, "edge", "run", str(bundle), "--input", str(tmp_path / "set"), "--out", str(out))
    assert code == 0, err
    rows = list(read_results(out))
    correct = sum(r["class_name"] == Path(r["sample_id"]).parent.name for r in rows)
    assert f"accuracy {correct / 12:.4f} ({correct} of 12 inputs" in err
    np.savez(tmp_path / "set.npz", x=images, y=np.arange(12) % 10)
    code, _, err = _run(capsys, "edge", "run", str(bundle), "--input", str(tmp_path / "set.npz"),
                        "--out", str(tmp_path / "npz.jsonl"))
    rows = list(read_results(tmp_path / "npz.jsonl"))
    correct = sum(r["label"] == i % 10 for i, r in enumerate(rows))
    assert code == 0 and f"({correct} of 12 inputs" in err
    np.save(tmp_path / "plain.npy", images)
    code, _, err = _run(capsys, "edge", "run", str(bundle), "--input", str(tmp_path / "plain.npy"),
                        "--out", str(tmp_path / "plain.jsonl"))
    assert code == 0 and "inputs whose class" not in err
