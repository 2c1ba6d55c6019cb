"""The edge agent with an in-process cloud: split answers equal the whole model's, exited
rows never travel, every failure becomes a degraded answer with its reason, nothing is
lost when the cloud dies mid-run, and spooled rows are refined when it is back."""

from __future__ import annotations

import asyncio
from pathlib import Path

import numpy as np
import pytest
import torch

from splitexit.edge import (
    AgentConfig,
    EdgeAgent,
    InProcessTransport,
    OffloadError,
    PoolConfig,
    Spool,
    SyncEdgeAgent,
    WorkerPool,
    read_trace,
)
from splitexit.policies import MaxProb, Patience
from splitexit.policies.bolukbasi import Bolukbasi, num_features
from splitexit.policies.predictive import Predictive
from splitexit.proto import inference_pb2 as pb
from splitexit.runtime import ExitRunner


import splitexit_tests_edge_support as S  # noqa: E402  (registered by conftest.py)

N = 48


@pytest.fixture(scope="module")
def net(tiny_net):
    return tiny_net


@pytest.fixture(scope="module")
def data(tiny_batch):
    assert len(tiny_batch[0]) == N
    return tiny_batch


@pytest.fixture(scope="module")
def maxprob_bundle(net, data, tmp_path_factory):
    model, meta = net
    policy = MaxProb(S.exit_thresholds(model, data[1]))
    return S.export(tmp_path_factory.mktemp("b"), model, meta, policy), policy


def _agent(path: Path, handler=None, **kwargs) -> EdgeAgent:
    transport = None if handler is None else InProcessTransport(handler, model_info=handler.model_info())
    return EdgeAgent(path, transport, **kwargs)


def _infer(agent: EdgeAgent, images, ids=None, **kwargs):
    async def go():
        try:
            return await agent.infer(images, ids, **kwargs)
        finally:
            await agent.close()

    return asyncio.run(go())


def _policies(model, x):
    t = S.median_threshold(model, x)
    return [MaxProb(S.exit_thresholds(model, x)), Patience(1), Predictive(step_ms=(1.0,) * 6, threshold=t, l0=1)]


def test_a_fallback_answer_names_the_exit_it_came_from(net, data, tmp_path: Path) -> None:
    """No exit is confident enough (threshold above 1): every row goes to the cloud, and at
    the last exit SDN's fallback answers with the most confident exit seen. The answer
    must name that exit (its stage), not the last one, and carry its label (issue 20)."""
    model, meta = net
    images, x = data
    path = S.export(tmp_path, model, meta, MaxProb(1.5, fallback=True), split=3)
    handler = S.TailHandler(path)
    answers = _infer(_agent(path, handler), images, [f"s{i}" for i in range(N)])
    with torch.inference_mode():
        probs = np.stack([z.softmax(-1).numpy() for z in model.forward_exits(x)])  # [K, N, C], the whole net
    best = probs.max(-1).argmax(0)  # the most confident exit per row (first of ties)
    stages = list(model.exit_points) + [model.num_stages - 1]
    assert all(a.route == "cloud" for a in answers)
    assert [a.exit for a in answers] == [stages[k] for k in best]
    assert [a.label for a in answers] == [int(probs[k, i].argmax()) for i, k in enumerate(best)]
    # edge exits answer some rows (before this fix, every one said the last exit)
    assert any(a.exit <= 3 for a in answers) and any(a.exit > 3 for a in answers), [a.exit for a in answers]


@pytest.mark.parametrize("index", [0, 1, 2])
def test_split_answers_equal_the_whole_model_under_the_same_policy(net, data, tmp_path: Path, index: int) -> None:
    model, meta = net
    images, x = data
    policy = _policies(model, x)[index]
    for split in (1, 3):
        path = S.export(tmp_path, model, meta, policy, split=split)
        handler = S.TailHandler(path)
        answers = _infer(_agent(path, handler, trace=tmp_path / "t.msgpack"), images, [f"s{i}" for i in range(N)])
        want = S.reference(model, policy, x, handler.exits)
        assert [(a.label, a.exit) for a in answers] == want, (policy.name, split)
        assert [a.sample_id for a in answers] == [f"s{i}" for i in range(N)]
        assert all(a.route in ("edge", "cloud") and a.reason is None for a in answers)
        routes = {a.route for a in answers}
        assert all(a.exit <= split for a in answers if a.route == "edge")
        # a cloud answer comes from a cloud exit, or (SDN's fallback) names the earlier exit it came from
        assert all((a.exit > split or policy.name == "maxprob") and a.worker == "tail"
                   for a in answers if a.route == "cloud")
        if policy.name == "maxprob":
            assert routes == {"edge", "cloud"}, "the test needs rows on both sides"
        assert all(a.class_name == S.CLASSES[a.label] for a in answers)


def test_exited_rows_are_never_sent(net, data, maxprob_bundle, tmp_path: Path) -> None:
    images, _ = data
    path, _ = maxprob_bundle
    handler = S.TailHandler(path)
    answers = _infer(_agent(path, handler, trace=tmp_path / "t.msgpack"), images, [f"s{i}" for i in range(N)])
    edge = {a.sample_id for a in answers if a.route == "edge"}
    sent = [s for r in handler.requests for s in r.sample_ids]
    assert edge and sent and not edge & set(sent)
    assert handler.rows == len(sent) == N - len(edge)
    (record,) = list(read_trace(tmp_path / "t.msgpack"))
    assert record["bytes_up"] == sum(r.ByteSize() for r in handler.requests)
    feature_bytes = 4 * int(np.prod(S.load_bundle(path, "edge").feature_shape))
    # the feature of the pending rows, and not much more (policy state, ids, framing)
    assert feature_bytes * len(sent) <= record["bytes_up"] < feature_bytes * len(sent) * 1.2 + 1000
    assert record["route"] == {"edge": len(edge), "cloud": len(sent), "degraded": 0}
    assert sum(record["exit_hist"].values()) == len(edge)

    # a policy under which everyone exits at the first exit sends nothing at all
    model, meta = net
    path = S.export(tmp_path, model, meta, MaxProb(0.0), name="all-exit")
    handler = S.TailHandler(path)
    answers = _infer(_agent(path, handler, trace=tmp_path / "t2.msgpack"), images)
    assert {a.route for a in answers} == {"edge"} and handler.calls == 0
    assert next(read_trace(tmp_path / "t2.msgpack"))["bytes_up"] == 0


def _local_best(path: Path, x: torch.Tensor) -> dict[int, tuple[int, int]]:
    """(label, exit stage) of each pending row's most confident edge exit."""
    bundle = S.load_bundle(path, "edge")
    head = ExitRunner(bundle.model, bundle.policy, num_classes=10).run(x, stop=bundle.split)
    exits = bundle.manifest.exits
    p = head.pending
    return {row: (int(p.state.best_probs[j].argmax()), exits[int(p.state.best_exit[j])])
            for j, row in enumerate(p.rows.tolist())}


@pytest.mark.parametrize("code", ["UNAVAILABLE", "RESOURCE_EXHAUSTED", "DEADLINE_EXCEEDED", "FAILED_PRECONDITION",
                                  "INVALID_ARGUMENT", "NOT_FOUND", "INTERNAL"])
def test_every_worker_error_becomes_a_degraded_local_answer(data, maxprob_bundle, code: str) -> None:
    images, x = data
    path, _ = maxprob_bundle
    handler = S.TailHandler(path, fail=code)
    answers = _infer(_agent(path, handler), images)
    best = _local_best(path, x)
    assert len(answers) == N
    for i, a in enumerate(answers):
        if i in best:
            assert a.route == "degraded" and a.reason == code.lower() and a.spooled is False
            assert (a.label, a.exit) == best[i] and a.class_name == S.CLASSES[a.label]
            assert a.network == "tiny" and a.exit <= 2
        else:
            assert a.route == "edge"


def test_slow_worker_hash_mismatch_offline_and_bad_answers(net, data, maxprob_bundle, tmp_path: Path) -> None:
    images, x = data
    path, policy = maxprob_bundle
    pending = len(_local_best(path, x))
    # slower than the budget: the call is cut at the deadline
    slow = S.TailHandler(path, delay_s=2.0)
    answers = _infer(_agent(path, slow, config=AgentConfig(latency_budget_ms=150)), images)
    assert sum(a.reason == "latency_budget" for a in answers) == pending  # the budget, not the worker
    assert max(a.latency_ms for a in answers) < 1500
    # the budget is gone before the offload: nothing is sent
    handler = S.TailHandler(path)
    answers = _infer(_agent(path, handler), images, budget_ms=1e-3)
    assert handler.calls == 0 and sum(a.reason == "latency_budget" for a in answers) == pending
    # a worker serving another bundle (same model, another policy)
    model, meta = net
    other = S.TailHandler(S.export(tmp_path, model, meta, MaxProb(0.99), name="other"))
    answers = _infer(_agent(path, other), images)
    assert sum(a.reason == "failed_precondition" for a in answers) == pending
    # no transport at all
    answers = _infer(_agent(path), images)
    assert sum(a.reason == "no_worker" for a in answers) == pending

    # an answer that does not answer the request
    async def wrong_ids(request: pb.InferRequest) -> pb.InferResponse:
        rows = [pb.RowResult(sample_id=f"x{s}", label=1) for s in request.sample_ids]
        return pb.InferResponse(request_id=request.request_id, rows=rows)

    answers = _infer(EdgeAgent(path, InProcessTransport(wrong_ids)), images)
    assert sum(a.reason == "bad_response" for a in answers) == pending

    # a handler that is plainly broken, or a worker that cut a row short
    async def broken(request: pb.InferRequest) -> pb.InferResponse:
        raise RuntimeError("boom")

    answers = _infer(EdgeAgent(path, InProcessTransport(broken)), images)
    assert sum(a.reason == "internal" for a in answers) == pending

    async def short(request: pb.InferRequest) -> pb.InferResponse:
        rows = [pb.RowResult(sample_id=s, label=4, exit_index=3, network="tiny", degraded=True, confidence=0.5)
                for s in request.sample_ids]
        return pb.InferResponse(request_id=request.request_id, rows=rows, worker_id="w")

    answers = _infer(EdgeAgent(path, InProcessTransport(short)), images)
    cut = [a for a in answers if a.reason == "worker_degraded"]
    assert len(cut) == pending and all(a.route == "degraded" and a.label == 4 and a.worker == "w" for a in cut)


def test_degraded_rows_that_no_edge_exit_evaluated(net, data, tmp_path: Path) -> None:
    model, meta = net
    images, x = data
    # Predictive Exit starting at the 3rd exit never evaluates the exit at the split (stage
    # 1): should the cloud fail, the agent evaluates it then
    path = S.export(tmp_path, model, meta, Predictive(step_ms=(1.0,) * 6, threshold=0.5, l0=2), split=1)
    answers = _infer(_agent(path, S.TailHandler(path, fail="UNAVAILABLE")), images)
    with torch.no_grad():
        want = model.exit_logits(1, model.forward_intermediates(x, indices=[1], stop_early=True)[1][0]).argmax(-1)
    assert all(a.route == "degraded" and a.exit == 1 for a in answers)
    assert [a.label for a in answers] == want.tolist()
    # split before the first exit: no local answer exists, and the answer says so
    path = S.export(tmp_path, model, meta, MaxProb(0.5), split=0)
    answers = _infer(_agent(path, S.TailHandler(path, fail="UNAVAILABLE")), images)
    assert all(a.route == "degraded" and a.label == -1 and a.exit == -1 and a.class_name is None for a in answers)
    assert all(a.reason == "unavailable" for a in answers)


def test_a_worker_that_dies_mid_run_loses_nothing_and_is_used_again(data, maxprob_bundle) -> None:
    images, x = data
    path, _ = maxprob_bundle
    handler = S.TailHandler(path)
    pool = WorkerPool(bundle_hash=S.load_bundle(path, "edge").hash, config=PoolConfig(max_failures=1,
                                                                                      probe_interval_s=0.05))
    state = {"alive": True}

    async def health() -> str:
        return "SERVING" if state["alive"] else "NOT_SERVING"

    async def flaky(request: pb.InferRequest) -> pb.InferResponse:
        if not state["alive"]:
            raise ConnectionResetError("worker died")
        return await handler(request)

    pool.add("w1", InProcessTransport(flaky, model_info=handler.model_info(), health=health, name="w1"))
    batches = [(images[i:i + 8], [f"b{i // 8}-{j}" for j in range(8)]) for i in range(0, N, 8)]

    async def run():
        agent = EdgeAgent(path, pool, config=AgentConfig(max_batch_rows=2))
        out = []
        try:
            for n, (batch, ids) in enumerate(batches):
                if n == 2:
                    state["alive"] = False  # dies between batches ...
                if n == 4:
                    state["alive"] = True  # ... and comes back
                    for _ in range(100):  # the pool's prober finds it again
                        if pool.workers()[0].state == "up":
                            break
                        await asyncio.sleep(0.02)
                out.append(await agent.infer(batch, ids))
        finally:
            await agent.close()
        return out

    results = asyncio.run(run())
    flat = [a for r in results for a in r]
    ids = [a.sample_id for a in flat]
    assert sorted(ids) == sorted(s for _, b in batches for s in b) and len(set(ids)) == len(ids) == N
    assert all(a.route in ("edge", "cloud") for r in results[:2] for a in r)
    down = [a for r in results[2:4] for a in r if a.route != "edge"]
    assert down and all(a.route == "degraded" and a.reason in ("unavailable", "no_worker") for a in down)
    back = [a.route for r in results[4:] for a in r]
    assert "cloud" in back and "degraded" not in back


def test_a_handler_dying_inside_a_batch_answers_every_row_once(data, maxprob_bundle) -> None:
    images, x = data
    path, _ = maxprob_bundle
    handler = S.TailHandler(path)

    async def dies_after_two(request: pb.InferRequest) -> pb.InferResponse:
        if handler.calls >= 2:
            handler.calls += 1
            raise ConnectionResetError("gone")
        return await handler(request)

    answers = _infer(EdgeAgent(path, InProcessTransport(dies_after_two), config=AgentConfig(max_batch_rows=2)),
                     images, [f"s{i}" for i in range(N)])
    assert [a.sample_id for a in answers] == [f"s{i}" for i in range(N)]
    pending = len(_local_best(path, x))
    assert sum(a.route == "cloud" for a in answers) == 4
    assert sum(a.reason == "unavailable" for a in answers) == pending - 4


def test_stream_answers_exited_rows_before_the_cloud_answers(data, maxprob_bundle) -> None:
    images, _ = data
    path, _ = maxprob_bundle
    handler = S.TailHandler(path, delay_s=0.05)

    async def run():
        agent = _agent(path, handler)
        try:
            return [(pos, a) async for pos, a in agent.stream(images)]
        finally:
            await agent.close()

    seen = asyncio.run(run())
    routes = [a.route for _, a in seen]
    assert sorted(p for p, _ in seen) == list(range(N))
    assert routes.index("cloud") > max(i for i, r in enumerate(routes) if r == "edge")
    edge_latency = max(a.latency_ms for _, a in seen if a.route == "edge")
    assert edge_latency < min(a.latency_ms for _, a in seen if a.route == "cloud")


@pytest.mark.parametrize("codec", ["fp16", "int8", "int8-per-channel"])
def test_codecs_and_request_splitting(data, maxprob_bundle, codec: str) -> None:
    images, x = data
    path, policy = maxprob_bundle
    handler = S.TailHandler(path)
    agent = _agent(path, handler, config=AgentConfig(codec=codec, max_batch_rows=5))
    answers = _infer(agent, images)
    pending = len(_local_best(path, x))
    assert handler.calls == -(-pending // 5) and handler.rows == pending
    dtype = pb.DTYPE_FLOAT16 if codec == "fp16" else pb.DTYPE_UINT8
    assert all(r.feature.dtype == dtype for r in handler.requests)
    assert sum(a.route == "cloud" for a in answers) == pending
    # lossy codecs may flip a borderline row, not many
    want = S.reference(*S.tiny_model()[:1], policy, x, handler.exits)
    assert sum((a.label, a.exit) == w for a, w in zip(answers, want)) >= N - 3


def test_spool_keeps_failed_rows_and_refine_updates_them(data, maxprob_bundle, tmp_path: Path) -> None:
    images, x = data
    path, policy = maxprob_bundle
    handler = S.TailHandler(path, fail="UNAVAILABLE")
    spool = tmp_path / "spool"
    ids = [f"s{i}" for i in range(N)]

    async def run():
        agent = _agent(path, handler, spool=spool, config=AgentConfig(max_batch_rows=4))
        try:
            first = await agent.infer(images, ids)
            assert len(Spool(spool)) > 0
            refined_down = [a async for a in agent.refine()]  # still down: nothing, all kept
            handler.fail = None
            refined = [a async for a in agent.refine()]
            again = [a async for a in agent.refine()]
            return first, refined_down, refined, again
        finally:
            await agent.close()

    first, refined_down, refined, again = asyncio.run(run())
    degraded = {a.sample_id for a in first if a.route == "degraded"}
    assert degraded and all(a.spooled for a in first if a.route == "degraded")
    assert refined_down == [] and again == []
    assert {a.sample_id for a in refined} == degraded and len(refined) == len(degraded)
    assert all(a.update and a.route == "cloud" for a in refined)
    want = dict(zip(ids, S.reference(*S.tiny_model()[:1], policy, x, handler.exits)))
    assert all((a.label, a.exit) == want[a.sample_id] for a in refined)
    assert len(Spool(spool)) == 0 and (spool / "spool.log").stat().st_size == 0


def test_sync_agent_and_float_inputs(data, maxprob_bundle) -> None:
    images, x = data
    path, _ = maxprob_bundle
    handler = S.TailHandler(path)
    with SyncEdgeAgent(path, InProcessTransport(handler)) as agent:
        from_images = agent.infer(images)
        from_floats = agent.infer(x)
        from_list = agent.infer([img for img in images[:3]], ["a", "b", "c"])
    assert [(a.label, a.exit, a.route) for a in from_images] == [(a.label, a.exit, a.route) for a in from_floats]
    assert [a.sample_id for a in from_list] == ["a", "b", "c"]
    with pytest.raises(ValueError, match="uint8 images must be"):
        asyncio.run(EdgeAgent(path).infer(np.zeros((2, 4, 4, 1), dtype=np.uint8)))
    with pytest.raises(ValueError, match="sample ids"):
        asyncio.run(EdgeAgent(path).infer(images[:2], ["only-one"]))


def test_a_cascade_escalation_ships_the_raw_input(net, data, tmp_path: Path) -> None:
    model, meta = net
    images, x = data
    large = S.tiny_model(seed=1)
    k = 6  # 5 exits + final head of the small network, then the larger network's exit
    f = num_features(3)
    # at the first exit every row jumps straight to the larger network (ladder exit 6)
    policy = Bolukbasi(coef=((0.0,) * f,) * k, intercept=(-10.0,) * k, jump_to=(6,) + (-1,) * (k - 1),
                       jump_coef=((0.0,) * f,) + ((),) * (k - 1), jump_intercept=(10.0,) + (0.0,) * (k - 1),
                       jump_threshold=(0.0,) * k)
    path = S.export(tmp_path, model, meta, policy, large=large, name="cascade")
    handler = S.TailHandler(path)
    for fmt in ("png", "u8"):
        handler.requests.clear()
        answers = _infer(_agent(path, handler, config=AgentConfig(raw_format=fmt)), images)
        assert all(a.route == "cloud" and a.network == "cascade/large" for a in answers)
        (request,) = handler.requests
        assert not request.HasField("feature") and request.raw_input.format == fmt
        from splitexit import wire

        decoded = wire.decode_raw_input(fmt, request.raw_input.items, (1, 8, 8))
        assert np.array_equal(decoded, images)
        assert [a.label for a in answers] == [int(img.sum()) % 10 for img in images]


def test_offload_error_mapping() -> None:
    class Coded(Exception):
        code = "RESOURCE_EXHAUSTED"

    assert OffloadError.from_exception(Coded("busy")).reason == "resource_exhausted"
    assert OffloadError.from_exception(asyncio.TimeoutError()).code == "DEADLINE_EXCEEDED"
    assert OffloadError.from_exception(ConnectionRefusedError()).code == "UNAVAILABLE"
    assert OffloadError.from_exception(KeyError("x")).code == "INTERNAL"
    assert OffloadError("BOGUS").code == "UNKNOWN"
    with pytest.raises(ValueError, match="unknown codec"):
        AgentConfig(codec="zip")
    with pytest.raises(ValueError, match="latency_budget_ms"):
        AgentConfig(latency_budget_ms=0)
