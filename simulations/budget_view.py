"""``fedpriv budget``: what a data owner's ledger holds, what is left, and how many more rounds fit.

Everything is recomputed from the ledger's releases with the owner's accountant and delta (or the
ones asked for), never taken from a stored epsilon, so it holds for the whole history whatever the
data file or the servers did in between.
"""

from __future__ import annotations

import datetime as dt
import math
from pathlib import Path
from typing import Any

from fedpriv.client.ledger import LEDGER_FILE, LEGACY_DIR, OwnerLedger, load_ledger
from fedpriv.client.owner_policy import OwnerPolicy
from fedpriv.common.config import DECISION_ACCOUNTANTS
from fedpriv.common.errors import UserInputError
from fedpriv.common.accounting import Mechanism, epsilon_for, round_mechanism

MAX_ROUNDS_SHOWN = 100_000  # "how many more rounds fit" stops counting here


def budget_summary(state_dir: Path, *, noise_multiplier: float | None = None, local_epochs: int = 2,
                   batch_size: int = 64, records: int | None = None, budget_epsilon: float | None = None,
                   delta: float | None = None, accountant: str | None = None) -> dict[str, Any]:
    """The ledger of ``state_dir`` as one JSON-ready dict (see ``fedpriv budget --json``)."""
    state_dir = Path(state_dir)
    if not (state_dir / LEDGER_FILE).is_file() and not (state_dir / LEGACY_DIR).is_dir():
        raise UserInputError(f"--state-dir {state_dir} holds no privacy ledger ({LEDGER_FILE}); give the folder "
                             "passed to 'fedpriv client --state-dir'")
    ledger = load_ledger(state_dir)
    policy = _policy(ledger, budget_epsilon, delta, accountant)
    cumulative = _cumulative(ledger, policy)
    epsilon = cumulative[-1] if cumulative else 0.0
    summary: dict[str, Any] = {
        "state_dir": str(state_dir), "owner": ledger.owner, "accountant": policy.accountant, "delta": policy.delta,
        "budget_epsilon": policy.budget_epsilon, "epsilon": epsilon,
        "left": policy.budget_epsilon - epsilon if math.isfinite(epsilon) else -math.inf,
        "policy": ledger.policy,
        "releases": [{**_release_dict(r), "cumulative_epsilon": e} for r, e in zip(ledger.releases, cumulative)],
        "declines": [{"run_id": d.run_id, "round": d.round, "time": _iso(d.time), "reason": d.reason}
                     for d in ledger.declines],
        "migrated_from_old_layout": list(ledger.migrated),
    }
    if noise_multiplier is not None:
        summary["plan"] = _plan(ledger, policy, noise_multiplier, local_epochs, batch_size, records)
    return summary


def _policy(ledger: OwnerLedger, budget: float | None, delta: float | None, accountant: str | None) -> OwnerPolicy:
    stored = dict(ledger.policy)
    if isinstance(stored.get("budget_epsilon"), str):  # written as "inf"
        stored["budget_epsilon"] = float(stored["budget_epsilon"])
    known = {k: v for k, v in stored.items() if k in OwnerPolicy.__dataclass_fields__}
    policy = OwnerPolicy(**known) if known else OwnerPolicy()
    overrides = {k: v for k, v in (("budget_epsilon", budget), ("delta", delta), ("accountant", accountant))
                 if v is not None}
    if "accountant" in overrides and overrides["accountant"] not in DECISION_ACCOUNTANTS:
        raise UserInputError(f"--accountant must be one of {', '.join(DECISION_ACCOUNTANTS)} (got {accountant})")
    return OwnerPolicy(**{**policy.__dict__, **overrides}).validate()


def _cumulative(ledger: OwnerLedger, policy: OwnerPolicy) -> list[float]:
    """Epsilon after each release, composed over everything before it."""
    out, history, without_dp = [], [], False
    for release in ledger.releases:
        mechanism = release.mechanism()
        if mechanism is None:
            without_dp = True
        else:
            history.append(mechanism)
        out.append(math.inf if without_dp else epsilon_for(history, policy.delta, policy.accountant))
    return out


def _plan(ledger: OwnerLedger, policy: OwnerPolicy, noise: float, epochs: int, batch: int,
          records: int | None) -> dict[str, Any]:
    """How many more rounds of (noise, epochs, batch) fit in the budget, on top of the ledger."""
    if records is None:
        known = [r.records for r in ledger.releases if r.records]
        if not known:
            raise UserInputError("the ledger records no data size yet; pass --records N to plan rounds")
        records = known[-1]
    for name, value in (("noise-multiplier", noise), ("local-epochs", epochs), ("batch-size", batch),
                        ("records", records)):
        if not (value > 0 and math.isfinite(value)):
            raise UserInputError(f"--{name} must be positive (got {value})")
    per_round = round_mechanism(noise, records, batch, epochs, policy.poisson_sampling)
    history = [] if ledger.released_without_dp() else ledger.history()
    fits = 0 if ledger.released_without_dp() else _rounds_that_fit(history, per_round, policy)
    return {"noise_multiplier": noise, "local_epochs": epochs, "batch_size": batch, "records": records,
            "sampling": "poisson" if policy.poisson_sampling else "fixed", "per_round_mechanism": list(per_round),
            "rounds_that_fit": fits, "capped": fits >= MAX_ROUNDS_SHOWN}


def _rounds_that_fit(history: list[Mechanism], per_round: Mechanism, policy: OwnerPolicy) -> int:
    """The largest k with epsilon(history + k rounds) <= budget (epsilon grows with k: doubling, then bisection)."""
    def fits(k: int) -> bool:
        noise, rate, steps = per_round
        return epsilon_for(history + [(noise, rate, steps * k)], policy.delta, policy.accountant) <= policy.budget_epsilon

    if not fits(1):
        return 0
    low, high = 1, 2
    while high < MAX_ROUNDS_SHOWN and fits(high):
        low, high = high, high * 2
    if high >= MAX_ROUNDS_SHOWN and fits(MAX_ROUNDS_SHOWN):
        return MAX_ROUNDS_SHOWN
    while high - low > 1:
        mid = (low + high) // 2
        low, high = (mid, high) if fits(mid) else (low, mid)
    return low


def _release_dict(release) -> dict[str, Any]:  # noqa: ANN001 - client.ledger.Release
    return {"run_id": release.run_id, "round": release.round, "time": _iso(release.time),
            "noise_multiplier": release.noise_multiplier, "sample_rate": release.sample_rate, "steps": release.steps,
            "epochs": release.epochs, "sampling": release.sampling, "fingerprint": release.fingerprint,
            "records": release.records}


def _iso(timestamp: float) -> str:
    return dt.datetime.fromtimestamp(timestamp, dt.timezone.utc).isoformat(timespec="seconds")


def budget_table(summary: dict[str, Any]) -> list:
    """Rich renderables for the console: releases, declines, totals and the plan."""
    from rich.table import Table

    releases = Table(title=f"privacy ledger of {summary['owner'] or summary['state_dir']} "
                           f"({summary['accountant']}, delta={summary['delta']:g})")
    for column in ("#", "run", "round", "time (UTC)", "σ", "rate", "steps", "sampling", "data", "n", "ε after"):
        releases.add_column(column, justify="right" if column not in ("run", "sampling", "data") else "left",
                            no_wrap=column != "run")
    for i, r in enumerate(summary["releases"], 1):
        releases.add_row(str(i), r["run_id"], str(r["round"]), r["time"][5:16].replace("T", " "),
                         f"{r['noise_multiplier']:.4g}",
                         f"{r['sample_rate']:.4g}", str(r["steps"]), r["sampling"], r["fingerprint"][:8],
                         "?" if r["records"] is None else str(r["records"]), _eps(r["cumulative_epsilon"]))
    out: list = [releases]
    budget = summary["budget_epsilon"]
    out.append(f"spent epsilon {_eps(summary['epsilon'])} of budget {_eps(budget)}: "
               f"{_eps(max(summary['left'], 0.0)) if math.isfinite(summary['left']) or math.isinf(budget) else '0'} left"
               + (" (a release without DP: no guarantee remains)" if math.isinf(summary["epsilon"]) else ""))
    if summary["declines"]:
        declines = Table(title="declined rounds")
        for column in ("run", "round", "time (UTC)", "reason"):
            declines.add_column(column)
        for d in summary["declines"]:
            declines.add_row(d["run_id"], str(d["round"]), d["time"], d["reason"])
        out.append(declines)
    plan = summary.get("plan")
    if plan:
        more = f"{plan['rounds_that_fit']}{'+' if plan['capped'] else ''}"
        out.append(f"{more} more rounds fit at noise {plan['noise_multiplier']:g}, {plan['local_epochs']} local epochs, "
                   f"batch {plan['batch_size']}, {plan['records']} records ({plan['sampling']} sampling)")
    return out


def plot_budget(summary: dict[str, Any], path: Path) -> None:
    """Cumulative epsilon after each release, with the budget as a line (PNG, written atomically)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from fedpriv.common.atomic_io import atomic_write

    values = [r["cumulative_epsilon"] for r in summary["releases"]]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.step(range(1, len(values) + 1), [v if math.isfinite(v) else float("nan") for v in values], where="post",
            marker="o", label="cumulative epsilon")
    if math.isfinite(summary["budget_epsilon"]):
        ax.axhline(summary["budget_epsilon"], color="tab:red", linestyle="--", label="budget")
    ax.set_xlabel("release")
    ax.set_ylabel(f"epsilon ({summary['accountant']}, delta={summary['delta']:g})")
    ax.set_title(f"privacy spent by {summary['owner'] or 'this owner'}")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    try:
        atomic_write(Path(path), lambda f: fig.savefig(f, format="png", dpi=110), binary=True)
    except OSError as exc:
        raise UserInputError(f"--plot {path}: cannot write ({exc.strerror})") from None
    finally:
        plt.close(fig)


def _eps(value: float) -> str:
    return "inf" if math.isinf(value) else f"{value:.3f}"
