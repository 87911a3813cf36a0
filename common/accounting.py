"""All of fedpriv's privacy accounting, in one module: epsilon, the mechanism a round adds, planning.

- Record level, local DP (each owner's DP-SGD): :func:`epsilon_for` composes a ledger's history
  with Opacus' accountants; :func:`round_mechanism` / :func:`planned_mechanism` say which entry one
  round adds; :func:`plan_budget`, :func:`noise_for_target` and :func:`epsilon_for_plan` plan a run
  with exactly that code, so a planned epsilon is the one a client reports.
- User level, central DP (Flower's DP strategies): :func:`user_level_epsilon` with Google's
  ``dp-accounting`` (sampling without replacement, replace-one adjacency), imported only when used.

Three accountants, by ``--accountant``: ``rdp`` (Opacus' RDP, a provable upper bound), ``prv``
(Opacus' PRV, a numerical upper estimate of the tight epsilon, within ``eps_error=0.01``) and
``gdp`` (Gaussian DP via the central limit theorem, composed over heterogeneous histories here;
an approximation that *underestimates* epsilon for few steps or little noise, see ``_gdp_mu``).

A data owner's ledger (client/ledger.py) is the persistent form of an accountant's history: one
entry per round it released an update for, with the mechanism's parameters and steps. Epsilon is
always recomputed from the whole history, so it composes over every local step of every round,
across runs and restarts. :func:`round_mechanism` says which history entry one round adds, for
both batch-sampling schemes the clients run.

Opacus is left as it was (tests/test_opacus_untouched.py): :class:`ComposedGdpAccountant` is the
project's own, built by :func:`make_accountant`, and never registered with Opacus. Registering it
(``register_accountant("gdp", ..., force=True)``) would replace Opacus' ``GaussianAccountant``
behind ``PrivacyEngine(accountant="gdp")`` for every other user of Opacus in the process. No
project code needs that: the clients' ledger is computed by :func:`epsilon_for`, not by the
accountant of their ``PrivacyEngine``.
"""

from __future__ import annotations

import hashlib
import math
import warnings
from collections import Counter
from dataclasses import dataclass
from functools import lru_cache
from typing import Callable, Iterable

import numpy as np
from opacus.accountants import PRVAccountant, RDPAccountant
from opacus.accountants.accountant import IAccountant
from opacus.accountants.analysis import rdp as rdp_analysis
from scipy import optimize
from scipy.stats import norm

from fedpriv.common.config import ACCOUNTANTS, DECISION_ACCOUNTANTS, RunConfig  # noqa: F401 - re-exported
from fedpriv.common.errors import ConfigError, UserInputError

Mechanism = tuple[float, float, int]  # (noise_multiplier, sample_rate, steps), Opacus' history format


def round_mechanism(noise_multiplier: float, num_examples: int, batch_size: int, local_epochs: int,
                    poisson_sampling: bool) -> Mechanism:
    """The history entry one local round adds, for the batch sampling the client really runs.

    * Poisson sampling (Opacus' ``DPDataLoader``): ``sample_rate = 1 / ceil(n / batch)`` and
      ``int(1 / sample_rate)`` steps per epoch; every step is a Poisson-subsampled Gaussian.
    * Fixed partition (``poisson_sampling=False``, client/batch_sampling.py): every record falls in
      exactly one batch per epoch, assigned independently of the other records, so adding or
      removing a record changes one step per epoch and no other. Without claiming amplification
      by shuffling, one epoch is one Gaussian mechanism of noise ``sigma`` on that record:
      ``(sigma, 1.0, local_epochs)``. Accounting it as Poisson (what Opacus does) would claim
      amplification that fixed batches do not have.
    """
    batches = math.ceil(num_examples / batch_size)
    if not poisson_sampling:
        return (noise_multiplier, 1.0, local_epochs)
    batches = int(1 / (1.0 / batches))  # Opacus' Poisson sampler: steps = int(1 / sample_rate)
    return (noise_multiplier, 1.0 / batches, local_epochs * batches)


def make_accountant(name: str) -> IAccountant:
    """An empty accountant by its short name: Opacus' RDP and PRV, the project's :class:`ComposedGdpAccountant`.

    The project's way to an accountant by name: Opacus' ``create_accountant("gdp")`` stays Opacus'
    own ``GaussianAccountant`` (the project registers nothing with Opacus).
    """
    check_accountant(name)
    return {"rdp": RDPAccountant, "prv": PRVAccountant, "gdp": ComposedGdpAccountant}[name]()


def check_accountant(name: str) -> None:
    """A one-line ``UserInputError`` for an accountant name outside ``ACCOUNTANTS``."""
    if name not in ACCOUNTANTS:
        raise UserInputError(f"--accountant '{name}' is unknown; choose one of: {', '.join(ACCOUNTANTS)}")


def epsilon_for(history: Iterable[Mechanism], delta: float, accountant: str) -> float:
    """Epsilon of the composition of every (noise, rate, steps) entry; 0 for an empty history.

    Entries with the same (noise, rate) are merged first (composition is commutative): the same
    number, and PRV is ~10x faster on a ledger with one entry per round. RDP is computed exactly
    as Opacus' ``RDPAccountant`` does (same orders, same analysis), but the per-step RDP curve of
    each (noise, rate) pair is cached and scaled by the step count: RDP composes additively, so
    this is the same number, without Opacus' ~1 s per call.
    """
    history = _merged(history)
    check_accountant(accountant)
    if not history:
        return 0.0
    return _epsilon_of_merged(tuple(sorted(history)), float(delta), accountant)


@lru_cache(maxsize=512)
def _epsilon_of_merged(history: tuple[Mechanism, ...], delta: float, accountant: str) -> float:
    """:func:`epsilon_for` of a merged, sorted history: a pure function, so it is cached. Simulated
    clients of equal size share one history each round, and a round asks for it up to three times
    (spent so far, planned, charged): PRV costs ~0.35 s a call on a 20-step-per-round ledger."""
    history = list(history)
    if accountant == "rdp":
        rdp = sum(steps * _rdp_per_step(q, sigma) for sigma, q, steps in history)
        eps, _ = rdp_analysis.get_privacy_spent(orders=RDP_ORDERS, rdp=rdp, delta=delta)
        return float(eps)
    if accountant == "gdp":
        return _gdp_epsilon(_gdp_mu(history), delta)
    acc = make_accountant(accountant)
    acc.history = history
    with warnings.catch_warnings():  # PRV's np.where evaluates log(0) on the branch it discards
        warnings.simplefilter("ignore", RuntimeWarning)
        return float(acc.get_epsilon(delta=delta))


def _merged(history: Iterable[Mechanism]) -> list[Mechanism]:
    """One entry per distinct (noise, rate), steps summed; entries without steps dropped."""
    steps: dict[tuple[float, float], int] = {}
    for noise, rate, count in history:
        if int(count) > 0:
            key = (float(noise), float(rate))
            steps[key] = steps.get(key, 0) + int(count)
    return [(noise, rate, count) for (noise, rate), count in steps.items()]


RDP_ORDERS = tuple(RDPAccountant.DEFAULT_ALPHAS)


@lru_cache(maxsize=1024)
def _rdp_per_step_cached(sample_rate: float, noise_multiplier: float) -> tuple[float, ...]:
    return tuple(rdp_analysis.compute_rdp(q=sample_rate, noise_multiplier=noise_multiplier, steps=1,
                                          orders=list(RDP_ORDERS)))


def _rdp_per_step(sample_rate: float, noise_multiplier: float) -> np.ndarray:
    return np.asarray(_rdp_per_step_cached(sample_rate, noise_multiplier))


# ------------------------------------------------------------------------------------- GDP
def _gdp_mu(history: list[Mechanism]) -> float:
    """mu of the whole history under Gaussian DP (Dong, Roth & Su 2019; Bu et al. 2020).

    Each entry is approximately mu_i-GDP with mu_i = q sqrt(T (e^{1/sigma^2} - 1)), the central
    limit theorem for Poisson-subsampled Gaussian steps (Opacus' ``compute_mu_poisson``), and
    mu-GDP mechanisms compose exactly to sqrt(sum mu_i^2)-GDP. Opacus' own ``GaussianAccountant``
    keeps only its last entry and refuses a change of noise or rate, so it cannot carry a
    client's multi-round ledger. The CLT is asymptotic (many steps, small rate): for few steps it
    underestimates epsilon (by up to ~80% at 10 steps in tests/test_accounting.py).
    """
    try:
        return math.sqrt(sum(steps * rate ** 2 * math.expm1(noise ** -2) for noise, rate, steps in history))
    except OverflowError:  # noise so small that e^{1/sigma^2} overflows: no privacy to speak of
        return math.inf


def _gdp_delta(eps: float, mu: float) -> float:
    """delta(eps) of mu-GDP (its dual), with e^eps folded into a log-CDF so large eps cannot overflow."""
    return float(norm.cdf(-eps / mu + mu / 2) - math.exp(eps + norm.logcdf(-eps / mu - mu / 2)))


def _gdp_epsilon(mu: float, delta: float) -> float:
    """The smallest eps with delta(eps) <= delta for mu-GDP, as Opacus' ``eps_from_mu`` but unbounded."""
    if mu == 0:
        return 0.0
    if not math.isfinite(mu):
        return math.inf
    if _gdp_delta(0.0, mu) <= delta:
        return 0.0
    high = 1.0
    while _gdp_delta(high, mu) > delta:  # delta(eps) falls to 0, so this ends
        high *= 2
        if high > 1e12:
            return math.inf
    return float(optimize.brentq(lambda eps: _gdp_delta(eps, mu) - delta, 0.0, high))


class ComposedGdpAccountant(IAccountant):
    """Opacus' GDP accounting (CLT, Poisson sampling) over a history of different mechanisms.

    It records every (noise, rate) change like the RDP and PRV accountants do, instead of raising
    or dropping the rounds before the current one as Opacus' ``GaussianAccountant`` does. Built by
    :func:`make_accountant` and handed to whatever needs it as an object; deliberately not
    registered with Opacus (see the module docstring).
    """

    def __init__(self) -> None:
        super().__init__()

    step = RDPAccountant.step  # the same history bookkeeping as RDP: append, or extend the last entry

    def get_epsilon(self, delta: float, *args, **kwargs) -> float:
        return epsilon_for(self.history, delta, "gdp")

    def __len__(self) -> int:
        return len(self.history)

    @classmethod
    def mechanism(cls) -> str:
        return "gdp"


def data_fingerprint(*arrays) -> str:
    """A short, stable fingerprint of a client's data: its ledger's key across runs."""
    digest = hashlib.sha256()
    for arr in arrays:
        if arr is None:
            continue
        digest.update(str(arr.dtype).encode())
        digest.update(str(arr.shape).encode())
        digest.update(memoryview(arr.tobytes()))
    return digest.hexdigest()[:16]


def planned_mechanism(num_examples: int, cfg: RunConfig) -> Mechanism:
    """The history entry a round of ``cfg`` adds for a client of ``num_examples`` records.

    Computed before any data is touched, so the budget is checked before training; it is the
    entry :func:`train_round` then reports for what it ran (``common.accounting.round_mechanism``).
    """
    return round_mechanism(cfg.noise_multiplier, num_examples, cfg.batch_size, cfg.local_epochs, cfg.poisson_sampling)


def user_level_epsilon(releases: list[dict], delta: float, *, amplification: bool) -> float:
    """Epsilon of every round's release so far, each a dict with noise_multiplier, sampled, population
    and secret_cohort (absent: False).

    ``amplification=False`` charges every release as a Gaussian mechanism the client took part in: the
    epsilon against anyone who knows the cohorts. ``amplification=True`` charges releases whose cohort
    was secret (and smaller than the population) as sampled without replacement, the others in full.
    Identical releases are composed as one event with a count: dp-accounting's sampled-without-
    replacement RDP costs ~0.5 s per distinct event, and composition is additive either way.
    """
    if not releases:
        return 0.0
    import dp_accounting  # only central-DP runs need it (user-level, replace-one adjacency)
    from dp_accounting import rdp as dp_rdp

    counts = Counter((float(r["noise_multiplier"]), int(r["sampled"]), int(r["population"]),
                      amplification and bool(r.get("secret_cohort", False))) for r in releases)
    accountant = dp_rdp.RdpAccountant(neighboring_relation=dp_accounting.NeighboringRelation.REPLACE_ONE)
    for (noise, sampled, population, amplified), count in counts.items():
        gaussian = dp_accounting.GaussianDpEvent(noise)
        if amplified and sampled < population:
            accountant.compose(dp_accounting.SampledWithoutReplacementDpEvent(population, sampled, gaussian), count)
        else:
            accountant.compose(gaussian, count)
    return float(accountant.get_epsilon(delta))


# ------------------------------------------------------------------ budget planning
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


def plan_round_mechanism(noise: float, local_epochs: int, batch_size: int, dataset_size: int,
                         poisson_sampling: bool = True) -> Mechanism:
    """(noise, rate, steps) of one local round of a client holding ``dataset_size`` records."""
    return round_mechanism(noise, dataset_size, batch_size, local_epochs, poisson_sampling)


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
    _, rate, steps = plan_round_mechanism(noise, local_epochs, batch_size, dataset_size, poisson_sampling)
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
    mechanism = plan_round_mechanism(noise, local_epochs, batch_size, dataset_size, poisson_sampling)
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
