"""Privacy accounting on top of Opacus' accountants, and the per-client privacy ledger.

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
from functools import lru_cache
from typing import Iterable

import numpy as np
from opacus.accountants import PRVAccountant, RDPAccountant
from opacus.accountants.accountant import IAccountant
from opacus.accountants.analysis import rdp as rdp_analysis
from scipy import optimize
from scipy.stats import norm

from fedpriv.common.config import ACCOUNTANTS, DECISION_ACCOUNTANTS  # noqa: F401 - re-exported
from fedpriv.common.errors import UserInputError

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
