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

import numpy as np
import torch
from opacus import PrivacyEngine
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from common.config import RunConfig
from common.evaluation import task_loss
from common.privacy import Mechanism, epsilon_for

# Opacus (re)configures loggers on import in some setups; keep Flower's at its own level.
logging.getLogger("flwr").setLevel(logging.INFO)
warnings.filterwarnings("ignore", message=".*Secure RNG turned off.*")
warnings.filterwarnings("ignore", message=".*Using a non-full backward hook.*")
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
        engine = PrivacyEngine(accountant=cfg.accountant, secure_mode=cfg.secure_mode)
        engine.accountant.history = list(prior_history)
        loader = DataLoader(dataset, batch_size=cfg.batch_size, generator=generator)
        wrapped = engine.make_private(
            module=model, optimizer=optimizer, criterion=criterion, data_loader=loader,
            noise_multiplier=cfg.noise_multiplier, max_grad_norm=cfg.max_grad_norm,
            poisson_sampling=cfg.poisson_sampling, grad_sample_mode=cfg.grad_sample_mode,
        )
        if cfg.grad_sample_mode == "ghost":
            train_model, optimizer, criterion, loader = wrapped
        else:
            train_model, optimizer, loader = wrapped
        steps_before = sum(s for _, _, s in engine.accountant.history)
    else:
        loader = DataLoader(dataset, batch_size=cfg.batch_size, shuffle=True, generator=generator)
        train_model = model

    train_model.train()
    total_loss, seen = 0.0, 0
    for _ in range(cfg.local_epochs):
        for xb, yb in loader:
            # Poisson sampling can draw an empty batch; Opacus turns it into a noise-only step.
            optimizer.zero_grad()
            loss = criterion(train_model(xb), yb)
            loss.backward()
            optimizer.step()
            if global_params is not None:
                _proximal_step(model, global_params, cfg.learning_rate * cfg.proximal_mu)
            total_loss += float(loss.detach()) * len(xb)
            seen += len(xb)

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


@torch.no_grad()
def _proximal_step(model: nn.Module, global_params: list[torch.Tensor], strength: float) -> None:
    """FedProx' pull towards the global model, applied after the private step.

    The proximal term does not touch the data, so applying it outside DP-SGD is post-processing
    and costs no privacy (Opacus' per-sample gradients would silently drop it from the loss).
    """
    for p, g in zip(model.parameters(), global_params):
        p.sub_(strength * (p - g))
