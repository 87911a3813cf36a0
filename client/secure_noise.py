"""Opacus' secure mode without torchcsprng: DP noise and batch sampling from the OS' CSPRNG.

Opacus' ``secure_mode`` needs ``torchcsprng``, which has no build for current PyTorch, so
``PrivacyEngine(secure_mode=True)`` cannot start. Secure mode matters in production because
noise from a seeded Mersenne Twister or Philox stream is predictable to whoever recovers the seed,
and then the noise can be subtracted. This module keeps Opacus' own secure-mode recipe (sum of four
Gaussians halved, against floating-point attacks, Holohan & Braghin 2021) but draws every Gaussian
and every Poisson batch mask from ``os.urandom`` (getrandom(2)), the kernel's CSPRNG.
"""

from __future__ import annotations

import math
import os

import numpy as np
import torch
from opacus.optimizers import optimizer as opacus_optimizer
from opacus.optimizers import optimizer_fast_gradient_clipping as opacus_fast_optimizer
from opacus.utils.uniform_sampler import UniformWithReplacementSampler

_TWO_POW_MINUS_53 = 2.0**-53


def csprng_uniform(n: int) -> np.ndarray:
    """``n`` floats uniform in [0, 1), 53 random bits each, from the OS' CSPRNG."""
    raw = np.frombuffer(os.urandom(8 * n), dtype=np.uint64)
    return (raw >> np.uint64(11)).astype(np.float64) * _TWO_POW_MINUS_53


def csprng_normal(shape: torch.Size | tuple[int, ...], std: float, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Gaussian noise N(0, std^2) by Box-Muller on CSPRNG uniforms."""
    n = math.prod(shape)
    half = (n + 1) // 2
    u1 = 1.0 - csprng_uniform(half)  # in (0, 1]: log is finite
    u2 = csprng_uniform(half)
    radius = np.sqrt(-2.0 * np.log(u1))
    z = np.concatenate([radius * np.cos(2 * np.pi * u2), radius * np.sin(2 * np.pi * u2)])[:n]
    return torch.from_numpy(z * std).to(dtype).reshape(shape)


def _secure_noise(std: float, reference: torch.Tensor) -> torch.Tensor:
    """Opacus' secure-mode noise (four Gaussians summed and halved) with CSPRNG Gaussians."""
    if std == 0:
        return torch.zeros_like(reference)
    total = sum(csprng_normal(reference.shape, std, reference.dtype) for _ in range(4))
    return (total / 2).to(reference.device)


_opacus_generate_noise = opacus_optimizer._generate_noise


def _generate_noise(std, reference, generator=None, secure_mode: bool = False):  # noqa: ANN001, ANN201
    """Opacus' noise function, routed to the CSPRNG whenever the optimizer is in secure mode."""
    if secure_mode:
        return _secure_noise(std, reference)
    return _opacus_generate_noise(std, reference, generator=generator, secure_mode=False)


# Both Opacus optimizer families (per-sample and ghost clipping) look the function up in their module.
opacus_optimizer._generate_noise = _generate_noise
opacus_fast_optimizer._generate_noise = _generate_noise


class CsprngPoissonSampler(UniformWithReplacementSampler):
    """Opacus' Poisson batch sampler with its coin flips drawn from the OS' CSPRNG."""

    def __iter__(self):  # noqa: ANN204
        for _ in range(self.steps):
            mask = torch.from_numpy(csprng_uniform(self.num_samples) < self.sample_rate)
            yield mask.nonzero(as_tuple=False).reshape(-1).tolist()


def make_secure(optimizer: torch.optim.Optimizer, loader: torch.utils.data.DataLoader) -> None:
    """Switch an Opacus optimizer and its Poisson loader to CSPRNG noise and sampling."""
    optimizer.secure_mode = True
    optimizer.generator = None
    sampler = getattr(loader, "batch_sampler", None)
    if isinstance(sampler, UniformWithReplacementSampler):
        sampler.__class__ = CsprngPoissonSampler
        sampler.generator = None
