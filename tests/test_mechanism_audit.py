"""White-box audit of the local DP-SGD step (client/mechanism_audit.py, ``fedpriv audit --mechanism``).

The bound must stay at or below the theoretical per-step epsilon for the code as it is, and rise
clearly above it when noise is lost: by the audit's own ``noise_scale`` knob and by bugs planted
in the book-keeping optimizer's noise and clipping code (monkeypatched here only). All runs are
seeded, so the numbers are reproducible; the margins were measured over many seeds (README).
"""

from __future__ import annotations

import math
import re

import pytest
from scipy import optimize
from scipy.stats import norm
from typer.testing import CliRunner

import fedpriv.client.grad_sample_modes as gsm
from fedpriv.client.mechanism_audit import audit_mechanism, check_options, theoretical_epsilon
from fedpriv.common.errors import UserInputError

SIGMA = 1.5  # the project's default noise multiplier
TRIALS = 2000  # per world; seeds 0-9 gave bounds of 0.79-1.38, and 3.95-4.74 at a quarter noise (theory 2.75)


def _analytic_gaussian_epsilon(sigma: float, delta: float) -> float:
    """Balle & Wang's exact (eps, delta) curve of the Gaussian mechanism, solved for eps."""
    mu = 1 / sigma
    curve = lambda eps: norm.cdf(-eps / mu + mu / 2) - math.exp(eps) * norm.cdf(-eps / mu - mu / 2) - delta  # noqa: E731
    return optimize.brentq(curve, 0.0, 50.0)


def test_theory_is_the_tight_gaussian_epsilon():
    for sigma in (0.7, 1.5, 4.0):
        assert theoretical_epsilon(sigma, 1.0, 1e-5) == pytest.approx(_analytic_gaussian_epsilon(sigma, 1e-5), abs=2e-3)
    # Poisson subsampling amplifies: a smaller rate, a smaller epsilon.
    assert theoretical_epsilon(SIGMA, 0.5, 1e-5) < theoretical_epsilon(SIGMA, 1.0, 1e-5)


@pytest.mark.parametrize("mode", ["bookkeeping", "hooks"])
def test_bound_stays_below_theory_and_the_noise_is_as_claimed(mode):
    audit = audit_mechanism(mode, SIGMA, TRIALS)
    assert 0 < audit.epsilon_lower_bound <= audit.theoretical_epsilon, audit
    assert audit.theoretical_epsilon <= audit.accounted_epsilon  # RDP is an upper bound of the tight value
    assert audit.passed and not audit.violated and not audit.noise_short
    # Parametric checks: the released update is the canary's clipped C plus N(0, (sigma C)^2).
    assert abs(audit.noise_std - SIGMA) < 4 * audit.noise_std_error
    assert abs(audit.signal - 1.0) < 4 * audit.signal_error


@pytest.mark.parametrize("mode", ["bookkeeping", "hooks"])
def test_quarter_noise_is_caught(mode):
    audit = audit_mechanism(mode, SIGMA, TRIALS, noise_scale=0.25)
    assert audit.epsilon_lower_bound > audit.theoretical_epsilon + 0.5, audit  # clearly, not by a hair
    assert audit.violated and audit.noise_short and not audit.passed


def _lose_noise(monkeypatch):
    """The book-keeping optimizer keeps a quarter of its noise (e.g. a scale applied twice)."""
    original = gsm._BookkeepingDPOptimizer.add_noise

    def add_noise(self):
        original(self)
        for p in self.params:
            clean = p.summed_grad.view_as(p) / self.expected_batch_size
            p.grad = clean + (p.grad - clean) / 4

    monkeypatch.setattr(gsm._BookkeepingDPOptimizer, "add_noise", add_noise)


def _lose_clipping(monkeypatch):
    """The book-keeping clipper stops clipping (a bound far above any gradient)."""
    clipper = gsm.BookkeepingClipper
    monkeypatch.setattr(gsm, "BookkeepingClipper", lambda model, max_grad_norm, views=1: clipper(model, 1e9, views))


@pytest.mark.parametrize("plant", [_lose_noise, _lose_clipping], ids=["noise", "clipping"])
def test_planted_bugs_in_the_real_code_path_are_caught(monkeypatch, plant):
    plant(monkeypatch)
    audit = audit_mechanism("bookkeeping", SIGMA, 1000)
    assert audit.violated, audit


@pytest.mark.parametrize("sample_rate, secure_mode", [(0.5, False), (1.0, True)])
def test_poisson_and_secure_paths_stay_below_theory(sample_rate, secure_mode):
    audit = audit_mechanism("bookkeeping", SIGMA, 1000, sample_rate=sample_rate, secure_mode=secure_mode)
    assert audit.epsilon_lower_bound <= audit.theoretical_epsilon and audit.passed, audit
    assert abs(audit.signal - sample_rate) < 4 * audit.signal_error  # the canary is in a q share of the batches


@pytest.mark.parametrize("kwargs, needle", [
    (dict(modes=["auto"]), "--grad-sample-mode 'auto' is unknown"),
    (dict(noise_multiplier=0.0), "--noise-multiplier must be > 0"),
    (dict(trials=10), "--trials must be between"),
    (dict(noise_scale=-1.0), "--noise-scale must be > 0"),
    (dict(sample_rate=0.3), "--sample-rate must be 1/k"),
    (dict(delta=1.0), "--delta must be in (0, 1)"),
    (dict(accountant="moments"), "--accountant 'moments' is unknown"),
    (dict(max_grad_norm=math.inf), "--max-grad-norm must be > 0"),
])
def test_bad_options_name_the_option(kwargs, needle):
    options = dict(modes=["bookkeeping"], noise_multiplier=SIGMA, trials=1000, noise_scale=1.0, sample_rate=1.0,
                   delta=1e-5, accountant="rdp", max_grad_norm=1.0) | kwargs
    with pytest.raises(UserInputError, match=re.escape(needle)):
        check_options(**options)


def test_all_means_every_concrete_mode():
    options = dict(noise_multiplier=SIGMA, trials=1000, noise_scale=1.0, sample_rate=0.25, delta=1e-5, accountant="rdp")
    assert check_options(["all"], **options) == list(gsm.MODES)
    assert check_options(["hooks", "hooks", "ew"], **options) == ["hooks", "ew"]


# ------------------------------------------------------------------------------------------ CLI
def test_cli_prints_the_table_and_exits_0(fedpriv):
    result = fedpriv("audit", "--mechanism", "--trials", "300", "--grad-sample-mode", "bookkeeping", timeout=120)
    assert result.returncode == 0, (result.stdout, result.stderr)
    out = result.stdout
    assert "DP-SGD mechanism audit" in out and "bookkeeping" in out and "theory ε" in out and "ok" in out, out
    assert "2×300" in out and "every mode is consistent with the claimed noise" in out


def test_cli_bad_option_is_one_line_and_exit_2(fedpriv):
    result = fedpriv("audit", "--mechanism", "--trials", "5", timeout=60)
    assert result.returncode == 2, (result.stdout, result.stderr)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: --trials must be between"), result.stderr
    assert "Traceback" not in result.stdout + result.stderr


def _cli(*args: str):
    from fedpriv.simulations.cli import app

    return CliRunner().invoke(app, ["audit", *args])


@pytest.mark.parametrize("args, needle", [
    (["--mechanism", "some-run"], "takes no RUN_DIR"),
    (["some-run", "--trials", "300"], "--trials only apply with --mechanism"),
    ([], "give RUN_DIR"),
    (["--mechanism", "--sample-rate", "0.3"], "--sample-rate must be 1/k"),
])
def test_cli_misuse_is_one_line(args, needle):
    result = _cli(*args)
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert result.exit_code == 2 and len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], result.output


def test_cli_exits_1_when_the_noise_is_cut():
    result = _cli("--mechanism", "--trials", "300", "--grad-sample-mode", "bookkeeping", "--noise-scale", "0.25")
    assert result.exit_code == 1, result.output
    assert "FAIL" in result.output and "audit failed for bookkeeping" in result.output
