"""Augmentation multiplicity (De et al. 2022): K random views of every sampled record per step.

DP-SGD clips each record's gradient, so a larger batch of *different* records buys signal only
at the price of the sampling rate. Augmentation multiplicity instead averages the gradients of K
augmented views of the same record *before* clipping: the clipped per-record gradient is less
noisy, and it is still one record's contribution of norm at most C. Nothing the accountant sees
changes (the records are sampled, the steps and the noise are as without views), which is why
the views must never be clipped one by one: K clipped views of one record would move the sum by
up to K*C. :class:`~fedpriv.client.bookkeeping.BookkeepingClipper` (``views=K``) clips each
record's K consecutive rows as one.

The views are random shifts along every spatial axis (a sequence's steps, an image's rows and
columns) of up to ``shift`` positions, the record's edge values filling what moves in (standardised
data's background is not zero), and, for images with ``flip``, a random horizontal mirror. A view
is a function of its own record and of randomness independent of the data, so it needs no secret
stream: the round's ``augment`` generator (client/dp_training.py) is its own, not the noise's.
"""

from __future__ import annotations

import torch
from torch.nn import functional as F

from fedpriv.common.errors import UserInputError


def augmented_views(x: torch.Tensor, views: int, shift: int, flip: bool, generator: torch.Generator) -> torch.Tensor:
    """``(B, C, *spatial)`` -> ``(B * views, C, *spatial)``, record-major: rows ``r*views .. r*views+views-1``
    are record ``r``'s views. Each view is shifted by an independent uniform offset in
    ``[-shift, shift]`` per spatial axis and, with ``flip`` on images, mirrored left-right with
    probability 1/2.
    """
    spatial = x.shape[2:]
    if x.dim() not in (3, 4):
        raise UserInputError(
            f"--augment-views needs sequences (C, L) or images (C, H, W) to shift, not records of shape {tuple(x.shape[1:])}; "
            "use --augment-views 1")
    out = x.repeat_interleave(views, 0)
    rows = out.shape[0]
    if shift > 0 and rows:
        padded = F.pad(out, [shift] * (2 * len(spatial)), mode="replicate")
        offsets = torch.randint(0, 2 * shift + 1, (rows, len(spatial)), generator=generator)
        for axis, size in enumerate(spatial):  # crop each axis at the row's own offset
            dim = 2 + axis
            index = offsets[:, axis].view(-1, *[1] * (padded.dim() - 1)) + torch.arange(size).view(
                *[1] * dim, size, *[1] * (padded.dim() - dim - 1))
            target = list(padded.shape)
            target[dim] = size
            padded = padded.gather(dim, index.expand(target))
        out = padded
    if flip and len(spatial) == 2 and rows:
        mirrored = torch.rand(rows, generator=generator) < 0.5
        out = torch.where(mirrored.view(-1, 1, 1, 1), out.flip(-1), out)
    return out
