from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from splitexit.checkpoint import CheckpointError, load_checkpoint, read_meta
from splitexit.data import ArraySet, Dataset, Normalize, iterate_batches, load_digits
from splitexit.models import ModelConfig, build_model
from splitexit.reference import QUICK
import splitexit.train as train_module
from splitexit.train import TrainConfig, fit, input_size, lr_at, resolve_precision, run_key, train_cached

TINY = dict(arch="resnet14_tiny", in_chans=1)
FAST = dict(batch_size=64, lr=0.05, augment_pad=1, augment_flip=False)


@pytest.fixture(scope="module")
def digits() -> Dataset:
    return load_digits()


def _ce_per_exit(model, data: Dataset) -> np.ndarray:
    """Plain cross-entropy of every exit on the validation split (not the training loss,
    whose distillation term moves with the teacher)."""
    model.eval()
    with torch.no_grad():
        x, y = next(iterate_batches(data.val, Normalize(data.mean, data.std), batch_size=300))
        return np.array([float(torch.nn.functional.cross_entropy(o, y)) for o in model.forward_exits(x)])


@pytest.mark.slow
@pytest.mark.parametrize("head", ["bof", "pool"])
def test_joint_training_lowers_the_loss_of_every_exit(digits: Dataset, cache_dir: Path, head: str) -> None:
    cfg = ModelConfig(**TINY, exit_after=(1, 3, 5), exit_head=head)
    train_cfg = TrainConfig(epochs=5, **FAST)
    before = _ce_per_exit(build_model(cfg), digits)
    model, meta, _ = train_cached(cfg, train_cfg, digits, cache_dir=cache_dir, on_epoch=None)
    after = _ce_per_exit(model, digits)
    assert (after < before).all(), (before, after)
    assert (after[1:] < 0.6 * before[1:]).all(), (before, after)  # the 8x8x8 first exit learns slowest
    history = meta.extra["history"]
    assert len(history) == 5 and history[-1]["val_acc"][-1] > 0.8


@pytest.mark.slow
def test_exits_on_a_frozen_backbone_leave_the_backbone_untouched(digits: Dataset, cache_dir: Path) -> None:
    backbone_cfg = ModelConfig(**TINY, exit_after=(3,))
    _, _, backbone_path = train_cached(backbone_cfg, TrainConfig(epochs=3, **FAST), digits, cache_dir=cache_dir, on_epoch=None)
    frozen_cfg = ModelConfig(**TINY, exit_after=(1, 2, 4), exit_head="bof")
    train_cfg = TrainConfig(mode="exits", epochs=3, **FAST)
    model, meta, _ = train_cached(frozen_cfg, train_cfg, digits, cache_dir=cache_dir, init=backbone_path, on_epoch=None)
    before = _ce_per_exit(build_model(frozen_cfg), digits)
    source, _ = load_checkpoint(backbone_path)
    for name, tensor in source.state_dict().items():
        if name.startswith(("stages.", "head.")):
            torch.testing.assert_close(model.state_dict()[name], tensor, rtol=0, atol=0, msg=name)
    assert meta.extra["history"][-1]["loss"] < meta.extra["history"][0]["loss"]
    assert (_ce_per_exit(model, digits)[:-1] < before[:-1]).all()


def test_a_trained_configuration_is_loaded_not_retrained(digits: Dataset, cache_dir: Path) -> None:
    cfg, train_cfg = ModelConfig(**TINY, exit_after=(2,)), TrainConfig(epochs=1, **FAST)
    calls: list[int] = []
    _, _, first = train_cached(cfg, train_cfg, digits, cache_dir=cache_dir, on_epoch=lambda r: calls.append(r.epoch))
    _, _, second = train_cached(cfg, train_cfg, digits, cache_dir=cache_dir, on_epoch=lambda r: calls.append(r.epoch))
    assert first == second and calls == [1]


class _Stop(Exception):
    pass


def _interrupted_after_two_epochs(cfg: ModelConfig, train_cfg: TrainConfig, digits: Dataset, cache_dir: Path) -> None:
    """Start a cached run and stop it as epoch 2 is reported (before its state is saved)."""

    def stop_after_two(report) -> None:
        if report.epoch == 2:
            raise _Stop

    with pytest.raises(_Stop):
        train_cached(cfg, train_cfg, digits, cache_dir=cache_dir, on_epoch=stop_after_two)


@pytest.mark.slow
def test_an_interrupted_run_resumes_from_its_last_epoch(digits: Dataset, cache_dir: Path) -> None:
    cfg, train_cfg = ModelConfig(**TINY, exit_after=(2,)), TrainConfig(epochs=3, **FAST)

    _interrupted_after_two_epochs(cfg, train_cfg, digits, cache_dir)
    # the epoch-2 state is written after on_epoch, so the resume restarts at epoch 2
    epochs: list[int] = []
    _, meta, path = train_cached(cfg, train_cfg, digits, cache_dir=cache_dir, on_epoch=lambda r: epochs.append(r.epoch))
    assert epochs[-1] == 3 and epochs[0] >= 2
    assert path.exists() and not (path.parent / "resume.safetensors").exists()


def test_one_cycle_schedule_warms_up_then_decays() -> None:
    cfg = TrainConfig(epochs=10, lr=0.1, warmup_frac=0.1)
    lrs = [lr_at(s, 100, cfg) for s in range(100)]
    assert lrs[0] < lrs[9] == pytest.approx(0.1)
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:])) and lrs[-1] < 1e-3


def test_checkpoint_errors_are_clear(tmp_path: Path, digits: Dataset, cache_dir: Path) -> None:
    with pytest.raises(CheckpointError, match="no such checkpoint"):
        load_checkpoint(tmp_path / "missing.safetensors")
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x00" * 64)
    with pytest.raises(CheckpointError, match="not a readable safetensors"):
        read_meta(bad)
    _, _, path = train_cached(ModelConfig(**TINY, exit_after=(2,)), TrainConfig(epochs=1, **FAST), digits,
                              cache_dir=cache_dir, on_epoch=None)
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(CheckpointError):
        load_checkpoint(truncated)


def test_bad_training_configs_are_refused() -> None:
    with pytest.raises(ValueError, match="mode"):
        TrainConfig(mode="sideways")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="distill"):
        TrainConfig(distill=1.5)
    with pytest.raises(ValueError, match="positive"):
        TrainConfig(epochs=0)
    with pytest.raises(ValueError, match="progressive_from"):
        TrainConfig(progressive_from=0.0)
    with pytest.raises(ValueError, match="progressive_from"):
        TrainConfig(progressive_from=1.5)
    with pytest.raises(ValueError, match="sum to at most 1"):
        TrainConfig(progressive_from=0.5, progressive_hold=0.6, progressive_finetune=0.5)
    with pytest.raises(ValueError, match="alternate_flips needs augment_flip"):
        TrainConfig(alternate_flips=True, augment_flip=False)
    with pytest.raises(ValueError, match="exit_ramp must be in"):
        TrainConfig(exit_ramp=1.5)
    with pytest.raises(ValueError, match="exit_ramp is for joint training"):
        TrainConfig(mode="exits", exit_ramp=0.5)


def test_the_exit_weight_ramps_up_then_holds_and_training_uses_it_step_by_step(
        digits: Dataset, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = TrainConfig(exit_weight=0.4, exit_ramp=0.5)
    weights = [train_module.exit_weight_at(s, 100, cfg) for s in range(100)]
    assert weights[0] == pytest.approx(0.008) and weights[49] == pytest.approx(0.4) == weights[-1]
    assert all(b - a == pytest.approx(0.008) for a, b in zip(weights[:49], weights[1:50]))
    assert train_module.exit_weight_at(0, 100, replace(cfg, exit_ramp=0.0)) == 0.4  # off: full from the start
    outputs = [torch.randn(8, 10), torch.randn(8, 10)]
    labels = torch.arange(8)
    final_only = torch.nn.functional.cross_entropy(outputs[-1], labels)
    torch.testing.assert_close(train_module.exit_loss(outputs, labels, cfg, with_final=True, exit_weight=0.0),
                               final_only)
    assert train_module.exit_loss(outputs, labels, cfg, with_final=True) > final_only  # cfg's weight by default

    seen: list[float | None] = []
    loss = train_module.exit_loss

    def recording(*args, exit_weight: float | None = None, **kwargs):
        seen.append(exit_weight)
        return loss(*args, exit_weight=exit_weight, **kwargs)

    monkeypatch.setattr(train_module, "exit_loss", recording)
    ramped = TrainConfig(epochs=2, precision="fp32", **FAST, exit_weight=0.4, exit_ramp=0.5)
    fit(build_model(ModelConfig(**TINY, exit_after=(2,))), digits, ramped)
    steps = len(seen)
    assert seen == pytest.approx([train_module.exit_weight_at(s, steps, ramped) for s in range(steps)])
    assert seen[0] < 0.05 and seen[steps // 2 :] == pytest.approx([0.4] * (steps - steps // 2))
    seen.clear()
    fit(build_model(ModelConfig(**TINY, exit_after=(2,))), digits, ramped, start_epoch=1)  # as if resumed
    assert seen == pytest.approx([0.4] * (steps // 2))


def test_alternating_flips_show_each_image_the_other_way_round_every_epoch_even_after_a_resume(
        digits: Dataset, monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[torch.Tensor] = []  # the flip mask each epoch passed to the batches
    batches = train_module.iterate_batches

    def recording(*args, flips: torch.Tensor | None = None, **kwargs):
        if kwargs.get("augment_flip"):  # training's batches, not validation's
            assert flips is not None
            seen.append(flips.clone())
        return batches(*args, flips=flips, **kwargs)

    monkeypatch.setattr(train_module, "iterate_batches", recording)
    cfg = TrainConfig(epochs=3, precision="fp32", **{**FAST, "augment_flip": True}, alternate_flips=True)
    fit(build_model(ModelConfig(**TINY, exit_after=(2,))), digits, cfg)
    first, second, third = seen
    assert len(first) == len(digits.train) and 0.4 < first.float().mean() < 0.6  # a random half first
    assert torch.equal(second, ~first) and torch.equal(third, first)
    seen.clear()
    fit(build_model(ModelConfig(**TINY, exit_after=(2,))), digits, cfg, start_epoch=1)  # as if resumed
    assert torch.equal(seen[0], second) and torch.equal(seen[1], third)


def test_progressive_resizing_holds_the_smallest_size_grows_and_ends_at_full_size() -> None:
    cfg = TrainConfig(epochs=32, progressive_from=0.5, progressive_hold=0.25, progressive_finetune=0.3)
    sides = [input_size(e, 32, cfg) for e in range(32)]
    assert sides[:8] == [16] * 8  # the first quarter held at half the side
    assert sides[-9:] == [32] * 9  # the last 30% (9.6 epochs: from epoch 23) at full size
    assert sides == sorted(sides) and set(sides) == {16, 20, 24, 28, 32}  # grows in steps of 4
    assert all(input_size(e, 32, replace(cfg, progressive_from=1.0)) == 32 for e in range(32))  # off
    assert input_size(0, 8, replace(cfg, progressive_from=0.25)) == 8  # never below 8 pixels


def _enlarged(data: Dataset, factor: int) -> Dataset:
    """The data set with every image enlarged `factor` times (pixels repeated)."""
    def grow(part: ArraySet) -> ArraySet:
        return ArraySet(part.images.repeat(factor, axis=1).repeat(factor, axis=2), part.labels)

    return replace(data, train=grow(data.train), val=grow(data.val), test=grow(data.test))


def test_progressive_training_sees_small_images_first_and_validates_at_full_size(digits: Dataset) -> None:
    big = _enlarged(digits, 2)  # 16x16: room to shrink
    cfg = TrainConfig(epochs=4, progressive_from=0.5, progressive_hold=0.25, progressive_finetune=0.25,
                      precision="fp32", **FAST)
    model = build_model(ModelConfig(**TINY, exit_after=(2, 4)))
    first_conv = next(m for m in model.modules() if isinstance(m, torch.nn.Conv2d))
    seen: list[tuple[bool, int]] = []  # (training?, image side) of every batch
    first_conv.register_forward_pre_hook(lambda module, inputs: seen.append((module.training, inputs[0].shape[-1])))
    per_epoch: list[set[int]] = []

    def close_epoch(report) -> None:
        per_epoch.append({side for training, side in seen if training})
        assert {side for training, side in seen if not training} == {16}, "validation runs at full size"
        seen.clear()

    # 8-channel projection shortcuts: channels-last would crash oneDNN at the odd last batch
    assert len(big.train) % cfg.batch_size % 2 == 1 and not train_module.channels_last_is_safe(model)
    assert train_module.channels_last_is_safe(build_model(ModelConfig(arch="resnet20", exit_after=(2, 4))))
    reports = fit(model, big, cfg, on_epoch=close_epoch)
    assert per_epoch == [{8}, {8}, {12}, {16}]
    assert [r.image_size for r in reports] == [8, 8, 12, 16]
    assert reports[-1].val_acc[-1] > 0.6 and reports[-1].loss < reports[0].loss


@pytest.mark.parametrize("joint", [False, True], ids=["backbone-then-exits", "joint-from-scratch"])
def test_a_recipe_trains_its_edge_network_in_the_order_it_names(digits: Dataset, tmp_path: Path, joint: bool) -> None:
    one = replace(QUICK.edge_train, epochs=1)
    recipe = replace(QUICK, edge_train=one, exit_train=replace(one, mode="exits"),
                     joint=replace(one, exit_weight=0.3) if joint else None)
    edge = recipe.train_edge(digits, tmp_path, threads=1)
    runs = sorted(p.name.rsplit("-", 1)[0] for p in (tmp_path / "runs").iterdir())
    # joint: one run, exits and backbone together; else the backbone alone, then its exits on it
    assert runs == (["resnet14_tiny-joint"] if joint else ["resnet14_tiny-exits", "resnet14_tiny-joint"])
    assert edge.model.exit_points == list(QUICK.edge_model.exit_after)
    assert edge.meta.extra["train"]["exit_weight"] == (0.3 if joint else one.exit_weight)


def test_bad_precision_is_refused_and_auto_resolves_to_what_the_cpu_computes(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ValueError, match="precision"):
        TrainConfig(precision="fp8")  # type: ignore[arg-type]
    monkeypatch.setattr(train_module, "native_bf16", lambda: False)
    assert resolve_precision("auto") == "fp32" and resolve_precision("bf16") == "bf16"
    monkeypatch.setattr(train_module, "native_bf16", lambda: True)
    assert resolve_precision("auto") == "bf16" and resolve_precision("fp32") == "fp32"


def test_the_cache_key_names_the_precision_that_ran(digits: Dataset, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = ModelConfig(**TINY, exit_after=(2,))
    key = lambda precision: run_key(cfg, TrainConfig(precision=precision), digits, None)  # noqa: E731
    assert key("bf16") != key("fp32")
    monkeypatch.setattr(train_module, "native_bf16", lambda: True)
    assert key("auto") == key("bf16")
    monkeypatch.setattr(train_module, "native_bf16", lambda: False)
    assert key("auto") == key("fp32")


@pytest.mark.slow
def test_bfloat16_training_learns_and_keeps_fp32_weights(digits: Dataset, cache_dir: Path) -> None:
    cfg = ModelConfig(**TINY, exit_after=(1, 3, 5), exit_head="bof")
    before = _ce_per_exit(build_model(cfg), digits)
    model, meta, path = train_cached(cfg, TrainConfig(epochs=5, precision="bf16", **FAST), digits,
                                     cache_dir=cache_dir, on_epoch=None)
    after = _ce_per_exit(model, digits)
    # the same bar as fp32 training's (test_joint_training_lowers_the_loss_of_every_exit)
    assert (after < before).all() and (after[1:] < 0.6 * before[1:]).all(), (before, after)
    assert meta.extra["precision"] == "bf16"
    assert {t.dtype for t in model.state_dict().values() if t.is_floating_point()} == {torch.float32}
    assert {t.dtype for t in load_checkpoint(path)[0].state_dict().values() if t.is_floating_point()} == {torch.float32}


def test_the_progress_bar_shows_images_per_second(digits: Dataset, capsys: pytest.CaptureFixture[str],
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(train_module.StepProgress, "min_interval_s", 0.0)  # every step drawn
    model = build_model(ModelConfig(**TINY, exit_after=(2,)))
    fit(model, digits, TrainConfig(epochs=1, precision="fp32", **FAST), progress=True)
    err = capsys.readouterr().err
    assert "img/s" in err and "epoch 1/1" in err


def test_weight_average_follows_the_weights_with_a_ramped_decay() -> None:
    model = build_model(ModelConfig(**TINY, exit_after=(2,)))
    average = train_module.WeightAverage(model, decay=0.9)
    first = {k: v.clone() for k, v in model.state_dict().items()}
    weight = model.head.fc.weight if hasattr(model.head, "fc") else next(model.parameters())
    name = next(k for k, v in model.state_dict().items() if v.data_ptr() == weight.data_ptr())
    with torch.no_grad():
        weight.add_(1.0)  # an optimizer step, in place
    average.update()  # decay min(0.9, 2/11): the average moves 9/11 of the way
    torch.testing.assert_close(average.state[name], first[name] + 9 / 11)
    with torch.no_grad():
        weight.add_(1.0)
    average.update()  # decay 3/12
    torch.testing.assert_close(average.state[name], first[name] + 9 / 11 + 0.75 * (2 - 9 / 11))
    restored = train_module.WeightAverage(model, decay=0.9)
    restored.restore(average.saved())
    assert restored.updates == 2 and torch.equal(restored.state[name], average.state[name])


def test_an_averaged_run_trains_resumes_and_keeps_old_cache_keys(digits: Dataset, cache_dir: Path) -> None:
    cfg = ModelConfig(**TINY, exit_after=(2,))
    plain = TrainConfig(epochs=3, precision="fp32", **FAST)
    averaged = replace(plain, ema=0.95)
    assert run_key(cfg, plain, digits, None) != run_key(cfg, averaged, digits, None)
    assert run_key(cfg, plain, digits, None) != run_key(cfg, replace(plain, exit_grad=0.5), digits, None)
    assert run_key(cfg, plain, digits, None) != run_key(cfg, replace(plain, progressive_from=0.5), digits, None)
    flipped = replace(plain, augment_flip=True)
    assert run_key(cfg, flipped, digits, None) != run_key(cfg, replace(flipped, alternate_flips=True), digits, None)
    assert run_key(cfg, plain, digits, None) != run_key(cfg, replace(plain, exit_ramp=1.0), digits, None)
    # progressive resizing's shape means nothing while it is off
    assert run_key(cfg, plain, digits, None) == run_key(cfg, replace(plain, progressive_hold=0.1), digits, None)
    # options added later, at their "off" value, are left out of the key: older cached runs stay found
    key_without_option = train_module.hashlib.sha256(train_module.json.dumps(
        {"model": cfg.to_dict(), "train": {k: v for k, v in train_module.asdict(plain).items()
                                           if k not in ("threads", "ema", "exit_grad", "progressive_from",
                                                         "progressive_hold", "progressive_finetune",
                                                         "alternate_flips", "exit_ramp")},
         "data": train_module.dataset_fingerprint(digits), "init": None}, sort_keys=True).encode()).hexdigest()[:16]
    assert run_key(cfg, plain, digits, None) == key_without_option

    _interrupted_after_two_epochs(cfg, averaged, digits, cache_dir)
    epochs: list[int] = []
    model, meta, _ = train_cached(cfg, averaged, digits, cache_dir=cache_dir, on_epoch=lambda r: epochs.append(r.epoch))
    assert epochs[-1] == 3 and meta.extra["history"][-1]["val_acc"][-1] > 0.5  # resumed (epoch 2 again: see above)
    before = _ce_per_exit(build_model(cfg), digits)
    assert (_ce_per_exit(model, digits) < before).all()
