"""`splitexit cloud serve`: one clear line and exit 2 on bad input; a real worker process
prints its address, serves, logs stats and drains on SIGTERM."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import grpc
import pytest
import torch

from splitexit.bundle import export_bundle
from splitexit.checkpoint import CheckpointMeta
from splitexit.cli import build_parser, main
from splitexit.cloud.cli import build_config
from splitexit.models import ModelConfig, build_model
from splitexit.policies import MaxProb
from splitexit.proto import inference_pb2 as pb
from splitexit.proto import inference_pb2_grpc as pb_grpc

pytestmark = pytest.mark.loopback
CONFIG = ModelConfig(arch="resnet14_tiny", in_chans=1, exit_after=(1, 2, 3, 4, 5))


@pytest.fixture(scope="module")
def bundle(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    meta = CheckpointMeta(model=CONFIG, mean=(0.5,), std=(0.25,), classes=tuple(str(i) for i in range(10)))
    return export_bundle(tmp_path_factory.mktemp("b") / "tiny", build_model(CONFIG).eval(), meta, split=2,
                         policy=MaxProb(0.5), input_shape=(1, 8, 8), name="tiny")


def _serve(bundle: Path, *extra: str) -> list[str]:
    return ["cloud", "serve", str(bundle), "--host", "127.0.0.1", "--no-advertise", *extra]


def _fails_with(capsys, argv: list[str], fragment: str) -> None:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("splitexit: error:") and fragment in err[0], err


def test_parser_options(bundle: Path) -> None:
    args = build_parser().parse_args(_serve(bundle, "--port", "0", "--max-batch", "8", "--max-delay-ms", "1.5",
                                            "--queue-limit", "64", "--threads", "1", "--metrics-port", "9100",
                                            "--interfaces", "127.0.0.1", "--concurrent-batches", "2",
                                            "--max-queue-wait-ms", "80", "--max-concurrent-rpcs", "64"))
    assert (args.port, args.max_batch, args.max_delay_ms, args.queue_limit, args.threads) == (0, 8, 1.5, 64, 1)
    config = build_config(args)
    assert config.batching.concurrent_batches == 2 and config.batching.max_queue_wait_ms == 80
    assert config.max_concurrent_rpcs == 64
    assert args.advertise is False and args.metrics_port == 9100 and args.interfaces == "127.0.0.1"
    with pytest.raises(SystemExit):
        build_parser().parse_args(_serve(bundle, "--port", "70000"))


def test_bad_input_is_one_line_and_exit_2(capsys, tmp_path: Path, bundle: Path) -> None:
    _fails_with(capsys, _serve(tmp_path / "nope", "--port", "0"), "not a bundle")
    _fails_with(capsys, _serve(bundle, "--port", "0", "--tls-cert", str(tmp_path / "c.pem"),
                               "--tls-key", str(tmp_path / "k.pem")), "no such file")
    junk = tmp_path / "junk.pem"
    junk.write_text("junk")
    _fails_with(capsys, _serve(bundle, "--port", "0", "--tls-cert", str(junk), "--tls-key", str(junk)), "not a PEM")
    _fails_with(capsys, _serve(bundle, "--port", "0", "--tls-key", str(junk)), "both a certificate and a key")
    empty = tmp_path / "token"
    empty.write_text("\n")
    _fails_with(capsys, _serve(bundle, "--port", "0", "--token-file", str(empty)), "is empty")
    with socket.socket() as taken:  # a port in use
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        _fails_with(capsys, _serve(bundle, "--port", str(taken.getsockname()[1])), "in use")


@pytest.mark.slow
def test_a_worker_process_serves_logs_and_drains_on_sigterm(bundle: Path) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "splitexit.cli", *_serve(bundle, "--port", "0",
                             "--stats-interval", "0.3", "--threads", "1", "--grace", "2")],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        line = proc.stdout.readline()  # the one line it prints once listening
        assert line.startswith("serving tiny@") and " on 127.0.0.1:" in line, (line, proc.stderr.read())
        address = line.split(" on ")[1].split()[0]
        with grpc.insecure_channel(address) as channel:
            info = pb_grpc.SplitInferenceStub(channel).GetModelInfo(pb.ModelInfoRequest(), timeout=10)
        assert info.models[0].name == "tiny"
        time.sleep(0.8)  # a stats line or two
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=15) == 0
        err = proc.stderr.read()
        assert "stats: 1 requests (0 errors)" in err and "SIGTERM: draining" in err, err
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stdout.close()
        proc.stderr.close()


def test_an_open_worker_is_announced_loudly_at_start(bundle: Path) -> None:
    from splitexit.cloud.cli import exposure_warnings

    def warnings(*argv: str, advertise: bool = True, interfaces=None) -> list[str]:
        config = build_config(build_parser().parse_args(["cloud", "serve", str(bundle), *argv]))
        return exposure_warnings(config, 50051, advertise=advertise, interfaces=interfaces)

    open_worker = warnings()  # the defaults: every interface, plaintext, no token, mDNS on
    assert len(open_worker) == 2
    assert "every interface (0.0.0.0:50051) in plaintext without a token" in open_worker[0]
    assert "mDNS on every interface" in open_worker[1]
    assert warnings("--host", "127.0.0.1", advertise=False) == []
    assert warnings("--host", "127.0.0.1", interfaces=["127.0.0.1"]) == []


def test_the_worker_limits_its_malloc_arenas_unless_told_otherwise() -> None:
    """glibc's per-thread arenas let a flood of large requests grow the worker without
    bound; `cloud serve` caps them at 2, unless MALLOC_ARENA_MAX already says otherwise."""
    import os
    import subprocess
    import sys

    code = "from splitexit.cloud.memory import limit_malloc_arenas; print(limit_malloc_arenas())"
    env = {k: v for k, v in os.environ.items() if k != "MALLOC_ARENA_MAX"}
    plain = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    told = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env={**env, "MALLOC_ARENA_MAX": "4"}, check=True)
    assert plain.stdout.strip() == ("True" if sys.platform.startswith("linux") else "False")
    assert told.stdout.strip() == "False"
