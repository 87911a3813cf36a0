"""One round of local training with Opacus DP-SGD (or without DP), composing with past rounds.

A fresh ``PrivacyEngine`` wraps a fresh model every round (wrapping twice adds hooks twice), but
its accountant is first given the client's whole past history, so the epsilon it reports after
training is the cumulative one over all rounds the client took part in.
"""

from __future__ import annotations

import logging
import math
import warnings
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch
from opacus import PrivacyEngine
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from client.grad_sample_modes import make_private, resolve
from client.secure_noise import make_secure
from common.config import RunConfig
from common.evaluation import task_loss
from common.privacy import Mechanism, epsilon_for

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


def planned_mechanism(num_examples: int, cfg: RunConfig) -> Mechanism:
    """(noise, sample rate, steps) a round will use, exactly as Opacus' Poisson loader sets them.

    Opacus' DPDataLoader uses ``sample_rate = 1 / len(loader)`` and as many steps per epoch as
    batches, so the budget can be checked before any data is touched.
    """
    batches = math.ceil(num_examples / cfg.batch_size)
    if cfg.poisson_sampling:
        batches = int(1 / (1.0 / batches))  # Opacus' Poisson sampler: steps = int(1 / sample_rate)
    return (cfg.noise_multiplier, 1.0 / batches, cfg.local_epochs * batches)


def train_round(model: nn.Module, x: np.ndarray, y: np.ndarray | None, cfg: RunConfig,
                prior_history: list[Mechanism], seed: int) -> RoundResult:
    """Train ``model`` in place on local data for ``cfg.local_epochs`` epochs."""
    torch.manual_seed(seed)
    targets = torch.from_numpy(x) if cfg.model == "autoencoder" else torch.from_numpy(y)  # AE reconstructs
    dataset = TensorDataset(torch.from_numpy(x), targets)
    criterion = task_loss(cfg.model)
    optimizer = torch.optim.SGD(model.parameters(), lr=cfg.learning_rate, momentum=cfg.momentum)
    global_params = [p.detach().clone() for p in model.parameters()] if cfg.strategy == "fedprox" else None
    generator = torch.Generator().manual_seed(seed)

    engine = None
    if cfg.dp:
        model.train()  # Opacus refuses to wrap a model in eval mode
        # Opacus' own secure mode needs torchcsprng (no build for current torch); see client/secure_noise.py.
        engine = PrivacyEngine(accountant=cfg.accountant, secure_mode=False)
        engine.accountant.history = list(prior_history)
        private = make_private(
            engine, model=model, optimizer=optimizer, criterion=criterion,
            loader=DataLoader(dataset, batch_size=cfg.batch_size, generator=generator),
            mode=resolve(cfg.grad_sample_mode, cfg.model, model), noise_multiplier=cfg.noise_multiplier,
            max_grad_norm=cfg.max_grad_norm, poisson_sampling=cfg.poisson_sampling,
        )
        train_model, optimizer, criterion, loader = private.model, private.optimizer, private.criterion, private.loader
        if cfg.secure_mode:
            make_secure(optimizer, loader)  # CSPRNG noise and Poisson sampling
        steps_before = sum(s for _, _, s in engine.accountant.history)
    else:
        loader = DataLoader(dataset, batch_size=cfg.batch_size, shuffle=True, generator=generator)
        train_model = model

    train_model.train()
    total_loss, seen = 0.0, 0
    for _ in range(cfg.local_epochs):
        for xb, yb in loader:
            # Poisson sampling can draw an empty batch; Opacus turns it into a noise-only step.
            loss = train_step(train_model, optimizer, criterion, xb, yb)
            if global_params is not None:
                _proximal_step(model, global_params, cfg.learning_rate * cfg.proximal_mu)
            if len(xb):  # the mean loss of an empty batch is NaN
                total_loss += float(loss) * len(xb)
                seen += len(xb)
    if engine is not None:
        private.cleanup()

    if engine is None:
        steps, rate, noise, epsilon = cfg.local_epochs * len(loader), 1.0, 0.0, math.inf
    else:
        steps = sum(s for _, _, s in engine.accountant.history) - steps_before
        rate, noise = engine.accountant.history[-1][1], cfg.noise_multiplier
        epsilon = epsilon_for(engine.accountant.history, cfg.delta, cfg.accountant)
    return RoundResult(
        state_dict={k: v.detach().clone() for k, v in model.state_dict().items()},
        num_examples=len(dataset), train_loss=total_loss / max(seen, 1), steps=steps,
        sample_rate=rate, noise_multiplier=noise, epsilon=epsilon,
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
