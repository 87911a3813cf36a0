"""Cohorts sampled with the operating system's CSPRNG, so amplification by sampling can be claimed.

Amplification by sampling (the privacy a client gains from not being in every round's cohort) holds
only against someone who cannot tell who was sampled. Flower's strategies sample with Python's
``random.sample``: a Mersenne Twister, whose future (and past) outputs follow from 624 observed ones
or from its seed, so the cohort is predictable. We do not patch Flower. Instead the strategy hands
Flower's sampler a view of the grid whose node list is freshly shuffled with ``secrets.SystemRandom``
(``os.urandom``, the kernel's CSPRNG) on every call. ``random.sample`` picks *positions*; whatever
positions a known or recovered Mersenne Twister state picks, the nodes at those positions of a
uniformly random permutation are a uniformly random cohort. The cohort therefore depends on the OS
CSPRNG alone, and Flower's own sample-size rule, waiting for nodes and logging stay as they are.
"""

from __future__ import annotations

import secrets
from functools import cache
from typing import Any, Iterable

from flwr.app import ArrayRecord, ConfigRecord, Message
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg

_CSPRNG = secrets.SystemRandom()


class CsprngShuffledGrid:
    """A grid whose ``get_node_ids`` lists the connected nodes in a fresh CSPRNG-random order.

    Everything else is the wrapped grid's: only the order in which Flower's sampler sees the nodes
    changes, never which nodes exist or how messages travel.
    """

    def __init__(self, grid: Grid) -> None:
        self._grid = grid

    def get_node_ids(self) -> list[int]:
        nodes = list(self._grid.get_node_ids())
        _CSPRNG.shuffle(nodes)
        return nodes

    def __getattr__(self, name: str) -> Any:
        return getattr(self._grid, name)


class SecretCohortSampling:
    """Mixin for Flower's FedAvg family: cohorts for training and evaluation drawn from the OS CSPRNG.

    Put it first among the bases (``class X(SecretCohortSampling, FedProx)``), or use ``secret_cohort``.
    """

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        return super().configure_train(server_round, arrays, config, CsprngShuffledGrid(grid))

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                           grid: Grid) -> Iterable[Message]:
        return super().configure_evaluate(server_round, arrays, config, CsprngShuffledGrid(grid))


@cache
def secret_cohort(strategy_class: type[FedAvg]) -> type[FedAvg]:
    """``strategy_class`` (a Flower FedAvg subclass) sampling its cohorts with the OS CSPRNG."""
    if issubclass(strategy_class, SecretCohortSampling):
        return strategy_class
    return type(strategy_class.__name__, (SecretCohortSampling, strategy_class),
                {"__doc__": f"Flower's {strategy_class.__name__}, cohorts sampled with the OS CSPRNG.",
                 "__module__": __name__})


def samples_secretly(strategy: object) -> bool:
    """Whether the strategy that samples the cohorts (under any ``.strategy`` wrappers) uses the CSPRNG."""
    seen = set()
    while not isinstance(strategy, FedAvg) and hasattr(strategy, "strategy") and id(strategy) not in seen:
        seen.add(id(strategy))
        strategy = strategy.strategy
    return isinstance(strategy, SecretCohortSampling)
