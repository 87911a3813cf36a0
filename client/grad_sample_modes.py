"""Per-sample-gradient modes: which one ``auto`` means, and one ``make_private`` for all of them.

Every mode computes the same exact clipped sum (tests/test_dp_speed.py checks them against a
one-sample-at-a-time loop); they differ in speed and in the layers they support. ``auto`` is a
fixed choice per model family, taken from ``fedpriv bench dp-overhead``: book-keeping was the
fastest mode for every family and input shape there (batch 128, 1 and 2 threads: 1.4-3x
faster than the fastest Opacus mode, which differs per model). A fixed choice keeps every client of a federation on the same code path and
costs no calibration time per round; a model with a layer book-keeping does not cover falls back
to Opacus' hooks, which cover the most layer types.

Opacus is left as it was (tests/test_opacus_untouched.py): the project's optimizers (book-keeping,
CSPRNG secure mode) and its secure Poisson loader are built in place of Opacus' by a
``PrivacyEngine`` subclass that overrides Opacus' two factory methods, never by replacing Opacus'
functions or swapping an object's ``__class__`` after Opacus built it. Other code in the process
that uses Opacus gets Opacus.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any, Callable

import torch
from opacus import PrivacyEngine
from opacus.accountants.accountant import IAccountant
from opacus.optimizers import DPOptimizer, get_optimizer_class
from opacus.optimizers.optimizer import _check_processed_flag, _mark_as_processed
from torch import nn
from torch.optim import Optimizer
from torch.utils.data import DataLoader

from fedpriv.client.bookkeeping import BookkeepingClipper, BookkeepingLoss, per_sample_loss, supports
from fedpriv.client.secure_noise import CSPRNG_OPTIMIZERS, CsprngDPOptimizerFastGradientClipping, csprng_poisson_loader
from fedpriv.common.config import GRAD_SAMPLE_MODES

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


class _BookkeepingDPOptimizer(CsprngDPOptimizerFastGradientClipping):
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
    Skipping, accounting hooks and the generator are Opacus' own. ``make_private`` has Opacus'
    ``make_private`` construct this class (:class:`_ProjectEngine`), with the arguments Opacus gives
    its own ghost-clipping optimizer.
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


class _ProjectEngine(PrivacyEngine):
    """Opacus' ``PrivacyEngine`` building the project's optimizer and, in secure mode, Poisson loader.

    Opacus' ``make_private`` takes neither an optimizer class (``_prepare_optimizer`` picks one
    with ``get_optimizer_class``) nor a batch sampler (``DPDataLoader`` creates its own). This
    subclass overrides just those two factory methods, for its own instances: validation, the
    model's hooks, the expected batch size, the accountant's step hook and ghost clipping's
    criterion (which holds the optimizer) stay Opacus' ``make_private``, unchanged.

    * The optimizer is ``optimizer_class`` (book-keeping) or the project's subclass of the class
      Opacus would pick (client/secure_noise.py), constructed with exactly the arguments Opacus'
      ``_prepare_optimizer`` passes. ``secure_mode`` means the project's CSPRNG noise (Opacus'
      own secure mode needs torchcsprng, so Opacus' ``secure_mode`` stays off), and then no
      generator, as in Opacus' secure mode.
    * A Poisson loader in secure mode is ``csprng_poisson_loader``; otherwise Opacus' own.

    Its accountant is the caller's engine's, so the steps are recorded where they were before.
    """

    def __init__(self, accountant: IAccountant, *, optimizer_class: type[DPOptimizer] | None = None,
                 secure_mode: bool = False) -> None:
        with warnings.catch_warnings():  # Opacus warns that its (torchcsprng) secure mode is off
            warnings.filterwarnings("ignore", message=".*Secure RNG turned off.*")
            super().__init__(accountant="rdp", secure_mode=False)
        self.accountant = accountant
        self.optimizer_class = optimizer_class
        self.csprng = secure_mode

    def _prepare_optimizer(self, *, optimizer: Optimizer, noise_multiplier: float, max_grad_norm: float,
                           expected_batch_size: int, loss_reduction: str = "mean", distributed: bool = False,
                           clipping: str = "flat", noise_generator: torch.Generator | None = None,
                           grad_sample_mode: str = "hooks", **kwargs: Any) -> DPOptimizer:
        if isinstance(optimizer, DPOptimizer):
            optimizer = optimizer.original_optimizer
        opacus_class = get_optimizer_class(clipping=clipping, distributed=distributed, grad_sample_mode=grad_sample_mode)
        optim_class = self.optimizer_class or CSPRNG_OPTIMIZERS.get(opacus_class)
        if optim_class is None or not issubclass(optim_class, opacus_class):
            raise ValueError(f"fedpriv has no optimizer for Opacus' {opacus_class.__name__} "
                             f"(clipping={clipping}, distributed={distributed}, grad_sample_mode={grad_sample_mode})")
        return optim_class(
            optimizer=optimizer, noise_multiplier=noise_multiplier, max_grad_norm=max_grad_norm,
            expected_batch_size=expected_batch_size, loss_reduction=loss_reduction,
            generator=None if self.csprng else noise_generator, secure_mode=self.csprng, **kwargs,
        )

    def _prepare_data_loader(self, data_loader: DataLoader, *, poisson_sampling: bool, distributed: bool,
                             batch_first: bool = True, rand_on_empty: bool = False) -> DataLoader:
        if poisson_sampling and self.csprng:
            if distributed:
                raise ValueError("fedpriv's CSPRNG Poisson loader is not distributed")
            return csprng_poisson_loader(data_loader, batch_first=batch_first, rand_on_empty=rand_on_empty)
        # Without Poisson sampling the caller's loader is used as it is (a fixed-partition loader
        # draws from the CSPRNG itself in secure mode: client/batch_sampling.py).
        return super()._prepare_data_loader(data_loader, poisson_sampling=poisson_sampling, distributed=distributed,
                                            batch_first=batch_first, rand_on_empty=rand_on_empty)


def make_private(engine: PrivacyEngine, *, model: nn.Module, optimizer: Optimizer, criterion: nn.Module,
                 loader: DataLoader, mode: str, noise_multiplier: float, max_grad_norm: float,
                 poisson_sampling: bool, noise_generator: torch.Generator | None = None,
                 secure_mode: bool = False, views: int = 1) -> PrivateTraining:
    """Opacus' ``make_private`` for a concrete ``mode``, including the book-keeping one.

    For ``bookkeeping`` Opacus still builds the Poisson loader, the noise-adding optimizer for
    already-clipped gradients (``_BookkeepingDPOptimizer``, a ``DPOptimizerFastGradientClipping``)
    and the accountant hook, through ghost mode; only Opacus' two-pass hooks are swapped for ours.
    ``noise_generator`` is the noise's own stream (Opacus falls back to PyTorch's global one).
    ``secure_mode``: noise and Poisson sampling from the OS' CSPRNG (client/secure_noise.py); the
    generator is then unused. ``engine`` contributes its accountant, which records the steps; the
    objects are built by :class:`_ProjectEngine`, which leaves Opacus untouched.
    ``views`` > 1 (augmentation multiplicity, client/augmentation.py): each record arrives as that
    many consecutive rows, clipped as one; only book-keeping groups them, so any other mode is
    refused rather than clipping every view alone (K times the sensitivity).
    """
    if views > 1 and mode != "bookkeeping":
        raise ValueError(f"--augment-views {views} needs the bookkeeping grad-sample mode (got {mode}): "
                         "Opacus' modes would clip each view as a record of its own")
    opacus_mode = "ghost" if mode == "bookkeeping" else mode
    if mode == "ghost":
        criterion = PerSampleCriterion(criterion)
    builder = _ProjectEngine(engine.accountant, secure_mode=secure_mode,
                             optimizer_class=_BookkeepingDPOptimizer if mode == "bookkeeping" else None)
    wrapped = builder.make_private(
        module=model, optimizer=optimizer, criterion=criterion, data_loader=loader,
        noise_multiplier=noise_multiplier, max_grad_norm=max_grad_norm,
        poisson_sampling=poisson_sampling, grad_sample_mode=opacus_mode,
        wrap_model=mode != "bookkeeping", noise_generator=None if secure_mode else noise_generator,
    )
    if mode == "bookkeeping":
        opacus_hooks, dp_optimizer, _, dp_loader = wrapped
        opacus_hooks.cleanup()
        clipper = BookkeepingClipper(model, max_grad_norm, views)
        return PrivateTraining(model, dp_optimizer, BookkeepingLoss(clipper, criterion), dp_loader, mode,
                               clipper.remove)
    if mode == "ghost":
        module, dp_optimizer, dp_criterion, dp_loader = wrapped
    else:
        module, dp_optimizer, dp_loader = wrapped
        dp_criterion = criterion
    return PrivateTraining(module, dp_optimizer, dp_criterion, dp_loader, mode, module._close)
