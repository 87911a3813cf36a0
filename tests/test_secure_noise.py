"""Secure mode: DP noise and Poisson sampling from the OS' CSPRNG, with Opacus' floating-point defence."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import stats

from fedpriv.client.dp_training import RoundRandomness, train_round
from fedpriv.client.secure_noise import CsprngPoissonSampler, csprng_normal, csprng_uniform
from fedpriv.common.config import RunConfig
from fedpriv.common.datasets import load_dataset
from fedpriv.common.models import model_from_config


def test_csprng_gaussian_is_gaussian_with_the_requested_std():
    sample = csprng_normal((200_000,), std=2.5, dtype=torch.float64).numpy()
    assert stats.kstest(sample / 2.5, "norm").pvalue > 1e-3
    assert sample.std() == pytest.approx(2.5, rel=0.01)
    uniform = csprng_uniform(100_000)
    assert uniform.min() >= 0 and uniform.max() < 1
    assert stats.kstest(uniform, "uniform").pvalue > 1e-3


def test_csprng_noise_ignores_torch_seeds():
    torch.manual_seed(0)
    a = csprng_normal((1000,), 1.0)
    torch.manual_seed(0)
    b = csprng_normal((1000,), 1.0)
    assert not torch.equal(a, b)


def _one_round(secure: bool, seed: int = 7):
    data = load_dataset("digits", seed=0)
    cfg = RunConfig(local_epochs=1, secure_mode=secure, noise_multiplier=1.0).validate()
    model = model_from_config(cfg, data.input_shape, data.num_classes, seed=0)
    x, y = data.x_train[:256], data.y_train[:256]
    return train_round(model, x, y, cfg, [], rng=RoundRandomness.seeded(seed))


def test_secure_mode_round_trains_and_is_not_reproducible_from_the_seed():
    torch.set_num_threads(1)
    plain_a, plain_b = _one_round(False), _one_round(False)
    # Without secure mode the seed fixes sampling and noise (what makes it unfit for production).
    assert all(torch.equal(plain_a.state_dict[k], plain_b.state_dict[k]) for k in plain_a.state_dict)
    secure_a, secure_b = _one_round(True), _one_round(True)
    assert secure_a.steps == plain_a.steps and secure_a.epsilon == pytest.approx(plain_a.epsilon)
    assert all(torch.isfinite(v).all() for v in secure_a.state_dict.values())
    assert any(not torch.equal(secure_a.state_dict[k], secure_b.state_dict[k]) for k in secure_a.state_dict)


def test_csprng_poisson_sampler_keeps_the_sample_rate():
    sampler = CsprngPoissonSampler(num_samples=1000, sample_rate=0.1, generator=None)
    sizes = [len(batch) for batch in sampler]
    assert len(sizes) == sampler.steps == 10
    assert np.mean(sizes) == pytest.approx(100, rel=0.15)
