"""Batch augmentation on the training device: one gather does random crop (zero padding) and horizontal flip."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def crop_and_flip(images: torch.Tensor, padding: int, flip: bool, generator: torch.Generator) -> torch.Tensor:
    """Random ``padding``-pixel crop and optional flip of a whole (B, C, H, W) batch, without a Python loop.

    Returns a (B, C, H, W) view in channels_last memory order, which convolutions prefer.
    """
    batch, _, height, width = images.shape
    device = images.device
    if padding:
        images = F.pad(images, (padding, padding, padding, padding))
    shift = 2 * padding + 1
    top = torch.randint(0, shift, (batch, 1), device=device, generator=generator)
    left = torch.randint(0, shift, (batch, 1), device=device, generator=generator)
    rows = top + torch.arange(height, device=device)
    cols = left + torch.arange(width, device=device)
    if flip:
        mirrored = torch.rand(batch, 1, device=device, generator=generator) < 0.5
        cols = torch.where(mirrored, cols.flip(1), cols)
    gathered = images[torch.arange(batch, device=device)[:, None, None], :, rows[:, :, None], cols[:, None, :]]
    return gathered.permute(0, 3, 1, 2)


def normalize(images: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """uint8 pixels -> float32 standardised per channel."""
    scale = (1 / (255 * std)).view(1, -1, 1, 1)
    return images.float() * scale - (mean / std).view(1, -1, 1, 1)
