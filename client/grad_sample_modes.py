"""Per-sample-gradient modes: which one ``auto`` means, and one ``make_private`` for all of them.

Every mode computes the same exact clipped sum (tests/test_dp_speed.py checks them against a
one-sample-at-a-time loop); they differ in speed and in the layers they support. ``auto`` is a
fixed choice per model family, taken from ``fedpriv bench dp-overhead``: book-keeping was the
fastest mode for every family and input shape there (batch 128, 1 and 2 threads: 1.4-3x
faster than the fastest Opacus mode, which differs per model). A fixed choice keeps every client of a federation on the same code path and
costs no calibration time per round; a model with a layer book-keeping does not cover falls back
to Opacus' hooks, which cover the most layer types.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
from opacus import PrivacyEngine
from opacus.optimizers import DPOptimizerFastGradientClipping
from opacus.optimizers.optimizer import _check_processed_flag, _mark_as_processed
from torch import nn
from torch.optim import Optimizer
from torch.utils.data import DataLoader

from client.bookkeeping import BookkeepingClipper, BookkeepingLoss, per_sample_loss, supports
from common.config import GRAD_SAMPLE_MODES

MODES = tuple(m for m in GRAD_SAMPLE_MODES if m != "auto")  # concrete modes; "auto" picks one

# Fastest exact mode per model family, and the fallback (see the module docstring).
AUTO_BY_MODEL = {"cnn": "bookkeeping", "rnn": "bookkeeping", "autoencoder": "bookkeeping"}
AUTO_FALLBACK = "hooks"


def resolve(mode: str, model_name: str, model: nn.Module | None = None) -> str:
    """The concrete mode to run: ``mode`` itself, or for ``auto`` the family's measured best."""
    if mode != "auto":
        return mode
    choice = AUTO_BY_MODEL.get(model_name, AUTO_FALLBACK)
    if choice == "bookkeeping" and model is not None and not supports(model):
        return AUTO_FALLBACK
    return choice


class PerSampleCriterion(nn.Module):
    """A mean-reduced criterion whose ``reduction='none'`` form gives one loss per sample.

    Opacus' ghost clipping evaluates the criterion with ``reduction='none'`` and expects a loss per
    sample; a reconstruction loss gives one per element (the autoencoder's MSE), which Opacus
    cannot back-propagate. Per-sample means are what the hook modes differentiate too.
    """

    def __init__(self, criterion: nn.Module) -> None:
        super().__init__()
        self.criterion = criterion
        self.reduction = criterion.reduction

    def forward(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        losses = per_sample_loss(self.criterion, output, target)
        return losses if self.reduction == "none" else losses.mean()


class _BookkeepingDPOptimizer(DPOptimizerFastGradientClipping):
    """Opacus' optimizer for already-clipped gradients, with fewer passes over the gradients.

    The digits autoencoder's whole non-private step is about 1.4 ms, so per-step bookkeeping shows:

    * Opacus copies every ``p.grad`` into ``p.summed_grad`` with ``copy.deepcopy`` (1.6 ms per step
      under cProfile). Book-keeping hands over a fresh tensor each step, so it is moved, not copied;
      ``p.grad`` is cleared so that ``zero_grad`` cannot zero the moved tensor in place.
    * Opacus draws noise into a new tensor after zero-filling another, adds, then divides by the
      expected batch size in a third pass. Here the noise is drawn at its final scale,
      ``N(0, (sigma C / B)^2)``, and the clipped sum is added scaled by ``1 / B``: the same
      distribution as ``(sum + N(0, (sigma C)^2)) / B``, from the same generator draws.

    Secure mode keeps Opacus' own order (noise at full scale, then the division), so the
    floating-point-attack-resistant noise of client/secure_noise.py is used exactly as Opacus does.
    Skipping, accounting hooks and the generator are Opacus' own.
    """

    def accumulate(self) -> None:
        for p in self.params:
            if p.summed_grad is not None:
                p.summed_grad.add_(p.grad)
            else:
                p.summed_grad, p.grad = p.grad, None

    def add_noise(self) -> None:
        """Set ``p.grad`` to the noisy *averaged* gradient (``scale_grad`` then has nothing left to do)."""
        if self.secure_mode or self.loss_reduction != "mean":
            super().add_noise()
            super().scale_grad()
            return
        scale = 1.0 / (self.expected_batch_size * self.accumulated_iterations)
        std = getattr(self, "_adjusted_noise_multiplier", self.noise_multiplier) * self.max_grad_norm * scale
        for p in self.params:
            _check_processed_flag(p.summed_grad)
            noisy = torch.empty_like(p.summed_grad)
            if std > 0:
                noisy.normal_(0.0, std, generator=self.generator)
            else:
                noisy.zero_()
            p.grad = noisy.add_(p.summed_grad, alpha=scale).view_as(p)
            _mark_as_processed(p.summed_grad)

    def scale_grad(self) -> None:
        """Done in ``add_noise``."""


@dataclass
class PrivateTraining:
    """What a DP training loop uses: ``criterion(model(x), y).backward(); optimizer.step()``."""

    model: nn.Module
    optimizer: Optimizer
    criterion: Callable[..., Any]
    loader: DataLoader
    mode: str
    cleanup: Callable[[], None]  # detaches hooks so the plain model can be wrapped again


def make_private(engine: PrivacyEngine, *, model: nn.Module, optimizer: Optimizer, criterion: nn.Module,
                 loader: DataLoader, mode: str, noise_multiplier: float, max_grad_norm: float,
                 poisson_sampling: bool, noise_generator: torch.Generator | None = None) -> PrivateTraining:
    """Opacus' ``make_private`` for a concrete ``mode``, including the book-keeping one.

    For ``bookkeeping`` Opacus still builds the Poisson loader, the noise-adding
    ``DPOptimizerFastGradientClipping`` (it expects ``p.grad`` to hold the clipped sum) and the
    accountant hook, through ghost mode; only Opacus' two-pass hooks are swapped for ours.
    ``noise_generator`` is the noise's own stream (Opacus falls back to PyTorch's global one).
    """
    opacus_mode = "ghost" if mode == "bookkeeping" else mode
    if mode == "ghost":
        criterion = PerSampleCriterion(criterion)
    wrapped = engine.make_private(
        module=model, optimizer=optimizer, criterion=criterion, data_loader=loader,
        noise_multiplier=noise_multiplier, max_grad_norm=max_grad_norm,
        poisson_sampling=poisson_sampling, grad_sample_mode=opacus_mode,
        wrap_model=mode != "bookkeeping", noise_generator=noise_generator,
    )
    if mode == "bookkeeping":
        opacus_hooks, dp_optimizer, _, dp_loader = wrapped
        opacus_hooks.cleanup()
        if type(dp_optimizer) is DPOptimizerFastGradientClipping:
            dp_optimizer.__class__ = _BookkeepingDPOptimizer  # same state, three methods overridden
        clipper = BookkeepingClipper(model, max_grad_norm)
        return PrivateTraining(model, dp_optimizer, BookkeepingLoss(clipper, criterion), dp_loader, mode,
                               clipper.remove)
    if mode == "ghost":
        module, dp_optimizer, dp_criterion, dp_loader = wrapped
    else:
        module, dp_optimizer, dp_loader = wrapped
        dp_criterion = criterion
    return PrivateTraining(module, dp_optimizer, dp_criterion, dp_loader, mode, module._close)
