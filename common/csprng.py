"""Draws from the operating system's CSPRNG (``os.urandom``, i.e. getrandom(2)), for secure mode.

One place for the client's DP-SGD noise and batch masks (client/secure_noise.py,
client/batch_sampling.py) and the server's central-DP noise (server/central_dp.py). A seeded
Mersenne Twister or Philox stream is predictable to whoever recovers its seed, and then the noise
can be subtracted; the kernel's CSPRNG cannot be seeded. ``os.urandom`` is looked up per call.
"""

from __future__ import annotations

import math
import os

import numpy as np

_TWO_POW_MINUS_53 = 2.0**-53


def csprng_uniform(n: int) -> np.ndarray:
    """``n`` floats uniform in [0, 1), 53 random bits each."""
    raw = np.frombuffer(os.urandom(8 * n), dtype=np.uint64)
    return (raw >> np.uint64(11)).astype(np.float64) * _TWO_POW_MINUS_53


def csprng_standard_normal(n: int) -> np.ndarray:
    """``n`` N(0, 1) draws (float64) by Box-Muller on CSPRNG uniforms."""
    half = (n + 1) // 2
    radius = np.sqrt(-2.0 * np.log(1.0 - csprng_uniform(half)))  # 1 - u in (0, 1]: the log is finite
    angle = 2.0 * np.pi * csprng_uniform(half)
    return np.concatenate([radius * np.cos(angle), radius * np.sin(angle)])[:n]


def csprng_gaussian(shape: tuple[int, ...], std: float) -> np.ndarray:
    """N(0, std^2) noise of ``shape`` (float64) with Opacus' secure-mode recipe: four Gaussians summed
    and halved, against floating-point attacks (Holohan & Braghin 2021)."""
    shape = tuple(shape)
    total = sum(csprng_standard_normal(math.prod(shape)) for _ in range(4)) / 2.0
    return (total * std).reshape(shape)
