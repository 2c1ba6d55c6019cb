"""The runtime with compute skipping makes the offline simulator's decisions, split or not,
and bundles carry each side's weights, checked by hash."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from splitexit.bundle import BundleError, NotOnThisSide, export_bundle, load_bundle, manifest_hash, read_manifest
from splitexit.checkpoint import CheckpointMeta
from splitexit.models import ModelConfig, build_model
from splitexit.policies import Ladder, MaxProb, Patience, simulate
from splitexit.policies.predictive import Predictive
from splitexit.runtime import ExitRunner

CONFIG = ModelConfig(arch="resnet14_tiny", in_chans=1, exit_after=(1, 2, 3, 4, 5))
SHAPE = (1, 8, 8)


@pytest.fixture
def net():
    torch.manual_seed(0)
    model = build_model(CONFIG).eval()
    # sharpen the random heads a little so that confidences spread over the exits
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(1.5)
    meta = CheckpointMeta(model=CONFIG, mean=(0.5,), std=(0.25,), classes=tuple(str(i) for i in range(10)))
    return model, meta


def _offline(model, x: torch.Tensor, policy) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    with torch.no_grad():
        probs = torch.stack([z.softmax(-1) for z in model.forward_exits(x)]).numpy()
    out = simulate(policy, probs, Ladder.from_cumulative(range(1, probs.shape[0] + 1)))
    return out.exit_index, out.label, out.head_evals


def _policies(model, x):
    with torch.no_grad():
        conf = torch.stack([z.softmax(-1).max(-1).values for z in model.forward_exits(x)])
    t = float(conf[:-1].median())
    return [MaxProb(t), MaxProb(t, fallback=False), Patience(1),
            Predictive(step_ms=(1.0,) * 6, threshold=t, l0=1)]


def _answers(result, n: int) -> tuple[np.ndarray, np.ndarray]:
    merged = result.merged()
    exit_index = np.full(n, -1)
    label = np.full(n, -1)
    exit_index[merged.rows] = merged.exit_index
    label[merged.rows] = merged.probs.argmax(-1)
    return exit_index, label


def test_runner_makes_the_offline_decisions_and_skips_exited_rows(net) -> None:
    model, _ = net
    x = torch.randn(64, *SHAPE)
    for policy in _policies(model, x):
        result = ExitRunner(model, policy, num_classes=10).run(x)
        assert result.pending is None
        exit_index, label = _answers(result, len(x))
        want_exit, want_label, want_evals = _offline(model, x, policy)
        assert np.array_equal(exit_index, want_exit), policy.name
        assert np.array_equal(label, want_label), policy.name
        merged = result.merged()
        evaluated = np.zeros(len(x), dtype=np.int64)
        evaluated[merged.rows] = merged.evaluated
        assert np.array_equal(evaluated, want_evals), policy.name  # Predictive Exit's skipped heads are not counted
        if policy.name == "maxprob":
            assert len(set(exit_index.tolist())) > 2, "the test needs rows leaving at different exits"


@pytest.mark.parametrize("split", [0, 2, 4])
def test_a_split_run_equals_the_whole_run(net, split: int) -> None:
    model, _ = net
    x = torch.randn(48, *SHAPE)
    for policy in _policies(model, x):
        runner = ExitRunner(model, policy, num_classes=10)
        head = runner.run(x, stop=split)
        both = head
        if head.pending is not None:
            p = head.pending
            both = type(head)(head.answered + runner.run(p.feature, start=split + 1, state=p.state, rows=p.rows).answered)
        assert np.array_equal(np.stack(_answers(both, len(x))), np.stack(_answers(runner.run(x), len(x))))


class _GivenExits:
    """An engine whose exit k gives `probs[k]` for its rows (the feature is the row index)."""

    def __init__(self, probs: np.ndarray) -> None:
        self.probs = probs
        self.num_stages = len(probs)
        self.exit_points = tuple(range(len(probs) - 1))

    def advance(self, feature, start, stop, *, head, rows):
        if not head:
            return feature, None
        chosen = feature if rows is None else feature[rows]
        return feature, self.probs[stop][chosen]

    def take(self, feature, rows):
        return feature[rows]

    def from_array(self, x):
        return x

    def exit_probs(self, stage, feature):
        return self.probs[stage][feature]


def test_rows_left_undecided_carry_their_most_confident_exit_so_far() -> None:
    """What the edge answers (degraded) for an offloaded row when no cloud answers: of the
    exits it evaluated, the most confident one (max-prob, the first of ties), however many
    rows left before it."""
    rng = np.random.default_rng(0)
    sharpness = rng.uniform(0.2, 3.0, size=(5, 200, 1))  # confidence varies by row and exit
    probs = rng.dirichlet(np.ones(10), size=(5, 200)).astype(np.float32) ** sharpness
    probs = (probs / probs.sum(-1, keepdims=True)).astype(np.float32)
    split = 3
    for policy in (MaxProb(0.5), MaxProb(0.5, fallback=False)):
        pending = ExitRunner(_GivenExits(probs), policy, num_classes=10).run(np.arange(200), stop=split).pending
        assert pending is not None and 0 < len(pending.rows) < 200, "the test needs rows leaving and staying"
        conf = probs[: split + 1, pending.rows].max(-1)  # [exits evaluated, rows left]
        best = conf.argmax(0)
        assert len(set(best.tolist())) == split + 1, "the test needs every exit to be someone's most confident"
        assert np.array_equal(pending.state.best_exit, best)
        assert np.array_equal(pending.state.best_conf, conf.max(0))
        assert np.array_equal(pending.state.best_probs, probs[best, pending.rows])


def test_bundle_sides_carry_only_their_weights_and_reproduce_the_model(net, tmp_path: Path) -> None:
    model, meta = net
    x = torch.randn(32, *SHAPE)
    policy = _policies(model, x)[0]
    path = export_bundle(tmp_path / "b", model, meta, split=2, policy=policy, input_shape=SHAPE)
    edge, cloud = load_bundle(path, "edge"), load_bundle(path, "cloud")
    assert edge.hash == cloud.hash == read_manifest(path).hash
    assert edge.feature_shape == (8, 8, 8) and edge.manifest.edge_exits == (1, 2)
    from safetensors.torch import load_file

    edge_keys = set(load_file(str(path / "edge.safetensors")))
    assert edge_keys and all(k.startswith(("stages.0.", "stages.1.", "stages.2.", "exits.1.", "exits.2."))
                             for k in edge_keys)
    head = ExitRunner(edge.model, edge.policy, num_classes=10).run(x, stop=edge.split)
    p = head.pending
    tail = ExitRunner(cloud.model, cloud.policy, num_classes=10).run(p.feature, start=cloud.split + 1,
                                                                       state=p.state, rows=p.rows)
    got = _answers(type(head)(head.answered + tail.answered), len(x))
    assert np.array_equal(np.stack(got), np.stack(_offline(model, x, policy)[:2]))


def test_the_edge_builds_only_what_it_runs(net, tmp_path: Path) -> None:
    model, meta = net
    path = export_bundle(tmp_path / "b", model, meta, split=2, policy=MaxProb(0.5), input_shape=SHAPE)
    edge = load_bundle(path, "edge")
    from safetensors.torch import load_file

    assert set(edge.model.state_dict()) == set(load_file(str(path / "edge.safetensors")))  # no tail weights
    assert all(isinstance(edge.model.stages[i], NotOnThisSide) for i in range(3, edge.model.num_stages))
    assert isinstance(edge.model.head, NotOnThisSide) and isinstance(edge.model.exits["3"], NotOnThisSide)
    with pytest.raises(BundleError, match="stage 3 is not in the edge part"):
        edge.model(torch.randn(1, *SHAPE))
    assert edge.model.exit_points == model.exit_points  # the ladder is the whole network's


@pytest.mark.parametrize("field", ["split", "exits", "ladder", "model", "files"])
def test_a_manifest_missing_a_field_is_refused_by_name(net, tmp_path: Path, field: str) -> None:
    model, meta = net
    path = export_bundle(tmp_path / "b", model, meta, split=1, policy=MaxProb(0.5), input_shape=SHAPE)
    manifest = json.loads((path / "manifest.json").read_text())
    del manifest[field]
    manifest["hash"] = manifest_hash(manifest)  # a consistent manifest, only incomplete
    (path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match=f"bad or missing '{field}'"):
        load_bundle(path, "edge")


def test_tampered_or_mismatched_bundles_are_refused(net, tmp_path: Path) -> None:
    model, meta = net
    path = export_bundle(tmp_path / "b", model, meta, split=1, policy=MaxProb(0.5), input_shape=SHAPE)
    good = read_manifest(path).hash
    with pytest.raises(BundleError, match="not the expected"):
        load_bundle(path, "edge", expect_hash="0" * 64)
    data = bytearray((path / "cloud.safetensors").read_bytes())
    data[-1] ^= 0xFF
    (path / "cloud.safetensors").write_bytes(bytes(data))
    load_bundle(path, "edge", expect_hash=good)  # the edge side does not need the cloud file
    with pytest.raises(BundleError, match="content hash mismatch"):
        load_bundle(path, "cloud")
    manifest = json.loads((path / "manifest.json").read_text())
    manifest["split"] = 2
    (path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match="manifest hash mismatch"):
        load_bundle(path, "edge")
    (path / "manifest.json").unlink()
    with pytest.raises(BundleError, match="not a bundle"):
        load_bundle(path, "edge")


def test_export_refuses_what_cannot_be_split(net, tmp_path: Path) -> None:
    model, meta = net
    with pytest.raises(BundleError, match="split must be"):
        export_bundle(tmp_path / "b", model, meta, split=6, policy=MaxProb(0.5), input_shape=SHAPE)
    with pytest.raises(BundleError, match="codec"):
        export_bundle(tmp_path / "b", model, meta, split=1, policy=MaxProb(0.5), input_shape=SHAPE, codec="zip")
    assert not (tmp_path / "b").exists()  # nothing half-written


def test_the_runner_runs_a_cascades_larger_network_on_the_input_it_is_given(net) -> None:
    model, _ = net
    torch.manual_seed(5)
    large = build_model(ModelConfig(arch="resnet14_tiny", in_chans=1, exit_after=())).eval()
    x = torch.randn(64, *SHAPE)
    with torch.no_grad():
        conf = torch.stack([z.softmax(-1).max(-1).values for z in model.forward_exits(x)])
    thresholds = conf.quantile(0.9, dim=1)
    thresholds[-1] = conf[-1].median()  # about half of the rows that reach the final head go on
    policy = MaxProb((*(float(t) for t in thresholds), 0.0))  # the last exit: the larger network's head
    runner = ExitRunner(model, policy, num_classes=10, network=(0,) * 6 + (1,), larger=large)

    alone = runner.run(x)  # no input for the larger network: its rows leave as `escalate`
    bound = alone.escalate.rows
    assert len(bound) > 2 and len(alone.merged().rows) + len(bound) == len(x)

    even = bound[bound % 2 == 0]
    partial = runner.run(x, larger_input=lambda rows: (rows[rows % 2 == 0], x[torch.from_numpy(rows[rows % 2 == 0])]))
    assert np.array_equal(partial.escalate.rows, bound[bound % 2 == 1])  # those without input still leave
    merged = partial.merged()
    by_large = merged.exit_index == runner.num_exits - 1
    assert np.array_equal(np.sort(merged.rows[by_large]), np.sort(even))
    with torch.no_grad():
        want = large(x[torch.from_numpy(merged.rows[by_large])]).softmax(-1).numpy()
    np.testing.assert_allclose(merged.probs[by_large], want, rtol=1.3e-6, atol=1e-5)

    whole = runner.run(x, larger_input=lambda rows: (rows, x[torch.from_numpy(rows)]))
    assert whole.escalate is None and len(whole.merged().rows) == len(x)
