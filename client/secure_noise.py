"""Secure mode without torchcsprng: DP noise and Poisson batch sampling from the OS' CSPRNG.

Opacus' ``secure_mode`` needs ``torchcsprng``, which has no build for current PyTorch, so
``PrivacyEngine(secure_mode=True)`` cannot start. Secure mode matters in production because
noise from a seeded Mersenne Twister or Philox stream is predictable to whoever recovers the seed,
and then the noise can be subtracted. This module keeps Opacus' own secure-mode recipe (sum of four
Gaussians halved, against floating-point attacks, Holohan & Braghin 2021) but draws every Gaussian
and every Poisson batch mask from ``os.urandom`` (getrandom(2)), the kernel's CSPRNG.

Contract: Opacus is left exactly as it was (tests/test_opacus_untouched.py). The CSPRNG comes in
through the project's own objects, never by replacing Opacus' module functions or swapping an
object's ``__class__``: other code in the same process (another library, a test, a notebook) that
uses Opacus' optimizers or samplers must get Opacus' behaviour, and Opacus' own code stays the
reference the project's subclasses are checked against. So:

* :class:`CsprngDPOptimizer` and :class:`CsprngDPOptimizerFastGradientClipping` are Opacus' two
  optimizer families with ``add_noise`` overridden: with ``secure_mode=True`` they draw the noise
  here; otherwise they are Opacus' own, draw for draw (the first also lets a record with a
  non-finite gradient norm add zero instead of NaN). :data:`CSPRNG_OPTIMIZERS` maps Opacus' class
  to the project's; ``client.grad_sample_modes.make_private`` builds them.
* :class:`CsprngPoissonSampler` is Opacus' Poisson sampler with CSPRNG coin flips, and
  :func:`csprng_poisson_loader` the Poisson loader built around it (Opacus' ``DPDataLoader``
  hard-wires its own sampler class).
"""

from __future__ import annotations

import math

import torch
from opacus.data_loader import dtype_safe, shape_safe, wrap_collate_with_empty
from opacus.optimizers import DPOptimizer, DPOptimizerFastGradientClipping
from opacus.optimizers.optimizer import _check_processed_flag, _mark_as_processed
from opacus.utils.uniform_sampler import UniformWithReplacementSampler
from torch.utils.data import DataLoader, IterableDataset, default_collate

from fedpriv.common.csprng import csprng_standard_normal, csprng_uniform  # noqa: F401 - csprng_uniform re-exported

def csprng_normal(shape: torch.Size | tuple[int, ...], std: float, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Gaussian noise N(0, std^2) by Box-Muller on CSPRNG uniforms (``common.csprng``)."""
    return torch.from_numpy(csprng_standard_normal(math.prod(shape)) * std).to(dtype).reshape(shape)


def secure_noise(std: float, reference: torch.Tensor) -> torch.Tensor:
    """Opacus' secure-mode noise (four Gaussians summed and halved) with CSPRNG Gaussians."""
    if std == 0:
        return torch.zeros_like(reference)
    total = sum(csprng_normal(reference.shape, std, reference.dtype) for _ in range(4))
    return (total / 2).to(reference.device)


class CsprngNoise:
    """Mixin for an Opacus DP optimizer: in secure mode, ``add_noise`` draws from the OS' CSPRNG.

    Opacus' ``add_noise`` draws from ``self.generator`` (torchcsprng's in Opacus' secure mode);
    this one is the same loop (processed-flag checks, ``p.grad = summed + noise``) with
    :func:`secure_noise`. Out of secure mode it is Opacus' own ``add_noise``, so the plain path
    draws exactly what Opacus draws.
    """

    def _noise_std(self) -> float:
        return self.noise_multiplier * self.max_grad_norm  # DPOptimizer.add_noise

    def add_noise(self) -> None:
        if not self.secure_mode:
            super().add_noise()
            return
        std = self._noise_std()
        for p in self.params:
            _check_processed_flag(p.summed_grad)
            p.grad = (p.summed_grad + secure_noise(std, p.summed_grad)).view_as(p)
            _mark_as_processed(p.summed_grad)


class CsprngDPOptimizer(CsprngNoise, DPOptimizer):
    """Opacus' ``DPOptimizer`` (hooks, functorch, ew) whose secure mode draws from the OS' CSPRNG.

    Also: a record whose per-sample gradient norm is not finite (weights a server chose to overflow
    its activations) adds zero. Opacus would turn its clip factor, and the whole step, into NaN; the
    server drops a NaN update and so learns that such a record was sampled, a bit the noise does not
    cover (the book-keeping engine does the same: client/bookkeeping.py ``_without``).
    """

    def clip_and_accumulate(self) -> None:
        samples = self.grad_samples  # one step's per-sample gradients: the tensors Opacus reads next
        if len(samples[0]):
            norms = torch.stack([g.reshape(len(g), -1).norm(2, dim=-1) for g in samples], dim=1).norm(2, dim=1)
            dropped = ~torch.isfinite(norms)
            if dropped.any():
                for g in samples:
                    g[dropped] = 0
        super().clip_and_accumulate()


class CsprngDPOptimizerFastGradientClipping(CsprngNoise, DPOptimizerFastGradientClipping):
    """Opacus' ghost-clipping optimizer (and the book-keeping one's base) with CSPRNG secure mode."""

    def _noise_std(self) -> float:
        # DPOptimizerFastGradientClipping.add_noise: adaptive clipping's multiplier when one is set
        return getattr(self, "_adjusted_noise_multiplier", self.noise_multiplier) * self.max_grad_norm


# The optimizer class Opacus' get_optimizer_class picks -> the project's subclass built instead.
CSPRNG_OPTIMIZERS: dict[type[DPOptimizer], type[DPOptimizer]] = {
    DPOptimizer: CsprngDPOptimizer,
    DPOptimizerFastGradientClipping: CsprngDPOptimizerFastGradientClipping,
}


class CsprngPoissonSampler(UniformWithReplacementSampler):
    """Opacus' Poisson batch sampler with its coin flips drawn from the OS' CSPRNG (``generator`` unused)."""

    def __iter__(self):  # noqa: ANN204
        for _ in range(self.steps):
            mask = torch.from_numpy(csprng_uniform(self.num_samples) < self.sample_rate)
            yield mask.nonzero(as_tuple=False).reshape(-1).tolist()


def csprng_poisson_loader(data_loader: DataLoader, *, batch_first: bool = True,
                          rand_on_empty: bool = False) -> DataLoader:
    """Opacus' ``DPDataLoader.from_data_loader(data_loader)`` with :class:`CsprngPoissonSampler`.

    The same loader as Opacus builds (sample rate ``1 / len(data_loader)``, ``int(1 / rate)`` steps,
    Opacus' collate wrapper for empty batches, the caller's loader settings; ``drop_last`` ignored
    as Opacus ignores it), built by the project: ``DPDataLoader`` creates its sampler itself, and a
    ``DataLoader``'s sampler cannot be replaced once it is built.
    """
    if isinstance(data_loader.dataset, IterableDataset):
        raise ValueError("Uniform sampling is not supported for IterableDataset")
    dataset = data_loader.dataset
    sampler = CsprngPoissonSampler(num_samples=len(dataset), sample_rate=1 / len(data_loader))
    collate = wrap_collate_with_empty(
        collate_fn=data_loader.collate_fn or default_collate, batch_first=batch_first, rand_on_empty=rand_on_empty,
        sample_empty_shapes=[(0, *shape_safe(x)) for x in dataset[0]], dtypes=[dtype_safe(x) for x in dataset[0]],
    )
    return DataLoader(
        dataset, batch_sampler=sampler, collate_fn=collate, num_workers=data_loader.num_workers,
        pin_memory=data_loader.pin_memory, timeout=data_loader.timeout, worker_init_fn=data_loader.worker_init_fn,
        multiprocessing_context=data_loader.multiprocessing_context, generator=data_loader.generator,
        prefetch_factor=data_loader.prefetch_factor, persistent_workers=data_loader.persistent_workers,
    )
