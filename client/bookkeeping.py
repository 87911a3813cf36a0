"""Exact DP-SGD clipping in one backward pass ("book-keeping", Bu et al. 2023).

Opacus' modes either materialise every per-sample gradient of every layer (hooks, functorch, ew)
or run two backward passes (ghost). Here one forward pass stores each trainable layer's input,
one ``torch.autograd.grad`` call returns the gradient of the summed per-sample loss at each
layer's *output* (autograd then skips every weight gradient), and per layer:

* the per-sample gradient norm comes from whichever exact formula is cheaper for its shape:
  the "ghost norm" ``<a a^T, g g^T>`` (for a dense layer without a sequence axis simply
  ``|a|^2 |g|^2``; for a convolution over unfolded patches) or the explicit per-sample gradient
  (``g^T a``; for a convolution from unfolded patches, or from one call of PyTorch's
  weight-gradient kernel with the batch stacked into channel groups);
* the clipped sum ``sum_i c_i g_i^T a_i``, with Opacus' clip factors
  ``c_i = min(1, C / (|grad_i| + 1e-6))``, is one matrix product of the stored activations with
  the scaled output gradients, or a weighted sum of the explicit per-sample gradients.

A ghost norm is a sum of terms that cancel when a record's positions (steps, patches, views) push
opposite ways; rounded in float32 it can then fall far below the true norm, and a server that
chooses the weights can arrange that for honest records. So every ghost norm is replaced by a
certified upper bound (:func:`~fedpriv.client.ghost_norm.certified_ghost_sq_norms`): no rounding lets a record move the clipped sum by
more than C, and honest records are clipped by a norm at most about 1e-4 (relative) too large.

``p.grad`` then holds the clipped sum, exact up to the rounding of its own product; Opacus' ``DPOptimizerFastGradientClipping`` adds the
noise and divides by the expected batch size, and Opacus' Poisson loader and accountant stay in
charge of sampling and accounting. Layers covered: ``nn.Linear`` (and Opacus' ``RNNLinear``, which
``DPGRU`` and ``DPLSTM`` call once per time step: the calls form the sequence axis), ``nn.Conv1d`` and
``nn.Conv2d`` with numeric zero padding. A model with any other trainable layer, or with weights
shared between layers, is not supported (:func:`supports`); the caller picks an Opacus mode then.

Augmentation multiplicity (``views`` > 1, client/augmentation.py): the batch holds ``views``
consecutive rows per record, and a record's loss is the mean of its views' losses. Its gradient,
the mean of its views' gradients, is clipped *as one*: every layer regroups a record's views as
extra positions of one sample (a dense layer's ``(B*K, T, I)`` becomes ``(B, K*T, I)``; a
convolution's patches and output gradients concatenate the views' positions; explicit per-view
gradients are summed per record). The clipped sum therefore still moves by at most C per record,
the sensitivity the accountant assumes; clipping each view alone would allow K*C.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Iterable

import torch
from opacus.layers.dp_rnn import RNNLinear
from torch import nn

from fedpriv.client.ghost_norm import certified_ghost_sq_norms

_CONVS = (nn.Conv1d, nn.Conv2d)
_LAYERS = (nn.Linear, RNNLinear, *_CONVS)
GROUPED_MIN_PATCHES = 32 * 1024  # see _conv_route
CLIP_EPS = 1e-6  # Opacus' clip factor: C / (norm + 1e-6), capped at 1


def _layers_and_problems(model: nn.Module) -> tuple[list[nn.Module], list[str]]:
    """The layers to hook, and why any trainable parameter lies outside them (empty: supported).

    Exact types only: a subclass may use its weight without calling its own forward (e.g. the
    output projection of ``nn.MultiheadAttention``), which the hooks would never see. A
    parameter shared by two layers (tied weights) is refused: its per-sample gradient is the sum
    of both layers' parts, whose norms do not add.
    """
    layers, problems, covered = [], [], set()
    for module in model.modules():
        own = [p for p in module.parameters(recurse=False) if p.requires_grad]
        if type(module) not in _LAYERS or not own:
            continue
        if isinstance(module, _CONVS) and (isinstance(module.padding, str) or module.padding_mode != "zeros"):
            problems.append(f"{type(module).__name__} with string padding or padding_mode != 'zeros'")
            continue
        if any(id(p) in covered for p in own):
            problems.append("a parameter shared by two layers")
            continue
        layers.append(module)
        covered.update(id(p) for p in own)
    for module in model.modules():
        if any(p.requires_grad and id(p) not in covered for p in module.parameters(recurse=False)):
            problems.append(f"trainable {type(module).__name__}")
    return layers, sorted(set(problems))


def supports(model: nn.Module) -> bool:
    """Whether every trainable parameter of ``model`` sits in a layer this module can clip."""
    return not _layers_and_problems(model)[1]


@dataclass
class _Contribution:
    """One layer's part of a step: squared per-sample gradient norms, and its clipped sums."""

    sq_norms: torch.Tensor  # (B,)
    clipped_sums: Callable[[torch.Tensor], list[tuple[torch.Tensor, torch.Tensor]]]  # coef -> (param, grad)


class BookkeepingClipper:
    """Forward hooks on ``model``'s layers plus the single-pass clipped backward."""

    def __init__(self, model: nn.Module, max_grad_norm: float, views: int = 1) -> None:
        self.layers, problems = _layers_and_problems(model)
        if problems:
            raise ValueError(f"book-keeping clipping does not support: {', '.join(problems)}")
        if views < 1:
            raise ValueError(f"views must be a positive integer (got {views})")
        self.max_grad_norm = float(max_grad_norm)
        self.views = int(views)  # consecutive rows per record (augmentation multiplicity); 1 = off
        self.per_sample_norms: torch.Tensor | None = None  # of the last step, for tests and debugging
        self._calls: dict[nn.Module, list[tuple[torch.Tensor, torch.Tensor]]] = {}
        self._handles = [m.register_forward_hook(self._capture) for m in self.layers]
        # a new forward pass starts a new step: drop what an abandoned pass left behind
        self._handles.append(model.register_forward_pre_hook(lambda *_: self.discard()))

    def _capture(self, module: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
        if module.training and torch.is_grad_enabled() and output.requires_grad:
            self._calls.setdefault(module, []).append((inputs[0].detach(), output))

    def remove(self) -> None:
        """Detach the hooks (the model is plain again)."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._calls.clear()

    def discard(self) -> None:
        """Forget the activations of a forward pass that will not be back-propagated."""
        self._calls.clear()

    def _parts(self, layer_calls: dict) -> list[_Contribution]:
        return [(_conv if isinstance(m, _CONVS) else _linear)(m, recs, self.views) for m, recs in layer_calls.items()]

    def backward(self, loss_per_sample: torch.Tensor) -> None:
        """Set every trainable ``p.grad`` to the sum over the batch of clipped per-sample gradients.

        ``loss_per_sample`` has one entry per record; with ``views`` > 1 the forward pass saw
        ``views`` consecutive rows per record and each entry is the mean of its views' losses.
        """
        calls, self._calls = self._calls, {}
        batch = loss_per_sample.shape[0]
        done: set[nn.Module] = set()
        if batch and calls:  # Poisson sampling may draw an empty batch: its clipped sum is zero
            rows = {a.shape[0] for recs in calls.values() for a, _ in recs}
            if rows != {batch * self.views}:
                raise ValueError(f"book-keeping expected {self.views} rows per record for {batch} records, "
                                 f"the layers saw {sorted(rows)}")
            outputs = [out for recs in calls.values() for _, out in recs]
            grads = iter(torch.autograd.grad(loss_per_sample.sum(), outputs, materialize_grads=True))
            with torch.no_grad():
                layer_calls = {m: [(a.detach(), next(grads)) for a, _ in recs] for m, recs in calls.items()}
                parts = self._parts(layer_calls)
                norms = clip_norms = torch.stack([part.sq_norms for part in parts]).sum(0).sqrt()
                finite = torch.isfinite(norms)
                if not finite.all():  # such records add zero (their rows zeroed: norm 0): see _without
                    parts = self._parts(_without(layer_calls, ~finite, self.views))
                    clip_norms = torch.stack([part.sq_norms for part in parts]).sum(0).sqrt()
                coef = (self.max_grad_norm / (clip_norms + CLIP_EPS)).clamp(max=1.0)  # Opacus' clip factor
                for part in parts:
                    for param, grad in part.clipped_sums(coef):
                        _set_grad(param, grad)
            done = set(calls)
        else:
            norms = loss_per_sample.detach().new_zeros(batch)
        self.per_sample_norms = norms.detach()
        for module in self.layers:  # a layer the loss did not reach contributes zero
            if module not in done:
                for p in module.parameters(recurse=False):
                    if p.requires_grad:
                        _set_grad(p, torch.zeros_like(p))


def _without(layer_calls: dict, dropped: torch.Tensor, views: int) -> dict:
    """The same calls with the ``dropped`` records' rows (inputs and output gradients) set to zero.

    A record whose norm is not finite (weights that overflow its activations, or an inf times a zero
    output gradient) would otherwise turn its clip factor, and with it the whole step's sum, into
    NaN: the update would be dropped by the server, which would so learn that such a record was
    sampled -- a bit the DP noise does not cover. Zeroed, it adds exactly nothing (well within C),
    and the other records' sums stay what they are.
    """
    rows = dropped.repeat_interleave(views)

    def zero(t: torch.Tensor) -> torch.Tensor:
        return torch.where(rows.view(-1, *[1] * (t.dim() - 1)), torch.zeros_like(t), t)
    return {m: [(zero(a), zero(g)) for a, g in recs] for m, recs in layer_calls.items()}


def _linear(module: nn.Linear, calls: list[tuple[torch.Tensor, torch.Tensor]], views: int = 1) -> _Contribution:
    """A dense layer; its calls (time steps of an RNN) and any middle axes form the positions T.

    With ``views`` rows per record, a record's views are further positions: (B*K, T, .) -> (B, K*T, .).

    Per-sample weight gradients are ``g_i^T a_i`` (T x O by T x I). The ghost norm
    ``<a_i a_i^T, g_i g_i^T>`` costs T^2 (I + O) per sample against I O for the explicit
    gradient (whose weighted sum is then nearly free, while the ghost route needs one I O T
    product for the sum): ghost wins when I O > T^2 (I + O), e.g. always at T = 1.
    """
    a = _group_views(_cat_positions([a for a, _ in calls]), views)  # (B, T, I)
    g = _group_views(_cat_positions([g for _, g in calls]), views)  # (B, T, O)
    batch, positions, fan_in = a.shape
    fan_out = g.shape[2]
    weight, bias = module.weight, module.bias
    per_bias = g[:, 0] if positions == 1 else g.sum(1)  # (B, O): per-sample bias gradients
    bias_sq = _sq_norms(per_bias)
    sq = bias_sq if bias is not None and bias.requires_grad else torch.zeros_like(bias_sq)
    sums: list[Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]] = []
    if weight.requires_grad:
        ghost = _ghost_is_cheaper(positions, fan_in, fan_out)
        if ghost and positions == 1:  # |a|^2 |g|^2
            a1 = a[:, 0]
            sq = sq + _sq_norms(a1) * bias_sq
            sums.append(lambda c: (weight, torch.mm(per_bias.t() * c, a1)))
        elif ghost:
            sq = sq + certified_ghost_sq_norms(a, g)
            sums.append(lambda c: (weight, (g * c.view(-1, 1, 1)).flatten(0, 1).t() @ a.flatten(0, 1)))
        else:  # explicit per-sample gradients
            psg = torch.bmm(g.transpose(1, 2), a).flatten(1)  # (B, O * I)
            sq = sq + _sq_norms(psg)
            sums.append(lambda c: (weight, (c @ psg).view_as(weight)))
    if bias is not None and bias.requires_grad:
        sums.append(lambda c: (bias, c @ per_bias))
    return _Contribution(sq, lambda c: [f(c) for f in sums])


def _ghost_is_cheaper(positions: int, fan_in: int, fan_out: int) -> bool:
    """Ghost norm (T^2 (I + O) per sample) beats explicit gradients (I O) for this dense layer."""
    return fan_in * fan_out > positions * positions * (fan_in + fan_out)


def _sq_norms(rows: torch.Tensor) -> torch.Tensor:
    """Squared L2 norm of each row of a (B, N) tensor, in one op without a (B, N) temporary."""
    return torch.linalg.vecdot(rows, rows, dim=1)


def _conv(module: nn.Module, calls: list[tuple[torch.Tensor, torch.Tensor]], views: int = 1) -> _Contribution:
    """A convolution: ghost norm or explicit per-sample weight gradients, by ``_conv_route``.

    With ``views`` rows per record, the ghost norm runs over the positions of all of a record's
    views, and explicit per-view gradients are summed per record.
    """
    weight, bias = module.weight, module.bias
    batch = calls[0][0].shape[0] // views
    sq = calls[0][0].new_zeros(batch)
    sums: list[Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]] = []
    if weight.requires_grad:
        route = _conv_route(module, calls[0][1], views)
        if route == "ghost":  # <U U^T, G G^T> over all positions of all calls (and views)
            patches = _views_as_positions(torch.cat([_unfold(module, a) for a, _ in calls], 2), views)  # (B, I, T)
            grads = _views_as_positions(torch.cat([g.flatten(2) for _, g in calls], 2), views)  # (B, O, T)
            sq = sq + certified_ghost_sq_norms(patches.transpose(1, 2), grads.transpose(1, 2))
            sums.append(lambda c: (weight, _total(
                _conv_weight_grad(module, a, g * c.repeat_interleave(views).view(-1, *[1] * (g.dim() - 1)))
                for a, g in calls)))
        else:
            psg = _per_record(_total(_conv_per_sample_weight_grads(module, a, g, grouped=route == "grouped")
                                     for a, g in calls), views)
            sq = sq + _sq_norms(psg)
            sums.append(lambda c: (weight, (c @ psg).view_as(weight)))
    if bias is not None and bias.requires_grad:
        per_bias = _per_record(_total(g.flatten(2).sum(2) for _, g in calls), views)  # (B, O)
        sq = sq + _sq_norms(per_bias)
        sums.append(lambda c: (bias, c @ per_bias))
    return _Contribution(sq, lambda c: [f(c) for f in sums])


def _conv_route(module: nn.Module, g: torch.Tensor, views: int = 1) -> str:
    """How to get a convolution's per-sample weight-gradient norms: ghost, unfold or grouped.

    With T output positions, I = in-channels x kernel size and O out-channels, explicit
    per-sample gradients are B I O values to write and read back; the ghost norm needs B T^2
    Gram entries plus one ordinary weight-gradient call for the clipped sum. Measured here
    (batch 128, 1 and 2 threads, each layer of the three CNNs): ghost wins when
    T^2 (I + O) < 16 I O (the 8x8 CNN's second convolution, ratio 4.9: 2.3-3x faster; MNIST-1D's
    second, ratio 10.4: 1.3x faster at 2 threads, even at 1; first convolutions, ratio 580 and
    up: 2-100x slower); otherwise PyTorch's weight-gradient kernel run once with the
    batch stacked into channel groups wins once a sample's unfolded patches exceed
    ``GROUPED_MIN_PATCHES`` values (the 28x28 CNN's second convolution: 1.6-2.5x faster), and
    unfolded patches times output gradients (one bmm) below that.
    """
    fan_in = module.weight[0].numel()
    fan_out = module.weight.shape[0] // module.groups
    positions = math.prod(g.shape[2:]) * views  # a record's views are positions of the ghost norm
    if module.groups == 1 and positions * positions * (fan_in + fan_out) < 16 * fan_in * fan_out:
        return "ghost"
    if module.groups == 1 and fan_in * positions < GROUPED_MIN_PATCHES:
        return "unfold"
    return "grouped"


def _unfold(module: nn.Module, a: torch.Tensor) -> torch.Tensor:
    """(B, I, T) patches of a convolution's input (a 1-D convolution as a 2-D one of height 1)."""
    if isinstance(module, nn.Conv1d):
        return torch.nn.functional.unfold(a.unsqueeze(2), (1, *module.kernel_size), dilation=(1, *module.dilation),
                                          padding=(0, *module.padding), stride=(1, *module.stride))
    return torch.nn.functional.unfold(a, module.kernel_size, dilation=module.dilation, padding=module.padding,
                                      stride=module.stride)


def _conv_weight_grad(module: nn.Module, a: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """The ordinary (summed over the batch) weight gradient, by PyTorch's kernel."""
    weight_grad = torch.nn.grad.conv1d_weight if isinstance(module, nn.Conv1d) else torch.nn.grad.conv2d_weight
    return weight_grad(a, module.weight.shape, g, stride=module.stride, padding=module.padding,
                       dilation=module.dilation, groups=module.groups)


def _conv_per_sample_weight_grads(module: nn.Module, a: torch.Tensor, g: torch.Tensor, *, grouped: bool) -> torch.Tensor:
    """(B, weight.numel()) per-sample gradients of a convolution's weight."""
    batch, channels = a.shape[:2]
    if not grouped:
        return torch.bmm(g.flatten(2), _unfold(module, a).transpose(1, 2)).reshape(batch, -1)
    out_channels, *kernel_shape = module.weight.shape
    weight_grad = torch.nn.grad.conv1d_weight if isinstance(module, nn.Conv1d) else torch.nn.grad.conv2d_weight
    grads = weight_grad(a.reshape(1, batch * channels, *a.shape[2:]), (batch * out_channels, *kernel_shape),
                        g.reshape(1, batch * out_channels, *g.shape[2:]), stride=module.stride,
                        padding=module.padding, dilation=module.dilation, groups=batch * module.groups)
    return grads.reshape(batch, -1)


def _total(tensors: Iterable[torch.Tensor]) -> torch.Tensor:
    """Sum of tensors; unlike ``sum()``, no copy when there is only one (``0 + t`` copies t)."""
    it = iter(tensors)
    total = next(it)
    for t in it:
        total = total + t
    return total


def _cat_positions(tensors: list[torch.Tensor]) -> torch.Tensor:
    """(B, ..., F) tensors -> one (B, positions, F) tensor."""
    flat = [t.reshape(t.shape[0], -1, t.shape[-1]) for t in tensors]
    return flat[0] if len(flat) == 1 else torch.cat(flat, 1)


def _group_views(t: torch.Tensor, views: int) -> torch.Tensor:
    """(B*K, T, F) rows, K consecutive per record -> (B, K*T, F): a record's views as positions."""
    return t if views == 1 else t.reshape(t.shape[0] // views, views * t.shape[1], t.shape[2])


def _views_as_positions(t: torch.Tensor, views: int) -> torch.Tensor:
    """(B*K, F, T) -> (B, F, K*T): the channel-first form of :func:`_group_views`."""
    if views == 1:
        return t
    rows, features, positions = t.shape
    return t.reshape(rows // views, views, features, positions).transpose(1, 2).reshape(rows // views, features, -1)


def _per_record(t: torch.Tensor, views: int) -> torch.Tensor:
    """(B*K, N) per-view gradients -> (B, N) per-record sums."""
    return t if views == 1 else t.reshape(t.shape[0] // views, views, -1).sum(1)


def _set_grad(p: torch.Tensor, grad: torch.Tensor) -> None:
    p.grad = grad  # computed under no_grad: no history to detach


def per_sample_loss(criterion: nn.Module, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Loss of each sample as the batch-mean criterion sees it (mean over a sample's elements).

    Opacus' hook modes differentiate ``batch_size * mean_loss``, i.e. these per-sample losses.
    """
    reduction = criterion.reduction
    criterion.reduction = "none"
    try:
        losses = criterion(output, target)
    finally:
        criterion.reduction = reduction
    return losses.flatten(1).mean(1) if losses.dim() > 1 else losses


class BookkeepingLoss:
    """Criterion wrapper: ``criterion(out, y).backward()`` runs the clipped single-pass backward.

    Mirrors Opacus' ``DPLossFastGradientClipping`` so a training loop needs no special case.
    """

    def __init__(self, clipper: BookkeepingClipper, criterion: nn.Module) -> None:
        if getattr(criterion, "reduction", "mean") != "mean":
            raise ValueError("book-keeping clipping expects a criterion with reduction='mean'")
        self.clipper, self.criterion = clipper, criterion

    def __call__(self, output: torch.Tensor, target: torch.Tensor) -> "BookkeepingTensor":
        """One loss per record: with ``views`` rows per record, the mean of its views' losses."""
        losses = per_sample_loss(self.criterion, output, target)
        views = self.clipper.views
        if losses.shape[0] % views:
            raise ValueError(f"book-keeping expected {views} rows per record, got a batch of {losses.shape[0]} rows")
        return BookkeepingTensor(self.clipper, losses if views == 1 else losses.view(-1, views).mean(1))


class BookkeepingTensor:
    """A pending loss: ``backward()`` clips, ``detach()`` gives the batch-mean loss for logging."""

    def __init__(self, clipper: BookkeepingClipper, loss_per_sample: torch.Tensor) -> None:
        self.clipper, self.loss_per_sample = clipper, loss_per_sample

    def backward(self) -> None:
        self.clipper.backward(self.loss_per_sample)

    def detach(self) -> torch.Tensor:
        return self.loss_per_sample.detach().mean()

    def item(self) -> float:
        return float(self.detach())
