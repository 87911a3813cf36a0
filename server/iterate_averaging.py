"""Exponential moving average of the global model's iterates (``--server-ema``).

DP noise makes consecutive global models scatter around the path the noiseless run would take;
averaging them cancels part of that scatter (Polyak-Ruppert averaging; De et al. 2022 use an EMA of
DP-SGD's iterates for most of their gain at small epsilon). The average is computed by the server
from models it already released to every client, so it is post-processing and costs no privacy.
The clients keep training the raw iterate; the server evaluates, reports and saves the average.
"""

from __future__ import annotations

import torch


class IterateAverage:
    """``average = decay * average + (1 - decay) * iterate``, started at the first iterate it sees.

    Integer buffers (none in today's models) are copied, not averaged. ``state`` is what a
    checkpoint keeps so a resumed server continues the same average.
    """

    def __init__(self, decay: float, state: dict[str, torch.Tensor] | None = None) -> None:
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"EMA decay must be in [0, 1) (got {decay})")
        self.decay = decay
        self.state = None if state is None else {k: v.detach().clone() for k, v in state.items()}

    def update(self, iterate: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Fold ``iterate`` in and return the new average (a copy the caller may keep)."""
        if self.state is None:
            self.state = {k: v.detach().clone() for k, v in iterate.items()}
        else:
            for key, value in iterate.items():
                avg = self.state[key]
                if avg.is_floating_point():
                    avg.mul_(self.decay).add_(value.to(avg.dtype), alpha=1.0 - self.decay)
                else:
                    avg.copy_(value)
        return {k: v.clone() for k, v in self.state.items()}
