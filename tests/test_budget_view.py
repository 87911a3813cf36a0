"""``fedpriv budget``: the owner's ledger shown, recomputed independently, and how many rounds fit."""

from __future__ import annotations

import json

import dp_accounting
import pytest
from dp_accounting.rdp import RdpAccountant
from typer.testing import CliRunner

from fedpriv.client.ledger import Decline, OwnerLedger, Release
from fedpriv.simulations.budget_view import budget_summary
from fedpriv.simulations.cli import app


def _reference(history, delta=1e-5) -> float:
    accountant = RdpAccountant()
    for sigma, q, steps in history:
        accountant.compose(dp_accounting.SelfComposedDpEvent(
            dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(sigma)), steps))
    return accountant.get_epsilon(delta)


@pytest.fixture
def state(tmp_path):
    ledger = OwnerLedger("hospital-a", policy={"budget_epsilon": 8.0, "delta": 1e-5, "accountant": "rdp"})
    ledger.releases = [Release("run-a", r, 1.0e9 + r, 1.5, 0.125, 16, 2, "poisson", "f1", 500, 0.0, "rdp", 1e-5)
                       for r in (1, 2)]
    ledger.releases.append(Release("run-b", 1, 1.1e9, 1.5, 1.0, 8, 2, "fixed", "f2", 520, 0.0, "rdp", 1e-5))
    ledger.declines = [Decline("run-b", 2, 1.2e9, "server asked for dp=false; this owner requires DP")]
    ledger.save(tmp_path / "s")
    return tmp_path / "s"


def test_summary_recomputes_every_release(state):
    summary = budget_summary(state, noise_multiplier=1.5, local_epochs=2, batch_size=64)
    cumulative = [r["cumulative_epsilon"] for r in summary["releases"]]
    assert cumulative[0] == pytest.approx(_reference([(1.5, 0.125, 16)]), rel=0.01)
    assert cumulative[1] == pytest.approx(_reference([(1.5, 0.125, 32)]), rel=0.01)
    assert cumulative[0] < cumulative[1] < cumulative[2] == pytest.approx(summary["epsilon"])
    assert summary["left"] == pytest.approx(8.0 - summary["epsilon"])
    assert summary["declines"][0]["reason"] == "server asked for dp=false; this owner requires DP"
    plan = summary["plan"]
    assert plan["records"] == 520 and plan["sampling"] == "poisson"
    k = plan["rounds_that_fit"]
    per_round = tuple(plan["per_round_mechanism"])
    from fedpriv.common.accounting import epsilon_for

    def eps(n: int) -> float:  # the stored ledger (fixed sampling: one Gaussian per epoch) plus n rounds
        return epsilon_for([(1.5, 0.125, 32), (1.5, 1.0, 2), (per_round[0], per_round[1], per_round[2] * n)],
                           1e-5, "rdp")
    assert k > 0 and eps(k) <= 8.0 < eps(k + 1)


def test_cli_json_plot_and_bad_input(state, tmp_path):
    runner = CliRunner()
    plot = tmp_path / "budget.png"
    result = runner.invoke(app, ["budget", "--state-dir", str(state), "--json", "--plot", str(plot),
                                 "--noise-multiplier", "2", "--records", "400"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    assert len(data["releases"]) == 3 and data["plan"]["records"] == 400
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table = runner.invoke(app, ["budget", "--state-dir", str(state)])
    assert table.exit_code == 0 and "declined rounds" in table.output and "left" in table.output
    missing = runner.invoke(app, ["budget", "--state-dir", str(tmp_path / "nothing")])
    assert missing.exit_code == 2 and "holds no privacy ledger" in missing.output
    bad = runner.invoke(app, ["budget", "--state-dir", str(state), "--accountant", "gdp"])
    assert bad.exit_code == 2 and "rdp, prv" in bad.output
