"""common.scattering: a fixed wavelet front end that learns nothing and treats every record alone."""

from __future__ import annotations

import pytest
import torch

from fedpriv.common.models import build_model
from fedpriv.common.scattering import (FREQUENCIES, ORIENTATIONS, WaveletScattering, gabor_bank_1d,
                                       gabor_bank_2d)


@pytest.mark.parametrize("bank, count", [(gabor_bank_1d(), FREQUENCIES), (gabor_bank_2d(), ORIENTATIONS)])
def test_wavelets_have_no_dc_response_and_unit_norm(bank, count):
    assert bank.shape[0] == 2 * count
    flat = bank.flatten(1)
    torch.testing.assert_close(flat[:count].sum(dim=1), torch.zeros(count), atol=1e-5, rtol=0)  # real parts
    torch.testing.assert_close(flat.norm(dim=1), torch.ones(2 * count), atol=1e-5, rtol=0)


def test_wavelets_of_one_bank_differ():
    for bank in (gabor_bank_1d(), gabor_bank_2d()):
        flat = bank.flatten(1)
        cosine = flat @ flat.T
        assert (cosine - torch.eye(len(flat))).abs().max() < 0.999


@pytest.mark.parametrize("shape, out_shape", [((1, 40), (1 + FREQUENCIES, 40)), ((2, 40), (2 * (1 + FREQUENCIES), 40)),
                                              ((1, 8, 8), (1 + ORIENTATIONS, 4, 4)),
                                              ((3, 32, 32), (3 * (1 + ORIENTATIONS), 16, 16))])
def test_features_are_each_channel_then_its_wavelet_moduli(shape, out_shape):
    scattering = WaveletScattering(shape[0], len(shape) - 1)
    x = torch.randn(4, *shape)
    features = scattering(x)
    assert tuple(features.shape) == (4, *out_shape) and scattering.out_channels == out_shape[0]
    per_channel = 1 + scattering.wavelets
    order0 = features[:, ::per_channel]  # channel c's own values come first in its group
    expected = x if len(shape) == 2 else torch.nn.functional.avg_pool2d(x, 2)
    torch.testing.assert_close(order0, expected)
    assert (features.view(4, shape[0], per_channel, -1)[:, :, 1:] > 0).all()  # moduli


def test_channels_are_filtered_apart():
    """Depthwise: a channel's features depend on that channel only (no colour mixing before training)."""
    scattering = WaveletScattering(3, 2)
    x = torch.randn(2, 3, 8, 8)
    changed = x.clone()
    changed[:, 1] = torch.randn(2, 8, 8)
    a, b = scattering(x).view(2, 3, -1, 4, 4), scattering(changed).view(2, 3, -1, 4, 4)
    assert torch.equal(a[:, 0], b[:, 0]) and torch.equal(a[:, 2], b[:, 2])
    assert not torch.equal(a[:, 1], b[:, 1])


def test_the_front_end_has_nothing_to_train_and_nothing_to_send():
    scattering = WaveletScattering(1, 2)
    assert list(scattering.parameters()) == [] and scattering.state_dict() == {}


@pytest.mark.parametrize("arch", ["scatter", "scatter-conv"])
def test_a_record_is_normalised_on_its_own(arch):
    """The GroupNorm after the wavelets normalises each record's channels with that record's own
    statistics: a record's output does not depend on the other records of its batch (BatchNorm's
    would, and per-sample clipping would then not bound one record's influence)."""
    model = build_model("cnn", (1, 40), 10, seed=0, cnn_arch=arch).eval()
    x = torch.randn(5, 1, 40)
    alone = torch.cat([model(x[i:i + 1]) for i in range(5)])
    with torch.no_grad():
        others = x.clone()
        others[1:] = 100 * torch.randn(4, 1, 40)
    torch.testing.assert_close(model(x), alone, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(model(others)[0], alone[0], atol=1e-5, rtol=1e-5)
