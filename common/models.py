"""The three model families, each valid under Opacus (no BatchNorm, DPGRU for recurrence).

Shapes follow the design card: CNN = two 3x3 convs (32, 64) + ReLU + 2x2 max-pool, FC 128,
class layer; RNN = recurrent encoder whose last step feeds a linear classifier (a GRU over
overlapping windows rather than the card's LSTM: far more accurate under DP-SGD, see
:class:`SequenceClassifier`); autoencoder = input -> 400 -> encoding -> 400 -> input. Input
shapes adapt to the dataset: ``(C, L)`` for sequences (MNIST-1D) uses 1-D convolutions,
``(C, H, W)`` for images uses 2-D ones.
"""

from __future__ import annotations

import math

import torch
from opacus.layers import DPGRU
from torch import nn

from fedpriv.common.errors import UserInputError

CLASSIFIERS = ("cnn", "rnn")
SEQUENCE_CHUNK = 8  # 1-D sequences: time steps per GRU step (see SequenceClassifier)


class ConvNet(nn.Module):
    """Two conv blocks and two dense layers, 1-D or 2-D by the input's rank."""

    def __init__(self, input_shape: tuple[int, ...], num_classes: int) -> None:
        super().__init__()
        channels, *spatial = input_shape
        conv, pool = (nn.Conv1d, nn.MaxPool1d) if len(spatial) == 1 else (nn.Conv2d, nn.MaxPool2d)
        self.features = nn.Sequential(
            conv(channels, 32, kernel_size=3, padding=1),
            nn.ReLU(),
            pool(2),
            conv(32, 64, kernel_size=3, padding=1),
            nn.ReLU(),
            pool(2),
        )
        flat = 64 * math.prod(s // 4 for s in spatial)
        self.classifier = nn.Sequential(nn.Flatten(), nn.Linear(flat, 128), nn.ReLU(), nn.Linear(128, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


class SequenceClassifier(nn.Module):
    """DPGRU over the sequence axis; the last hidden state feeds a linear classifier.

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
    DPGRU runs one Python-level step per time step, so steps dominate the cost (DPLSTM, measured
    here: 40 steps of one scalar about 3x slower per sample than 10 of 4, 10 about 2x slower than 5).
    """

    def __init__(self, input_shape: tuple[int, ...], num_classes: int, hidden: int, layers: int,
                 chunk: int = SEQUENCE_CHUNK, stride: int | None = None) -> None:
        super().__init__()
        channels, *spatial = input_shape
        self.image = len(spatial) == 2
        self.chunk = 1 if self.image else chunk
        self.stride = 1 if self.image else (stride or max(1, chunk // 2))
        features = channels * spatial[1] if self.image else channels * self.chunk
        self.rnn = DPGRU(features, hidden, num_layers=layers, batch_first=True)
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
    """Dense autoencoder; reconstructs the flattened input, returns it in the input's shape."""

    def __init__(self, input_shape: tuple[int, ...], encoding_dim: int) -> None:
        super().__init__()
        self.input_shape = tuple(input_shape)
        dim = math.prod(input_shape)
        self.encoder = nn.Sequential(nn.Flatten(), nn.Linear(dim, 400), nn.ReLU(), nn.Linear(400, encoding_dim), nn.ReLU())
        self.decoder = nn.Sequential(nn.Linear(encoding_dim, 400), nn.ReLU(), nn.Linear(400, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.encoder(x)).view(-1, *self.input_shape)


def check_fit(model: str, input_shape: tuple[int, ...], labelled: bool, dataset: str) -> None:
    """Raise a one-line error when a dataset cannot feed a model family."""
    if model in CLASSIFIERS and not labelled:
        raise UserInputError(
            f"--model {model} needs labels but dataset '{dataset}' has no 'y' array; add y or use --model autoencoder"
        )
    if model == "cnn":
        spatial = input_shape[1:]
        if any(s < 4 for s in spatial):
            raise UserInputError(
                f"--model cnn needs every spatial size >= 4 (dataset '{dataset}' has shape {input_shape}); use --model rnn or autoencoder"
            )


def build_model(model: str, input_shape: tuple[int, ...], num_classes: int, *, rnn_hidden: int = 64,
                rnn_layers: int = 1, encoding_dim: int = 32, seed: int | None = None) -> nn.Module:
    """A fresh model; with ``seed`` its initial weights are deterministic."""
    if seed is not None:
        torch.manual_seed(seed)
    if model == "cnn":
        return ConvNet(input_shape, num_classes)
    if model == "rnn":
        return SequenceClassifier(input_shape, num_classes, rnn_hidden, rnn_layers)
    if model == "autoencoder":
        return Autoencoder(input_shape, encoding_dim)
    raise UserInputError(f"--model '{model}' is unknown; choose one of: cnn, rnn, autoencoder")


def model_from_config(cfg, input_shape: tuple[int, ...], num_classes: int, seed: int | None = None) -> nn.Module:
    """Build the model a :class:`~common.config.RunConfig` describes."""
    return build_model(cfg.model, input_shape, num_classes, rnn_hidden=cfg.rnn_hidden,
                       rnn_layers=cfg.rnn_layers, encoding_dim=cfg.encoding_dim, seed=seed)
