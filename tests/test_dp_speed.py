"""Fast DP-SGD stays exact: per-sample norms and clipped sums against a naive one-sample-at-a-time loop.

The reference runs each sample through the model alone, takes its gradient with plain autograd,
clips it with Opacus' factor ``min(1, C / (norm + 1e-6))`` and sums. Every mode ``auto`` can pick
is checked through the real ``make_private`` path (Opacus' optimizer with zero noise does the
scaling), for each model family, and for an empty Poisson batch.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from opacus import PrivacyEngine
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import fedpriv.client.bookkeeping as bookkeeping
from fedpriv.client.bookkeeping import BookkeepingClipper, BookkeepingLoss, supports
from fedpriv.client.dp_training import RoundRandomness, train_round
from fedpriv.common.accounting import planned_mechanism
from fedpriv.client.grad_sample_modes import AUTO_BY_MODEL, AUTO_FALLBACK, MODES, make_private, resolve
from fedpriv.common.config import GRAD_SAMPLE_MODES, RunConfig
from fedpriv.common.errors import UserInputError
from fedpriv.common.evaluation import task_loss
from fedpriv.common.models import build_model

TOL = 1e-4
# book-keeping's ghost norms are certified upper bounds: up to ~1e-4 relative above the true norm
# (client/bookkeeping.py _ghost_sq_norms), so that float rounding can never let a record escape clipping
NORM_RTOL = 2e-4
CLIP = 0.7  # small enough that most samples are clipped, large enough that some are not

# (family, input shape, classes): digits images, MNIST-1D sequences (shortened: speed does not matter here)
FAMILIES = [
    ("cnn", (1, 8, 8), 10),
    ("cnn", (1, 16), 10),
    ("rnn", (1, 12), 10),
    ("rnn", (1, 8, 8), 10),
    ("autoencoder", (1, 8, 8), 0),
]
AUTO_CHOICES = sorted({*AUTO_BY_MODEL.values(), AUTO_FALLBACK})


def naive_clipped(model: nn.Module, criterion: nn.Module, x: torch.Tensor, y: torch.Tensor,
                  clip: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(per-sample gradient norms, sum of clipped per-sample gradients) by a loop over samples."""
    params = [p for p in model.parameters() if p.requires_grad]
    flat = []
    for i in range(len(x)):
        grads = torch.autograd.grad(criterion(model(x[i:i + 1]), y[i:i + 1]), params)
        flat.append(torch.cat([g.reshape(-1) for g in grads]))
    if not flat:
        return torch.zeros(0), torch.zeros(sum(p.numel() for p in params))
    per_sample = torch.stack(flat)
    norms = per_sample.norm(dim=1)
    coef = (clip / (norms + 1e-6)).clamp(max=1.0)
    return norms, (coef[:, None] * per_sample).sum(0)


def batch_for(family: str, shape: tuple[int, ...], classes: int, n: int, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, *shape, generator=gen)
    y = x.clone() if family == "autoencoder" else torch.randint(0, classes, (n,), generator=gen)
    return x, y


def private_step_gradient(model: nn.Module, criterion: nn.Module, mode: str, x: torch.Tensor, y: torch.Tensor,
                          expected_batch: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Clipped sum as Opacus' optimizer hands it to SGD (zero noise, undone mean), and the norms."""
    # only the loader's length matters here: Opacus derives the expected batch size from it
    loader = DataLoader(TensorDataset(torch.zeros(2 * expected_batch, 1)), batch_size=expected_batch)
    private = make_private(PrivacyEngine(accountant="rdp"), model=model,
                           optimizer=torch.optim.SGD(model.parameters(), lr=0.1), criterion=criterion,
                           loader=loader, mode=mode, noise_multiplier=0.0, max_grad_norm=CLIP,
                           poisson_sampling=True)
    optimizer = private.optimizer
    assert optimizer.expected_batch_size == expected_batch
    optimizer.zero_grad()
    private.criterion(private.model(x), y).backward()
    norms = None
    if mode == "bookkeeping":
        norms = private.criterion.clipper.per_sample_norms
    elif mode == "ghost":
        norms = private.model.per_sample_gradient_norms
    elif len(x):
        norms = torch.stack([g.reshape(len(x), -1).norm(dim=1) for g in optimizer.grad_samples]).norm(dim=0)
    if optimizer.pre_step():  # clip (Opacus modes), add zero noise, divide by the expected batch size
        grad = torch.cat([p.grad.reshape(-1) for p in model.parameters()]) * expected_batch
    else:
        grad = None
    private.cleanup()
    return grad, norms


@pytest.mark.parametrize("mode", [*AUTO_CHOICES, "ghost"])
@pytest.mark.parametrize("family, shape, classes", FAMILIES)
def test_modes_match_naive_per_sample_loop(family, shape, classes, mode):
    """Every mode ``auto`` may pick, and Opacus' ghost clipping (fixed here for per-element losses)."""
    model = build_model(family, shape, classes, rnn_hidden=16, encoding_dim=8, seed=1)
    criterion = task_loss(family)
    x, y = batch_for(family, shape, classes, n=6)
    ref_norms, ref_sum = naive_clipped(model, criterion, x, y, CLIP)
    assert (ref_norms > CLIP).any() and (ref_norms < 50).all()

    grad, norms = private_step_gradient(model, criterion, mode, x, y, expected_batch=6)

    torch.testing.assert_close(norms, ref_norms, rtol=NORM_RTOL, atol=TOL)
    torch.testing.assert_close(grad, ref_sum, rtol=0, atol=TOL)


@pytest.mark.parametrize("family, shape, classes", FAMILIES)
def test_bookkeeping_empty_poisson_batch_is_a_noise_only_step(family, shape, classes):
    model = build_model(family, shape, classes, rnn_hidden=16, encoding_dim=8, seed=1)
    x, y = batch_for(family, shape, classes, n=0)
    grad, norms = private_step_gradient(model, task_loss(family), "bookkeeping", x, y, expected_batch=4)
    assert norms is not None and norms.shape == (0,)
    assert grad is not None and torch.count_nonzero(grad) == 0  # zero clipped sum (and zero noise here)


@pytest.mark.parametrize("secure", [False, True])
@pytest.mark.parametrize("mode", ["bookkeeping", "hooks"])
def test_noise_has_opacus_scale_sigma_c_over_expected_batch(mode, secure):
    """A noise-only step: every gradient entry is N(0, (sigma C / B)^2), as Opacus specifies."""
    sigma, clip, batch = 2.0, 1.5, 16
    model = nn.Sequential(nn.Linear(400, 100))
    loader = DataLoader(TensorDataset(torch.zeros(4 * batch, 400), torch.zeros(4 * batch, 100)), batch_size=batch)
    private = make_private(PrivacyEngine(accountant="rdp"), model=model,
                           optimizer=torch.optim.SGD(model.parameters(), lr=0.1), criterion=nn.MSELoss(),
                           loader=loader, mode=mode, noise_multiplier=sigma, max_grad_norm=clip,
                           poisson_sampling=True, secure_mode=secure)
    private.optimizer.zero_grad()
    private.criterion(private.model(torch.zeros(0, 400)), torch.zeros(0, 100)).backward()
    assert private.optimizer.pre_step()
    noise = torch.cat([p.grad.reshape(-1) for p in model.parameters()]).double()
    private.cleanup()
    assert noise.numel() == 40_100 and abs(float(noise.mean())) < 5 * sigma * clip / batch / math.sqrt(40_100)
    assert float(noise.std()) == pytest.approx(sigma * clip / batch, rel=0.03)  # 0.35 % standard error


class OddConvs(nn.Module):
    """Convolutions with stride, dilation, groups and no bias, a 3-D linear input, a frozen layer."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(2, 4, kernel_size=(3, 2), stride=2, padding=(1, 0), dilation=(1, 2))
        self.c2 = nn.Conv2d(4, 6, kernel_size=3, padding=1, groups=2, bias=False)
        self.c3 = nn.Conv1d(6, 4, kernel_size=3, stride=2, dilation=2, padding=2)
        self.frozen = nn.Linear(4, 4)
        self.frozen.requires_grad_(False)
        self.seq = nn.Linear(4, 5)  # applied to (B, L, 4): positions L, explicit or ghost norms
        self.head = nn.Linear(5, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.c2(torch.relu(self.c1(x))))  # (B, 6, H', W')
        h = torch.tanh(self.c3(h.flatten(2)))  # (B, 4, L)
        h = self.seq(self.frozen(h.transpose(1, 2)))  # (B, L, 5)
        return self.head(h.mean(1))


@pytest.mark.parametrize("route", ["ghost", "unfold", "grouped", "auto"])
def test_bookkeeping_general_layers_match_naive(monkeypatch, route):
    """Each way of getting convolution norms is exact (ghost and unfold need groups == 1)."""
    if route != "auto":
        monkeypatch.setattr(bookkeeping, "_conv_route",
                            lambda module, g, views=1: route if module.groups == 1 else "grouped")
    torch.manual_seed(3)
    model, criterion = OddConvs(), nn.CrossEntropyLoss()
    x, y = torch.randn(5, 2, 9, 10), torch.randint(0, 3, (5,))
    ref_norms, ref_sum = naive_clipped(model, criterion, x, y, CLIP)
    clipper = BookkeepingClipper(model, CLIP)
    BookkeepingLoss(clipper, criterion)(model(x), y).backward()
    got = torch.cat([p.grad.reshape(-1) for p in model.parameters() if p.requires_grad])
    torch.testing.assert_close(clipper.per_sample_norms, ref_norms, rtol=NORM_RTOL, atol=TOL)
    torch.testing.assert_close(got, ref_sum, rtol=0, atol=TOL)
    assert model.frozen.weight.grad is None


@pytest.mark.parametrize("ghost", [True, False], ids=["ghost-norm", "explicit"])
def test_bookkeeping_sequence_linear_both_norm_routes(monkeypatch, ghost):
    """A dense layer over several positions: ghost norms and explicit per-sample gradients both exact."""
    monkeypatch.setattr(bookkeeping, "_ghost_is_cheaper", lambda positions, fan_in, fan_out: ghost)
    torch.manual_seed(4)
    model = nn.Sequential(nn.Linear(6, 7), nn.Tanh(), nn.Flatten(), nn.Linear(3 * 7, 2))
    x, y = torch.randn(4, 3, 6), torch.randint(0, 2, (4,))
    criterion = nn.CrossEntropyLoss()
    ref_norms, ref_sum = naive_clipped(model, criterion, x, y, CLIP)
    clipper = BookkeepingClipper(model, CLIP)
    BookkeepingLoss(clipper, criterion)(model(x), y).backward()
    got = torch.cat([p.grad.reshape(-1) for p in model.parameters()])
    torch.testing.assert_close(clipper.per_sample_norms, ref_norms, rtol=NORM_RTOL, atol=TOL)
    torch.testing.assert_close(got, ref_sum, rtol=0, atol=TOL)


def test_train_round_with_empty_poisson_batches_stays_finite(monkeypatch):
    """Batch size 1 on 12 records: about a third of Poisson batches are empty; the round must add up."""
    import fedpriv.client.dp_training as dp_training

    sizes: list[int] = []
    real_step = dp_training.train_step

    def counting_step(model, optimizer, criterion, xb, yb):
        sizes.append(len(xb))
        return real_step(model, optimizer, criterion, xb, yb)

    monkeypatch.setattr(dp_training, "train_step", counting_step)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(12, 1, 8, 8)).astype(np.float32)
    y = rng.integers(0, 10, size=12)
    cfg = RunConfig(model="cnn", batch_size=1, local_epochs=1).validate()  # auto -> bookkeeping
    model = build_model("cnn", (1, 8, 8), 10, seed=0)
    before = [p.detach().clone() for p in model.parameters()]
    result = train_round(model, x, y, cfg, prior_history=[], rng=RoundRandomness.seeded(5))
    assert 0 in sizes and any(sizes), sizes  # this seed draws empty and non-empty batches
    assert math.isfinite(result.train_loss) and math.isfinite(result.epsilon)
    assert result.steps == len(sizes) == planned_mechanism(12, cfg)[2]
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())  # hooks removed


@pytest.mark.parametrize("family", ["cnn", "rnn", "autoencoder"])
def test_train_round_same_weights_in_every_auto_mode_as_in_opacus_hooks(family):
    """Same seed, same Poisson batches and noise draws: book-keeping ends where Opacus' hooks end."""
    rng = np.random.default_rng(1)
    x = rng.normal(size=(40, 1, 8, 8)).astype(np.float32)
    y = rng.integers(0, 10, size=40)
    finals = {}
    for mode in ("hooks", *AUTO_CHOICES):
        cfg = RunConfig(model=family, batch_size=8, local_epochs=1, grad_sample_mode=mode, rnn_hidden=16).validate()
        model = build_model(family, (1, 8, 8), 10, rnn_hidden=16, seed=0)
        train_round(model, x, y, cfg, prior_history=[], rng=RoundRandomness.seeded(2))
        finals[mode] = model.state_dict()
    for mode, state in finals.items():
        for key, value in state.items():
            torch.testing.assert_close(value, finals["hooks"][key], rtol=0, atol=TOL, msg=f"{mode} {key}")


@pytest.mark.parametrize("family, shape, classes", FAMILIES)
def test_auto_resolves_to_a_concrete_mode_per_family(family, shape, classes):
    model = build_model(family, shape, classes, seed=0)
    mode = resolve("auto", family, model)
    assert mode in MODES and mode != "auto"
    assert mode == AUTO_BY_MODEL[family]
    assert supports(model)
    assert resolve("hooks", family, model) == "hooks"  # an explicit choice is kept


def test_auto_falls_back_for_layers_bookkeeping_does_not_cover():
    with_norm = nn.Sequential(nn.Conv2d(1, 4, 3), nn.GroupNorm(2, 4), nn.Flatten(), nn.Linear(4 * 36, 2))
    tied = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4))
    tied[1].weight = tied[0].weight
    attention = nn.MultiheadAttention(4, 2)
    for model in (with_norm, tied, attention):
        assert not supports(model)
        assert resolve("auto", "cnn", model) == AUTO_FALLBACK
        with pytest.raises(ValueError, match="book-keeping clipping does not support"):
            BookkeepingClipper(model, 1.0)


def test_config_defaults_to_auto_and_knows_bookkeeping():
    assert RunConfig().grad_sample_mode == "auto"
    assert set(MODES) | {"auto"} == set(GRAD_SAMPLE_MODES)
    RunConfig(grad_sample_mode="bookkeeping").validate()
    with pytest.raises(UserInputError, match="--grad-sample-mode"):
        RunConfig(grad_sample_mode="fastest").validate()


def test_abandoned_forward_is_not_mixed_into_the_next_step():
    torch.manual_seed(5)
    model, criterion = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2)), nn.CrossEntropyLoss()
    clipper = BookkeepingClipper(model, CLIP)
    model(torch.randn(7, 3))  # e.g. a forward whose loss was never back-propagated
    x, y = torch.randn(3, 3), torch.randint(0, 2, (3,))
    BookkeepingLoss(clipper, criterion)(model(x), y).backward()
    _, ref_sum = naive_clipped(model, criterion, x, y, CLIP)
    torch.testing.assert_close(torch.cat([p.grad.reshape(-1) for p in model.parameters()]), ref_sum,
                               rtol=0, atol=TOL)
