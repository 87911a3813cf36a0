"""common.models: every family is Opacus-valid, has the right shapes, and learns under DP-SGD."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from opacus.validators import ModuleValidator

from fedpriv.client.dp_training import RoundRandomness, train_round
from fedpriv.common.config import RunConfig
from fedpriv.common.datasets import load_dataset
from fedpriv.common.errors import UserInputError
from fedpriv.common.evaluation import evaluate
from fedpriv.common.models import build_model, check_fit, model_from_config
from fedpriv.common.scattering import WaveletScattering
from fedpriv.client.bookkeeping import supports
from fedpriv.client.grad_sample_modes import resolve
from opacus.layers import DPGRU, DPLSTM

MNIST1D_SAMPLES = 1000


@pytest.fixture(scope="module", autouse=True)
def quiet_cpu(cache_dir):
    """One torch thread (the suite may share two cores with other work; per-sample grads of
    these tiny models are faster single-threaded) and the session's dataset cache folder."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("FEDPRIV_CACHE", str(cache_dir))
        yield
    torch.set_num_threads(threads)


def _data(name: str):
    return load_dataset(name, seed=0, mnist1d_samples=MNIST1D_SAMPLES)


SHAPES = {"digits": ((1, 8, 8), 10), "mnist1d": ((1, 40), 10)}


@pytest.mark.parametrize("family, dataset", [("cnn", "digits"), ("cnn", "mnist1d"), ("rnn", "digits"),
                                             ("rnn", "mnist1d"), ("autoencoder", "digits"),
                                             ("autoencoder", "mnist1d")])
def test_family_is_valid_for_opacus_and_has_the_right_output_shape(family, dataset):
    input_shape, classes = SHAPES[dataset]
    model = build_model(family, input_shape, classes, seed=0)
    assert ModuleValidator.validate(model, strict=True) == []
    assert not any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in model.modules())
    x = torch.randn(5, *input_shape)
    out = model(x)
    expected = (5, *input_shape) if family == "autoencoder" else (5, classes)
    assert tuple(out.shape) == expected


def test_same_seed_same_initial_weights():
    a = build_model("cnn", (1, 8, 8), 10, seed=3).state_dict()
    b = build_model("cnn", (1, 8, 8), 10, seed=3).state_dict()
    c = build_model("cnn", (1, 8, 8), 10, seed=4).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)


def test_model_from_config_uses_its_sizes():
    cfg = RunConfig(model="rnn", rnn_hidden=24, rnn_layers=2, encoding_dim=7)
    rnn = model_from_config(cfg, (1, 40), 10, seed=0)
    assert rnn.rnn.hidden_size == 24 and rnn.rnn.num_layers == 2
    assert rnn.head.in_features == 24
    ae = model_from_config(RunConfig(model="autoencoder", encoding_dim=7), (1, 8, 8), 0, seed=0)
    assert ae.encoder[-2].out_features == 7


@pytest.mark.parametrize("cell, layer", [("gru", DPGRU), ("lstm", DPLSTM)])
def test_rnn_cell_option_picks_the_opacus_layer(cell, layer):
    model = model_from_config(RunConfig(model="rnn", rnn_cell=cell, rnn_hidden=16), (1, 40), 10, seed=0)
    assert isinstance(model.rnn, layer)
    assert ModuleValidator.validate(model, strict=True) == []
    assert tuple(model(torch.randn(3, 1, 40)).shape) == (3, 10)
    # "auto" keeps exact per-sample gradients for both cells: book-keeping covers RNNLinear.
    assert supports(model) and resolve("auto", "rnn", model) == "bookkeeping"


@pytest.mark.parametrize("mode", ["bookkeeping", "hooks"])
@pytest.mark.parametrize("cell", ["gru", "lstm"])
def test_rnn_cells_get_exact_clipped_per_sample_gradients(cell, mode):
    """What ``auto`` picks (book-keeping) and its fallback (hooks) match a one-sample-at-a-time loop."""
    from test_dp_speed import CLIP, TOL, batch_for, naive_clipped, private_step_gradient

    from fedpriv.common.evaluation import task_loss

    model = build_model("rnn", (1, 12), 10, rnn_hidden=16, rnn_cell=cell, seed=1)
    x, y = batch_for("rnn", (1, 12), 10, n=6)
    ref_norms, ref_sum = naive_clipped(model, task_loss("rnn"), x, y, CLIP)
    assert (ref_norms > CLIP).any()
    grad, norms = private_step_gradient(model, task_loss("rnn"), mode, x, y, expected_batch=6)
    torch.testing.assert_close(norms, ref_norms, rtol=0, atol=TOL)
    torch.testing.assert_close(grad, ref_sum, rtol=0, atol=TOL)


def test_unknown_rnn_cell_is_a_config_error():
    with pytest.raises(UserInputError, match="--rnn-cell"):
        RunConfig(model="rnn", rnn_cell="rnn").validate()
    with pytest.raises(UserInputError, match="--ae-layers"):
        RunConfig(model="autoencoder", ae_layers=0).validate()


def test_ae_layers_default_is_the_original_architecture():
    default = build_model("autoencoder", (1, 8, 8), 0, encoding_dim=7, seed=0)
    assert [tuple(p.shape) for p in default.parameters()] == [(400, 64), (400,), (7, 400), (7,), (400, 7), (400,),
                                                             (64, 400), (64,)]
    assert list(default.state_dict()) == ["encoder.1.weight", "encoder.1.bias", "encoder.3.weight", "encoder.3.bias",
                                          "decoder.0.weight", "decoder.0.bias", "decoder.2.weight", "decoder.2.bias"]


def test_ae_layers_two_adds_a_400_layer_on_each_side_and_opacus_accepts_it():
    model = model_from_config(RunConfig(model="autoencoder", encoding_dim=7, ae_layers=2), (1, 8, 8), 0, seed=0)
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(64, 400), (400, 400), (400, 7), (7, 400),
                                                                  (400, 400), (400, 64)]
    assert ModuleValidator.validate(model, strict=True) == []
    assert tuple(model(torch.randn(5, 1, 8, 8)).shape) == (5, 1, 8, 8)
    assert supports(model) and resolve("auto", "autoencoder", model) == "bookkeeping"


def test_cnn_arch_card_is_the_design_cards_cnn_with_its_parameter_names():
    model = build_model("cnn", (3, 32, 32), 10, seed=0, cnn_arch="card")
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert shapes == {"features.0.weight": (32, 3, 3, 3), "features.0.bias": (32,),  # Conv2d(3, 32, 3)
                      "features.3.weight": (64, 32, 3, 3), "features.3.bias": (64,),
                      "classifier.1.weight": (128, 64 * 8 * 8), "classifier.1.bias": (128,),
                      "classifier.3.weight": (10, 128), "classifier.3.bias": (10,)}
    assert sum(p.numel() for p in build_model("cnn", (1, 8, 8), 10, cnn_arch="card").parameters()) == 53_002


def test_cnn_arch_compact_is_the_cards_first_block_feeding_the_class_layer():
    model = model_from_config(RunConfig(cnn_arch="compact"), (3, 32, 32), 10, seed=0)
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert shapes == {"features.0.weight": (32, 3, 3, 3), "features.0.bias": (32,),
                      "classifier.1.weight": (10, 32 * 16 * 16), "classifier.1.bias": (10,)}
    assert sum(p.numel() for p in build_model("cnn", (1, 8, 8), 10, cnn_arch="compact").parameters()) == 5_450
    assert ModuleValidator.validate(model, strict=True) == []


def test_cnn_arch_card_conv_is_the_cards_two_conv_blocks_feeding_the_class_layer():
    """The card's convolutions with their parameter names, FC 128 left out; book-keeping clips it
    exactly (``auto`` picks it), so it costs what the card's CNN costs per step."""
    from test_dp_speed import CLIP, NORM_RTOL, TOL, batch_for, naive_clipped, private_step_gradient

    from fedpriv.common.evaluation import task_loss

    model = model_from_config(RunConfig(cnn_arch="card-conv"), (3, 32, 32), 10, seed=0)
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert shapes == {"features.0.weight": (32, 3, 3, 3), "features.0.bias": (32,),
                      "features.3.weight": (64, 32, 3, 3), "features.3.bias": (64,),
                      "classifier.1.weight": (10, 64 * 8 * 8), "classifier.1.bias": (10,)}
    assert sum(p.numel() for p in build_model("cnn", (1, 40), 10, cnn_arch="card-conv").parameters()) == 12_746
    assert ModuleValidator.validate(model, strict=True) == []
    model = build_model("cnn", (1, 40), 10, seed=0, cnn_arch="card-conv")
    assert resolve("auto", "cnn", model) == "bookkeeping"
    x, y = batch_for("cnn", (1, 40), 10, n=6)
    ref_norms, ref_sum = naive_clipped(model, task_loss("cnn"), x, y, CLIP)
    grad, norms = private_step_gradient(model, task_loss("cnn"), "bookkeeping", x, y, expected_batch=6)
    torch.testing.assert_close(norms, ref_norms, rtol=NORM_RTOL, atol=TOL)  # norms ~10: float32 rounding
    torch.testing.assert_close(grad, ref_sum, rtol=0, atol=TOL)


def test_cnn_arch_scatter_the_default_trains_only_the_class_layer_on_fixed_wavelet_features():
    """ScatterNet + linear (Tramer & Boneh 2021): the wavelet filters and the per-record GroupNorm
    have no trainable parameter, so the class layer is all a client trains and releases."""
    model = model_from_config(RunConfig(), (3, 32, 32), 10, seed=0)
    channels = 3 * (1 + 8)  # every colour channel, and the modulus of its 8 oriented wavelets
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert shapes == {"classifier.1.weight": (10, channels * 16 * 16), "classifier.1.bias": (10,)}
    assert [type(m) for m in model.features] == [WaveletScattering, torch.nn.GroupNorm]
    assert sum(p.numel() for p in build_model("cnn", (1, 8, 8), 10).parameters()) == 1_450
    assert sum(p.numel() for p in build_model("cnn", (1, 40), 10, cnn_arch="scatter").parameters()) == 2_810
    assert ModuleValidator.validate(model, strict=True) == []
    assert resolve("auto", "cnn", model) == "bookkeeping"


def test_cnn_arch_scatter_conv_feeds_the_features_to_the_cards_two_conv_blocks():
    model = build_model("cnn", (1, 40), 10, seed=0, cnn_arch="scatter-conv")
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert shapes == {"features.2.weight": (32, 7, 3), "features.2.bias": (32,),  # 1 + 6 wavelet channels
                      "features.5.weight": (64, 32, 3), "features.5.bias": (64,),
                      "classifier.1.weight": (10, 64 * 10), "classifier.1.bias": (10,)}
    assert sum(p.numel() for p in model.parameters()) == 13_322
    image = build_model("cnn", (3, 32, 32), 10, seed=0, cnn_arch="scatter-conv")
    assert tuple(image(torch.randn(2, 3, 32, 32)).shape) == (2, 10)
    assert ModuleValidator.validate(image, strict=True) == []


@pytest.mark.parametrize("arch", ["scatter", "scatter-conv"])
@pytest.mark.parametrize("shape", [(1, 8, 8), (3, 8, 8), (1, 40)])
def test_scatter_archs_get_exact_clipped_per_sample_gradients(arch, shape):
    """Book-keeping (what ``auto`` picks) clips each record's gradient exactly: the per-record
    GroupNorm mixes no records, so a one-sample-at-a-time loop gives the same norms and sum."""
    from test_dp_speed import CLIP, NORM_RTOL, TOL, batch_for, naive_clipped, private_step_gradient

    from fedpriv.common.evaluation import task_loss

    model = build_model("cnn", shape, 10, seed=0, cnn_arch=arch)
    assert resolve("auto", "cnn", model) == "bookkeeping"
    x, y = batch_for("cnn", shape, 10, n=6)
    ref_norms, ref_sum = naive_clipped(model, task_loss("cnn"), x, y, CLIP)
    grad, norms = private_step_gradient(model, task_loss("cnn"), "bookkeeping", x, y, expected_batch=6)
    torch.testing.assert_close(norms, ref_norms, rtol=NORM_RTOL, atol=TOL)
    torch.testing.assert_close(grad, ref_sum, rtol=0, atol=TOL)


@pytest.mark.parametrize("arch", ["scatter", "scatter-conv"])
def test_a_server_cannot_set_the_wavelet_filters(arch):
    """The filters are rebuilt from code on every machine and never travel: weights from a server
    that carry filters of its own (say, all zero, or one that copies the input) are refused, and the
    client's filters stay as they were."""
    model = build_model("cnn", (1, 8, 8), 10, seed=0, cnn_arch=arch)
    scattering = model.features[0]
    before = scattering.filters.clone()
    crafted = dict(model.state_dict())
    crafted["features.0.filters"] = torch.zeros_like(before)
    with pytest.raises(RuntimeError, match="features.0.filters"):
        model.load_state_dict(crafted)
    assert torch.equal(scattering.filters, before)
    assert "features.0.filters" not in model.state_dict()


@pytest.mark.parametrize("arch", ["compact", "card", "card-conv", "scatter-conv"])
@pytest.mark.parametrize("shape", [(1, 8, 8), (1, 40)])
def test_cnn_norm_group_is_opacus_valid_and_gets_exact_clipped_per_sample_gradients(shape, arch):
    """GroupNorm normalises each record on its own, so per-sample gradients exist; the mode ``auto``
    resolves to for it must match a one-sample-at-a-time loop (BatchNorm would mix records)."""
    from test_dp_speed import CLIP, TOL, batch_for, naive_clipped, private_step_gradient

    from fedpriv.common.evaluation import task_loss

    model = model_from_config(RunConfig(cnn_norm="group", cnn_arch=arch), shape, 10, seed=0)
    # scatter-conv's own GroupNorm on the wavelet features comes first
    assert sum(isinstance(m, torch.nn.GroupNorm) for m in model.modules()) == {"compact": 1, "scatter-conv": 3}.get(arch, 2)
    assert ModuleValidator.validate(model, strict=True) == []
    x, y = batch_for("cnn", shape, 10, n=6)
    ref_norms, ref_sum = naive_clipped(model, task_loss("cnn"), x, y, CLIP)
    grad, norms = private_step_gradient(model, task_loss("cnn"), resolve("auto", "cnn", model), x, y, expected_batch=6)
    torch.testing.assert_close(norms, ref_norms, rtol=0, atol=TOL)
    torch.testing.assert_close(grad, ref_sum, rtol=0, atol=TOL)


def test_cnn_norm_group_on_the_scatter_arch_is_refused_not_ignored():
    """``scatter`` has no conv block for ``--cnn-norm group`` to normalise: one line, not a silent no-op."""
    with pytest.raises(UserInputError, match="--cnn-norm group .* --cnn-arch scatter has none"):
        build_model("cnn", (1, 8, 8), 10, cnn_norm="group", cnn_arch="scatter")


def test_the_scatter_front_end_needs_two_positions_per_channel():
    """One value per channel normalises to zero: the class layer would see nothing but its bias."""
    one = build_model("cnn", (1, 2, 2), 10, seed=0).features  # 2x2 averaged to 1x1
    assert torch.count_nonzero(one(torch.randn(4, 1, 2, 2))) == 0
    two = build_model("cnn", (1, 4, 4), 10, seed=0).features
    assert torch.count_nonzero(two(torch.randn(4, 1, 4, 4))) > 0


def test_unknown_family_is_a_user_error():
    with pytest.raises(UserInputError, match="--model"):
        build_model("transformer", (1, 8, 8), 10)


# One DP round on a small slice of real data; settings picked so the loss falls for any seed
# (checked on seeds 0-3). The RNN on MNIST-1D reads 40 steps of one scalar and learns slowly
# even without DP, so it gets a smaller slice, smaller batches and more epochs.
CASES = [
    # family, dataset, samples, batch, epochs, lr, required drop of the training loss
    ("cnn", "digits", 256, 32, 5, 0.1, 0.5),
    ("cnn", "mnist1d", 256, 32, 5, 0.05, 0.1),
    ("rnn", "digits", 256, 32, 5, 0.1, 0.1),
    ("rnn", "mnist1d", 64, 16, 10, 0.1, 0.03),
    ("autoencoder", "digits", 256, 32, 5, 0.05, 0.2),
]


@pytest.mark.parametrize("family, dataset, n, batch, epochs, lr, drop", CASES,
                         ids=[f"{c[0]}-{c[1]}" for c in CASES])
def test_family_learns_under_dp(family, dataset, n, batch, epochs, lr, drop):
    _learns_under_dp(family, dataset, n, batch, epochs, lr, drop)


# The RNN with each cell (--rnn-cell), and the deeper autoencoder (--ae-layers 2).
VARIANTS = [
    # family, dataset, samples, batch, epochs, lr, drop, extra config
    ("rnn", "digits", 256, 32, 5, 0.1, 0.1, {"rnn_cell": "gru"}),
    ("rnn", "digits", 256, 32, 5, 0.1, 0.1, {"rnn_cell": "lstm"}),
    ("rnn", "mnist1d", 64, 16, 10, 0.1, 0.03, {"rnn_cell": "gru"}),
    ("rnn", "mnist1d", 64, 16, 10, 0.1, 0.03, {"rnn_cell": "lstm"}),
    ("autoencoder", "digits", 256, 32, 5, 0.05, 0.2, {"ae_layers": 2}),
]


@pytest.mark.parametrize("family, dataset, n, batch, epochs, lr, drop, extra", VARIANTS,
                         ids=[f"{c[0]}-{c[1]}-{'-'.join(f'{k}={v}' for k, v in c[7].items())}" for c in VARIANTS])
def test_variant_learns_under_dp(family, dataset, n, batch, epochs, lr, drop, extra):
    _learns_under_dp(family, dataset, n, batch, epochs, lr, drop, **extra)


def _learns_under_dp(family, dataset, n, batch, epochs, lr, drop, **extra):
    torch.manual_seed(0)
    data = _data(dataset)
    x = np.ascontiguousarray(data.x_train[:n])
    y = np.ascontiguousarray(data.y_train[:n])
    labels = None if family == "autoencoder" else y
    cfg = RunConfig(model=family, dataset=dataset, mnist1d_samples=MNIST1D_SAMPLES, local_epochs=epochs,
                    batch_size=batch, learning_rate=lr, noise_multiplier=0.5, max_grad_norm=1.0, **extra).validate()
    model = model_from_config(cfg, data.input_shape, data.num_classes, seed=0)
    before = evaluate(model, family, x, labels)["loss"]
    model.train()  # evaluate() left it in eval mode, which Opacus refuses
    result = train_round(model, x, y, cfg, prior_history=[], rng=RoundRandomness.seeded(0))
    after = evaluate(model, family, x, labels)["loss"]

    assert np.isfinite(after)
    assert after < before - drop, (before, after)
    # The returned weights are the trained model's, and DP was really on.
    assert all(torch.equal(result.state_dict[k], v) for k, v in model.state_dict().items())
    assert result.num_examples == n
    assert result.noise_multiplier == 0.5 and 0 < result.epsilon < np.inf
    assert result.steps > 0 and np.isfinite(result.train_loss)


def test_check_fit_classifier_needs_labels():
    for family in ("cnn", "rnn"):
        with pytest.raises(UserInputError, match=f"--model {family}"):
            check_fit(family, (1, 8, 8), labelled=False, dataset="npz:x.npz")
    check_fit("autoencoder", (1, 8, 8), labelled=False, dataset="npz:x.npz")  # fine


@pytest.mark.parametrize("arch, shape", [("card", (1, 3)), ("card", (1, 3, 8)), ("card", (1, 8, 2)), ("card", (3, 2, 2)),
                                         ("card-conv", (1, 3)), ("card-conv", (3, 8, 2)), ("compact", (1, 1)), ("compact", (1, 1, 8)), ("compact", (3, 8, 1)),
                                         ("scatter", (1, 1)), ("scatter", (1, 2, 2)), ("scatter", (1, 3, 8)), ("scatter-conv", (1, 3)),
                                         ("scatter-conv", (1, 4, 8)), ("scatter-conv", (3, 8, 7))])
def test_check_fit_cnn_needs_a_spatial_size_each_pool_can_halve(arch, shape):
    with pytest.raises(UserInputError, match=f"--model cnn --cnn-arch {arch}"):
        check_fit("cnn", shape, labelled=True, dataset="npz:small.npz", cnn_arch=arch)
    check_fit("rnn", shape, labelled=True, dataset="npz:small.npz")
    check_fit("autoencoder", shape, labelled=True, dataset="npz:small.npz")


@pytest.mark.parametrize("arch, shape", [("card", (1, 4)), ("card", (1, 4, 4)), ("card", (3, 8, 8)), ("card", (1, 40)),
                                         ("card-conv", (1, 4)), ("card-conv", (3, 8, 8)), ("compact", (1, 2)), ("compact", (1, 2, 2)), ("compact", (3, 8, 8)), ("compact", (1, 40)),
                                         ("scatter", (1, 2)), ("scatter", (1, 4, 4)), ("scatter", (3, 32, 32)), ("scatter-conv", (1, 4)), ("scatter-conv", (1, 8, 8))])
def test_check_fit_accepts_what_the_cnn_can_take(arch, shape):
    check_fit("cnn", shape, labelled=True, dataset="d", cnn_arch=arch)
    # ...and the CNN really runs on it.
    out = build_model("cnn", shape, 3, seed=0, cnn_arch=arch)(torch.randn(2, *shape))
    assert tuple(out.shape) == (2, 3)
