"""One round of local training with Opacus DP-SGD (or without DP), composing with past rounds.

A fresh ``PrivacyEngine`` wraps a fresh model every round (wrapping twice adds hooks twice). The
round's accounting does not come from Opacus' accountant (which books fixed batches as if they were
Poisson-sampled) but from ``common.accounting.round_mechanism``, checked against the steps that ran,
and composed with the owner's whole ledger.
"""

from __future__ import annotations

import logging
import math
import secrets
import warnings
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch
from opacus import PrivacyEngine
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from fedpriv.client.augmentation import augmented_views
from fedpriv.client.batch_sampling import fixed_partition_loader
from fedpriv.client.grad_sample_modes import make_private, resolve
from fedpriv.common.config import RunConfig
from fedpriv.common.evaluation import task_loss
from fedpriv.common.accounting import Mechanism, epsilon_for, planned_mechanism

# Opacus (re)configures loggers on import in some setups; keep Flower's at its own level.
logging.getLogger("flwr").setLevel(logging.INFO)
warnings.filterwarnings("ignore", message=".*Secure RNG turned off.*")
warnings.filterwarnings("ignore", message=".*Using a non-full backward hook.*")
# Opacus' hooks on a first layer whose input needs no gradient: expected, harmless
warnings.filterwarnings("ignore", message=".*Full backward hook is firing when gradients are computed.*")
warnings.filterwarnings("ignore", message=".*Optimal order is the (largest|smallest) alpha.*")


@dataclass
class RoundResult:
    """What one local round produced, for the reply and the ledger."""

    state_dict: dict[str, torch.Tensor]
    num_examples: int
    train_loss: float
    steps: int
    sample_rate: float
    noise_multiplier: float
    epsilon: float  # cumulative, math.inf without DP
    mechanism: Mechanism | None  # the accountant's history entry for this round; None without DP
    sampling: str  # "poisson", "fixed" or "none" (no DP)




@dataclass(frozen=True)
class RoundRandomness:
    """Independent random streams of one round: batch sampling, DP noise and augmentation.

    Sampling and noise must be independent: if the noise were drawn from the stream that chose
    the batches (as one shared seed makes it), the released noisy gradient would tell which
    records were sampled, and the amplification by sampling the accountant assumes would not
    hold. Augmented views (``--augment-views``) get a third stream, so they never shift the other
    two. Each seed is drawn separately from the OS' CSPRNG, never from the server's config.
    """

    sampler: torch.Generator
    noise: torch.Generator
    augment: torch.Generator

    @classmethod
    def from_os(cls) -> "RoundRandomness":
        """Seeds drawn separately from the OS' CSPRNG: what every real round uses."""
        return cls(*(torch.Generator().manual_seed(secrets.randbits(63)) for _ in range(3)))

    @classmethod
    def seeded(cls, seed: int) -> "RoundRandomness":
        """Reproducible streams for tests and benchmarks: independent children of one seed
        (NumPy's ``SeedSequence.spawn``), never the same seed for two."""
        return cls(*(torch.Generator().manual_seed(int(c.generate_state(1, np.uint64)[0] >> np.uint64(1)))
                     for c in np.random.SeedSequence(seed).spawn(3)))


def train_round(model: nn.Module, x: np.ndarray, y: np.ndarray | None, cfg: RunConfig,
                prior_history: list[Mechanism], rng: RoundRandomness | None = None) -> RoundResult:
    """Train ``model`` in place on local data for ``cfg.local_epochs`` epochs.

    ``cfg`` is the config this owner really runs (the owner's policy already applied). The result's
    ``mechanism`` is the accountant's history entry for what ran, and ``epsilon`` the cumulative
    epsilon of ``prior_history`` plus that entry (``cfg.delta``, ``cfg.accountant``). With
    ``cfg.augment_views`` > 1 every sampled record trains as that many augmented views whose
    gradients are averaged before clipping (client/augmentation.py): the same mechanism.
    """
    rng = rng or RoundRandomness.from_os()
    targets = torch.from_numpy(x) if cfg.model == "autoencoder" else torch.from_numpy(y)  # AE reconstructs
    dataset = TensorDataset(torch.from_numpy(x), targets)
    criterion = task_loss(cfg.model)
    optimizer = torch.optim.SGD(model.parameters(), lr=cfg.learning_rate, momentum=cfg.momentum)
    global_params = [p.detach().clone() for p in model.parameters()] if cfg.strategy == "fedprox" else None

    engine = None
    if cfg.dp:
        model.train()  # Opacus refuses to wrap a model in eval mode
        # Opacus' own secure mode needs torchcsprng (no build for current torch): secure mode is the
        # project's CSPRNG noise and sampling, built in by make_private (client/secure_noise.py).
        engine = PrivacyEngine(accountant="rdp", secure_mode=False)  # its accountant is not used: see mechanism
        if cfg.poisson_sampling:
            loader = DataLoader(dataset, batch_size=cfg.batch_size, generator=rng.sampler)
        else:
            loader = fixed_partition_loader(dataset, cfg.batch_size, None if cfg.secure_mode else rng.sampler)
        private = make_private(
            engine, model=model, optimizer=optimizer, criterion=criterion, loader=loader,
            mode=resolve(cfg.grad_sample_mode, cfg.model, model), noise_multiplier=cfg.noise_multiplier,
            max_grad_norm=cfg.max_grad_norm, poisson_sampling=cfg.poisson_sampling, noise_generator=rng.noise,
            secure_mode=cfg.secure_mode,  # CSPRNG noise and Poisson sampling
            views=cfg.augment_views,
        )
        train_model, optimizer, criterion, loader = private.model, private.optimizer, private.criterion, private.loader
    else:
        loader = DataLoader(dataset, batch_size=cfg.batch_size, shuffle=True, generator=rng.sampler)
        train_model = model

    train_model.train()
    total_loss, seen, steps = 0.0, 0, 0
    for _ in range(cfg.local_epochs):
        for xb, yb in loader:
            # Poisson sampling can draw an empty batch; Opacus turns it into a noise-only step.
            if cfg.augment_views > 1:  # record r's views are rows r*K .. r*K+K-1
                xb = augmented_views(xb, cfg.augment_views, cfg.augment_shift, cfg.augment_flip, rng.augment)
                yb = xb if cfg.model == "autoencoder" else yb.repeat_interleave(cfg.augment_views)
            loss = train_step(train_model, optimizer, criterion, xb, yb)
            steps += 1
            if global_params is not None:
                _proximal_step(model, global_params, cfg.learning_rate * cfg.proximal_mu)
            if len(xb):  # the mean loss of an empty batch is NaN
                total_loss += float(loss) * len(xb)
                seen += len(xb)
    if engine is not None:
        private.cleanup()

    if engine is None:
        rate, noise, mechanism, epsilon = 1.0, 0.0, None, math.inf
    else:
        rate, noise = 1.0 / len(loader), cfg.noise_multiplier
        mechanism = planned_mechanism(len(dataset), cfg)
        ran = (noise, rate, steps) if cfg.poisson_sampling else (noise, 1.0, cfg.local_epochs)
        if ran != mechanism:  # the plan the budget was checked with must be what ran
            raise RuntimeError(f"DP-SGD ran {ran}, but the round was planned as {mechanism}")
        epsilon = epsilon_for(list(prior_history) + [mechanism], cfg.delta, cfg.accountant)
    return RoundResult(
        state_dict={k: v.detach().clone() for k, v in model.state_dict().items()},
        num_examples=len(dataset), train_loss=total_loss / max(seen, 1), steps=steps,
        sample_rate=rate, noise_multiplier=noise, epsilon=epsilon, mechanism=mechanism,
        sampling="none" if engine is None else ("poisson" if cfg.poisson_sampling else "fixed"),
    )


def train_step(model: nn.Module, optimizer: torch.optim.Optimizer, criterion: Callable[..., Any],
               xb: torch.Tensor, yb: torch.Tensor) -> torch.Tensor:
    """One SGD step, private or not (the DP parts live in the wrapped optimizer and criterion).

    Shared with ``fedpriv bench dp-overhead`` so the benchmark times exactly this code.
    Returns the batch's mean loss, detached.
    """
    optimizer.zero_grad()
    loss = criterion(model(xb), yb)
    loss.backward()
    optimizer.step()
    return loss.detach()


@torch.no_grad()
def _proximal_step(model: nn.Module, global_params: list[torch.Tensor], strength: float) -> None:
    """FedProx' pull towards the global model, applied after the private step.

    The proximal term does not touch the data, so applying it outside DP-SGD is post-processing
    and costs no privacy (Opacus' per-sample gradients would silently drop it from the loss).
    """
    for p, g in zip(model.parameters(), global_params):
        p.sub_(strength * (p - g))
