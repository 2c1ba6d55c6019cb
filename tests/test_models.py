from __future__ import annotations

import pytest
import torch

from splitexit.models import ARCHS, BoFConfig, BoFHead, BoFHistogram, ModelConfig, PoolLinearHead, build_model


def _input(arch: str, batch: int = 2) -> tuple[ModelConfig, torch.Tensor]:
    if arch == "resnet14_tiny":
        return ModelConfig(arch=arch, in_chans=1, exit_after=(1, 3)), torch.randn(batch, 1, 8, 8)
    return ModelConfig(arch=arch, exit_after=(2, 4)), torch.randn(batch, 3, 32, 32)


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_tail_of_head_equals_full_network_at_every_split(arch: str) -> None:
    cfg, x = _input(arch)
    model = build_model(cfg).eval()
    with torch.no_grad():
        full = model(x)
        for k in range(model.num_stages):
            split = model.split_tail(k)(model.split_head(k)(x))
            torch.testing.assert_close(split, full, rtol=1e-5, atol=1e-5, msg=f"{arch} split after stage {k}")


def test_split_parts_partition_the_weights_with_stable_names() -> None:
    model = build_model(ModelConfig(arch="resnet20", exit_after=(2, 4, 6, 8)))
    head, tail = model.split_head(4), model.split_tail(4)
    head_keys, tail_keys = set(head.state_dict()), set(tail.state_dict())
    assert head_keys.isdisjoint(tail_keys)
    assert head_keys | tail_keys == set(model.state_dict())
    assert any(k.startswith("stages.4.") for k in head_keys) and any(k.startswith("exits.4.") for k in head_keys)
    assert not any(k.startswith(("stages.5.", "exits.6.", "head.")) for k in head_keys)  # no cloud weights on the edge
    assert any(k.startswith("head.fc.") for k in tail_keys)


def test_feature_info_and_exit_points_of_resnet20() -> None:
    model = build_model(ModelConfig(arch="resnet20", exit_after=(2, 4, 6, 8)))
    assert model.num_stages == 10 and model.exit_points == [2, 4, 6, 8] and model.num_exits == 5
    assert [f.num_chs for f in model.feature_info] == [16] * 4 + [32] * 3 + [64] * 3
    assert [f.reduction for f in model.feature_info] == [1] * 4 + [2] * 3 + [4] * 3
    assert model.feature_info[3].module == "stages.3"
    x = torch.randn(2, 3, 32, 32)
    final, feats = model.forward_intermediates(x, [1, 5])
    assert final is not None and final.shape == (2, 10)
    assert [tuple(f.shape) for f in feats] == [(2, 16, 32, 32), (2, 32, 16, 16)]
    final, feats = model.forward_intermediates(x, [3], stop_early=True)
    assert final is None and feats[0].shape == (2, 16, 32, 32)
    outputs = model.forward_exits(x)
    assert len(outputs) == 5 and all(o.shape == (2, 10) for o in outputs)


def test_edge_network_offers_at_least_four_exit_points() -> None:
    model = build_model(ModelConfig(arch="resnet20", exit_after=tuple(range(1, 9))))
    assert model.num_exits - 1 >= 4


@pytest.mark.parametrize("kernel", ["logistic", "rbf"])
@pytest.mark.parametrize("spatial", ["global", "2x2"])
def test_bof_histogram_sums_to_one_per_sample(kernel: str, spatial: str) -> None:
    cfg = BoFConfig(codewords=16, kernel=kernel, spatial=spatial)
    hist = BoFHistogram(8, cfg)(torch.randn(5, 8, 12, 12) * 3)
    cells = 4 if spatial == "2x2" else 1
    assert hist.shape == (5, 16 * cells)
    assert (hist >= 0).all()
    # layout [codeword, cell] flattened: each cell's histogram sums to 1
    torch.testing.assert_close(hist.view(5, 16, cells).sum(1), torch.ones(5, cells), rtol=0, atol=1e-4)


def test_bof_classifier_sees_a_2x2_histogram_at_a_global_ones_scale() -> None:
    # the classifier's input (scale x histogram) has the same norm for both layouts, so one
    # learning rate suits both (at 4x the squared norm the 2x2 heads diverged at lr 0.2)
    def scaled_norm(spatial: str) -> float:
        head = BoFHead(8, 10, BoFConfig(codewords=16, spatial=spatial))
        hist = torch.full((1, head.bof.config.histogram_dim), 1 / 16)  # every cell uniform
        return float((hist * head.fc.scale).norm())

    assert scaled_norm("2x2") == pytest.approx(scaled_norm("global"))


def test_bof_pools_large_maps_before_the_codebook() -> None:
    head = BoFHead(4, 3, BoFConfig(codewords=8, pool_to=4))
    x = torch.randn(2, 4, 16, 16)
    assert head(x).shape == (2, 3)
    assert head.bof.membership(x).shape == (2, 8, 4, 4)
    # pooling first is exactly the codebook on the average-pooled map (the fast path's sums)
    full_res = BoFHead(4, 3, BoFConfig(codewords=8, pool_to=None))
    full_res.load_state_dict(head.state_dict())
    assert full_res.bof.membership(x).shape == (2, 8, 16, 16)
    pooled = torch.nn.functional.adaptive_avg_pool2d(x, 4)
    assert torch.allclose(head.bof.membership(x), full_res.bof.membership(pooled), atol=1e-6)


@pytest.mark.parametrize("side", [6, 16, 32])  # kept, halved by slices, pooled by avg_pool2d
def test_the_fused_global_histogram_is_the_mean_of_the_memberships(side: int) -> None:
    hist = BoFHistogram(8, BoFConfig(codewords=16, pool_to=8))
    with torch.no_grad():
        hist.a.fill_(1.7), hist.c.fill_(-0.3)
    x = torch.randn(3, 8, side, side) * 2
    expected = hist.membership(x).flatten(2).mean(-1)
    torch.testing.assert_close(hist(x), expected, rtol=1e-5, atol=1e-6)
    hist.eval()
    with torch.inference_mode():  # the folded codebook is cached outside training
        torch.testing.assert_close(hist(x[:1]), expected[:1], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(hist(x[:1]), expected[:1], rtol=1e-5, atol=1e-6)
    # training goes through it: every parameter gets a gradient, the one the plain path gives
    hist.train()
    hist.membership(x).flatten(2).mean(-1).pow(2).sum().backward()
    expected_grads = [p.grad.clone() for p in hist.parameters()]
    hist.zero_grad()
    hist(x).pow(2).sum().backward()
    assert all(p.grad is not None and bool(p.grad.abs().sum() > 0) for p in hist.parameters())
    for p, g in zip(hist.parameters(), expected_grads):
        torch.testing.assert_close(p.grad, g, rtol=1e-4, atol=1e-6)


def test_the_folded_codebook_follows_an_update_that_bumps_no_version() -> None:
    """torch's fused SGD on CPU writes the weights without bumping their versions, the
    cache's key: a validation after such a training step must still see the new weights."""
    hist = BoFHistogram(8, BoFConfig(codewords=16, pool_to=4))
    x = torch.randn(4, 8, 8, 8)
    hist.eval()
    with torch.no_grad():
        before = hist(x)  # caches the folded codebook
    hist.train()
    optimizer = torch.optim.SGD(hist.parameters(), lr=1.0, fused=True)
    hist(x).pow(2).sum().backward()
    versions = [p._version for p in hist.parameters()]
    optimizer.step()
    assert [p._version for p in hist.parameters()] == versions  # what makes the key blind
    hist.eval()
    with torch.no_grad():
        after = hist(x)
    hist.train()
    with torch.no_grad():
        expected = hist(x)  # the training path folds afresh every call
    assert not torch.allclose(after, before)
    torch.testing.assert_close(after, expected)


def test_kmeans_codebook_init_puts_codewords_on_clusters() -> None:
    centres = torch.tensor([[5.0, 0.0], [-5.0, 0.0], [0.0, 5.0], [0.0, -5.0]])
    points = centres[torch.randint(0, 4, (2000,))] + 0.1 * torch.randn(2000, 2)
    features = points.T.reshape(1, 2, 40, 50)
    hist = BoFHistogram(2, BoFConfig(codewords=4, kernel="rbf", pool_to=None))
    hist.init_codebook(features)
    words = hist.codebook.weight.view(4, 2)
    distance = torch.cdist(words, centres).min(dim=1).values
    assert (distance < 0.2).all(), words
    u = hist.membership(centres.T.reshape(1, 2, 2, 2))
    assert (u.max(dim=1).values > 0.99).all()  # each centre is assigned to one codeword


def test_hierarchical_exits_share_one_classifier_and_average_histograms() -> None:
    cfg = ModelConfig(arch="resnet20", exit_after=(2, 5), hierarchical=True, bof=BoFConfig(codewords=16))
    model = build_model(cfg).eval()
    assert model.exit_classifier is not None
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        outputs = model.forward_exits(x)
        _, (f2, f5) = model.forward_intermediates(x, [2, 5])
        h2, h5 = model.exits["2"](f2), model.exits["5"](f5)
        torch.testing.assert_close(outputs[0], model.exit_classifier(h2))
        torch.testing.assert_close(outputs[1], model.exit_classifier((h2 + h5) / 2))


def test_pool_head_and_bad_configs() -> None:
    assert PoolLinearHead(16, 10)(torch.randn(2, 16, 4, 4)).shape == (2, 10)
    with pytest.raises(ValueError, match="unknown arch"):
        ModelConfig(arch="resnet1000")
    with pytest.raises(ValueError, match="strictly increasing"):
        ModelConfig(exit_after=(4, 2))
    with pytest.raises(ValueError, match="exit points"):
        build_model(ModelConfig(exit_after=(9,)))
    with pytest.raises(ValueError, match="hierarchical"):
        ModelConfig(exit_head="pool", hierarchical=True)
    with pytest.raises(ValueError, match="codewords"):
        BoFConfig(codewords=1)
    model = build_model(ModelConfig())
    with pytest.raises(ValueError, match="split point"):
        model.split_head(10)


def test_model_config_round_trips_through_a_dict() -> None:
    cfg = ModelConfig(arch="resnet32", exit_after=(1, 7), bof=BoFConfig(codewords=32, spatial="2x2"))
    assert ModelConfig.from_dict(cfg.to_dict()) == cfg


@pytest.mark.parametrize("kernel", ["logistic", "rbf"])
def test_bof_histograms_stay_fp32_under_bfloat16_autocast(kernel: str) -> None:
    """Histogram entries differ by ~1e-3 around 1/N_K: about bfloat16's resolution there."""
    hist = BoFHistogram(16, BoFConfig(codewords=64, kernel=kernel))
    x = torch.randn(4, 16, 16, 16)
    expected = hist(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = hist(x.bfloat16())
    assert got.dtype == torch.float32
    # only the input's rounding to bfloat16 is left (x has ~3 significant digits)
    torch.testing.assert_close(got, expected, rtol=0.02, atol=2e-4)


def test_exit_grad_scales_what_the_exits_send_below_and_nothing_else() -> None:
    torch.manual_seed(0)
    model = build_model(ModelConfig(arch="resnet14_tiny", in_chans=1, exit_after=(1, 3))).train()
    x = torch.randn(4, 1, 8, 8)

    def grads(exit_grad: float) -> tuple[list[torch.Tensor], dict[str, torch.Tensor]]:
        model.zero_grad()
        outputs = model.forward_exits(x, exit_grad=exit_grad)
        sum(o.square().sum() for o in outputs[:-1]).backward()  # the exits' losses only
        named = dict(model.named_parameters())
        return outputs, {n: p.grad.clone() for n, p in named.items() if p.grad is not None}

    whole_out, whole = grads(1.0)
    part_out, part = grads(0.25)
    for a, b in zip(whole_out, part_out):
        torch.testing.assert_close(a, b)  # the values do not change
    stage0 = next(n for n in whole if n.startswith("stages.0."))
    head = next(n for n in whole if n.startswith("exits."))
    torch.testing.assert_close(part[stage0], 0.25 * whole[stage0])
    torch.testing.assert_close(part[head], whole[head])
    # with the final head's loss beside them, only the exits' share is scaled
    model.zero_grad()
    model.forward_exits(x)[-1].square().sum().backward()
    final_only = model.get_parameter(stage0).grad.clone()
    model.zero_grad()
    outputs = model.forward_exits(x, exit_grad=0.25)
    sum(o.square().sum() for o in outputs).backward()
    torch.testing.assert_close(model.get_parameter(stage0).grad, final_only + 0.25 * whole[stage0])


def test_a_built_in_configs_dict_is_unchanged_by_the_fields_of_ones_own_networks() -> None:
    """Training caches are keyed by the config's dict: the fields of a network of one's own
    appear only for one, so the models cached before they existed are still found."""
    from splitexit.models import ModelConfig

    built_in = ModelConfig(arch="resnet20")
    assert not {"module", "cut_after", "input_size"} & set(built_in.to_dict())
    assert ModelConfig.from_dict(built_in.to_dict()) == built_in
    own = ModelConfig(arch="mine", module="pkg.mod:build", cut_after=("a", "b"), input_size=28, exit_after=(0, 1))
    assert own.to_dict()["cut_after"] == ("a", "b") and ModelConfig.from_dict(own.to_dict()) == own
