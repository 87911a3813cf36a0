"""Batch sampling for DP-SGD without Poisson sampling: a fixed partition per epoch, accounted honestly.

With ``poisson_sampling=False`` Opacus keeps the caller's loader and its accountant still books
every step as a Poisson-subsampled Gaussian, i.e. it claims amplification by sampling that fixed
batches do not have. An ordinary ``DataLoader`` is worse still under add/remove adjacency: removing
one record shifts every later record into another batch, so many steps change at once.

:class:`FixedPartitionSampler` puts every record in exactly one batch per epoch, each record's
batch drawn uniformly and independently of the others ("balls into bins"). Adding or removing a
record then changes one step of the epoch and leaves every other batch as it was, so one epoch is
at most one Gaussian mechanism with noise ``sigma`` on that record, whichever batch it fell in:
``common.accounting.round_mechanism`` books ``(sigma, 1.0, epochs)`` per round, no amplification.
An empty batch is still a step (noise only): skipping it would reveal that a record was absent.
"""

from __future__ import annotations

from typing import Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, Sampler, TensorDataset, default_collate

from fedpriv.common.csprng import csprng_uniform


class FixedPartitionSampler(Sampler[list[int]]):
    """``num_batches`` batches per epoch; each record in exactly one, chosen independently and uniformly.

    ``generator=None`` draws the assignment from the OS' CSPRNG (secure mode); otherwise from
    ``generator``, which must be independent of the noise generator.
    """

    def __init__(self, num_samples: int, num_batches: int, generator: torch.Generator | None) -> None:
        if num_samples < 1 or num_batches < 1:
            raise ValueError(f"need at least one sample and one batch (got {num_samples}, {num_batches})")
        self.num_samples, self.num_batches, self.generator = num_samples, num_batches, generator

    def _assignment(self) -> np.ndarray:
        if self.generator is None:
            return np.minimum((csprng_uniform(self.num_samples) * self.num_batches).astype(np.int64),
                              self.num_batches - 1)
        return torch.randint(0, self.num_batches, (self.num_samples,), generator=self.generator).numpy()

    def __iter__(self) -> Iterator[list[int]]:
        assignment = self._assignment()
        order = np.argsort(assignment, kind="stable")
        bounds = np.searchsorted(assignment[order], np.arange(self.num_batches + 1))
        for b in range(self.num_batches):
            yield order[bounds[b]:bounds[b + 1]].tolist()

    def __len__(self) -> int:
        return self.num_batches


def fixed_partition_loader(dataset: TensorDataset, batch_size: int, generator: torch.Generator | None) -> DataLoader:
    """A loader of ``ceil(n / batch_size)`` fixed-partition batches per epoch; empty batches keep their shape."""
    from opacus.data_loader import wrap_collate_with_empty

    n = len(dataset)
    batches = -(-n // batch_size)
    tensors = dataset.tensors
    collate = wrap_collate_with_empty(collate_fn=default_collate, sample_empty_shapes=[t.shape[1:] for t in tensors],
                                      dtypes=[t.dtype for t in tensors])
    return DataLoader(dataset, batch_sampler=FixedPartitionSampler(n, batches, generator), collate_fn=collate)
