"""Book-keeping clipping under a malicious server (and why Opacus' ghost clipping is refused): float rounding must never lift a record above C.

The ghost norm of a record's weight gradient, ``sum_st (a_s . a_t)(g_s . g_t)`` over its positions
(a sequence's steps, a convolution's patches, augmentation views), cancels when the positions'
gradients nearly cancel. In float32 the computed norm is then rounding noise, possibly far below the
true one, the record escapes clipping, and the clipped sum -- computed by a different product --
moves by much more than C. The server chooses the weights, so it can arrange exactly that for
honest records (an independent review found contributions of 2307 C on the project's CNN at two
views). These tests play that server; each record's contribution is measured by running the
clipper on that record alone.
"""

from __future__ import annotations

import copy
from dataclasses import replace

import numpy as np
import pytest
import torch
from torch import nn

from fedpriv.client.augmentation import augmented_views
from opacus import PrivacyEngine
from torch.utils.data import DataLoader, TensorDataset

from fedpriv.client.bookkeeping import BookkeepingClipper, BookkeepingLoss, _conv_route, _ghost_is_cheaper
from fedpriv.common import wire
from fedpriv.common.config import RunConfig
from fedpriv.common.errors import ConfigError
from fedpriv.client.grad_sample_modes import make_private
from fedpriv.common.evaluation import task_loss
from fedpriv.common.models import build_model

C = 1.0
TOLERANCE = 1e-4  # float rounding of the clipped sum itself


def _contribution(module: nn.Module, clipper: BookkeepingClipper) -> float:
    grads = torch.cat([p.grad.flatten() for p in module.parameters()])
    clipper.remove()
    return float(grads.norm())


def _true_norm(module: nn.Module, inputs: torch.Tensor, loss_fn) -> float:
    """The record's gradient norm in float64 (plain autograd)."""
    wide = copy.deepcopy(module).double()
    grads = torch.autograd.grad(loss_fn(wide, inputs.double()), list(wide.parameters()))
    return float(torch.cat([g.flatten() for g in grads]).norm())


def _cancelling_targets(size: int, generator: torch.Generator, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    h = torch.randn(size, generator=generator) * scale
    return h, -h + 0.1 * torch.randn(size, generator=generator)


@pytest.mark.parametrize("views", [1, 2])
def test_a_dense_layer_whose_positions_cancel_is_still_clipped_to_c(views: int) -> None:
    """Two near-identical positions (views, or an RNN's steps) with opposite output gradients."""
    gen = torch.Generator().manual_seed(0)
    layer = nn.Linear(256, 256)
    a = torch.randn(1, 256, generator=gen) * 1e3
    rows = torch.cat([a, a + 1e-3 * torch.randn(1, 256, generator=gen)])  # 2 positions of one record
    h1, h2 = _cancelling_targets(256, gen, 1e3)
    if views == 2:  # two views of one record, one position each
        inputs, weights = rows, torch.stack([h1, h2])
        assert _ghost_is_cheaper(2, 256, 256)

        def loss(m, x):
            return (m(x) * weights.to(x.dtype)).sum(1).mean()
    else:  # one record, two positions (the layer sees a sequence)
        inputs, weights = rows.unsqueeze(0), torch.stack([h1, h2]).unsqueeze(0)

        def loss(m, x):
            return (m(x) * weights.to(x.dtype)).sum()
    clipper = BookkeepingClipper(layer, C, views=views)
    out = layer(inputs)
    per_record = (out * weights).sum(-1).reshape(1, -1)
    clipper.backward(per_record.mean(1) if views == 2 else per_record.sum(1))
    true = _true_norm(layer, inputs, loss)
    assert true > 100 * C  # the record must be clipped
    assert clipper.per_sample_norms.item() >= true * (1 - 1e-4)  # never below the true norm
    assert _contribution(layer, clipper) <= C * (1 + TOLERANCE)


def test_a_convolution_whose_views_cancel_is_still_clipped_to_c() -> None:
    gen = torch.Generator().manual_seed(0)
    conv = nn.Conv2d(64, 64, 3, padding=1)
    x = torch.randn(1, 64, 3, 3, generator=gen) * 1e3
    views = torch.cat([x, x + 1e-3 * torch.randn(1, 64, 3, 3, generator=gen)])
    h = torch.randn(1, 64, 3, 3, generator=gen) * 1e3
    weights = torch.cat([h, -h + 0.1 * torch.randn(1, 64, 3, 3, generator=gen)])
    clipper = BookkeepingClipper(conv, C, views=2)
    out = conv(views)
    assert _conv_route(conv, out, 2) == "ghost"
    clipper.backward((out * weights).sum((1, 2, 3)).view(-1, 2).mean(1))
    true = _true_norm(conv, views, lambda m, v: (m(v) * weights.to(v.dtype)).sum((1, 2, 3)).mean())
    assert true > 100 * C
    assert clipper.per_sample_norms.item() >= true * (1 - 1e-4)
    assert _contribution(conv, clipper) <= C * (1 + TOLERANCE)


def _server_crafted_cnn(length: int) -> nn.Module:
    """The design card's MNIST-1D CNN (the MNIST-1D recipes' until card-conv) with weights
    chosen so that a record's two views saturate to two different classes through inputs that differ by ~1e-9 relative: their dense-layer gradients
    cancel to within float32 rounding (the reviewer's construction)."""
    model = build_model("cnn", (1, length), 10, seed=0, cnn_arch="card")
    beta = 5e4
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
        first, second = model.features[0], model.features[3]
        hidden, head = model.classifier[1], model.classifier[3]
        first.weight[0, 0, 1] = 1.0
        first.bias.fill_(1e4)
        second.weight[0, 0, 1] = 1.0
        second.bias.fill_(1e4)
        second.bias[0] = 0.0
        width = hidden.out_features
        direction = torch.tensor([(-1.0) ** i for i in range(width)]) / width ** 0.5
        w = torch.zeros(hidden.in_features)
        w[4], w[5] = 1e-3, -1e-3
        hidden.weight.copy_(torch.outer(direction, w))
        hidden.bias.fill_(1.0)
        head.weight[1], head.weight[2] = beta * direction, -beta * direction
    return model.train()


@pytest.mark.parametrize("views", [2, 4])
def test_honest_records_on_server_crafted_cnn_weights_each_move_the_sum_by_at_most_c(views: int) -> None:
    length = 40
    model = _server_crafted_cnn(length)
    loss_fn = task_loss("cnn")
    gen = torch.Generator().manual_seed(0)
    worst = 0.0
    for _ in range(40):
        x = torch.randn(1, 1, length, generator=gen)
        y = torch.randint(0, 10, (1,), generator=gen).repeat_interleave(views)
        rows = augmented_views(x, views, shift=1, flip=False, generator=gen)
        clipper = BookkeepingClipper(model, C, views=views)
        BookkeepingLoss(clipper, loss_fn)(model(rows), y).backward()
        worst = max(worst, _contribution(model, clipper))
        for p in model.parameters():
            p.grad = None
    assert worst <= C * (1 + TOLERANCE), f"a record moved the clipped sum by {worst:.4g} C"


def test_dp_training_refuses_opacus_ghost_mode_whose_two_passes_a_server_can_split() -> None:
    """Opacus' ghost clipping takes the norms from one backward pass and the clipped sum from a second;
    rounding can differ between them (a reviewer's crafted CNN: honest records up to 2.6e13 C), which no
    norm sampler can fix. So neither a user nor a server can ask for it with DP: the owner's client
    validates the server's config and declines (tests/test_owner_policy.py's decline path)."""
    with pytest.raises(ConfigError, match="ghost is not offered for DP training"):
        RunConfig(grad_sample_mode="ghost").validate()
    RunConfig(grad_sample_mode="ghost", dp=False).validate()  # nothing to protect without DP


@pytest.mark.usefixtures("task_identity")
def test_an_owner_declines_a_server_that_asks_for_ghost_clipping(tmp_path) -> None:
    from test_owner_policy import ROUND, Owner

    rng = np.random.default_rng(0)
    data = tmp_path / "records.npz"
    np.savez(data, x=rng.normal(size=(200, 1, 8, 8)).astype(np.float32), y=np.arange(200) % 10)
    reply = Owner(data, tmp_path / "state").round(replace(ROUND, grad_sample_mode="ghost"))
    assert wire.ARRAYS not in reply.content.array_records
    assert "ghost is not offered for DP training" in str(reply.content[wire.PRIVACY]["decline-reason"])


def _one_batch_sum(layer: nn.Module, inputs: torch.Tensor, weights: torch.Tensor) -> tuple[torch.Tensor, BookkeepingClipper]:
    clipper = BookkeepingClipper(layer, C)
    clipper.backward((layer(inputs) * weights).sum(tuple(range(1, inputs.dim()))))
    grads = torch.cat([p.grad.flatten() for p in layer.parameters()])
    clipper.remove()
    return grads, clipper


@pytest.mark.parametrize("positions", [1, 2], ids=["exact route", "ghost route"])
def test_a_record_whose_norm_overflows_adds_zero_not_nan_to_the_batch(positions: int) -> None:
    """Weights that blow one record's activations up (1e20: |a|^2 overflows to inf) against a zero
    output gradient made its norm inf * 0 = NaN, and with it the whole step's sum: the update turns
    NaN, the server drops it (server/update_validation.py), and so learns that such a record was
    sampled -- a bit the noise does not cover. Such a record must contribute exactly zero instead,
    and the other records of the batch their usual clipped gradients."""
    gen = torch.Generator().manual_seed(0)
    layer = nn.Linear(256, 256)
    honest = torch.randn(3, positions, 256, generator=gen)
    inputs = torch.cat([torch.full((1, positions, 256), 1e20), honest]).squeeze(1)
    weights = torch.cat([torch.zeros(1, positions, 256), torch.randn(3, positions, 256, generator=gen)]).squeeze(1)
    together, clipper = _one_batch_sum(layer, inputs, weights)
    assert torch.isfinite(together).all()
    assert not torch.isfinite(clipper.per_sample_norms[0])  # reported as what it is
    alone, _ = _one_batch_sum(layer, inputs[1:], weights[1:])
    torch.testing.assert_close(together, alone)


@pytest.mark.parametrize("mode", ["hooks", "functorch", "ew"])
def test_opacus_modes_also_let_an_overflowing_record_add_zero_not_nan(mode: str) -> None:
    """An overflow through Opacus' per-sample-gradient modes (the project's DPOptimizer, zero noise): a
    record whose per-sample gradient is inf gets clip factor C / inf = 0, and 0 * inf = NaN."""
    gen = torch.Generator().manual_seed(0)
    x = torch.cat([torch.full((1, 16), 1e20), torch.randn(3, 16, generator=gen)])
    w = torch.cat([torch.full((1, 4), 1e20), torch.randn(3, 4, generator=gen)])  # its gradient: 1e40 = inf

    def step(inputs: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(16, 4))
        loader = DataLoader(TensorDataset(torch.zeros(len(inputs), 1)), batch_size=len(inputs))
        private = make_private(PrivacyEngine(accountant="rdp"), model=model,
                               optimizer=torch.optim.SGD(model.parameters(), lr=0.1), criterion=nn.MSELoss(),
                               loader=loader, mode=mode, noise_multiplier=0.0, max_grad_norm=C, poisson_sampling=True)
        private.optimizer.zero_grad()
        out = private.model(inputs)
        private.criterion(out, out.detach() - weights * out.numel() / 2).backward()  # d loss / d out = weights
        assert private.optimizer.pre_step()
        grads = torch.cat([p.grad.flatten() for p in model.parameters()]) * len(inputs)
        private.cleanup()
        return grads

    together = step(x, w)
    assert torch.isfinite(together).all()
    torch.testing.assert_close(together * 1, step(x[1:], w[1:]) * 1, rtol=1e-4, atol=1e-5)
