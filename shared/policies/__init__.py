"""Exit policies: one interface (`ExitPolicy`, driven by `step`) for every rule of
METHODS.md, fit offline on cached exit outputs and stored in bundle manifests as plain data.
"""

from __future__ import annotations

from types import MappingProxyType
from typing import Any, Mapping, Protocol

from splitexit.policies.base import Decision, ExitPolicy, Ladder, Outcome, PolicyError, State, simulate, step
from splitexit.policies.bof import BoFBeta
from splitexit.policies.bolukbasi import Bolukbasi
from splitexit.policies.budget import MSDNetBudget, check_budget, fit_scalar_to_budget, sequential_thresholds
from splitexit.policies.eenet import EENet
from splitexit.policies.rules import Entropy, MaxProb, Oracle, Patience
from splitexit.policies.predictive import Predictive

__all__ = [
    "POLICIES", "BoFBeta", "Bolukbasi", "Decision", "EENet", "Entropy", "ExitPolicy", "Ladder", "MSDNetBudget",
    "MaxProb", "Oracle", "Outcome", "Patience", "PolicyError", "Predictive", "State", "check_budget",
    "fit_scalar_to_budget", "policy_from_dict", "policy_to_dict", "sequential_thresholds", "simulate", "step",
]

class PolicyClass(Protocol):
    """A policy class as the registry holds it: it builds its rule from manifest params."""

    def from_dict(self, data: dict[str, Any]) -> ExitPolicy: ...


# Every policy a bundle manifest may name. Read-only: a name means one rule forever.
POLICIES: Mapping[str, PolicyClass] = MappingProxyType({
    cls.name: cls for cls in (MaxProb, Entropy, Patience, BoFBeta, MSDNetBudget, Bolukbasi, EENet, Oracle, Predictive)
})


def policy_to_dict(policy: ExitPolicy) -> dict[str, Any]:
    """{"name", "params"}: plain data for a manifest (JSON / msgpack), never pickle."""
    return {"name": policy.name, "params": policy.to_dict()}


def policy_from_dict(data: Mapping[str, Any]) -> ExitPolicy:
    """Inverse of `policy_to_dict`; a PolicyError that says why for anything else."""
    if not isinstance(data, Mapping) or "name" not in data:
        raise PolicyError("a policy entry must be an object with a 'name'")
    cls = POLICIES.get(str(data["name"]))
    if cls is None:
        raise PolicyError(f"unknown policy {data['name']!r}; known: {', '.join(sorted(POLICIES))}")
    try:
        return cls.from_dict(dict(data.get("params") or {}))
    except (KeyError, TypeError, ValueError) as exc:
        if isinstance(exc, PolicyError):
            raise
        raise PolicyError(f"policy {data['name']!r}: bad parameters ({exc!r})") from exc
