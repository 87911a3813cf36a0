"""Privacy budget planning: the noise multiplier a target epsilon needs, and the epsilon a noise gives.

Both directions use exactly the code training uses: ``common.privacy.round_mechanism`` for the
(noise, sample rate, steps) of one local round as the client's loader runs it, and ``epsilon_for`` for the
composition over rounds, one ledger entry per round. So a planned epsilon is the epsilon a client
that trains in every round reports at the end, not an estimate of it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache
from typing import Callable

from fedpriv.common.config import RunConfig
from fedpriv.common.errors import ConfigError, UserInputError
from fedpriv.common.privacy import Mechanism, check_accountant, epsilon_for
from fedpriv.common.privacy import round_mechanism as privacy_round_mechanism

# Search range for the noise multiplier. Below MIN_NOISE DP-SGD's epsilon is in the hundreds and
# PRV's numerics take minutes or give up; above MAX_NOISE nothing useful is learnt, and the
# accountants' own resolution (RDP's orders, PRV's eps_error) limits epsilon anyway.
MIN_NOISE = 0.5
MAX_NOISE = 100.0
RELATIVE_TOLERANCE = 1e-3


@dataclass(frozen=True)
class BudgetPlan:
    """One client's planned privacy over a run: per round and in total."""

    noise_multiplier: float
    sample_rate: float
    steps_per_round: int
    rounds: int
    epsilon: float
    delta: float
    accountant: str

    @property
    def total_steps(self) -> int:
        return self.steps_per_round * self.rounds


def round_mechanism(noise: float, local_epochs: int, batch_size: int, dataset_size: int,
                    poisson_sampling: bool = True) -> Mechanism:
    """(noise, rate, steps) of one local round of a client holding ``dataset_size`` records."""
    return privacy_round_mechanism(noise, dataset_size, batch_size, local_epochs, poisson_sampling)


def epsilon_for_plan(noise: float, delta: float, rounds: int, local_epochs: int, batch_size: int,
                     dataset_size: int, accountant: str, poisson_sampling: bool = True) -> float:
    """Epsilon after ``rounds`` rounds with this noise, for a client that trains in every one."""
    _check_plan(delta, rounds, local_epochs, batch_size, dataset_size, accountant)
    _positive("noise-multiplier", noise)
    return _epsilon(noise, delta, rounds, local_epochs, batch_size, dataset_size, accountant, poisson_sampling)


def noise_for_target(target_epsilon: float, delta: float, rounds: int, local_epochs: int, batch_size: int,
                     dataset_size: int, accountant: str, poisson_sampling: bool = True) -> float:
    """The smallest noise multiplier (to 0.1 %, 5 digits) whose planned epsilon is <= ``target_epsilon``.

    A bracketing search on log(noise) (epsilon falls as noise grows; see ``_shrink``). The answer
    always meets the target: the bracket's upper end is only ever a noise whose epsilon was
    computed <= target, with the same code the clients' budget checks run. Never
    below ``MIN_NOISE``: a target so loose that it allows less gets ``MIN_NOISE`` and a smaller
    epsilon. A target even ``MAX_NOISE`` cannot reach is a ``UserInputError`` naming the best one.
    """
    _check_plan(delta, rounds, local_epochs, batch_size, dataset_size, accountant)
    _positive("target-epsilon", target_epsilon)
    return _noise_for_target(float(target_epsilon), float(delta), int(rounds), int(local_epochs),
                             int(batch_size), int(dataset_size), accountant, bool(poisson_sampling))


def describe_plan(noise: float, delta: float, rounds: int, local_epochs: int, batch_size: int,
                  dataset_size: int, accountant: str, poisson_sampling: bool = True) -> BudgetPlan:
    """Everything ``fedpriv plan-budget`` shows about a noise multiplier."""
    epsilon = epsilon_for_plan(noise, delta, rounds, local_epochs, batch_size, dataset_size, accountant,
                               poisson_sampling)
    _, rate, steps = round_mechanism(noise, local_epochs, batch_size, dataset_size, poisson_sampling)
    return BudgetPlan(noise_multiplier=noise, sample_rate=rate, steps_per_round=steps, rounds=rounds,
                      epsilon=epsilon, delta=delta, accountant=accountant)


_MAIN_JOB = RunConfig()  # the defaults of a plan are the main job's, from the one definition


def plan_budget(dataset_size: int, *, target_epsilon: float | None = None, noise_multiplier: float | None = None,
                rounds: int = _MAIN_JOB.num_rounds, local_epochs: int = _MAIN_JOB.local_epochs,
                batch_size: int = _MAIN_JOB.batch_size, delta: float = _MAIN_JOB.delta,
                accountant: str = _MAIN_JOB.accountant, poisson_sampling: bool = _MAIN_JOB.poisson_sampling
                ) -> BudgetPlan:
    """Plan one client's budget: the noise a target epsilon needs, or the epsilon a noise gives.

    Args: ``dataset_size`` records of the client to plan for (the smallest one spends the most);
    exactly one of ``target_epsilon`` (derive the smallest noise multiplier that keeps epsilon <= it)
    and ``noise_multiplier`` (compute its epsilon); the run's ``rounds``, ``local_epochs``,
    ``batch_size``, ``delta``, ``accountant`` and sampling (defaults: the main job's). The client is
    assumed to train in every round, the worst case, with the accounting code training runs.
    Returns: a :class:`BudgetPlan`. Raises: :class:`~fedpriv.common.errors.ConfigError` for a bad
    or missing argument, or a target no noise up to ``MAX_NOISE`` reaches.
    """
    if (target_epsilon is None) == (noise_multiplier is None):
        raise ConfigError("plan_budget: give exactly one of target_epsilon (to derive the noise) or "
                             "noise_multiplier (to compute epsilon)")
    plan_args = (delta, rounds, local_epochs, batch_size, dataset_size, accountant, poisson_sampling)
    noise = noise_multiplier if target_epsilon is None else noise_for_target(target_epsilon, *plan_args)
    return describe_plan(noise, *plan_args)


def check_delta(delta: float, smallest_dataset: int) -> None:
    """delta must stay below 1/n of the smallest client's n records.

    (epsilon, delta)-DP with delta >= 1/n is met by a mechanism that publishes one random record
    in the clear: such a delta promises nothing about an individual.
    """
    if delta >= 1.0 / smallest_dataset:
        raise UserInputError(
            f"--delta {delta:g} is not below 1/n for the smallest client (n = {smallest_dataset} records, "
            f"1/n = {1.0 / smallest_dataset:.3g}): such a delta allows leaking a whole record; use e.g. "
            f"--delta {_suggested_delta(smallest_dataset):g}"
        )


def _suggested_delta(n: int) -> float:
    """A usual choice: 1e-5, or a power of ten below 1/n^1.1 for a larger dataset."""
    return min(1e-5, 10.0 ** math.floor(math.log10(1.0 / n ** 1.1)))


@lru_cache(maxsize=64)  # preflight runs more than once per command; the answer is a pure function
def _noise_for_target(target: float, delta: float, rounds: int, local_epochs: int, batch_size: int,
                      dataset_size: int, accountant: str, poisson_sampling: bool) -> float:
    seen: dict[float, float] = {}

    def eps(noise: float) -> float:
        if noise not in seen:
            seen[noise] = _epsilon(noise, delta, rounds, local_epochs, batch_size, dataset_size, accountant,
                                   poisson_sampling)
        return seen[noise]

    low, high = 1.0, 1.0  # bracket: eps(low) > target >= eps(high), grown from 1 by factors of 2
    if eps(1.0) <= target:
        while True:
            low = max(low / 2, MIN_NOISE)
            if eps(low) > target:
                break
            high = low
            if low == MIN_NOISE:
                return MIN_NOISE
    else:
        while True:
            high = min(high * 2, MAX_NOISE)
            if eps(high) <= target:
                break
            low = high
            if high == MAX_NOISE:
                raise UserInputError(
                    f"--target-epsilon {target:g} is out of reach: the best is epsilon {eps(MAX_NOISE):.4g}, at noise "
                    f"multiplier {MAX_NOISE:g} ({accountant}, delta={delta:g}, {rounds} rounds); allow a larger epsilon "
                    "or delta, or plan fewer rounds or local epochs"
                )
    noise = _shrink(eps, target, low, high)
    tidy = _round_up(noise, 5)  # 1.6025 rather than 1.602490144525341 in configs and ledgers
    return tidy if eps(tidy) <= target else noise


def _round_up(value: float, digits: int) -> float:
    """``value`` rounded up to ``digits`` significant digits (more noise never costs privacy)."""
    step = 10.0 ** (math.floor(math.log10(value)) - digits + 1)
    return float(f"{math.ceil(value / step - 1e-9) * step:.{digits}g}")


def _shrink(eps: Callable[[float], float], target: float, low: float, high: float) -> float:
    """Narrow eps(low) > target >= eps(high) to high/low <= 1 + RELATIVE_TOLERANCE; returns high.

    log(eps) is nearly linear in log(noise), so each probe interpolates there (regula falsi, with
    Illinois' halving against a stale end) and then steps a third of the tolerance past the
    estimate, towards the far end: once the estimate is that good, the next probe lands on the
    other side and closes the bracket. ~3 probes where bisection needs ~10, each a full
    accountant run.
    """
    width = math.log1p(RELATIVE_TOLERANCE)
    f_low, f_high = _log_gap(eps(low), target), _log_gap(eps(high), target)
    side = 0
    while math.log(high) - math.log(low) > width:
        x_low, x_high = math.log(low), math.log(high)
        if math.isfinite(f_low) and math.isfinite(f_high):
            x = x_high - f_high * (x_high - x_low) / (f_high - f_low)
        else:  # an infinite or zero epsilon at an end: nothing to interpolate
            x = (x_low + x_high) / 2
        x += width / 3 if x - x_low < x_high - x else -width / 3
        noise = math.exp(min(max(x, x_low + width / 3), x_high - width / 3))
        f = _log_gap(eps(noise), target)
        if f <= 0:
            high, f_high = noise, f
            f_low = f_low / 2 if side == +1 else f_low  # Illinois: the end not moved twice running halves
            side = +1
        else:
            low, f_low = noise, f
            f_high = f_high / 2 if side == -1 else f_high
            side = -1
    return high


def _log_gap(epsilon: float, target: float) -> float:
    """log(epsilon / target): > 0 above the target; +inf for an infinite epsilon; -inf for zero."""
    if epsilon <= 0:
        return -math.inf
    return math.log(epsilon / target) if math.isfinite(epsilon) else math.inf


def _epsilon(noise: float, delta: float, rounds: int, local_epochs: int, batch_size: int, dataset_size: int,
             accountant: str, poisson_sampling: bool) -> float:
    mechanism = round_mechanism(noise, local_epochs, batch_size, dataset_size, poisson_sampling)
    return epsilon_for([mechanism] * rounds, delta, accountant)  # one ledger entry per round, as clients keep it


def _check_plan(delta: float, rounds: int, local_epochs: int, batch_size: int, dataset_size: int,
                accountant: str) -> None:
    check_accountant(accountant)
    if not 0.0 < delta < 1.0:
        raise UserInputError(f"--delta must be in (0, 1) (got {delta}); a usual choice is 1e-5")
    for option, value in (("rounds", rounds), ("local-epochs", local_epochs), ("batch-size", batch_size),
                          ("dataset-size", dataset_size)):
        if int(value) != value or value < 1:
            raise UserInputError(f"--{option} must be a positive integer (got {value})")
    check_delta(delta, dataset_size)


def _positive(option: str, value: float) -> None:
    if not (value > 0 and math.isfinite(value)):
        raise UserInputError(f"--{option} must be a positive number (got {value})")
