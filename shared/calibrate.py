"""Fit any exit policy by name on cached validation outputs: to a budget, or with its own
hyperparameter given. What `splitexit calibrate` runs, and what a bundle stores."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

from splitexit.evaluate import ExitOutputs, balance
from splitexit.policies import (
    BoFBeta, Entropy, ExitPolicy, Ladder, MaxProb, MSDNetBudget, Patience, PolicyError, check_budget,
    fit_scalar_to_budget, policy_to_dict, simulate,
)


@dataclass(frozen=True)
class FitInputs:
    """What fitting sees: validation outputs (never test), BoF's training statistics, and
    the exit ladder in the budget's unit."""

    val: ExitOutputs
    ladder: Ladder
    train_stats: ExitOutputs | None = None


@dataclass(frozen=True)
class FitOptions:
    budget: float | None = None  # average cost per sample, in the ladder's unit
    threshold: float | None = None  # maxprob / entropy
    patience: int | None = None
    beta: float | None = None
    statistic: str = "maxprob"  # bof_beta's statistic
    extra: dict[str, Any] = field(default_factory=dict)  # policy-specific (e.g. lam, q)


def _need(value: Any, what: str, name: str) -> Any:
    if value is None:
        raise PolicyError(f"{name} needs {what}")
    return value


def _bof_base(inputs: FitInputs, options: FitOptions) -> BoFBeta:
    stats = inputs.train_stats if inputs.train_stats is not None else inputs.val
    return BoFBeta.fit(stats.probs, statistic=options.statistic)  # type: ignore[arg-type]


def _fit_maxprob(inputs: FitInputs, options: FitOptions) -> ExitPolicy:
    if options.threshold is not None:
        return MaxProb(options.threshold)
    return fit_scalar_to_budget(MaxProb, 0.0, 1.0, inputs.val.probs, inputs.ladder,
                                _need(options.budget, "--threshold or --budget", "maxprob"))[0]


def _fit_entropy(inputs: FitInputs, options: FitOptions) -> ExitPolicy:
    if options.threshold is not None:
        return Entropy(options.threshold)
    # cost falls as the entropy threshold grows: bisect on its negation
    top = float(np.log(inputs.val.probs.shape[-1])) + 1e-6
    policy, _ = fit_scalar_to_budget(lambda x: Entropy(-x), -top, 0.0, inputs.val.probs, inputs.ladder,
                                     _need(options.budget, "--threshold or --budget", "entropy"))
    return policy


def _fit_patience(inputs: FitInputs, options: FitOptions) -> ExitPolicy:
    if options.patience is not None:
        return Patience(options.patience)
    budget = _need(options.budget, "--patience or --budget", "patience")
    check_budget(budget, inputs.ladder)
    fitting = [p for p in range(inputs.ladder.num_exits)
               if simulate(Patience(p), inputs.val.probs, inputs.ladder).mean_cost <= budget]
    if not fitting:
        raise PolicyError(f"no patience fits budget {budget:,.0f}: even patience 0 costs more")
    return Patience(max(fitting))


def _fit_bof_beta(inputs: FitInputs, options: FitOptions) -> ExitPolicy:
    base = _bof_base(inputs, options)
    if options.beta is not None:
        return base.with_beta(options.beta)
    lo, hi = base.beta_range()
    return fit_scalar_to_budget(base.with_beta, lo, hi, inputs.val.probs, inputs.ladder,
                                _need(options.budget, "--beta or --budget", "bof_beta"))[0]


def _fit_msdnet(inputs: FitInputs, options: FitOptions) -> ExitPolicy:
    if "q" in options.extra:
        return MSDNetBudget.for_q(float(options.extra["q"]), inputs.val.probs)
    return MSDNetBudget.fit(inputs.val.probs, inputs.val.labels, inputs.ladder,
                            _need(options.budget, "--budget (or --q)", "msdnet_budget"))


def _fit_bolukbasi(inputs: FitInputs, options: FitOptions) -> ExitPolicy:
    from splitexit.policies.bolukbasi import Bolukbasi, sweep_lambda

    val = inputs.val
    if "lam" in options.extra:
        return Bolukbasi.fit(val.probs, val.labels, inputs.ladder, float(options.extra["lam"]))
    budget = _need(options.budget, "--lambda or --budget", "bolukbasi")
    # the λ sweep's most accurate policy whose validation cost fits
    best: tuple[float, ExitPolicy] | None = None
    for policy in sweep_lambda(val.probs, val.labels, inputs.ladder):
        out = simulate(policy, val.probs, inputs.ladder, val.labels)
        if out.mean_cost <= budget and (best is None or out.acc > best[0]):
            best = (out.acc, policy)
    if best is None:
        raise PolicyError(f"no lambda fits budget {budget:,.0f} on the validation split")
    return best[1]


def _fit_eenet(inputs: FitInputs, options: FitOptions) -> ExitPolicy:
    from splitexit.policies.eenet import EENet

    budget = _need(options.budget, "--budget", "eenet")
    return EENet.fit(inputs.val.probs, inputs.val.labels, inputs.ladder, budget)


def _fit_predictive(inputs: FitInputs, options: FitOptions) -> ExitPolicy:
    """Predictive Exit on the ladder's costs as ms at the board's top clock (give an ms
    ladder: `splitexit calibrate` measures one); a budget picks the threshold."""
    from splitexit.policies.predictive import Predictive

    params = {k: options.extra[k] for k in ("l0", "board") if options.extra.get(k) is not None}
    if options.threshold is not None:
        return Predictive.from_ladder(inputs.ladder, threshold=options.threshold, **params)
    make = lambda t: Predictive.from_ladder(inputs.ladder, threshold=min(max(t, 1e-3), 1.0), **params)  # noqa: E731
    return fit_scalar_to_budget(make, 1e-3, 1.0, inputs.val.probs, inputs.ladder,
                                _need(options.budget, "--threshold or --budget", "predictive"))[0]


def _fit_oracle(inputs: FitInputs, options: FitOptions) -> ExitPolicy:
    raise PolicyError("the oracle is a bound that needs each sample's label: it cannot be calibrated or deployed")


FITTERS: dict[str, Callable[[FitInputs, FitOptions], ExitPolicy]] = {
    "maxprob": _fit_maxprob,
    "entropy": _fit_entropy,
    "patience": _fit_patience,
    "bof_beta": _fit_bof_beta,
    "msdnet_budget": _fit_msdnet,
    "bolukbasi": _fit_bolukbasi,
    "eenet": _fit_eenet,
    "predictive": _fit_predictive,
    "oracle": _fit_oracle,
}


def fit_policy(name: str, inputs: FitInputs, options: FitOptions) -> ExitPolicy:
    if name not in FITTERS:
        raise PolicyError(f"unknown policy {name!r}; choose one of {', '.join(sorted(FITTERS))}")
    if options.budget is not None:
        check_budget(options.budget, inputs.ladder)
    return FITTERS[name](inputs, options)


def policy_figures(policy: ExitPolicy, outputs: ExitOutputs, ladder: Ladder, full_cost: float) -> dict[str, Any]:
    """How `policy` does on `outputs` (cached exit outputs of a set), run as the deployed
    runtime runs it: accuracy, mean cost (the ladder's unit) and its fraction of
    `full_cost`, where samples leave (`exit_hist`, what they cost) and which exit answers
    them (`answer_hist`: differs for SDN's most-confident fallback, `fallback_answers`)."""
    out = simulate(policy, outputs.probs, ladder, outputs.labels)
    hist = out.exit_hist(ladder.num_exits)
    answered = out.exit_index if out.answer_exit is None else out.answer_exit
    answer_hist = np.bincount(answered, minlength=ladder.num_exits) / len(answered)
    return {
        "acc": round(out.acc, 5), "cost": round(out.mean_cost, 4), "cost_frac": round(out.mean_cost / full_cost, 4),
        "exit_hist": [round(float(h), 4) for h in hist], "balance": round(balance(hist), 4),
        "answer_hist": [round(float(h), 4) for h in answer_hist],
        "fallback_answers": int((answered != out.exit_index).sum()),
        "exits": list(ladder.names), "samples": len(outputs.labels),
    }


def describe_fit(policy: ExitPolicy, inputs: FitInputs, full_cost: float) -> dict[str, Any]:
    """The policy entry a bundle stores: its parameters and how it did on validation."""
    return {**policy_to_dict(policy), "validation": policy_figures(policy, inputs.val, inputs.ladder, full_cost)}

