"""torch.fx cuts of arbitrary modules: chained stages equal the module, bad cuts fail clearly."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from splitexit.models import MultiExitNet, PoolLinearHead, StageInfo
from splitexit.models.fx_cut import CutError, cut_stages, graph_node_names, multi_exit_from_module

NUM_CLASSES = 5


class TinyCNN(nn.Module):
    """conv-relu-conv-relu-pool-flatten-linear, with one parameter read on both sides of
    most cuts (a get_attr must be re-read by each stage, not sent across)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 3, padding=1)
        self.act = nn.ReLU()
        self.conv2 = nn.Conv2d(4, 8, 3, stride=2, padding=1)
        self.pool = nn.MaxPool2d(2)
        self.fc = nn.Linear(8 * 2 * 2, NUM_CLASSES)
        self.scale = nn.Parameter(torch.tensor(1.5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act(self.conv1(x)) * self.scale
        x = torch.relu(self.conv2(x))
        x = torch.flatten(self.pool(x), 1)
        return self.fc(x) * self.scale


class Block(nn.Module):
    def __init__(self, chs: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(chs, chs, 3, padding=1)
        self.conv2 = nn.Conv2d(chs, chs, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.conv2(torch.relu(self.conv1(x))) + x)


class TinyResNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 3, padding=1)
        self.block = Block(4)
        self.fc = nn.Linear(4, NUM_CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.block(torch.relu(self.stem(x)))
        return self.fc(x.mean((2, 3)))


class Untraceable(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.sum() > 0:  # data-dependent control flow: fx cannot trace it
            return x
        return -x


@pytest.fixture
def cnn() -> TinyCNN:
    torch.manual_seed(0)
    return TinyCNN().eval()


@pytest.fixture
def x() -> torch.Tensor:
    torch.manual_seed(1)
    return torch.randn(2, 3, 8, 8)


def _chain(pieces: list[torch.fx.GraphModule], x: torch.Tensor) -> torch.Tensor:
    for piece in pieces:
        x = piece(x)
    return x


def test_every_single_cut_chains_to_the_full_module(cnn: TinyCNN, x: torch.Tensor) -> None:
    names = graph_node_names(cnn)
    assert names[0] == "conv1" and "fc" in names
    expected = cnn(x)
    for name in names[:-1]:
        head, tail = cut_stages(cnn, [name])
        torch.testing.assert_close(tail(head(x)), expected, msg=f"cut after {name}")


def test_three_cuts_chain_to_the_full_module(cnn: TinyCNN, x: torch.Tensor) -> None:
    pieces = cut_stages(cnn, ["act", "relu", "flatten"])
    assert len(pieces) == 4
    torch.testing.assert_close(_chain(pieces, x), cnn(x))
    # each piece holds only what it uses
    assert {n for n, _ in pieces[0].named_parameters()} == {"conv1.weight", "conv1.bias"}
    assert {n for n, _ in pieces[3].named_parameters()} == {"fc.weight", "fc.bias", "scale"}
    assert pieces[1].scale is cnn.scale  # referenced, not copied


def test_no_cuts_is_the_whole_module(cnn: TinyCNN, x: torch.Tensor) -> None:
    (whole,) = cut_stages(cnn, [])
    torch.testing.assert_close(whole(x), cnn(x))


def test_residual_cut_inside_the_block_names_the_crossing_values(x: torch.Tensor) -> None:
    torch.manual_seed(0)
    net = TinyResNet().eval()
    names = graph_node_names(net)
    inside = "block_conv1"
    assert inside in names
    with pytest.raises(CutError, match=r"2 values cross the cut after 'block_conv1' \(relu, block_conv1\)"):
        cut_stages(net, [inside])
    # at the block boundary only the block's input (resp. output) crosses
    pieces = cut_stages(net, ["relu", names[names.index("add") + 1]])
    torch.testing.assert_close(_chain(pieces, x), net(x))


def test_input_used_after_the_cut_is_rejected() -> None:
    with pytest.raises(CutError, match=r"2 values cross the cut after 'conv1' \(x, conv1\)"):
        cut_stages(Block(3), ["conv1"])


def test_unknown_node_lists_close_matches(cnn: TinyCNN) -> None:
    with pytest.raises(CutError, match=r"no node named 'conv_1'.*close matches: .*conv1.*graph_node_names"):
        cut_stages(cnn, ["conv_1"])


def test_cuts_out_of_order_or_repeated_are_rejected(cnn: TinyCNN) -> None:
    with pytest.raises(CutError, match="graph order"):
        cut_stages(cnn, ["pool", "act"])
    with pytest.raises(CutError, match="repeated"):
        cut_stages(cnn, ["act", "act"])
    with pytest.raises(CutError, match="empty final stage"):
        cut_stages(cnn, [graph_node_names(cnn)[-1]])


def test_untraceable_module_names_its_class() -> None:
    with pytest.raises(CutError, match="cannot trace Untraceable"):
        cut_stages(Untraceable(), [])


def test_multi_exit_from_module_with_pooling_exits(cnn: TinyCNN, x: torch.Tensor) -> None:
    cnn.train()  # the shape probe must leave the caller's mode alone
    seen: list[StageInfo] = []

    def factory(info: StageInfo) -> nn.Module:
        seen.append(info)
        return PoolLinearHead(info.num_chs, NUM_CLASSES)

    net = multi_exit_from_module(cnn, ["act", "pool"], x, exit_factory=factory)
    assert cnn.training and cnn.conv1.training
    cnn.eval()
    net.eval()
    assert isinstance(net, MultiExitNet) and isinstance(net.head, nn.Identity)
    assert net.feature_info == [
        StageInfo(4, 1, "stages.0"),
        StageInfo(8, 4, "stages.1"),
        StageInfo(NUM_CLASSES, 1, "stages.2"),
    ]
    assert seen == net.feature_info[:2] and net.exit_points == [0, 1]
    expected = cnn(x)
    torch.testing.assert_close(net(x), expected)
    outs = net.forward_exits(x)
    assert len(outs) == net.num_exits == 3
    assert all(o.shape == (2, NUM_CLASSES) for o in outs)
    torch.testing.assert_close(outs[-1], expected)
    for k in range(net.num_stages):
        torch.testing.assert_close(net.split_tail(k)(net.split_head(k)(x)), expected)


def test_multi_exit_from_module_with_explicit_exits_on_a_flat_stage(cnn: TinyCNN, x: torch.Tensor) -> None:
    net = multi_exit_from_module(cnn, ["pool", "flatten"], x, exits={1: nn.Linear(32, NUM_CLASSES)})
    assert [i.num_chs for i in net.feature_info] == [8, 32, NUM_CLASSES]
    assert [i.reduction for i in net.feature_info] == [4, 1, 1]
    assert net.exit_points == [1]
    torch.testing.assert_close(net(x), cnn(x))
    with pytest.raises(ValueError, match="not both"):
        multi_exit_from_module(cnn, ["pool"], x, exits={}, exit_factory=lambda i: nn.Identity())


def test_probe_keeps_modes_and_batch_stats(x: torch.Tensor) -> None:
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(3, 4, 3, stride=2), nn.BatchNorm2d(4), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        nn.Linear(4, NUM_CLASSES),
    )
    net.train()
    net[5].eval()  # a mixed mode to keep
    mean = net[1].running_mean.clone()
    multi = multi_exit_from_module(net, [graph_node_names(net)[2]], x)
    assert net.training and net[1].training and not net[5].training
    # the probe ran in eval mode: the training BatchNorm's statistics are untouched
    torch.testing.assert_close(net[1].running_mean, mean)
    assert multi.feature_info[0] == StageInfo(4, 2, "stages.0")  # 8x8 -> 3x3: reduction 8 // 3
