"""fedpriv: federated learning with differential privacy that data owners enforce themselves.

The Python API (see ``fedpriv.simulations.api`` and the README's "Python API" section)::

    import fedpriv
    plan = fedpriv.plan_budget(dataset_size=1000, target_epsilon=4, rounds=10)
    report = fedpriv.simulate(num_rounds=3, noise_multiplier=plan.noise_multiplier)
    print(report.rounds[-1]["metrics"]["accuracy"], report.max_epsilon())
    again = fedpriv.load_report(report.run_dir)

The names load on first use: ``import fedpriv.common.config`` (which runs this file first) must not
import torch, Flower or the simulation layers on top of it.
"""

from __future__ import annotations

import importlib
from typing import Any

__all__ = ["BudgetPlan", "ConfigError", "DataError", "FederationFailed", "FedprivError", "PrivacyPolicyError",
           "RunConfig", "RunReport", "load_report", "plan_budget", "simulate"]

_WHERE = {
    "simulate": "fedpriv.simulations.api", "load_report": "fedpriv.simulations.api",
    "plan_budget": "fedpriv.common.accounting", "BudgetPlan": "fedpriv.common.accounting",
    "RunConfig": "fedpriv.common.config", "RunReport": "fedpriv.server.report",
    "FederationFailed": "fedpriv.simulations.simulate",
    "FedprivError": "fedpriv.common.errors", "ConfigError": "fedpriv.common.errors",
    "DataError": "fedpriv.common.errors", "PrivacyPolicyError": "fedpriv.common.errors",
}


def __getattr__(name: str) -> Any:
    if name in _WHERE:
        value = getattr(importlib.import_module(_WHERE[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'fedpriv' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])
