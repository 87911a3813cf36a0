"""Augmentation multiplicity (client/augmentation.py): K views of a record, clipped as one record.

The attacker's view: a client that clipped each augmented view alone would let one record move
the clipped sum by K*C while the accountant assumes C. These tests hold the book-keeping clipper
to a one-record-at-a-time reference that clips the mean gradient of a record's views, and check
that nothing the accountant sees changes with the view count.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from opacus import PrivacyEngine
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import fedpriv.client.bookkeeping as bookkeeping
from fedpriv.client.augmentation import augmented_views
from fedpriv.client.bookkeeping import BookkeepingClipper, BookkeepingLoss
from fedpriv.client.dp_training import RoundRandomness, train_round
from fedpriv.client.grad_sample_modes import make_private
from fedpriv.common.accounting import planned_mechanism
from fedpriv.common.config import RunConfig
from fedpriv.common.errors import ConfigError, UserInputError
from fedpriv.common.evaluation import task_loss
from fedpriv.common.models import build_model, check_fit

TOL = 1e-4
# book-keeping's ghost norms are certified upper bounds: up to ~1e-4 relative above the true norm
# (client/bookkeeping.py _ghost_sq_norms), so that float rounding can never let a record escape clipping
NORM_RTOL = 2e-4
CLIP = 0.5  # some records clipped, some not (averaged views have smaller gradients)
VIEWS = 3
FAMILIES = [  # (family, record shape, classes)
    ("cnn", (1, 8, 8), 10),
    ("cnn", (1, 16), 10),
    ("rnn", (1, 12), 10),
    ("rnn", (1, 8, 8), 10),
    ("autoencoder", (1, 8, 8), 0),
]


def grouped_reference(model: nn.Module, criterion: nn.Module, views: torch.Tensor, targets: torch.Tensor,
                      k: int, clip: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(per-record norms, clipped sum) by a loop over records: each record's loss is the mean over its k views."""
    params = [p for p in model.parameters() if p.requires_grad]
    flat = []
    for r in range(len(views) // k):
        rows = slice(r * k, (r + 1) * k)
        grads = torch.autograd.grad(criterion(model(views[rows]), targets[rows]), params)
        flat.append(torch.cat([g.reshape(-1) for g in grads]))
    per_record = torch.stack(flat)
    norms = per_record.norm(dim=1)
    coef = (clip / (norms + 1e-6)).clamp(max=1.0)
    return norms, (coef[:, None] * per_record).sum(0)


def views_for(family: str, shape: tuple[int, ...], classes: int, records: int, k: int, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(records, *shape, generator=gen)
    views = augmented_views(x, k, shift=1, flip=False, generator=gen)
    targets = views if family == "autoencoder" else torch.randint(0, classes, (records,), generator=gen).repeat_interleave(k)
    return views, targets


@pytest.mark.parametrize("family, shape, classes", FAMILIES)
def test_bookkeeping_clips_a_records_views_as_one_record(family, shape, classes):
    model = build_model(family, shape, classes, rnn_hidden=16, encoding_dim=8, seed=1)
    criterion = task_loss(family)
    views, targets = views_for(family, shape, classes, records=5, k=VIEWS)
    ref_norms, ref_sum = grouped_reference(model, criterion, views, targets, VIEWS, CLIP)
    assert (ref_norms > CLIP).any()

    clipper = BookkeepingClipper(model, CLIP, views=VIEWS)
    BookkeepingLoss(clipper, criterion)(model(views), targets).backward()
    got = torch.cat([p.grad.reshape(-1) for p in model.parameters()])

    assert clipper.per_sample_norms.shape == (5,)  # one norm per record, not per view
    torch.testing.assert_close(clipper.per_sample_norms, ref_norms, rtol=NORM_RTOL, atol=TOL)
    torch.testing.assert_close(got, ref_sum, rtol=0, atol=TOL)


@pytest.mark.parametrize("route", ["ghost", "unfold", "grouped"])
def test_every_convolution_route_groups_views(monkeypatch, route):
    monkeypatch.setattr(bookkeeping, "_conv_route", lambda module, g, views=1: route)
    monkeypatch.setattr(bookkeeping, "_ghost_is_cheaper", lambda positions, fan_in, fan_out: route == "ghost")
    model = build_model("cnn", (1, 8, 8), 10, seed=2)
    criterion = task_loss("cnn")
    views, targets = views_for("cnn", (1, 8, 8), 10, records=4, k=4, seed=1)
    ref_norms, ref_sum = grouped_reference(model, criterion, views, targets, 4, CLIP)
    clipper = BookkeepingClipper(model, CLIP, views=4)
    BookkeepingLoss(clipper, criterion)(model(views), targets).backward()
    torch.testing.assert_close(clipper.per_sample_norms, ref_norms, rtol=NORM_RTOL, atol=TOL)
    torch.testing.assert_close(torch.cat([p.grad.reshape(-1) for p in model.parameters()]), ref_sum, rtol=0, atol=TOL)


def test_one_record_with_many_views_moves_the_sum_by_at_most_the_clip():
    """The sensitivity the accountant assumes: one record, 8 views, each view's gradient far above C."""
    model = build_model("cnn", (1, 8, 8), 10, seed=3)
    views, targets = views_for("cnn", (1, 8, 8), 10, records=1, k=8, seed=4)
    views = views * 50  # huge inputs: every view's own gradient is far larger than C
    clipper = BookkeepingClipper(model, CLIP, views=8)
    BookkeepingLoss(clipper, task_loss("cnn"))(model(views), targets).backward()
    total = torch.cat([p.grad.reshape(-1) for p in model.parameters()]).norm()
    assert total <= CLIP * (1 + 1e-5)
    # clipped view by view, the same record would move the sum by far more than C
    per_view = BookkeepingClipper(model, CLIP)
    BookkeepingLoss(per_view, task_loss("cnn"))(model(views), targets).backward()
    assert torch.cat([p.grad.reshape(-1) for p in model.parameters()]).norm() > 2 * CLIP


def test_a_batch_whose_rows_are_not_views_per_record_is_refused():
    model = build_model("cnn", (1, 8, 8), 10, seed=0)
    clipper = BookkeepingClipper(model, CLIP, views=3)
    x, y = torch.randn(4, 1, 8, 8), torch.randint(0, 10, (4,))  # 4 rows are not 3 views of whole records
    with pytest.raises(ValueError, match="rows per record"):
        BookkeepingLoss(clipper, task_loss("cnn"))(model(x), y).backward()


def test_dp_optimizer_divides_by_expected_records_not_views():
    """Through Opacus' optimizer (zero noise): the clipped per-record sum over the expected batch of records."""
    model = build_model("cnn", (1, 8, 8), 10, seed=5)
    criterion = task_loss("cnn")
    views, targets = views_for("cnn", (1, 8, 8), 10, records=6, k=VIEWS, seed=2)
    _, ref_sum = grouped_reference(model, criterion, views, targets, VIEWS, CLIP)
    loader = DataLoader(TensorDataset(torch.zeros(12, 1)), batch_size=6)  # expected batch: 6 records
    private = make_private(PrivacyEngine(accountant="rdp"), model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
                           criterion=criterion, loader=loader, mode="bookkeeping", noise_multiplier=0.0,
                           max_grad_norm=CLIP, poisson_sampling=True, views=VIEWS)
    private.optimizer.zero_grad()
    private.criterion(private.model(views), targets).backward()
    assert private.optimizer.pre_step()
    got = torch.cat([p.grad.reshape(-1) for p in model.parameters()]) * 6
    private.cleanup()
    torch.testing.assert_close(got, ref_sum, rtol=0, atol=TOL)


@pytest.mark.parametrize("mode", ["hooks", "functorch", "ew", "ghost"])
def test_opacus_modes_refuse_views(mode):
    model = build_model("cnn", (1, 8, 8), 10, seed=0)
    loader = DataLoader(TensorDataset(torch.zeros(8, 1)), batch_size=4)
    with pytest.raises(ValueError, match="bookkeeping"):
        make_private(PrivacyEngine(accountant="rdp"), model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
                     criterion=task_loss("cnn"), loader=loader, mode=mode, noise_multiplier=1.0, max_grad_norm=1.0,
                     poisson_sampling=True, views=2)


# ---------------------------------------------------------------------------- the views themselves
def test_views_are_record_major_shifts_of_their_own_record():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(3, 2, 10)
    views = augmented_views(x, 5, shift=2, flip=False, generator=gen)
    assert views.shape == (15, 2, 10)
    padded = nn.functional.pad(x, (2, 2), mode="replicate")
    for row in range(15):
        record = row // 5
        assert any(torch.equal(views[row], padded[record, :, o:o + 10]) for o in range(5)), row
    assert len({tuple(v.flatten().tolist()) for v in views}) > 3  # the shifts differ


def test_image_views_shift_both_axes_and_flip_only_when_asked():
    gen = torch.Generator().manual_seed(1)
    x = torch.arange(2 * 3 * 6 * 6, dtype=torch.float32).view(2, 3, 6, 6)
    assert torch.equal(augmented_views(x, 4, shift=0, flip=False, generator=gen), x.repeat_interleave(4, 0))
    padded = nn.functional.pad(x, (1, 1, 1, 1), mode="replicate")
    candidates = lambda r: [padded[r, :, i:i + 6, j:j + 6] for i in range(3) for j in range(3)]
    shifted = augmented_views(x, 6, shift=1, flip=False, generator=gen)
    assert all(any(torch.equal(v, c) for c in candidates(row // 6)) for row, v in enumerate(shifted))
    flipped = augmented_views(x, 16, shift=0, flip=True, generator=gen)
    mirrored = [torch.equal(v, x[row // 16].flip(-1)) for row, v in enumerate(flipped)]
    assert 0 < sum(mirrored) < 32
    assert all(m or torch.equal(v, x[row // 16]) for row, (v, m) in enumerate(zip(flipped, mirrored)))


def test_tables_cannot_be_shifted():
    with pytest.raises(UserInputError, match="augment-views"):
        augmented_views(torch.randn(4, 7), 2, 1, False, torch.Generator())
    with pytest.raises(UserInputError, match="augment-views"):
        check_fit("autoencoder", (7,), labelled=False, dataset="csv:t.csv", augment_views=2)
    check_fit("autoencoder", (7,), labelled=False, dataset="csv:t.csv", augment_views=1)


@pytest.mark.parametrize("options, match", [
    ({"augment_views": 0}, "augment-views"),
    ({"augment_views": 17}, "augment-views"),
    ({"augment_views": 2, "model": "mlp"}, "mlp"),
    ({"augment_views": 2, "grad_sample_mode": "hooks"}, "bookkeeping"),
    ({"augment_views": 2, "cnn_norm": "group"}, "bookkeeping"),
    ({"augment_shift": -1}, "augment-shift"),
])
def test_config_refuses_views_that_cannot_be_clipped_as_one(options, match):
    with pytest.raises(ConfigError, match=match):
        RunConfig(**options).validate()


# ------------------------------------------------------------------------------ a whole round
def test_a_round_with_views_trains_and_books_exactly_the_same_mechanism():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(40, 1, 8, 8)).astype(np.float32)
    y = rng.integers(0, 10, size=40)
    results, rows_seen = {}, {}
    for k in (1, 4):
        cfg = RunConfig(batch_size=10, local_epochs=2, learning_rate=0.3, augment_views=k).validate()
        model = build_model("cnn", (1, 8, 8), 10, seed=0)
        seen = []
        model.features[0].register_forward_hook(lambda m, inp, out: seen.append(inp[0].shape[0]))
        results[k] = train_round(model, x, y, cfg, prior_history=[], rng=RoundRandomness.seeded(3))
        rows_seen[k] = sum(seen)
    assert results[4].mechanism == results[1].mechanism == planned_mechanism(40, RunConfig(batch_size=10, local_epochs=2))
    assert results[4].epsilon == results[1].epsilon
    assert rows_seen[4] == 4 * rows_seen[1]  # the same Poisson batches of records, four views each
    assert np.isfinite(results[4].train_loss)
