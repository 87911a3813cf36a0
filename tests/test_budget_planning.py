"""Budget planning: noise for a target epsilon and back, the delta check, ``fedpriv plan-budget``,
and ``--target-epsilon`` in preflight.

The planner is checked against itself (round trip, monotonicity) and, for RDP, against Google's
dp_accounting on the planned mechanism, so a wrong step count or a lost round would show.
"""

from __future__ import annotations

import logging

import dp_accounting
import pytest
from dp_accounting.rdp import RdpAccountant
from typer.testing import CliRunner

from fedpriv.common.accounting import planned_mechanism
from fedpriv.common.accounting import (MAX_NOISE, MIN_NOISE, check_delta, describe_plan, epsilon_for_plan,
                                    noise_for_target)
from fedpriv.common.config import RunConfig
from fedpriv.common.datasets import load_dataset
from fedpriv.common.errors import UserInputError
from fedpriv.common.partitioning import partition
from fedpriv.common.accounting import RDP_ORDERS
from fedpriv.simulations.cli import app
from fedpriv.server.preflight import preflight

DELTA = 1e-5
# A client with 1000 records, batches of 50 (q = 0.05, 20 steps per epoch), 5 rounds of 1 epoch:
# 100 steps in all, cheap enough for PRV to be probed a few times per test.
PLAN = dict(delta=DELTA, rounds=5, local_epochs=1, batch_size=50, dataset_size=1000)


@pytest.fixture(scope="module", autouse=True)
def quiet():
    logging.getLogger("absl").setLevel(logging.ERROR)  # dp_accounting: one warning per fractional order


def reference_rdp(noise: float, plan: dict) -> float:
    """dp_accounting's RDP epsilon of ``rounds`` rounds of the planned mechanism (Opacus' orders)."""
    cfg = RunConfig(noise_multiplier=noise, local_epochs=plan["local_epochs"], batch_size=plan["batch_size"])
    _, rate, steps = planned_mechanism(plan["dataset_size"], cfg)
    accountant = RdpAccountant(orders=list(RDP_ORDERS))
    accountant.compose(dp_accounting.SelfComposedDpEvent(
        dp_accounting.PoissonSampledDpEvent(rate, dp_accounting.GaussianDpEvent(noise)), steps * plan["rounds"]))
    return accountant.get_epsilon(plan["delta"])


# ------------------------------------------------------------------------------ planning
@pytest.mark.parametrize("accountant, target", [("rdp", 2.0), ("rdp", 8.0), ("prv", 2.0), ("gdp", 2.0)])
def test_round_trip_meets_the_target_closely(accountant, target):
    noise = noise_for_target(target, accountant=accountant, **PLAN)
    epsilon = epsilon_for_plan(noise, accountant=accountant, **PLAN)
    assert target * 0.99 <= epsilon <= target
    # Smallest: 0.12% less noise (the search's tolerance and rounding) already overshoots the target.
    assert epsilon_for_plan(noise / 1.0012, accountant=accountant, **PLAN) > target
    assert noise == float(f"{noise:.5g}")
    if accountant == "rdp":  # independently: dp_accounting on rounds x steps of the planned mechanism
        assert reference_rdp(noise, PLAN) == pytest.approx(epsilon, rel=0.01)


def test_plan_describes_what_a_client_trains():
    plan = describe_plan(1.2, accountant="rdp", **PLAN)
    assert (plan.sample_rate, plan.steps_per_round, plan.total_steps) == (pytest.approx(0.05), 20, 100)
    assert plan.epsilon == epsilon_for_plan(1.2, accountant="rdp", **PLAN)
    # 1003 records in batches of 50: 21 batches, and Opacus' Poisson sampler takes int(1/(1/21)) = 20 steps.
    odd = describe_plan(1.2, accountant="rdp", **{**PLAN, "dataset_size": 1003})
    assert odd.steps_per_round == planned_mechanism(1003, RunConfig(local_epochs=1, batch_size=50))[2]


def test_monotonicity():
    eps = [epsilon_for_plan(noise, accountant="rdp", **PLAN) for noise in (0.7, 1.0, 2.0, 5.0)]
    assert eps == sorted(eps, reverse=True) and len(set(eps)) == 4
    more_rounds = [epsilon_for_plan(1.0, accountant="rdp", **{**PLAN, "rounds": r}) for r in (1, 5, 20)]
    assert more_rounds == sorted(more_rounds) and len(set(more_rounds)) == 3
    # A smaller client has a larger sample rate and spends more: preflight plans for the smallest.
    sizes = [epsilon_for_plan(1.0, accountant="rdp", **{**PLAN, "dataset_size": n}) for n in (120, 300, 1000, 5000)]
    assert sizes == sorted(sizes, reverse=True) and len(set(sizes)) == 4
    noises = [noise_for_target(t, accountant="gdp", **PLAN) for t in (0.5, 1.0, 4.0)]
    assert noises == sorted(noises, reverse=True) and len(set(noises)) == 3


def test_unreachable_target_names_the_best_epsilon():
    best = epsilon_for_plan(MAX_NOISE, accountant="rdp", **PLAN)
    with pytest.raises(UserInputError) as err:
        noise_for_target(best / 2, accountant="rdp", **PLAN)
    message = str(err.value)
    assert "out of reach" in message and f"epsilon {best:.4g}" in message and "\n" not in message


def test_a_very_loose_target_gets_the_least_noise_searched():
    assert epsilon_for_plan(MIN_NOISE, accountant="rdp", **PLAN) < 1000
    assert noise_for_target(1000.0, accountant="rdp", **PLAN) == MIN_NOISE


def test_delta_must_be_below_one_over_the_smallest_dataset():
    check_delta(0.0099, 100)
    for delta in (0.01, 0.5):
        with pytest.raises(UserInputError, match="--delta"):
            check_delta(delta, 100)
    with pytest.raises(UserInputError, match="n = 100 records"):
        noise_for_target(2.0, accountant="rdp", **{**PLAN, "dataset_size": 100, "delta": 0.02})


@pytest.mark.parametrize("changes, needle", [
    ({"rounds": 0}, "--rounds"),
    ({"batch_size": -1}, "--batch-size"),
    ({"delta": 0.0}, "--delta"),
    ({"accountant": "moments"}, "--accountant"),
    ({"target_epsilon": -1.0}, "--target-epsilon"),
    ({"target_epsilon": float("inf")}, "--target-epsilon"),
])
def test_bad_plan_inputs(changes, needle):
    args = {"target_epsilon": 2.0, "accountant": "rdp", **PLAN, **changes}
    with pytest.raises(UserInputError, match=needle):
        noise_for_target(**args)


# ------------------------------------------------------------------------- fedpriv plan-budget
def plan_budget(*args: str):
    return CliRunner().invoke(app, ["plan-budget", *args], env={"COLUMNS": "120"})


def test_plan_budget_for_a_target_prints_the_plan():
    result = plan_budget("--target-epsilon", "2", "--dataset-size", "1000", "--rounds", "5", "--local-epochs", "1",
                         "--batch-size", "50")
    assert result.exit_code == 0, result.output
    noise = noise_for_target(2.0, accountant="rdp", **PLAN)
    epsilon = epsilon_for_plan(noise, accountant="rdp", **PLAN)
    row = next(line for line in result.stdout.splitlines() if f"{noise:.4g}" in line)
    assert row.split()[1:-1] == [f"{noise:.4g}", "│", "0.05", "│", "20", "│", "100", "│", f"{epsilon:.4g}"]
    assert "noise multiplier" in result.stdout and "epsilon" in result.stdout


def test_plan_budget_for_a_noise_multiplier():
    result = plan_budget("--noise-multiplier", "1.2", "--dataset-size", "1000", "--rounds", "5", "--local-epochs",
                         "1", "--batch-size", "50", "--accountant", "gdp")
    assert result.exit_code == 0, result.output
    assert f"{epsilon_for_plan(1.2, accountant='gdp', **PLAN):.4g}" in result.stdout and "GDP" in result.stdout


@pytest.mark.parametrize("args, needles", [
    (["--dataset-size", "1000"], ["exactly one of --target-epsilon", "--noise-multiplier"]),
    (["--dataset-size", "1000", "--target-epsilon", "2", "--noise-multiplier", "1"], ["exactly one"]),
    (["--dataset-size", "1000", "--target-epsilon", "0.001"], ["out of reach", "the best is epsilon"]),
    (["--dataset-size", "50", "--target-epsilon", "2", "--delta", "0.05"], ["--delta", "n = 50 records"]),
    (["--dataset-size", "1000", "--noise-multiplier", "-1"], ["--noise-multiplier"]),
    (["--dataset-size", "1000", "--noise-multiplier", "1", "--accountant", "moments"], ["--accountant"]),
])
def test_plan_budget_errors_are_one_line(args, needles):
    result = plan_budget(*args)
    assert result.exit_code == 2, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    for needle in needles:
        assert needle in lines[0]
    assert "Traceback" not in result.output


# ------------------------------------------------------------------------ --target-epsilon
def client_sizes(cfg: RunConfig) -> list[int]:
    data = load_dataset(cfg.dataset, seed=cfg.seed, test_fraction=cfg.test_fraction)
    return [len(p) for p in partition(data.y_train, len(data.x_train), cfg.num_clients, cfg.partitioning,
                                      seed=cfg.seed, alpha=cfg.dirichlet_alpha)]


@pytest.mark.parametrize("accountant", ["rdp", "gdp"])
def test_preflight_derives_the_noise_for_the_smallest_client(accountant):
    cfg = RunConfig(dataset="digits", num_clients=6, partitioning="dirichlet", dirichlet_alpha=0.3, num_rounds=4,
                    local_epochs=1, batch_size=16, target_epsilon=3.0, accountant=accountant)
    given = cfg
    cfg = preflight(cfg)
    assert given.noise_multiplier == RunConfig().noise_multiplier  # the caller's value is never rewritten
    sizes = client_sizes(cfg)
    assert len(set(sizes)) > 1, "unequal clients, so the smallest one matters"
    plan = dict(delta=cfg.delta, rounds=4, local_epochs=1, batch_size=16, accountant=accountant)
    worst = epsilon_for_plan(cfg.noise_multiplier, dataset_size=min(sizes), **plan)
    assert 0.99 * 3.0 <= worst <= 3.0
    assert all(epsilon_for_plan(cfg.noise_multiplier, dataset_size=n, **plan) <= worst for n in sizes)
    assert cfg.to_dict(kebab=True)["noise-multiplier"] == cfg.noise_multiplier  # what the server sends clients


def test_preflight_keeps_the_noise_without_a_target_and_checks_delta():
    cfg = RunConfig(dataset="digits", num_clients=10, noise_multiplier=1.3)
    cfg = preflight(cfg)
    assert cfg.noise_multiplier == 1.3
    smallest = min(client_sizes(cfg))
    with pytest.raises(UserInputError, match="--delta"):
        preflight(RunConfig(dataset="digits", num_clients=10, delta=1.0 / smallest))
    preflight(RunConfig(dataset="digits", num_clients=10, delta=1.0 / smallest, dp=False, noise_multiplier=0.0))


def test_target_epsilon_config_validation():
    with pytest.raises(UserInputError, match="--target-epsilon"):
        RunConfig(target_epsilon=-1.0).validate()
    with pytest.raises(UserInputError, match="--target-epsilon needs DP"):
        RunConfig(target_epsilon=2.0, dp=False, noise_multiplier=0.0).validate()
    assert RunConfig.from_mapping({"target-epsilon": "2.5"}).target_epsilon == 2.5
