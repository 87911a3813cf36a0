"""Ghost norms that float rounding cannot push below the truth.

The "ghost norm" (Goodfellow 2015; Li et al. 2022) gets a record's weight-gradient norm
``|sum_t g_t a_t^T|`` from ``sum_st (a_s . a_t)(g_s . g_t)`` without forming the gradient. Its terms
cancel whenever a record's positions (an RNN's steps, a convolution's patches, augmented views)
push opposite ways, and a cancelled float32 sum is rounding noise that may lie far below the true
value. Under local DP the server picks the weights, so it can make honest records cancel like that;
a record whose norm reads low escapes clipping while the clipped sum, computed by another product,
carries its whole gradient. The book-keeping engine (client/bookkeeping.py), the one user of ghost
norms in DP training here, clips by the certified upper bound below instead. (Opacus' ghost clipping
is refused with DP, common/config.py: it takes its norms and its clipped sum from two different
backward passes, a gap no norm formula closes.)
"""

from __future__ import annotations

import torch


def certified_ghost_sq_norms(a: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """An upper bound, tight up to rounding, on each record's squared weight-gradient norm
    ``|sum_t g_t a_t^T|^2`` from its positions' inputs ``a`` (B, T, I) and output gradients ``g`` (B, T, O).

    The ghost norm ``sum_st (a_s . a_t)(g_s . g_t)`` cancels when the positions' gradients do (views
    or steps of one record pushing opposite ways), and in floating point a cancelled sum is rounding
    noise that can lie far *below* the true norm: the record would escape clipping while the clipped
    sum, a different product, carries its full gradient. A server chooses the weights, so it can make
    honest records cancel like that (a review measured 2307 C per record on the CNN at two views).
    Hence a certified bound: every term's rounding error is at most ``gamma * |a_s||a_t||g_s||g_t|``
    (the standard bound for sums and dot products, whatever the summation order), so the true value is at most
    ``gram + gamma * M`` with ``M = (sum_t |a_t||g_t|)^2``, and ``M`` itself bounds it (triangle
    inequality) without any cancellation. Clipping by an upper bound keeps each record within C; an
    honest record, whose terms do not cancel to rounding level, is clipped by a norm a relative
    ``gamma * M / gram / 2`` too large: measured 1e-6 to 1e-4 on the project's models (well under 1e-3
    wherever ``auto`` picks this route: few positions).
    """
    positions, fan_in, fan_out = a.shape[1], a.shape[2], g.shape[2]
    unit = _unit_roundoff(a)
    # two reductions of T terms each, not one of T^2: a term's rounding then passes through at most
    # 2 (T - 1) additions whatever order PyTorch sums in, where one flat sum could take T^2 - 1
    aat, ggt = torch.bmm(a, a.transpose(1, 2)), torch.bmm(g, g.transpose(1, 2))
    gram = (aat * ggt).sum(2).sum(1).clamp(min=0)
    # M from the Grams' diagonals (|a_t|^2, |g_t|^2: no extra pass over a and g), rounded up by its
    # own rounding (dot products of length I and O, a square root, a sum of T, a square)
    sq = (aat.diagonal(dim1=1, dim2=2) * ggt.diagonal(dim1=1, dim2=2)).clamp(min=0)
    bound = sq.sqrt().sum(1).square() * (1 + 2 * (fan_in + fan_out + 2 * positions + 8) * unit)
    nu = (fan_in + fan_out + 2 * positions + 1) * unit  # dot products of length I and O, 2 T additions, a product
    if nu >= 0.5:  # too coarse for the gram to tell anything: the cancellation-free bound alone
        return bound
    return torch.minimum(bound, gram + nu / (1 - nu) * bound)


def _unit_roundoff(t: torch.Tensor) -> float:
    """The rounding unit of ``t``'s matrix products: its dtype's, or bfloat16's when PyTorch may run
    float32 matrix products in reduced precision (TF32 on CUDA, ``set_float32_matmul_precision``)."""
    unit = torch.finfo(t.dtype).eps / 2
    if t.dtype == torch.float32 and (torch.get_float32_matmul_precision() != "highest"
                                     or (t.is_cuda and torch.backends.cuda.matmul.allow_tf32)):
        unit = max(unit, torch.finfo(torch.bfloat16).eps / 2)
    return unit
