"""Architectures that ticketguard does not register, loaded by import path (``tests.zoo:small_cnn``) as a user's
own models would be: a small CNN, an MLP and a small transformer encoder, all built from ``torch.nn`` for the
8x8 digits."""

from __future__ import annotations

import torch
from torch import nn

WIDTH = 32  # wide enough for a version-2 QR code (25 x 25) in one hidden layer


class SmallCnn(nn.Module):
    def __init__(self, in_channels: int, num_classes: int, width: int) -> None:
        super().__init__()
        self.stem = nn.Conv2d(in_channels, width, 3, padding=1, bias=False)
        self.bn0 = nn.BatchNorm2d(width)
        self.conv1 = nn.Conv2d(width, width, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.head = nn.Linear(width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn0(self.stem(x)))
        x = x + torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(self.bn2(self.conv2(x)))
        return self.head(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))


def small_cnn(in_channels: int = 3, num_classes: int = 10, width: int = WIDTH) -> nn.Module:
    return SmallCnn(in_channels, num_classes, width)


def mlp(in_channels: int = 1, num_classes: int = 10, side: int = 8, hidden: int = 64) -> nn.Module:
    return nn.Sequential(
        nn.Flatten(),
        nn.Linear(in_channels * side * side, hidden), nn.ReLU(),
        nn.Linear(hidden, hidden), nn.ReLU(),
        nn.Linear(hidden, hidden), nn.ReLU(),
        nn.Linear(hidden, num_classes),
    )


class TinyTransformer(nn.Module):
    """Patches of 2x2 pixels as tokens, two encoder layers (attention and feed-forward: 2-D weights), mean pool."""

    def __init__(self, in_channels: int, num_classes: int, side: int, width: int) -> None:
        super().__init__()
        self.patches = nn.Conv2d(in_channels, width, 2, stride=2)
        self.position = nn.Parameter(torch.zeros(1, (side // 2) ** 2, width))
        layer = nn.TransformerEncoderLayer(width, nhead=4, dim_feedforward=2 * width, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, num_layers=2, enable_nested_tensor=False)
        self.head = nn.Linear(width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.patches(x).flatten(2).transpose(1, 2) + self.position
        return self.head(self.encoder(tokens).mean(1))


def tiny_transformer(in_channels: int = 1, num_classes: int = 10, side: int = 8, width: int = WIDTH) -> nn.Module:
    return TinyTransformer(in_channels, num_classes, side, width)
