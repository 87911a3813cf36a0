"""The three model families, each valid under Opacus (no BatchNorm, DPGRU/DPLSTM for recurrence).

Shapes follow the design card: CNN = two 3x3 convs (32, 64) + ReLU + 2x2 max-pool, FC 128,
class layer; RNN = recurrent encoder whose last step feeds a linear classifier (``--rnn-cell``:
the card's LSTM, Opacus' DPLSTM, or the default GRU, DPGRU, which measured more accurate under
DP-SGD, see :class:`SequenceClassifier`; read over overlapping windows); autoencoder = input ->
400 -> encoding -> 400 -> input (``--ae-layers``: hidden layers of 400 per side). Input
shapes adapt to the dataset: ``(C, L)`` for sequences (MNIST-1D) uses 1-D convolutions,
``(C, H, W)`` for images uses 2-D ones.
"""

from __future__ import annotations

import math

import torch
from opacus.layers import DPGRU, DPLSTM
from torch import nn

from fedpriv.common.config import CNN_ARCHS, CNN_NORMS  # --cnn-arch, --cnn-norm
from fedpriv.common.errors import UserInputError
from fedpriv.common.scattering import WaveletScattering, pool_size

CLASSIFIERS = ("cnn", "rnn", "mlp")
MLP_WIDTHS = (128, 64)  # the tabular classifier's hidden layers
RNN_CELLS = {"gru": DPGRU, "lstm": DPLSTM}  # --rnn-cell: Opacus' DP-ready recurrent layers
AE_WIDTH = 400  # the autoencoder's hidden width (input -> 400 -> encoding -> 400 -> input)
SEQUENCE_CHUNK = 8  # 1-D sequences: time steps per GRU step (see SequenceClassifier)
CNN_BLOCKS = {"compact": 1, "card": 2, "card-conv": 2, "scatter": 0, "scatter-conv": 2}  # --cnn-arch: conv blocks, each halving every spatial size (2x2 pool)
SCATTER_ARCHS = ("scatter", "scatter-conv")  # --cnn-arch: the fixed wavelet front end (common/scattering.py) first
COMPACT_CHANNELS = 32  # --cnn-arch compact: the card's first block (64 filters: 0.892 against 0.897 over 12 runs each)
CNN_GROUPS = 8  # GroupNorm groups per conv layer (32 and 64 channels: 4 and 8 per group)


class ConvNet(nn.Module):
    """Convolution blocks and dense layers, 1-D or 2-D by the input's rank.

    ``arch="card"`` (``--cnn-arch card``) is the design card's CNN: two 3x3 conv blocks (32, 64
    channels, ReLU, 2x2 max-pool), FC 128, class layer (53,002 weights on 8x8 digits).
    ``arch="compact"`` is that network's first block feeding the class layer straight
    away (5,450 weights on digits). Why it was the default before ``scatter``: under local DP every owner adds noise of
    the same size to each of the model's weights, and at the main job's 143 records per owner the
    card's 53,002 weights drown the averaged clipped gradient in that noise (accuracy 0.755 at
    epsilon 3.98, against 0.897 over 12 runs for the compact CNN; README "--cnn-arch").
    ``arch="card-conv"`` is the card's two conv blocks feeding the class layer straight away, without
    FC 128 (12,746 weights on MNIST-1D's 40 steps, against the card's 89,674): where owners hold
    thousands of records (MNIST-1D, 4,800 each) the second block pays for itself, FC 128's 82,048
    weights do not (README "--cnn-arch": 0.937 against 0.899 at epsilon 8).

    ``arch="scatter"``, the default, is a ScatterNet (Tramer & Boneh 2021; common/scattering.py): a
    fixed, data-independent wavelet filter bank (each channel and the modulus of its Gabor wavelet
    responses; images averaged over 2x2 patches), a GroupNorm that normalises each record's feature
    channels on their own (no trainable parameters), and the class layer: the only trained weights
    (1,450 on 8x8 digits). ``arch="scatter-conv"`` puts the card's two conv blocks between the
    normalised features and the class layer (ScatterNet + CNN; 13,322 weights on MNIST-1D). Nothing
    before the trainable layers is learnt, so no privacy is spent on features, and the noise of
    DP-SGD falls on fewer weights that start from features in which the classes already separate:
    on the main job 0.946 against compact's 0.883 and 0.914 (two quality benches, epsilon 3.98; 0.949
    against 0.893 over 16 and 40 standalone replica runs), on MNIST-1D at epsilon 2 0.905 against
    card-conv's 0.869 (the same bench run, PRV; README "--cnn-arch").

    ``norm="group"`` (``--cnn-norm group``) puts a GroupNorm after each convolution, before its ReLU:
    the normalisation DP-SGD can use (BatchNorm mixes the records of a batch, so per-sample
    gradients would not exist; GroupNorm is per record). ``"none"`` keeps the card's parameter names.
    """

    def __init__(self, input_shape: tuple[int, ...], num_classes: int, norm: str = "none", arch: str = "scatter") -> None:
        super().__init__()
        if norm not in CNN_NORMS:
            raise UserInputError(f"--cnn-norm '{norm}' is unknown; choose one of: {', '.join(CNN_NORMS)}")
        if arch not in CNN_ARCHS:
            raise UserInputError(f"--cnn-arch '{arch}' is unknown; choose one of: {', '.join(CNN_ARCHS)}")
        if norm != "none" and CNN_BLOCKS[arch] == 0:
            raise UserInputError(f"--cnn-norm {norm} normalises the CNN's conv blocks, and --cnn-arch {arch} has none (its "
                                 "wavelet features are normalised per record already); use --cnn-norm none or --cnn-arch scatter-conv")
        channels, *spatial = input_shape
        conv, pool = (nn.Conv1d, nn.MaxPool1d) if len(spatial) == 1 else (nn.Conv2d, nn.MaxPool2d)

        def block(c_in: int, c_out: int) -> list[nn.Module]:
            normed = [nn.GroupNorm(CNN_GROUPS, c_out)] if norm == "group" else []
            return [conv(c_in, c_out, kernel_size=3, padding=1), *normed, nn.ReLU(), pool(2)]

        front: list[nn.Module] = []
        if arch in SCATTER_ARCHS:  # fixed wavelet features, each record's channels normalised on their own
            scattering = WaveletScattering(channels, len(spatial))
            front = [scattering, nn.GroupNorm(scattering.out_channels, scattering.out_channels, affine=False)]
            channels, spatial = scattering.out_channels, [s // scattering.pool for s in spatial]
        if arch == "compact":
            self.features, width = nn.Sequential(*block(channels, COMPACT_CHANNELS)), COMPACT_CHANNELS
        elif arch == "scatter":
            self.features, width = nn.Sequential(*front), channels
        else:  # the card's two conv blocks
            self.features, width = nn.Sequential(*front, *block(channels, 32), *block(32, 64)), 64
        flat = width * math.prod(s // 2 ** CNN_BLOCKS[arch] for s in spatial)
        if arch == "card":
            self.classifier = nn.Sequential(nn.Flatten(), nn.Linear(flat, 128), nn.ReLU(), nn.Linear(128, num_classes))
        else:
            self.classifier = nn.Sequential(nn.Flatten(), nn.Linear(flat, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


class SequenceClassifier(nn.Module):
    """DPGRU or DPLSTM (``cell``) over the sequence axis; the last hidden state feeds a linear classifier.

    A ``(C, L)`` input is read in windows of ``chunk`` consecutive steps that start every ``stride``
    steps (default ``chunk // 2``: half-overlapping), one GRU step of chunk*C features per window
    (the last window zero-padded), so MNIST-1D's 40 scalars are 9 steps of 8. ``(C, H, W)`` is read
    as H steps of C*W features. Measured on MNIST-1D (60,000 samples, 10 IID clients, local DP-SGD
    at epsilon 8, 10 rounds of 2 epochs, batch 512, final test accuracy): DPGRU beat DPLSTM at
    every learning rate tried (5 disjoint steps of 8, lr 16: 0.78 vs 0.69; half-overlapping windows,
    lr 16: 0.88 vs 0.80), and half-overlapping windows beat disjoint ones (lr 8: 0.83 vs 0.72; a
    digit shifted by a few steps straddles a window border less often) at 1.8x the steps.
    Mean-pooling all hidden states instead of the last one was no better at the best learning rate
    (lr 8: 0.84-0.85 vs 0.83; lr 16: 0.73 vs 0.88-0.89).
    Re-measured with ``--rnn-cell`` (MNIST-1D 10,000 samples, 10 IID clients, 8 rounds of 2 epochs,
    batch 256, ``--target-epsilon 8`` so sigma 1.544 for both; final test accuracy, seed 0):
    lr 2: GRU 0.434, LSTM 0.412; lr 8: GRU 0.403, LSTM 0.344; lr 16: GRU 0.151 (diverged),
    LSTM 0.309. Best against best, GRU stays the default.
    DPGRU runs one Python-level step per time step, so steps dominate the cost (DPLSTM, measured
    here: 40 steps of one scalar about 3x slower per sample than 10 of 4, 10 about 2x slower than 5).
    """

    def __init__(self, input_shape: tuple[int, ...], num_classes: int, hidden: int, layers: int,
                 chunk: int = SEQUENCE_CHUNK, stride: int | None = None, cell: str = "gru") -> None:
        super().__init__()
        if cell not in RNN_CELLS:
            raise UserInputError(f"--rnn-cell '{cell}' is unknown; choose one of: {', '.join(RNN_CELLS)}")
        channels, *spatial = input_shape
        self.image = len(spatial) == 2
        self.chunk = 1 if self.image else chunk
        self.stride = 1 if self.image else (stride or max(1, chunk // 2))
        features = channels * spatial[1] if self.image else channels * self.chunk
        self.rnn = RNN_CELLS[cell](features, hidden, num_layers=layers, batch_first=True)
        self.head = nn.Linear(hidden, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.image:  # (n, C, H, W) -> (n, H, C*W)
            x = x.permute(0, 2, 1, 3).flatten(2)
        else:  # (n, C, L) -> (n, steps, C*chunk): windows of chunk starting every stride steps
            steps = math.ceil(max(x.shape[-1] - self.chunk, 0) / self.stride) + 1
            x = nn.functional.pad(x, (0, (steps - 1) * self.stride + self.chunk - x.shape[-1]))
            x = x.unfold(2, self.chunk, self.stride).transpose(1, 2).flatten(2)
        out, _ = self.rnn(x)
        return self.head(out[:, -1, :])


class Autoencoder(nn.Module):
    """Dense autoencoder; reconstructs the flattened input, returns it in the input's shape.

    ``layers`` (``--ae-layers``, the design card's ``n_layers``) is the number of hidden layers of
    400 units on *each* side of the bottleneck: 1 (default) is input -> 400 -> encoding -> 400 ->
    input, exactly the original architecture (same parameter names, so old checkpoints load);
    2 is input -> 400 -> 400 -> encoding -> 400 -> 400 -> input, and so on. Every hidden layer
    and the encoding are followed by a ReLU; the output layer is linear.
    """

    def __init__(self, input_shape: tuple[int, ...], encoding_dim: int, layers: int = 1) -> None:
        super().__init__()
        if layers < 1:
            raise UserInputError(f"--ae-layers must be a positive integer (got {layers})")
        self.input_shape = tuple(input_shape)
        dim = math.prod(input_shape)
        extra = [m for _ in range(layers - 1) for m in (nn.Linear(AE_WIDTH, AE_WIDTH), nn.ReLU())]
        self.encoder = nn.Sequential(nn.Flatten(), nn.Linear(dim, AE_WIDTH), nn.ReLU(), *extra,
                                     nn.Linear(AE_WIDTH, encoding_dim), nn.ReLU())
        extra = [m for _ in range(layers - 1) for m in (nn.Linear(AE_WIDTH, AE_WIDTH), nn.ReLU())]
        self.decoder = nn.Sequential(nn.Linear(encoding_dim, AE_WIDTH), nn.ReLU(), *extra, nn.Linear(AE_WIDTH, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.encoder(x)).view(-1, *self.input_shape)


class MLP(nn.Module):
    """Tabular classifier: flattened input -> 128 -> 64 -> classes, ReLU between (Linear only: Opacus-valid)."""

    def __init__(self, input_shape: tuple[int, ...], num_classes: int, widths: tuple[int, ...] = MLP_WIDTHS) -> None:
        super().__init__()
        dims = (math.prod(input_shape), *widths)
        hidden = [m for a, b in zip(dims, dims[1:]) for m in (nn.Linear(a, b), nn.ReLU())]
        self.net = nn.Sequential(nn.Flatten(), *hidden, nn.Linear(dims[-1], num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def smallest_cnn_input(arch: str, spatial_dims: int) -> int:
    """The smallest spatial size ``--cnn-arch arch`` takes: each conv block's 2x2 pool halves every
    size, and so does the scattering front end's averaging on images; the front end's per-record
    GroupNorm needs two positions per channel (one value normalises to 0: nothing left to learn)."""
    if arch not in SCATTER_ARCHS:
        return 2 ** CNN_BLOCKS[arch]
    return pool_size(spatial_dims) * max(2, 2 ** CNN_BLOCKS[arch])


def check_fit(model: str, input_shape: tuple[int, ...], labelled: bool, dataset: str, augment_views: int = 1,
              cnn_arch: str = "scatter") -> None:
    """Raise a one-line error when a dataset cannot feed a model family (or be augmented, ``augment_views`` > 1)."""
    if augment_views > 1 and len(input_shape) not in (2, 3):
        raise UserInputError(
            f"--augment-views shifts sequences (C, L) or images (C, H, W), but dataset '{dataset}' has records of "
            f"shape {input_shape}; use --augment-views 1")
    if model in CLASSIFIERS and not labelled:
        raise UserInputError(
            (f"--model {model} needs labels but dataset '{dataset}' has none; set --label-column NAME or use --model autoencoder"
             if dataset.startswith(("csv:", "parquet:")) else
             f"--model {model} needs labels but dataset '{dataset}' has no 'y' array; add y or use --model autoencoder")
        )
    if model in ("cnn", "rnn") and len(input_shape) < 2:
        raise UserInputError(
            f"--model {model} needs sequences (C, L) or images (C, H, W), but dataset '{dataset}' is a table of "
            f"shape {input_shape}; use --model mlp (or autoencoder)"
        )
    if model == "cnn":
        smallest = smallest_cnn_input(cnn_arch, len(input_shape) - 1)
        if any(s < smallest for s in input_shape[1:]):
            raise UserInputError(
                f"--model cnn --cnn-arch {cnn_arch} needs every spatial size >= {smallest} (dataset '{dataset}' has shape "
                f"{input_shape}); use --model rnn or autoencoder")


def build_model(model: str, input_shape: tuple[int, ...], num_classes: int, *, rnn_hidden: int = 64,
                rnn_layers: int = 1, encoding_dim: int = 32, seed: int | None = None, rnn_cell: str = "gru",
                ae_layers: int = 1, cnn_norm: str = "none", cnn_arch: str = "scatter") -> nn.Module:
    """A fresh model; with ``seed`` its initial weights are deterministic."""
    if seed is not None:
        torch.manual_seed(seed)
    if model == "cnn":
        return ConvNet(input_shape, num_classes, norm=cnn_norm, arch=cnn_arch)
    if model == "rnn":
        return SequenceClassifier(input_shape, num_classes, rnn_hidden, rnn_layers, cell=rnn_cell)
    if model == "autoencoder":
        return Autoencoder(input_shape, encoding_dim, ae_layers)
    if model == "mlp":
        return MLP(input_shape, num_classes)
    raise UserInputError(f"--model '{model}' is unknown; choose one of: cnn, rnn, autoencoder, mlp")


def model_from_config(cfg, input_shape: tuple[int, ...], num_classes: int, seed: int | None = None) -> nn.Module:
    """Build the model a :class:`~common.config.RunConfig` describes."""
    return build_model(cfg.model, input_shape, num_classes, rnn_hidden=cfg.rnn_hidden,
                       rnn_layers=cfg.rnn_layers, encoding_dim=cfg.encoding_dim, seed=seed,
                       rnn_cell=cfg.rnn_cell, ae_layers=cfg.ae_layers, cnn_norm=cfg.cnn_norm,
                       cnn_arch=cfg.cnn_arch)
