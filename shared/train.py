"""Training: the backbone with all exits jointly, or the exits alone on a frozen backbone.

Joint loss (SDN-style): CE at the final head plus, at each exit k,
w * [(1 - a) CE(z_k, y) + a T^2 KL(softmax(z_K / T) || softmax(z_k / T))], the final
head's output detached (self-distillation, optional with a = 0).

Speed on CPU: bfloat16 autocast where the processor computes it natively (fp32 master
weights and optimizer; the loss, the BoF histograms and validation stay fp32) and
channels-last activations. Measured on two cores
(ResNet-20 with four BoF exits, batch 128, one training step): fp32 about 250 ms, bfloat16
about 160 ms; the twice-as-wide cloud network 710 and 380 ms.

Runs are cached: a configuration that was trained before is loaded, not retrained, and an
interrupted run resumes from its last finished epoch.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import math
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Callable, Literal

import torch
import torch.nn.functional as F

from splitexit.checkpoint import CheckpointMeta, load_checkpoint, load_tensors, save_checkpoint
from splitexit.data import Dataset, Normalize, iterate_batches
from splitexit.models import ModelConfig, MultiExitNet, build_model

Mode = Literal["joint", "exits"]
Precision = Literal["auto", "bf16", "fp32"]


def native_bf16() -> bool:
    """Whether this CPU computes bfloat16 natively (AVX-512 BF16 or AMX). Without it oneDNN
    emulates bfloat16 and a step can be slower than in fp32, so "auto" keeps fp32 there."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:  # not Linux: no cheap way to ask, stay with fp32
        return False
    return " avx512_bf16" in flags or " amx_bf16" in flags


def resolve_precision(precision: Precision) -> Literal["bf16", "fp32"]:
    if precision == "auto":
        return "bf16" if native_bf16() else "fp32"
    return precision


@dataclass(frozen=True, kw_only=True)
class TrainConfig:
    mode: Mode = "joint"  # "exits": backbone frozen (a user's trained model), exits only
    epochs: int = 30
    batch_size: int = 128
    lr: float = 0.1  # peak of the one-cycle schedule (SGD, Nesterov momentum 0.9)
    weight_decay: float = 5e-4
    warmup_frac: float = 0.15  # share of steps spent ramping the learning rate up
    label_smoothing: float = 0.0
    # bf16: bfloat16 autocast for the forward pass (fp32 weights); auto: bf16 where native
    precision: Precision = "auto"
    # decay of an exponential moving average of the weights and BN statistics, updated every
    # step; the trained model (and each epoch's validation) is the average. 0 = off.
    ema: float = 0.0
    exit_weight: float = 0.5  # w above, the same for every exit
    # share of the steps over which w grows linearly from 0 to exit_weight (SDN's schedule,
    # Kaya et al. 2019, ramps over all of training: 1.0); the shared layers first learn for
    # the final head, then make room for the exits. 0 = w from the first step. Joint mode only.
    exit_ramp: float = 0.0
    # share of the exits' gradient that reaches the layers below them (their heads get it
    # whole): less of it leaves the final head more of the shared layers (Li et al. 2019's
    # gradient equilibrium, in its simplest form)
    exit_grad: float = 1.0
    distill: float = 0.5  # a above: share of each exit's loss taken from the final head
    temperature: float = 3.0
    augment_pad: int = 4  # random crop padding; 0 = no crop
    augment_flip: bool = True
    # alternating flips (Jordan 2024, "94% on CIFAR-10 in 3.29 seconds"): a random half of
    # the images flipped in the first epoch, and each image's other view in the next, so two
    # epochs in a row show both views of every image instead of a random half twice
    alternate_flips: bool = False
    # progressive resizing (fast.ai's, as in MosaicML Composer): the first epochs see the
    # images downscaled to `progressive_from` of their side, held for `progressive_hold` of
    # the epochs, then grown linearly to full size, which the last `progressive_finetune`
    # of the epochs train at. A step's time follows the pixels, and the early epochs learn
    # coarse features that need no fine detail. 1.0 = off.
    progressive_from: float = 1.0
    progressive_hold: float = 0.4
    progressive_finetune: float = 0.25
    seed: int = 0
    threads: int | None = None  # torch threads; None keeps torch's default

    def __post_init__(self) -> None:
        if self.mode not in ("joint", "exits"):
            raise ValueError(f"mode must be 'joint' or 'exits', got {self.mode!r}")
        if self.epochs < 1 or self.batch_size < 1 or self.lr <= 0:
            raise ValueError("epochs, batch_size and lr must be positive")
        if not 0 <= self.distill <= 1:
            raise ValueError(f"distill must be in [0, 1], got {self.distill}")
        if not 0 <= self.exit_ramp <= 1:
            raise ValueError(f"exit_ramp must be in [0, 1], got {self.exit_ramp}")
        if self.exit_ramp and self.mode == "exits":
            raise ValueError("exit_ramp is for joint training: with the backbone frozen, a ramped exit weight "
                             "would only scale the learning rate down")
        if not 0 <= self.exit_grad <= 1:
            raise ValueError(f"exit_grad must be in [0, 1], got {self.exit_grad}")
        if not 0 <= self.ema < 1:
            raise ValueError(f"ema must be in [0, 1), got {self.ema}")
        if not 0 < self.progressive_from <= 1:
            raise ValueError(f"progressive_from must be in (0, 1], got {self.progressive_from}")
        if not (0 <= self.progressive_hold and 0 <= self.progressive_finetune
                and self.progressive_hold + self.progressive_finetune <= 1):
            raise ValueError("progressive_hold and progressive_finetune must be shares of the epochs that sum "
                             f"to at most 1, got {self.progressive_hold} and {self.progressive_finetune}")
        if self.alternate_flips and not self.augment_flip:
            raise ValueError("alternate_flips needs augment_flip (there is nothing to alternate without flips)")
        if self.precision not in ("auto", "bf16", "fp32"):
            raise ValueError(f"precision must be 'auto', 'bf16' or 'fp32', got {self.precision!r}")


@dataclass(frozen=True)
class EpochReport:
    epoch: int
    epochs: int
    loss: float
    val_acc: list[float]  # per exit, final last
    seconds: float
    image_size: int  # the side of the images it trained on (validation is at full size)


def lr_at(step: int, total: int, cfg: TrainConfig) -> float:
    """One-cycle: linear warm-up to cfg.lr, then cosine decay to 0."""
    warm = max(1, int(cfg.warmup_frac * total))
    if step < warm:
        return cfg.lr * (step + 1) / warm
    return 0.5 * cfg.lr * (1 + math.cos(math.pi * (step - warm) / max(1, total - warm)))


def input_size(epoch: int, full: int, cfg: TrainConfig) -> int:
    """The side of the images that epoch `epoch` (from 0) trains on: `full` unless progressive
    resizing is on; a multiple of 4 (the sizes step cleanly through the strides), at least 8."""
    if cfg.progressive_from >= 1:
        return full
    t = epoch / cfg.epochs
    ramp_end = 1 - cfg.progressive_finetune
    if t >= ramp_end:
        return full
    grown = max(0.0, t - cfg.progressive_hold) / max(1e-9, ramp_end - cfg.progressive_hold)
    scale = cfg.progressive_from + (1 - cfg.progressive_from) * grown
    return min(full, max(8, round(full * scale / 4) * 4))


def exit_weight_at(step: int, total: int, cfg: TrainConfig) -> float:
    """The exits' loss weight w at step `step` of `total`: cfg.exit_weight, ramped up linearly
    over the first cfg.exit_ramp of the steps."""
    ramp = cfg.exit_ramp * total
    return cfg.exit_weight if step >= ramp else cfg.exit_weight * (step + 1) / ramp


def exit_loss(outputs: list[torch.Tensor], labels: torch.Tensor, cfg: TrainConfig, *, with_final: bool,
              exit_weight: float | None = None) -> torch.Tensor:
    """The joint loss above; `exit_weight` (w) defaults to cfg.exit_weight."""
    weight = cfg.exit_weight if exit_weight is None else exit_weight
    final = outputs[-1]
    loss = F.cross_entropy(final, labels, label_smoothing=cfg.label_smoothing) if with_final else final.new_zeros(())
    teacher = F.softmax(final.detach() / cfg.temperature, dim=1)
    for logits in outputs[:-1]:
        ce = F.cross_entropy(logits, labels, label_smoothing=cfg.label_smoothing)
        kd = F.kl_div(F.log_softmax(logits / cfg.temperature, dim=1), teacher, reduction="batchmean")
        loss = loss + weight * ((1 - cfg.distill) * ce + cfg.distill * cfg.temperature**2 * kd)
    return loss


def channels_last_is_safe(model: torch.nn.Module) -> bool:
    """Whether the model may train in channels-last memory format. oneDNN's backward pass of
    a strided 1x1 convolution over channels-last input with fewer than 16 input channels
    writes past its workspace (oneDNN issue 6035): measured here with torch 2.13, a
    projection shortcut of 8 channels crashes the process (segfault, or glibc's "double
    free") at every odd batch size; 16 and more channels, as in the reference ResNets, do not."""
    return not any(
        isinstance(m, torch.nn.Conv2d) and m.kernel_size == (1, 1) and m.stride != (1, 1) and m.in_channels < 16
        for m in model.modules()
    )


def trainable_parameters(model: MultiExitNet, mode: Mode) -> list[torch.nn.Parameter]:
    if mode == "joint":
        return list(model.parameters())
    params = list(model.exits.parameters())
    if model.exit_classifier is not None:
        params += list(model.exit_classifier.parameters())
    return params


def set_train_mode(model: MultiExitNet, mode: Mode) -> None:
    model.train()
    if mode == "exits":  # frozen backbone: BN statistics stay as they are
        model.stages.eval()
        model.head.eval()


def forward_for_training(model: MultiExitNet, x: torch.Tensor, cfg: TrainConfig) -> list[torch.Tensor]:
    if cfg.mode == "joint":
        return model.forward_exits(x, exit_grad=cfg.exit_grad)
    with torch.no_grad():  # no graph through the frozen backbone
        final, feats = model.forward_intermediates(x, model.exit_points)
    assert final is not None  # the whole network ran (no stop_early)
    state: list[torch.Tensor] = []
    return [model.exit_logits(k, f, state) for k, f in zip(model.exit_points, feats)] + [final]


@torch.no_grad()
def accuracy_per_exit(model: MultiExitNet, data, normalize: Normalize, batch_size: int = 500) -> list[float]:
    model.eval()
    correct: torch.Tensor | None = None
    for x, y in iterate_batches(data, normalize, batch_size=batch_size):
        hits = torch.stack([(o.argmax(1) == y).sum() for o in model.forward_exits(x)])
        correct = hits if correct is None else correct + hits
    assert correct is not None, "empty data set"
    return (correct.double() / len(data)).tolist()


class WeightAverage:
    """An exponential moving average of a model's weights and BN statistics (Polyak
    averaging), which generalizes better than the last iterate of a short schedule. Its
    decay ramps up from 0 ((1 + n) / (10 + n), as TensorFlow's), so the random start does
    not linger. `saved()` / `restore()` carry it across an interrupted run."""

    def __init__(self, model: MultiExitNet, decay: float) -> None:
        self.decay = decay
        self.updates = 0
        # state_dict() tensors share storage with the live parameters and buffers; taken
        # once, after any change of memory format, they follow every in-place step
        live = model.state_dict()
        self.state = {name: value.detach().clone() for name, value in live.items()}
        # (average, live) pairs, split once: floats are averaged, the rest (BN's
        # num_batches_tracked) copied; this runs every step
        self._float_avg = [self.state[n] for n, v in live.items() if v.is_floating_point()]
        self._float_live = [v for v in live.values() if v.is_floating_point()]
        self._others = [(self.state[n], v) for n, v in live.items() if not v.is_floating_point()]

    @torch.no_grad()
    def update(self) -> None:
        self.updates += 1
        decay = min(self.decay, (1 + self.updates) / (10 + self.updates))
        torch._foreach_lerp_(self._float_avg, self._float_live, 1 - decay)
        for average, value in self._others:
            average.copy_(value)

    def saved(self) -> dict[str, torch.Tensor]:
        out = {f"ema.{name}": value for name, value in self.state.items()}
        out["ema._updates"] = torch.tensor(self.updates)
        return out

    def restore(self, saved: dict[str, torch.Tensor]) -> None:
        if "ema._updates" not in saved:
            return  # the run was interrupted before it had an average
        self.updates = int(saved["ema._updates"])
        for name in self.state:
            self.state[name].copy_(saved[f"ema.{name}"])


class StepProgress:
    """A per-step progress bar over the whole run (images/s and the time left), beside the
    per-epoch lines; written to stderr."""

    min_interval_s = 2.0  # between redraws: a log file of a long run stays readable

    def __init__(self, total_images: int, done_images: int = 0) -> None:
        from tqdm import tqdm

        self._bar = tqdm(total=total_images, initial=done_images, unit="img", unit_scale=True, file=sys.stderr,
                         mininterval=self.min_interval_s, dynamic_ncols=True, leave=False)

    def step(self, images: int, loss: float, epoch: int, epochs: int) -> None:
        self._bar.set_description(f"epoch {epoch}/{epochs}", refresh=False)
        self._bar.set_postfix_str(f"loss {loss:.3f}", refresh=False)
        self._bar.update(images)

    def clear(self) -> None:
        """Off the screen until the next step, so an epoch line prints on a line of its own."""
        self._bar.clear()

    def close(self) -> None:
        self._bar.close()


def fit(
    model: MultiExitNet,
    dataset: Dataset,
    cfg: TrainConfig,
    *,
    on_epoch: Callable[[EpochReport], None] | None = None,
    on_step: Callable[[int, int], None] | None = None,
    start_epoch: int = 0,
    optimizer_state: dict[str, torch.Tensor] | None = None,
    save_state: Callable[[MultiExitNet, dict[str, torch.Tensor], int], None] | None = None,
    progress: bool = False,
) -> list[EpochReport]:
    """Train in place; returns one report per epoch run."""
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed + start_epoch)
    if cfg.mode == "exits":
        for p in model.parameters():
            p.requires_grad_(False)
    params = trainable_parameters(model, cfg.mode)
    for p in params:
        p.requires_grad_(True)
    if not params:
        raise ValueError("nothing to train: the model has no exit heads")
    # fused: one kernel updates every parameter instead of a loop of small ops per parameter
    # (the digits network's 77 tensors: 0.19 ms a step instead of 1.36)
    optimizer = torch.optim.SGD(params, lr=cfg.lr, momentum=0.9, nesterov=True, weight_decay=cfg.weight_decay,
                                fused=True)
    names = {id(p): n for n, p in model.named_parameters()}
    if optimizer_state:
        for p in params:
            buf = optimizer_state.get(names[id(p)])
            if buf is not None:
                optimizer.state[p]["momentum_buffer"] = buf.clone()
    # ~25% faster convolutions on CPU (torch's stubs leave memory_format out of Module.to)
    channels_last = channels_last_is_safe(model)
    if channels_last:
        model.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
    bf16 = resolve_precision(cfg.precision) == "bf16"
    average = WeightAverage(model, cfg.ema) if cfg.ema else None
    averaged = copy.deepcopy(model) if average is not None else model  # what validation sees
    if average is not None and optimizer_state:
        average.restore(optimizer_state)
    normalize = Normalize(dataset.mean, dataset.std)
    steps_per_epoch = math.ceil(len(dataset.train) / cfg.batch_size)
    total = cfg.epochs * steps_per_epoch
    generator = torch.Generator().manual_seed(cfg.seed * 1000 + start_epoch)
    # drawn from the seed alone, so that a resumed run flips as the uninterrupted one would
    first_flips = (torch.rand(len(dataset.train), generator=torch.Generator().manual_seed(cfg.seed)) < 0.5
                   if cfg.alternate_flips else None)
    bar = StepProgress(cfg.epochs * len(dataset.train), start_epoch * len(dataset.train)) if progress else None
    reports: list[EpochReport] = []
    for epoch in range(start_epoch, cfg.epochs):
        start = time.perf_counter()
        set_train_mode(model, cfg.mode)
        losses: list[torch.Tensor] = []
        # Batches are prepared in this thread: a producer thread measured slower (its torch
        # ops contend with the step's: +11-14% per step on CIFAR-10, +60% on the digits
        # demo, on two cores), and preparing a batch costs ~2.5% of a step.
        batches = iterate_batches(
            dataset.train, normalize, batch_size=cfg.batch_size, shuffle=True, augment_pad=cfg.augment_pad,
            augment_flip=cfg.augment_flip, generator=generator, channels_last=channels_last,
            flips=None if first_flips is None else first_flips ^ bool(epoch % 2),
        )
        size = input_size(epoch, dataset.image_size, cfg)
        for i, (x, y) in enumerate(batches):
            if size != x.shape[-1]:  # antialiased: a plain subsampling would alias the fine detail
                x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
            step = epoch * steps_per_epoch + i
            for group in optimizer.param_groups:
                group["lr"] = lr_at(step, total, cfg)
            # autocast covers the forward pass only; the loss is taken in fp32
            with torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else contextlib.nullcontext():
                outputs = forward_for_training(model, x, cfg)
            loss = exit_loss([o.float() for o in outputs], y, cfg, with_final=cfg.mode == "joint",
                             exit_weight=exit_weight_at(step, total, cfg))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            if average is not None:
                average.update()
            losses.append(loss.detach())
            if bar is not None:
                bar.step(len(y), float(losses[-1]), epoch + 1, cfg.epochs)
            if on_step:
                on_step(i + 1, steps_per_epoch)
        if average is not None:
            averaged.load_state_dict(average.state)
        report = EpochReport(
            epoch + 1, cfg.epochs, float(torch.stack(losses).mean()),
            accuracy_per_exit(averaged, dataset.val, normalize), time.perf_counter() - start, size,
        )
        reports.append(report)
        if bar is not None:
            bar.clear()
        if on_epoch:
            on_epoch(report)
        if save_state:
            momentum = {names[id(p)]: optimizer.state[p]["momentum_buffer"] for p in params if p in optimizer.state}
            save_state(model, {**momentum, **(average.saved() if average is not None else {})}, epoch + 1)
    if bar is not None:
        bar.close()
    if average is not None:
        model.load_state_dict(average.state)
    model.eval()
    return reports


# --- cached runs ---------------------------------------------------------------------
def dataset_fingerprint(dataset: Dataset) -> str:
    h = hashlib.sha256()
    for part in (dataset.train, dataset.val, dataset.test):
        h.update(str(part.images.shape).encode())
        h.update(part.labels.tobytes())
        h.update(part.images[:: max(1, len(part) // 256)].tobytes())  # a sample of pixels
    return h.hexdigest()[:16]


# Options added after runs were cached: left out of the key while off, so that adding one
# does not orphan every cached model trained without it.
_ADDED_OPTIONS = {"ema": 0.0, "exit_grad": 1.0, "progressive_from": 1.0, "alternate_flips": False, "exit_ramp": 0.0}


def run_key(model_cfg: ModelConfig, train_cfg: TrainConfig, dataset: Dataset, init: str | None) -> str:
    # what ran, not what was asked: "auto" is bf16 on one machine and fp32 on another
    cfg = asdict(replace(train_cfg, precision=resolve_precision(train_cfg.precision)))
    cfg.pop("threads")  # does not change the result's meaning
    for name, off in _ADDED_OPTIONS.items():
        if cfg[name] == off:
            cfg.pop(name)
    if "progressive_from" not in cfg:  # its shape means nothing while it is off
        cfg.pop("progressive_hold")
        cfg.pop("progressive_finetune")
    blob = json.dumps(
        {"model": model_cfg.to_dict(), "train": cfg, "data": dataset_fingerprint(dataset), "init": init},
        sort_keys=True,
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def print_epoch(report: EpochReport) -> None:
    accs = " ".join(f"{a:.3f}" for a in report.val_acc)
    print(f"epoch {report.epoch:3d}/{report.epochs}  {report.image_size}px  loss {report.loss:.4f}  "
          f"val acc per exit [{accs}]  {report.seconds:.0f}s", flush=True)


def train_cached(
    model_cfg: ModelConfig,
    train_cfg: TrainConfig,
    dataset: Dataset,
    *,
    cache_dir: Path,
    init: Path | None = None,
    on_epoch: Callable[[EpochReport], None] | None = print_epoch,
    on_step: Callable[[int, int], None] | None = None,
    progress: bool = False,
) -> tuple[MultiExitNet, CheckpointMeta, Path]:
    """Train (or load the cached result of) this configuration; returns model, meta, path.

    `init` loads backbone weights from a checkpoint first (exits too, where names match):
    with mode="exits" that is the "bring your own trained model" case.
    """
    init_hash = None
    if init is not None:
        init_hash = hashlib.sha256(Path(init).read_bytes()).hexdigest()[:16]
    key = run_key(model_cfg, train_cfg, dataset, init_hash)
    run_dir = Path(cache_dir) / "runs" / f"{model_cfg.arch}-{train_cfg.mode}-{key}"
    final_path = run_dir / "model.safetensors"
    if final_path.exists():
        model, meta = load_checkpoint(final_path)
        return model, meta, final_path

    model = build_model(model_cfg)
    if init is not None:
        # backbone only: exits start fresh even where names and shapes happen to match
        source, _ = load_checkpoint(init)
        backbone = {k: v for k, v in source.state_dict().items() if k.startswith(("stages.", "head."))}
        try:
            model.load_state_dict(backbone, strict=False)
        except RuntimeError as exc:
            first_line = str(exc).splitlines()[0]
            raise ValueError(f"{init}: backbone weights do not fit {model_cfg.arch}: {first_line}") from exc
        missing = [k for k in model.state_dict() if k.startswith(("stages.", "head.")) and k not in backbone]
        if missing:
            raise ValueError(f"{init}: backbone weights do not fit {model_cfg.arch} (missing {missing[0]})")

    # resume an interrupted run from its last finished epoch
    state_path = run_dir / "resume.safetensors"
    start_epoch, momentum, history = 0, None, []
    if state_path.exists():
        state = load_tensors(state_path)
        model.load_state_dict({k[6:]: v for k, v in state.items() if k.startswith("model.")})
        momentum = {k[4:]: v for k, v in state.items() if k.startswith("opt.")}
        resumed = json.loads((run_dir / "resume.json").read_text())
        start_epoch, history = resumed["epoch"], resumed["history"]
        print(f"resuming {run_dir.name} at epoch {start_epoch + 1}", flush=True)

    def save_state(m: MultiExitNet, buffers: dict[str, torch.Tensor], epoch: int) -> None:
        from safetensors.torch import save_file

        run_dir.mkdir(parents=True, exist_ok=True)
        tensors = {f"model.{k}": v.contiguous() for k, v in m.state_dict().items()}
        tensors.update({f"opt.{k}": v.contiguous() for k, v in buffers.items()})
        save_file(tensors, str(state_path) + ".tmp")
        Path(str(state_path) + ".tmp").replace(state_path)
        (run_dir / "resume.json").write_text(json.dumps({"epoch": epoch, "history": history}))

    def record(report: EpochReport) -> None:
        history.append(asdict(report))
        if on_epoch:
            on_epoch(report)

    fit(model, dataset, train_cfg, on_epoch=record, on_step=on_step, start_epoch=start_epoch,
        optimizer_state=momentum, save_state=save_state, progress=progress)
    model = model.to(memory_format=torch.contiguous_format)  # type: ignore[call-overload]
    meta = CheckpointMeta(
        model=model_cfg, mean=dataset.mean, std=dataset.std, classes=dataset.classes,
        extra={"train": asdict(train_cfg), "precision": resolve_precision(train_cfg.precision),
               "dataset": dataset.name, "history": history,
               "train_seconds": float(sum(h["seconds"] for h in history)), "init": str(init) if init else None,
               "input_shape": [dataset.in_chans, dataset.image_size, dataset.image_size]},
    )
    save_checkpoint(final_path, model, meta)
    state_path.unlink(missing_ok=True)
    return model, meta, final_path
