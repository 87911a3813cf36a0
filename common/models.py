"""The three model families, each valid under Opacus (no BatchNorm, DPLSTM for recurrence).

Shapes follow the design card: CNN = two 3x3 convs (32, 64) + ReLU + 2x2 max-pool, FC 128,
class layer; RNN = LSTM encoder whose last step feeds a linear classifier; autoencoder =
input -> 400 -> encoding -> 400 -> input. Input shapes adapt to the dataset: ``(C, L)`` for
sequences (MNIST-1D) uses 1-D convolutions, ``(C, H, W)`` for images uses 2-D ones.
"""

from __future__ import annotations

import math

import torch
from opacus.layers import DPLSTM
from torch import nn

from common.errors import UserInputError

CLASSIFIERS = ("cnn", "rnn")
SEQUENCE_CHUNK = 8  # 1-D sequences: time steps per LSTM step (see SequenceClassifier)


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
    """DPLSTM over the sequence axis; the last hidden state feeds a linear classifier.

    A ``(C, L)`` input is read in chunks of ``chunk`` consecutive steps: ceil(L/chunk) LSTM steps of
    chunk*C features (the last chunk zero-padded), so MNIST-1D's 40 scalars are 5 steps of 8. DPLSTM
    runs one Python-level step per time step: 5 steps train about 6x faster per sample than 40
    (measured here: 40 -> 10 steps about 3x, 10 -> 5 about 2x), and under DP-SGD 5 steps of 8
    learned at least as fast per epoch as 10 of 4. ``(C, H, W)`` is read as H steps of C*W features.
    """

    def __init__(self, input_shape: tuple[int, ...], num_classes: int, hidden: int, layers: int,
                 chunk: int = SEQUENCE_CHUNK) -> None:
        super().__init__()
        channels, *spatial = input_shape
        self.image = len(spatial) == 2
        self.chunk = 1 if self.image else chunk
        features = channels * spatial[1] if self.image else channels * self.chunk
        self.lstm = DPLSTM(features, hidden, num_layers=layers, batch_first=True)
        self.head = nn.Linear(hidden, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.image:  # (n, C, H, W) -> (n, H, C*W)
            x = x.permute(0, 2, 1, 3).flatten(2)
        else:  # (n, C, L) -> (n, L, C) -> (n, ceil(L/chunk), chunk*C)
            pad = -x.shape[-1] % self.chunk
            x = nn.functional.pad(x, (0, pad)).transpose(1, 2)
            x = x.reshape(x.shape[0], x.shape[1] // self.chunk, self.chunk * x.shape[2])  # explicit: batches can be empty
        out, _ = self.lstm(x)
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
