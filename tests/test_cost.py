from __future__ import annotations

import json

import pytest
import torch

from splitexit.cost import CostModel, cost_model, format_cost_table, measure_ms
from splitexit.models import ModelConfig, build_model

CIFAR = (3, 32, 32)
# Hand count of ResNet-20 (projection shortcuts), one 32x32 sample:
STEM = 3 * 16 * 9 * 32 * 32  # 442,368
# codebook on the 8x8 pooled map + the histogram as one weighted sum over positions (the
# per-position normalization as weights: a product the flop counter sees) + classifier = 70,272
BOF_AT_STAGE_2 = 16 * 64 * 8 * 8 + 64 * 8 * 8 + 64 * 10


@pytest.fixture(scope="module")
def resnet20_cost() -> CostModel:
    return cost_model(build_model(ModelConfig(arch="resnet20")), CIFAR)


def test_resnet20_total_macs(resnet20_cost: CostModel) -> None:
    cost = resnet20_cost
    assert 40e6 <= cost.total_macs <= 42e6
    assert sum(cost.stage_macs) + cost.head_macs == cost.total_macs
    # whole-model count agrees with the per-part counts (nothing lost at the cuts)
    model = build_model(ModelConfig(arch="resnet20")).eval()
    with torch.no_grad(), torch.utils.flop_counter.FlopCounterMode(display=False) as counter:
        model(torch.zeros(1, *CIFAR))
    assert counter.get_total_flops() // 2 == cost.total_macs


def test_resnet20_hand_checked_numbers(resnet20_cost: CostModel) -> None:
    cost = resnet20_cost
    assert cost.num_stages == 10
    assert cost.stage_macs[0] == STEM
    assert cost.stage_macs[1] == 2 * 16 * 16 * 9 * 32 * 32  # two 3x3 convs 16->16
    assert cost.head_macs == 64 * 10
    assert cost.feature_bytes[1] == 16 * 32 * 32 * 4
    assert cost.bytes_at(1, 2) == 16 * 32 * 32 * 2
    assert cost.bytes_at(1, 1) == 16 * 32 * 32
    assert cost.feature_bytes[-1] == 64 * 8 * 8 * 4
    assert cost.input_bytes == 3 * 32 * 32 * 4
    assert cost.exit_points == [2, 4, 6, 8]
    assert cost.exit_macs[2] == BOF_AT_STAGE_2
    assert cost.measured is False and cost.stage_ms is None and cost.exit_ms is None


def test_cumulative_exit_costs(resnet20_cost: CostModel) -> None:
    cost = resnet20_cost
    c = cost.cumulative_exit_macs()
    assert len(c) == len(cost.exit_points) + 1
    assert all(a < b for a, b in zip(c, c[1:]))
    assert c[-1] == cost.total_macs + sum(cost.exit_macs.values())
    assert c[0] == sum(cost.stage_macs[:3]) + cost.exit_macs[2]
    # a subset of exits: only the chosen heads are paid for
    c_sub = cost.cumulative_exit_macs([4])
    assert c_sub == [sum(cost.stage_macs[:5]) + cost.exit_macs[4], cost.total_macs + cost.exit_macs[4]]
    assert cost.cumulative_exit_macs([]) == [cost.total_macs]
    with pytest.raises(ValueError, match="no exit"):
        cost.cumulative_exit_macs([3])


def test_edge_and_cloud_split(resnet20_cost: CostModel) -> None:
    cost = resnet20_cost
    assert cost.edge_macs(0) == STEM
    assert cost.edge_macs(4) == sum(cost.stage_macs[:5]) + cost.exit_macs[2] + cost.exit_macs[4]
    assert cost.edge_macs(4, exit_points=[]) == sum(cost.stage_macs[:5])
    for k in range(cost.num_stages):
        assert cost.edge_macs(k, exit_points=[]) + cost.cloud_macs(k) == cost.total_macs
    with pytest.raises(ValueError):
        cost.edge_macs(cost.num_stages)


def test_pool_exit_macs() -> None:
    cost = cost_model(build_model(ModelConfig(arch="resnet20", exit_head="pool", exit_after=(2,))), CIFAR)
    assert cost.exit_macs == {2: 16 * 10}


def test_hierarchical_exit_includes_shared_classifier() -> None:
    cost = cost_model(build_model(ModelConfig(arch="resnet20", hierarchical=True, exit_after=(2, 4))), CIFAR)
    assert cost.exit_macs[2] == BOF_AT_STAGE_2


def test_measure_tiny_model_and_round_trip() -> None:
    model = build_model(ModelConfig(arch="resnet14_tiny", in_chans=1, exit_after=(1, 3))).train()
    cost = cost_model(model, (1, 8, 8), measure=True)
    assert model.training  # mode restored
    assert cost.measured and cost.stage_ms is not None and cost.exit_ms is not None
    assert len(cost.stage_ms) == model.num_stages and all(ms > 0 for ms in cost.stage_ms)
    assert set(cost.exit_ms) == {1, 3} and all(ms > 0 for ms in cost.exit_ms.values())
    assert cost.head_ms is not None and cost.head_ms > 0
    assert CostModel.from_dict(cost.to_dict()) == cost
    assert CostModel.from_dict(json.loads(json.dumps(cost.to_dict()))) == cost

    table = format_cost_table(cost, [1, 3])
    assert len(table.splitlines()) == 2 + model.num_stages + 1 + 2
    assert "exit ms" in table

    timings = measure_ms(model, (1, 8, 8), batch_size=4, repeats=2, warmup=0)
    assert timings.batch_size == 4 and len(timings.stage_ms) == model.num_stages


def test_round_trip_unmeasured_and_table(resnet20_cost: CostModel) -> None:
    data = json.loads(json.dumps(resnet20_cost.to_dict()))
    assert CostModel.from_dict(data) == resnet20_cost
    table = format_cost_table(resnet20_cost, [2, 4])
    lines = table.splitlines()
    assert lines[0].split()[0] == "stage" and "ms" not in lines[0]
    assert len(lines) == 2 + 10 + 1 + 1
    assert "0.442" in lines[2]  # stem: 0.442 M MACs


def test_cost_model_validates() -> None:
    with pytest.raises(ValueError, match="out of range"):
        CostModel(stage_macs=(1, 2), exit_macs={1: 5}, head_macs=1, feature_bytes=(4, 4), input_bytes=4)
    with pytest.raises(ValueError, match="feature sizes"):
        CostModel(stage_macs=(1, 2), exit_macs={}, head_macs=1, feature_bytes=(4,), input_bytes=4)
