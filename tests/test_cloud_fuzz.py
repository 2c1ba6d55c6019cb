"""Thousands of random and mutated requests over a real channel: every one gets a proper
status, the worker keeps serving correct answers, and its memory does not grow."""

from __future__ import annotations

import asyncio
import random
import resource
import time
from pathlib import Path

import grpc
import numpy as np
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc

from splitexit import wire
from splitexit.bundle import export_bundle, load_bundle
from splitexit.checkpoint import CheckpointMeta
from splitexit.cloud.batcher import BatcherConfig
from splitexit.cloud.server import ServerConfig, build_server
from splitexit.cloud.served import load_models
from splitexit.models import ModelConfig, build_model
from splitexit.policies import Patience
from splitexit.proto import inference_pb2 as pb
from splitexit.runtime import ExitRunner

pytestmark = pytest.mark.loopback

CONFIG = ModelConfig(arch="resnet14_tiny", in_chans=1, exit_after=(1, 2, 3, 4, 5))
LARGE = ModelConfig(arch="resnet14_tiny", in_chans=1, exit_after=())
STRUCTURED, BYTE_LEVEL, CONCURRENCY = 2400, 800, 32
# What a malformed request may get (never UNKNOWN or INTERNAL: those are bugs).
# RESOURCE_EXHAUSTED: the fuzz keeps many requests of up to 16 rows in flight, and a worker
# refuses at once what would wait longer than its queue-wait limit (cloud.batcher). The test's
# worker has a long limit so that few are: on a loaded CI machine the default 250 ms refused
# 501 of 2400 before validation, and too few reached the checks this test counts.
REFUSALS = {grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.FAILED_PRECONDITION,
            grpc.StatusCode.NOT_FOUND, grpc.StatusCode.RESOURCE_EXHAUSTED}


@pytest.fixture(scope="module")
def bundle(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    model = build_model(CONFIG).eval()
    large = build_model(LARGE).eval()
    classes = tuple(str(i) for i in range(10))
    meta = CheckpointMeta(model=CONFIG, mean=(0.5,), std=(0.25,), classes=classes)
    # a cascade with a stateful (int64) policy: every code path a request can reach
    return export_bundle(tmp_path_factory.mktemp("b") / "fuzz", model, meta, split=2, policy=Patience(1),
                         input_shape=(1, 8, 8), name="fuzz",
                         large=(large, CheckpointMeta(model=LARGE, mean=(0.5,), std=(0.25,), classes=classes)))


def _seeds(bundle: Path) -> list[pb.InferRequest]:
    """Valid requests of every kind, to mutate."""
    edge = load_bundle(bundle, "edge")
    images = torch.randint(0, 256, (6, 8, 8, 1), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    x = (images.permute(0, 3, 1, 2).float() / 255 - 0.5) / 0.25
    p = ExitRunner(edge.model, edge.policy, num_classes=10, network=edge.network).run(x, stop=edge.split).pending
    rows = len(p.rows)
    raw = wire.encode_raw_input(images[p.rows], "png")
    return [
        wire.build_request(edge, p.feature, p.state, [], include_best=True),
        wire.build_request(edge, p.feature, p.state, [], codec="int8-per-channel", raw_items=raw),
        wire.build_request(edge, p.feature, None, [], codec="fp16", want_probabilities=True, top_k=3),
        wire.build_request(edge, None, None, [str(i) for i in range(rows)], raw_items=wire.encode_raw_input(
            images[p.rows], "u8"), raw_format="u8"),
    ]


def _junk(rng: random.Random) -> bytes:
    return rng.randbytes(rng.choice([0, 1, 3, 8, 64, 257, 1024]))


def _tensor(rng: random.Random) -> pb.Tensor:
    t = pb.Tensor(dtype=rng.randrange(-1, 7) % 7,
                  shape=[rng.choice([-5, 0, 1, 2, 3, 8, 2**31, 2**40]) for _ in range(rng.randrange(0, 10))],
                  data=_junk(rng))
    if rng.random() < 0.5:
        t.quant.CopyFrom(pb.Quantization(
            scheme=rng.randrange(0, 5), axis=rng.choice([-1, 0, 1, 3, 99]),
            scale=[rng.choice([0.0, -1.0, 1e-45, 0.1, 1.0, 3e38, float("inf"), float("nan")])
                   for _ in range(rng.randrange(0, 10))],
            zero_point=[rng.choice([-1000, -128, 0, 127, 255, 300]) for _ in range(rng.randrange(0, 10))]))
    return t


def _mutate(seed: pb.InferRequest, rng: random.Random) -> pb.InferRequest:
    r = pb.InferRequest()
    r.CopyFrom(seed)
    for _ in range(rng.randrange(1, 4)):
        op = rng.randrange(16)
        if op == 0:
            r.model = rng.choice(["", "fuzz", "fuzz/large", "x" * 300])
        elif op == 1:
            r.bundle_hash = rng.choice(["", "0" * 64, r.bundle_hash[:-1], r.bundle_hash])
        elif op == 2:
            r.split = rng.choice([-1, 0, 1, 2, 3, 5, 2**31 - 1])
        elif op == 3:
            r.feature.CopyFrom(_tensor(rng))
        elif op == 4 and r.HasField("feature"):  # plausible header, damaged data
            data = bytearray(r.feature.data)
            if data:
                for _ in range(rng.randrange(1, 8)):
                    data[rng.randrange(len(data))] = rng.randrange(256)
            r.feature.data = bytes(data[: rng.randrange(len(data) + 2)]) if rng.random() < 0.3 else bytes(data)
        elif op == 5 and r.feature.shape:
            r.feature.shape[rng.randrange(len(r.feature.shape))] = rng.choice([0, 1, 2, 7, 8, 9, 10**6])
        elif op == 6:
            del r.sample_ids[rng.randrange(len(r.sample_ids) + 1):]
            r.sample_ids.extend(str(i) for i in range(rng.choice([0, 0, 1, 40])))
        elif op == 7:
            r.policy_state[rng.choice(["_next_exit", "_evaluated", "label", "streak", "_best_probs", "junk"])
                           ].CopyFrom(_tensor(rng))
        elif op == 8 and r.policy_state:
            name = rng.choice(list(r.policy_state))
            if rng.random() < 0.5:
                del r.policy_state[name]
            else:  # right header, values of any kind (NaN, huge, fractions, negatives)
                t = r.policy_state[name]
                t.data = np.asarray(rng.choices([np.nan, -1.0, 0.5, 1e9, 3.0, 99.0, 0.0], k=len(t.data) // 4),
                                    "<f4").tobytes()
        elif op == 9:
            r.raw_input.format = rng.choice(["", "png", "jpeg", "u8", "gif", "PNG"])
        elif op == 10:
            del r.raw_input.items[rng.randrange(len(r.raw_input.items) + 1):]
            r.raw_input.items.extend(_junk(rng) for _ in range(rng.randrange(0, 3)))
        elif op == 11 and r.raw_input.items:  # a damaged image
            i = rng.randrange(len(r.raw_input.items))
            item = bytearray(r.raw_input.items[i])
            if item:
                for _ in range(rng.randrange(1, 6)):
                    item[rng.randrange(len(item))] = rng.randrange(256)
            r.raw_input.items[i] = bytes(item[: rng.randrange(1, len(item) + 2)])
        elif op == 12:
            r.want_probabilities, r.top_k = rng.random() < 0.5, rng.choice([-5, 0, 1, 10, 11, 2**31 - 1])
        elif op == 13:
            for _ in range(rng.choice([1, 7, 100])):
                r.edge_exits.add(best_exit=rng.randrange(-9, 9), best_confidence=rng.random())
        elif op == 14:
            r.ClearField(rng.choice(["feature", "raw_input", "policy_state"]))
        else:
            r.request_id = rng.choice(["", "\u00e9" * 50, "x" * 1000])
    return r


def _corrupt(data: bytes, rng: random.Random) -> bytes:
    buf = bytearray(data)
    for _ in range(rng.randrange(1, 10)):
        op, at = rng.randrange(3), rng.randrange(len(buf) + 1)
        if op == 0 and at < len(buf):
            buf[at] = rng.randrange(256)
        elif op == 1:
            buf[at:at] = rng.randbytes(rng.randrange(1, 9))
        else:
            del buf[at:at + rng.randrange(1, 9)]
    return bytes(buf)


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


@pytest.mark.slow
def test_malformed_requests_never_hurt_the_worker(bundle: Path) -> None:
    rng = random.Random(1234)
    seeds = _seeds(bundle)
    models = load_models([bundle])

    async def body() -> None:
        server = build_server(ServerConfig(host="127.0.0.1", port=0, max_request_rows=16,
                                           batching=BatcherConfig(max_queue_wait_ms=5000.0)), models)
        await server.start()
        try:
            async with grpc.aio.insecure_channel(server.address) as channel:
                infer = channel.unary_unary("/splitexit.v1.SplitInference/Infer",
                                            response_deserializer=pb.InferResponse.FromString)
                check = [await infer(s.SerializeToString(), timeout=5) for s in seeds]  # valid: all answered
                assert [len(c.rows) for c in check] == [len(s.sample_ids) for s in seeds]
                codes: dict[str, dict[grpc.StatusCode, int]] = {"structured": {}, "bytes": {}}
                slots = asyncio.Semaphore(CONCURRENCY)

                async def send(kind: str, payload: bytes) -> None:
                    async with slots:
                        try:
                            response = await infer(payload, timeout=10)
                            code = grpc.StatusCode.OK
                            assert response.rows, "an OK answer without rows"
                        except grpc.aio.AioRpcError as exc:
                            code = exc.code()
                            assert code in REFUSALS, (kind, code, exc.details())
                        codes[kind][code] = codes[kind].get(code, 0) + 1

                def batch(n: int, start: int) -> list:
                    out = []
                    for i in range(start, start + n):
                        seed = seeds[i % len(seeds)]
                        if i % 4 == 3:
                            out.append(send("bytes", _corrupt(seed.SerializeToString(), rng)))
                        else:
                            out.append(send("structured", _mutate(seed, rng).SerializeToString()))
                    return out

                started = time.monotonic()
                await asyncio.gather(*batch(800, 0))  # warm the allocator and the caches first
                rss_before = _rss_mb()
                total = STRUCTURED + BYTE_LEVEL
                await asyncio.gather(*batch(total - 800, 800))
                rss_after = _rss_mb()
                elapsed = time.monotonic() - started
                assert sum(codes["structured"].values()) + sum(codes["bytes"].values()) == total
                # the fuzz reached past validation too
                assert codes["structured"].get(grpc.StatusCode.OK, 0) > 50, codes
                assert codes["structured"].get(grpc.StatusCode.INVALID_ARGUMENT, 0) > 500, codes
                # a guard against a worker that hangs on some request, not a speed target: a few
                # seconds on an idle 2-core machine, 31 s once on one that was also training
                assert elapsed < 120, f"fuzz took {elapsed:.1f} s"
                assert rss_after - rss_before < 20, f"RSS grew {rss_after - rss_before:.1f} MB"
                # still serving, with the same answers as before
                again = [await infer(s.SerializeToString(), timeout=5) for s in seeds]
                for a, b in zip(check, again):
                    assert [(r.label, r.exit_index, r.network) for r in a.rows] == \
                        [(r.label, r.exit_index, r.network) for r in b.rows]
                health = health_pb2_grpc.HealthStub(channel)
                status = await health.Check(health_pb2.HealthCheckRequest(), timeout=5)
                assert status.status == health_pb2.HealthCheckResponse.SERVING
                assert server.batcher.queued_rows == 0 and server.servicer._inflight == 0
                assert server.batcher.expected_wait_s() == 0.0  # idle: no work left counted ahead
        finally:
            await server.stop()

    asyncio.run(asyncio.wait_for(body(), 90))
