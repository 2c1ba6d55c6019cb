"""Offline evaluation: run every exit once over a set, cache the probabilities [K, N, C],
and summarize them (per-exit accuracy, oracle bound, exit histogram of a threshold rule).

Policies are fit and simulated on these cached outputs without touching the model again.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from splitexit.data import ArraySet, Normalize, iterate_batches
from splitexit.models import MultiExitNet


@dataclass(frozen=True)
class ExitOutputs:
    """Probabilities of every exit over a set: probs [K, N, C] float32, labels [N]."""

    probs: np.ndarray
    labels: np.ndarray

    @property
    def num_exits(self) -> int:
        return int(self.probs.shape[0])

    def correct(self) -> np.ndarray:
        """[K, N] bool: exit k's prediction is right."""
        return self.probs.argmax(-1) == self.labels[None, :]

    def save(self, path: Path) -> None:
        from safetensors.numpy import save_file

        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        save_file({"probs": self.probs, "labels": self.labels}, str(tmp))
        tmp.replace(path)

    @classmethod
    def load(cls, path: Path) -> "ExitOutputs":
        from safetensors.numpy import load_file

        data = load_file(str(path))
        return cls(data["probs"], data["labels"])


@torch.inference_mode()
def collect_exit_outputs(
    model: MultiExitNet, data: ArraySet, normalize: Normalize, *, batch_size: int = 500
) -> ExitOutputs:
    model.eval()
    chunks: list[np.ndarray] = []
    for x, _ in iterate_batches(data, normalize, batch_size=batch_size):
        outputs = model.forward_exits(x)
        chunks.append(torch.stack([o.float().softmax(-1) for o in outputs]).numpy())
    return ExitOutputs(np.concatenate(chunks, axis=1), data.labels.copy())


def cached_exit_outputs(
    model: MultiExitNet, data: ArraySet, normalize: Normalize, *, cache_dir: Path | None, tag: str
) -> ExitOutputs:
    """collect_exit_outputs, cached under cache_dir by weights and data (tag names the set)."""
    if cache_dir is None:
        return collect_exit_outputs(model, data, normalize)
    h = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        h.update(name.encode())
        h.update(tensor.detach().contiguous().numpy().tobytes())
    h.update(data.labels.tobytes())
    h.update(data.images[:: max(1, len(data) // 256)].tobytes())
    path = Path(cache_dir) / "outputs" / f"{tag}-{h.hexdigest()[:16]}.safetensors"
    if path.exists():
        return ExitOutputs.load(path)
    outputs = collect_exit_outputs(model, data, normalize)
    outputs.save(path)
    return outputs


def balance(hist: Sequence[float] | np.ndarray) -> float:
    """Normalized entropy of an exit histogram: 1 = evenly spread, 0 = one exit takes all."""
    p = np.asarray(hist, dtype=np.float64)
    p = p / p.sum()
    nz = p[p > 0]
    # log(1/p), not -log(p): one exit taking all gives 0.0, not -0.0 (printed "-0.00")
    return float((nz * np.log(1 / nz)).sum() / np.log(len(p))) if len(p) > 1 else 1.0


def threshold_exits(probs: np.ndarray, threshold: float, *, fallback: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Per sample under "first exit whose max-prob >= threshold", run by the deployed
    `maxprob` policy itself: (the exit it leaves at, the exit whose output answers). A
    sample no exit is confident about leaves at the last exit and, with `fallback` (the
    policy's default), is answered by its most confident exit; without, by the last."""
    from splitexit.policies import Ladder, MaxProb, simulate

    free = (0.0,) * probs.shape[0]  # costs play no part in where samples leave
    out = simulate(MaxProb(threshold, fallback=fallback), probs, Ladder(net_cost=free, head_cost=free))
    assert out.answer_exit is not None
    return out.exit_index, out.answer_exit


@dataclass(frozen=True)
class EvalReport:
    exit_names: list[str]  # e.g. "exit@2", ..., "final"
    exit_acc: list[float]
    oracle_acc: float
    threshold: float
    threshold_acc: float  # answers as the deployed maxprob policy gives them (fallback included)
    exit_hist: list[float]  # share of samples leaving at each exit under the threshold rule
    balance: float
    cumulative_macs: list[float] | None  # c_k per exit, if a cost model was given
    threshold_macs: float | None  # expected MACs per sample under the threshold rule
    full_macs: float | None
    fallback_share: float = 0.0  # samples no exit was confident about, answered by their most confident one
    # a fitted policy's figures on the same outputs (`eval --policy`): see calibrate.policy_figures
    policy: dict | None = None

    def to_dict(self) -> dict:
        return asdict(self)


def summarize(
    outputs: ExitOutputs,
    exit_names: Sequence[str],
    *,
    threshold: float = 0.9,
    cumulative_macs: Sequence[float] | None = None,
    full_macs: float | None = None,
) -> EvalReport:
    correct = outputs.correct()
    left, chosen = threshold_exits(outputs.probs, threshold)
    n = len(outputs.labels)
    hist = np.bincount(left, minlength=outputs.num_exits) / n
    expected = float(np.dot(hist, cumulative_macs)) if cumulative_macs is not None else None
    return EvalReport(
        exit_names=list(exit_names),
        exit_acc=[float(a) for a in correct.mean(1)],
        oracle_acc=float(correct.any(0).mean()),
        threshold=threshold,
        threshold_acc=float(correct[chosen, np.arange(n)].mean()),
        exit_hist=[float(h) for h in hist],
        balance=balance(hist),
        cumulative_macs=[float(c) for c in cumulative_macs] if cumulative_macs is not None else None,
        threshold_macs=expected,
        full_macs=full_macs,
        fallback_share=float((chosen != left).mean()),
    )


def format_report(report: EvalReport) -> str:
    lines = [f"{'exit':>10} {'accuracy':>9} {'MMACs':>8} {'share@' + str(report.threshold):>11}"]
    for i, name in enumerate(report.exit_names):
        macs = f"{report.cumulative_macs[i] / 1e6:8.2f}" if report.cumulative_macs else f"{'-':>8}"
        lines.append(f"{name:>10} {report.exit_acc[i]:9.4f} {macs} {report.exit_hist[i]:11.3f}")
    lines.append(f"oracle (earliest correct exit): {report.oracle_acc:.4f}")
    cost = ""
    if report.threshold_macs is not None and report.full_macs:
        cost = f", {report.threshold_macs / 1e6:.2f} MMACs = {report.threshold_macs / report.full_macs:.2f} x full"
    lines.append(
        f"max-prob >= {report.threshold}: accuracy {report.threshold_acc:.4f}{cost}, balance {report.balance:.3f} "
        f"(exit use evenness, 1 = every exit equally); {report.fallback_share:.3f} answered by their most "
        f"confident exit, none being sure (as the deployed maxprob policy does)"
    )
    if report.policy is not None:
        p = report.policy
        lines.append(f"policy {p['policy']}: accuracy {p['acc']:.4f} at {p['cost_frac']:.3f} x full "
                     f"({p['cost'] / 1e6:.2f} MMACs), {p['fallback_answers']} fallback answers; "
                     f"exit histogram {p['exit_hist']}")
    return "\n".join(lines)


def plot_report(report: EvalReport, path: Path, *, title: str = "") -> Path:
    """Left: accuracy against cost, each exit a point (MMACs to reach and evaluate it, the
    earlier exits' heads included), the max-prob rule and a fitted policy as points of
    their own, the oracle as a line. Right: where the threshold rule sends the samples.
    Values are written on the points and bars; the accuracy axis spans the data."""
    import matplotlib

    matplotlib.use("Agg")  # files only; no display on devices and CI
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.6), gridspec_kw={"width_ratios": [3, 2]})
    names = report.exit_names
    have_cost = report.cumulative_macs is not None
    xs = [c / 1e6 for c in report.cumulative_macs] if report.cumulative_macs is not None else list(range(len(names)))
    ax1.plot(xs, report.exit_acc, "o-", color="tab:blue", label="each exit, all samples")
    for x, y, name in zip(xs, report.exit_acc, names):
        ax1.annotate(f"{name}\n{y:.3f}", (x, y), textcoords="offset points", xytext=(0, 8), ha="center", fontsize=8)
    ys = list(report.exit_acc) + [report.oracle_acc, report.threshold_acc]
    if have_cost and report.threshold_macs is not None:
        ax1.plot([report.threshold_macs / 1e6], [report.threshold_acc], "s", color="tab:green", markersize=8,
                 label=f"max-prob >= {report.threshold}: {report.threshold_acc:.3f}")
    if report.policy is not None and have_cost:
        p = report.policy
        ax1.plot([p["cost"] / 1e6], [p["acc"]], "D", color="tab:purple", markersize=8,
                 label=f"policy {p['policy']}: {p['acc']:.3f} at {p['cost_frac']:.2f} x full")
        ys.append(p["acc"])
    ax1.axhline(report.oracle_acc, color="tab:red", linestyle="--", label=f"oracle {report.oracle_acc:.3f}")
    if have_cost and report.full_macs:
        ax1.axvline(report.full_macs / 1e6, color="grey", linestyle=":",
                    label=f"full network without exit heads: {report.full_macs / 1e6:.2f} MMACs")
    low, high = min(ys), max(ys)
    pad = max(0.02, 0.15 * (high - low))
    ax1.set_ylim(max(0.0, low - pad), min(1.0, high + 2 * pad))
    ax1.set_xlabel("MMACs per sample (exit heads on the way included)" if have_cost else "exit")
    if not have_cost:
        ax1.set_xticks(xs, names)
    ax1.set_ylabel("accuracy")
    ax1.set_title("accuracy against cost")
    ax1.grid(alpha=0.3)
    ax1.legend(loc="lower right", fontsize=8)
    positions = np.arange(len(names))
    bars = ax2.bar(positions, report.exit_hist, color="tab:green")
    ax2.bar_label(bars, labels=[f"{h:.2f}" for h in report.exit_hist], fontsize=8)
    ax2.set_xticks(positions, names, rotation=30)
    ax2.set_ylabel("share of samples")
    ax2.set_ylim(0, min(1.0, max(report.exit_hist) * 1.2 + 0.02))
    ax2.set_title(f"where max-prob >= {report.threshold} sends samples\n(balance {report.balance:.2f}: "
                  f"1 = every exit equally)", fontsize=10)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def write_report(report: EvalReport, out_dir: Path, *, name: str = "eval", title: str = "") -> tuple[Path, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path = out_dir / f"{name}.json"
    json_path.write_text(json.dumps(report.to_dict(), indent=2))
    return json_path, plot_report(report, out_dir / f"{name}.png", title=title)
