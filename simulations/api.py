"""fedpriv's Python API for notebooks and scripts: run a simulation, plan a budget, read a report.

``import fedpriv`` exposes these three (``fedpriv.simulate``, ``fedpriv.plan_budget``,
``fedpriv.load_report``) with the config and report types. They are the functions the command
line runs, minus its printing: same validation, same accounting, same run folder. Errors are
:class:`~fedpriv.common.errors.FedprivError` subclasses (``ConfigError``, ``DataError``,
``PrivacyPolicyError``; all ``ValueError``), one sentence naming the setting, so a caller can catch
them; the CLI maps the same errors to one line and exit code 2.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Mapping

from fedpriv.common.accounting import BudgetPlan, plan_budget
from fedpriv.common.config import RunConfig
from fedpriv.server.report import RunReport

__all__ = ["BudgetPlan", "RunConfig", "RunReport", "load_report", "plan_budget", "simulate"]


def simulate(config: RunConfig | Mapping[str, Any] | None = None, /, **options: Any) -> RunReport:
    """Run one local federated simulation with DP on every client; return its report.

    Args:
        config: a :class:`RunConfig`, or a mapping of its keys (snake- or kebab-case); ``None`` is the
            main job (the defaults). Never modified: the run works on a copy.
        **options: overrides of single keys, e.g. ``num_rounds=3, model="rnn"``.

    Returns:
        The :class:`RunReport` (accuracy and loss per round, every client's epsilon over its whole
        ledger, the guarantees it rests on), also written to ``report.run_dir`` (``report.json``,
        ``report.md``, plots). Set ``run_dir`` to choose the folder; otherwise ``runs/<time>-...``.

    Raises:
        ConfigError: an option is invalid (the message names it).
        DataError: the data set cannot be read or does not fit the model.
        PrivacyPolicyError: the run would break the owners' privacy policy (e.g. noise below their minimum).
        FederationFailed: the run stopped before its last round (see ``flower.log`` in the run folder).

    Clients train in worker processes forked from this one (``client_cpus`` sets how many at a time),
    so call it from the main thread of a process that has not started other threads' work mid-flight.
    """
    from fedpriv.simulations.simulate import simulate as run_simulation

    if config is None:
        base = RunConfig()
    elif isinstance(config, RunConfig):
        base = config
    elif isinstance(config, Mapping):
        base = RunConfig.from_mapping(config)
    else:
        raise TypeError(f"config must be a RunConfig, a mapping or None, not {type(config).__name__}")
    cfg = RunConfig.from_mapping({**base.to_dict(), **options}) if options else dataclasses.replace(base)
    cfg.validate()
    report, _ = run_simulation(cfg)  # RunReport.load set report.run_dir
    return report


def load_report(run_dir: str | Path) -> RunReport:
    """The :class:`RunReport` of a finished (or running) run, read from ``run_dir/report.json``.

    Raises:
        ConfigError: ``run_dir`` holds no report, or one that is not a fedpriv report.
    """
    return RunReport.load(Path(run_dir))
