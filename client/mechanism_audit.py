"""White-box audit of one local DP-SGD step, run through the code that training runs.

``fedpriv audit RUN_DIR`` attacks a finished model from the outside and can only ever show a weak
bound. This audit goes the other way: it checks the *mechanism*, the one private step that every
client repeats, where a lost factor of noise would hide from every other test (accuracy even
improves). Each trial is one real step through :func:`client.grad_sample_modes.make_private` and
:func:`client.dp_training.train_step` (Opacus' optimizer, or the book-keeping one with its own
clipper and noise code; CSPRNG noise in secure mode), in one of two neighbouring worlds:

* "with": 15 ordinary records plus one **Dirac canary**. The model is ``nn.Linear(8, 1, bias=False)``
  reset to zero before every step; every ordinary record has a 0 on input coordinate ``j``, so its
  gradient there is exactly 0, while the canary is ``100 C e_j`` with target -1, so its gradient is
  ``200 C e_j`` and clips to ``C e_j`` (to 5e-9 relative). The released update on weight ``j`` is then
  the canary's clipped gradient plus that coordinate's noise, and nothing else.
* "without": the same step without the canary (add/remove adjacency, as Opacus accounts).

The statistic is the released update on weight ``j`` in units of ``C / B`` (``B`` the expected
batch size Opacus divides by): ``N(0, sigma^2)`` without the canary, ``N(1, sigma^2)`` with it when
the code adds the noise it claims. Thresholding it is the optimal test for that pair, so with
enough trials the lower bound approaches the tight epsilon of one step. The threshold is chosen on a
random half of the trials (:func:`select_threshold`) and measured on the other half, with one-sided
Clopper-Pearson bounds on TPR and FPR (``common/audit.py``, shared with the run audit). The bound is set beside the tight
per-step epsilon from ``dp_accounting``'s PLD accountant (independent of Opacus and of
``common/accounting.py``), and beside what the project's accountant claims for one step.

With ``sample_rate`` q < 1 the step runs Opacus' Poisson loader over 16/q records (expected batch
16); the "without" world drops the canary from each drawn batch, which is Poisson sampling of the
neighbouring dataset. The theory is then the Poisson-subsampled Gaussian's epsilon; a single step's
threshold test is far from tight there, so q = 1 is the sharp audit.

``noise_scale`` deliberately multiplies the noise the optimizer adds (after wrapping, like a bug
would), while the theory stays that of the claimed ``noise_multiplier``: at 0.25 the bound must rise
clearly above the theory, which shows that the audit catches lost noise (tests/test_mechanism_audit.py).
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from functools import lru_cache
from typing import TYPE_CHECKING, Iterator

import numpy as np

from fedpriv.common import audit as stats
from fedpriv.common.config import ACCOUNTANTS, GRAD_SAMPLE_MODES, check_choice
from fedpriv.common.errors import UserInputError

if TYPE_CHECKING:
    import torch
    from torch.utils.data import DataLoader

# torch, Opacus and dp_accounting are imported where used: a wrong option fails in a fraction of a
# second (``check_options``), before seconds of imports.
MODES = tuple(m for m in GRAD_SAMPLE_MODES if m != "auto")  # as client/grad_sample_modes.py

DIM = 8               # model inputs; coordinate CANARY_COORD is the canary's alone
CANARY_COORD = 0
BATCH = 16            # expected batch size: 15 ordinary records + the canary at sample rate 1
CANARY_INPUT = 100.0  # times C: the canary's gradient is 200 C, clipped to C e_j within 5e-9
LEARNING_RATE = 1.0   # plain SGD, no momentum: the weight change is minus the released gradient
DEFAULT_TRIALS = 10_000  # per world (fedpriv audit --mechanism): about 10 s per mode on one core
MIN_TRIALS = 100      # per world; the held-out half of fewer cannot show any epsilon worth the time
MAX_TRIALS = 1_000_000
MAX_BATCHES = 1000    # sample rate 1/k needs 16 k records; beyond 1/1000 the audit shows nothing
SHORT_Z = 4.0         # noise_short: a false alarm about 3 in 100 000 audits of a correct mode
DEFAULT_MODES = ("bookkeeping", "hooks")  # auto's choice for every model family, and its fallback
ATTACK = "Dirac canary"
SCORE = "released update on the canary's weight, in units of C/B"


@dataclass(frozen=True)
class MechanismAudit:
    """One mode's audit: the trials' attack result beside the epsilon the step should have.

    ``theoretical_epsilon`` is the tight (PLD) epsilon of one step at the *claimed*
    ``noise_multiplier``; ``accounted_epsilon`` is what the project's accountant reports for one
    step (an upper bound of the former). A correct mechanism keeps ``epsilon_lower_bound`` at or
    below ``theoretical_epsilon`` (but for a 10 % chance at most, the two Clopper-Pearson bounds'
    joint confidence); a bound above it means the step leaks more than claimed.
    """

    mode: str
    noise_multiplier: float  # claimed sigma: what the accountant and the theory assume
    max_grad_norm: float
    noise_scale: float       # factor on the noise actually added (1 = the code as it is)
    sample_rate: float
    delta: float
    secure_mode: bool
    trials: int              # private steps in each world (with and without the canary)
    seed: int
    theoretical_epsilon: float
    accountant: str
    accounted_epsilon: float
    attack: stats.AttackResult
    ceiling: float           # the largest bound this many held-out trials can show
    noise_std: float         # sample std of the statistic without the canary: the noise actually added, in C
    noise_std_error: float   # its standard error
    signal: float            # mean with minus mean without: the canary's clipped gradient in C (q expected)
    signal_error: float
    seconds: float

    @property
    def epsilon_lower_bound(self) -> float:
        """The held-out bound (threshold chosen on the other half of the trials)."""
        return self.attack.evaluation.epsilon_lower_bound

    @property
    def epsilon_estimate(self) -> float:
        """The epsilon the held-out TPR and FPR imply as measured, without confidence bounds."""
        ev = self.attack.evaluation
        return float(stats.implied_epsilon(ev.tpr, ev.fpr, self.delta))

    @property
    def violated(self) -> bool:
        """True when the trials prove more leakage than one step of the claimed noise allows."""
        return self.epsilon_lower_bound > self.theoretical_epsilon

    @property
    def noise_short(self) -> bool:
        """True when the measured noise std is more than ``SHORT_Z`` standard errors below the claim.

        A parametric check (it trusts that the noise is Gaussian, which the bound does not), far
        more sensitive than the bound: 2000 trials per world resolve the std to about 2 %, while
        the bound needs about 50 000 to catch half the noise (README, privacy section).
        """
        return not self.noise_std >= self.noise_multiplier - SHORT_Z * self.noise_std_error  # NaN: short too

    @property
    def passed(self) -> bool:
        return not (self.violated or self.noise_short)

    def to_dict(self) -> dict:
        result = asdict(self)
        result.update(epsilon_lower_bound=self.epsilon_lower_bound, epsilon_estimate=self.epsilon_estimate,
                      violated=self.violated, noise_short=self.noise_short, passed=self.passed,
                      confidence=round(2 * stats.CONFIDENCE - 1, 6))
        return result


def check_options(modes: list[str], noise_multiplier: float, trials: int, noise_scale: float,
                  sample_rate: float, delta: float, accountant: str, max_grad_norm: float = 1.0) -> list[str]:
    """Validate the audit's options (one-line ``UserInputError``); return the concrete modes.

    ``"all"`` stands for every concrete mode. The sample rate must be ``1/k`` for a whole ``k``:
    Opacus' loader sets the rate to one over its number of batches.
    """
    for mode in modes:
        check_choice("grad-sample-mode", mode, (*MODES, "all"))
    chosen = list(MODES) if "all" in modes else list(dict.fromkeys(modes))
    if not (noise_multiplier > 0 and math.isfinite(noise_multiplier)):
        raise UserInputError(f"--noise-multiplier must be > 0 (got {noise_multiplier}); the audit checks DP-SGD's noise")
    if not MIN_TRIALS <= trials <= MAX_TRIALS:
        raise UserInputError(f"--trials must be between {MIN_TRIALS} and {MAX_TRIALS} steps per world (got {trials}); "
                             "fewer cannot show any epsilon")
    if not (max_grad_norm > 0 and math.isfinite(max_grad_norm)):
        raise UserInputError(f"--max-grad-norm must be > 0 (got {max_grad_norm})")
    if not (noise_scale > 0 and math.isfinite(noise_scale)):
        raise UserInputError(f"--noise-scale must be > 0 (got {noise_scale}); 1 audits the code as it is")
    if not 0 < delta < 1:
        raise UserInputError(f"--delta must be in (0, 1) (got {delta})")
    batches = round(1 / sample_rate) if 0 < sample_rate <= 1 else 0
    if not (1 <= batches <= MAX_BATCHES and math.isclose(batches * sample_rate, 1.0, rel_tol=1e-9)):
        raise UserInputError(f"--sample-rate must be 1/k for a whole k from 1 to {MAX_BATCHES} (got {sample_rate}): "
                             "Opacus' loader samples at one over its number of batches")
    check_choice("accountant", accountant, ACCOUNTANTS)
    return chosen


@lru_cache(maxsize=64)
def theoretical_epsilon(noise_multiplier: float, sample_rate: float, delta: float) -> float:
    """Epsilon of one DP-SGD step at ``delta``, add/remove adjacency: ``dp_accounting``'s PLD.

    A Gaussian mechanism of sensitivity 1 and noise ``sigma`` (Poisson-subsampled at rate q < 1).
    PLD with its default discretization is a pessimistic estimate, tight to about 1e-4, and shares
    no code with Opacus' accountants or ``common/accounting.py``, so it checks those too.
    """
    import dp_accounting
    from dp_accounting.pld import pld_privacy_accountant

    event = dp_accounting.GaussianDpEvent(noise_multiplier)
    if sample_rate < 1:
        event = dp_accounting.PoissonSampledDpEvent(sample_rate, event)
    accountant = pld_privacy_accountant.PLDAccountant()
    accountant.compose(event)
    return float(accountant.get_epsilon(delta))


def select_threshold(with_canary: np.ndarray, without_canary: np.ndarray, members: int, nonmembers: int,
                     sample_rate: float, delta: float) -> float:
    """The threshold whose bound on ``members`` + ``nonmembers`` held-out trials is expected largest.

    Fitted on the selection half only: the claimed mechanism's shape, without the canary
    ``N(mu0, s^2)`` and with it ``(1 - q) N(mu0, s^2) + q N(mu0 + d, s^2)``, with ``mu0``, ``s`` and
    ``d`` estimated there; then the Clopper-Pearson bound of the expected held-out counts is
    maximised over a grid of thresholds. The held-out bound stays valid whatever the noise really
    is (the fit only picks the threshold), and is steadier than taking the selection half's best
    empirical threshold (``common.audit.best_threshold``), which in the far tail often picks a
    threshold that one or two trials made look good. On 10 numpy draws of the ideal mechanism
    (sigma 1.5, theory 2.75, 2000 trials per world) that gave held-out bounds of 0.00-1.23 (mean
    0.57), this 0.68-1.29 (0.86); at a quarter of the noise both about 3.8-4.8.
    """
    from scipy.stats import norm

    mu0 = float(np.mean(without_canary))
    spread = max(float(np.std(without_canary, ddof=1)), 1e-12)  # no noise at all: a step at d/2
    shift = (float(np.mean(with_canary)) - mu0) / sample_rate
    lo, hi = min(mu0, mu0 + shift) - 8 * spread, max(mu0, mu0 + shift) + 8 * spread
    if not (math.isfinite(lo) and math.isfinite(hi)):  # NaN or inf releases: any threshold will do
        return 0.5
    grid = np.linspace(lo, hi, 4001)
    fpr = norm.sf(grid, mu0, spread)
    tpr = (1 - sample_rate) * fpr + sample_rate * norm.sf(grid, mu0 + shift, spread)
    bounds = stats.epsilon_lower_bound(members * tpr, members, nonmembers * fpr, nonmembers, delta)
    return float(grid[int(np.argmax(bounds))])


def canary_dataset(num_ordinary: int, max_grad_norm: float,
                   generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """``num_ordinary`` random records with 0 on the canary's coordinate, then the canary (last row).

    Ordinary inputs and targets are standard normal, so their gradients (``2 y x`` at zero weights)
    have norms on both sides of C = 1 (the default bound): some are clipped, some not, as in training.
    The canary's gradient norm, ``200 C``, is clipped whatever ``max_grad_norm`` is.
    """
    import torch

    x = torch.randn(num_ordinary + 1, DIM, generator=generator)
    y = torch.randn(num_ordinary + 1, 1, generator=generator)
    x[:, CANARY_COORD] = 0.0
    x[-1], y[-1] = 0.0, -1.0
    x[-1, CANARY_COORD] = CANARY_INPUT * max_grad_norm
    return x, y


def _batches(loader: DataLoader) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    while True:
        yield from loader


def released_scores(mode: str, noise_multiplier: float, trials: int, *, max_grad_norm: float = 1.0,
                    noise_scale: float = 1.0, sample_rate: float = 1.0, secure_mode: bool = False,
                    seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Run ``trials`` real private steps in each world; return their statistics, with and without the canary.

    The private objects are built once (hooks attached once, as in a round) and the weights reset
    to zero before each step; worlds alternate, so anything that drifts over the trials (the
    generators' streams) touches both alike. As in ``train_round``, batch sampling and noise draw
    from separate generators (seeded from ``seed``; secure mode draws both from the OS' CSPRNG).
    Torch's global RNG is forked, so the caller's random state is left as it was.
    """
    import torch
    from opacus import PrivacyEngine
    from torch import nn
    from torch.utils.data import DataLoader, TensorDataset

    from fedpriv.client.dp_training import train_step
    from fedpriv.client.grad_sample_modes import make_private

    batches = round(1 / sample_rate)
    data_seed, sampler_seed, noise_seed = np.random.SeedSequence(seed).generate_state(3)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(data_seed))
        x, y = canary_dataset(BATCH * batches - 1, max_grad_norm, torch.Generator().manual_seed(int(data_seed)))
        model = nn.Linear(DIM, 1, bias=False)
        engine = PrivacyEngine(accountant="rdp", secure_mode=False)  # its accountant plays no part here
        private = make_private(
            engine, model=model, optimizer=torch.optim.SGD(model.parameters(), lr=LEARNING_RATE),
            criterion=nn.MSELoss(),
            loader=DataLoader(TensorDataset(x, y), batch_size=BATCH,
                              generator=torch.Generator().manual_seed(int(sampler_seed))),
            mode=mode, noise_multiplier=noise_multiplier, max_grad_norm=max_grad_norm,
            poisson_sampling=batches > 1, noise_generator=torch.Generator().manual_seed(int(noise_seed)),
            secure_mode=secure_mode,
        )
        optimizer = private.optimizer
        if noise_scale != 1.0:  # the deliberate bug: less (or more) noise than claimed, unknown to the theory
            optimizer.noise_multiplier = noise_multiplier * noise_scale
            if hasattr(optimizer, "_adjusted_noise_multiplier"):
                optimizer._adjusted_noise_multiplier *= noise_scale
        scale = optimizer.expected_batch_size / (LEARNING_RATE * max_grad_norm)
        draws = _batches(private.loader) if batches > 1 else None
        weight = model.weight
        released = np.empty(2 * trials)
        try:
            for t in range(2 * trials):
                xb, yb = next(draws) if draws is not None else (x, y)
                if t % 2:  # the neighbouring world: the same step without the canary
                    keep = xb[:, CANARY_COORD] == 0
                    xb, yb = xb[keep], yb[keep]
                with torch.no_grad():
                    weight.zero_()
                train_step(private.model, optimizer, private.criterion, xb, yb)
                released[t] = weight[0, CANARY_COORD].item()
        finally:
            private.cleanup()
    scores = -released * scale  # the gradient step went against the canary's +C e_j
    return scores[0::2], scores[1::2]


def audit_mechanism(mode: str, noise_multiplier: float, trials: int, *, max_grad_norm: float = 1.0,
                    noise_scale: float = 1.0, sample_rate: float = 1.0, delta: float = 1e-5,
                    accountant: str = "rdp", secure_mode: bool = False, seed: int = 0) -> MechanismAudit:
    """Audit one grad-sample mode: ``trials`` steps per world, bound held out, theory beside it.

    Raises ``UserInputError`` for options outside what the audit supports (see :func:`check_options`).
    """
    from fedpriv.common.accounting import epsilon_for

    (mode,) = check_options([mode], noise_multiplier, trials, noise_scale, sample_rate, delta, accountant,
                            max_grad_norm)
    start = time.perf_counter()
    with_canary, without_canary = released_scores(
        mode, noise_multiplier, trials, max_grad_norm=max_grad_norm, noise_scale=noise_scale, sample_rate=sample_rate,
        secure_mode=secure_mode, seed=seed)
    rng = np.random.default_rng(seed)
    select_with, select_without = stats.split_halves(trials, trials, rng)
    held_out = trials - int(select_with.sum()), trials - int(select_without.sum())
    threshold = select_threshold(with_canary[select_with], without_canary[select_without], *held_out,
                                 sample_rate, delta)
    attack = stats.AttackResult(
        name=ATTACK, score=SCORE, auc=stats.auc(with_canary, without_canary),
        tpr_at_fpr={f"{f:g}": stats.tpr_at_fpr(with_canary, without_canary, f) for f in stats.LOW_FPRS},
        selection=stats.measure(with_canary[select_with], without_canary[select_without], threshold, delta),
        evaluation=stats.measure(with_canary[~select_with], without_canary[~select_without], threshold, delta),
    )
    return MechanismAudit(
        mode=mode, noise_multiplier=noise_multiplier, max_grad_norm=max_grad_norm, noise_scale=noise_scale,
        sample_rate=sample_rate, delta=delta, secure_mode=secure_mode, trials=trials, seed=seed,
        theoretical_epsilon=theoretical_epsilon(noise_multiplier, sample_rate, delta), accountant=accountant,
        accounted_epsilon=epsilon_for([(noise_multiplier, sample_rate, 1)], delta, accountant),
        attack=attack, ceiling=stats.epsilon_ceiling(*held_out, delta),
        noise_std=float(without_canary.std(ddof=1)),
        noise_std_error=float(without_canary.std(ddof=1) / math.sqrt(2 * (trials - 1))),
        signal=float(with_canary.mean() - without_canary.mean()),
        signal_error=float(math.sqrt(with_canary.var(ddof=1) / trials + without_canary.var(ddof=1) / trials)),
        seconds=time.perf_counter() - start,
    )
