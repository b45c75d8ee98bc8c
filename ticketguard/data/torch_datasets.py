"""Map-style torch Datasets of (image, label) pairs as the whole uint8 tensors ``ImageData`` holds: every image
form a Dataset may give (PIL, numpy, tensors) checked and converted where it enters."""

from __future__ import annotations

import operator
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import IterableDataset

from ticketguard.core.errors import InputError

GREY_IMAGE_MODES = ("1", "L", "LA")
DEEP_IMAGE_MODES = ("I", "F")  # more than 8 bits per pixel: converting them would clip or round silently


def dataset_length(dataset: Any, split: str) -> int:
    if isinstance(dataset, IterableDataset) or not hasattr(dataset, "__getitem__"):
        raise InputError(
            f"the {split} data is a {type(dataset).__name__}; give a map-style Dataset (len() and [index])"
        )
    try:
        length = len(dataset)
    except TypeError:
        raise InputError(
            f"the {split} data ({type(dataset).__name__}) has no len(); give a map-style Dataset"
        ) from None
    if length < 1:
        raise InputError(f"the {split} dataset is empty")
    return length


def dataset_item(dataset: Any, index: int, split: str) -> tuple[Any, Any]:
    item = dataset[index]
    if not isinstance(item, (tuple, list)) or len(item) != 2:
        raise InputError(
            f"{split} item {index} is of type {type(item).__name__}; a dataset must give (image, label) pairs"
        )
    return item[0], item[1]


def materialise(
    dataset: Any, split: str, length: int, shape: tuple[int, ...]
) -> tuple[torch.Tensor, torch.Tensor]:
    """One split as (N, C, H, W) uint8 images and (N,) int64 labels, filled in place: no second copy."""
    images = torch.empty((length, *shape), dtype=torch.uint8)
    pixels = images.numpy()
    labels = torch.empty(length, dtype=torch.long)
    for index in range(length):
        image, label = dataset_item(dataset, index, split)
        array = image_array(image, f"{split} item {index}")
        if array.shape != shape:
            raise InputError(
                f"{split} item {index} is {dims(array.shape)} but train item 0 is {dims(shape)} "
                "(C x H x W); give all images one shape, e.g. with Resize or Grayscale transforms"
            )
        pixels[index] = array
        labels[index] = _label(label, f"{split} item {index}")
    return images, labels


def image_array(image: Any, where: str) -> np.ndarray:
    """One image as a (C, H, W) uint8 array."""
    from PIL import Image

    if isinstance(image, Image.Image):
        if image.mode.startswith(DEEP_IMAGE_MODES):
            raise InputError(
                f"{where} is a PIL image of mode {image.mode}, deeper than 8 bits; convert it to L or RGB"
            )
        image = np.asarray(image.convert("L" if image.mode in GREY_IMAGE_MODES else "RGB"))
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8 or image.ndim not in (2, 3):
            raise InputError(
                f"{where} is a {image.dtype} array of shape {image.shape}; numpy images must be uint8 "
                "(H, W) or (H, W, C)"
            )
        return image.reshape(*image.shape[:2], -1).transpose(2, 0, 1)
    if isinstance(image, torch.Tensor):
        return _tensor_array(image, where)
    raise InputError(
        f"{where} is of type {type(image).__name__}; images must be PIL images, uint8 numpy arrays or "
        "(C, H, W) tensors"
    )


def _tensor_array(image: torch.Tensor, where: str) -> np.ndarray:
    if image.dim() not in (2, 3):
        raise InputError(
            f"{where} is a tensor of shape {tuple(image.shape)}; tensor images must be (C, H, W)"
        )
    image = image.detach().cpu().reshape(-1, *image.shape[-2:])
    if image.is_floating_point():
        image = image.float()
        if not bool(torch.isfinite(image).all()) or image.min() < 0 or image.max() > 1:
            raise InputError(
                f"{where} is a float tensor with values outside [0, 1]; give pixels in [0, 1] (ToTensor "
                "without Normalize) or uint8"
            )
        return (image * 255).round_().to(torch.uint8).numpy()
    if image.dtype != torch.uint8:
        raise InputError(f"{where} is a {image.dtype} tensor; tensor images must be uint8 or float in [0, 1]")
    return image.numpy()


def dims(shape: tuple[int, ...]) -> str:
    return "x".join(map(str, shape))


def _label(label: Any, where: str) -> int:
    if isinstance(label, (bool, np.bool_)) or (isinstance(label, torch.Tensor) and label.dtype == torch.bool):
        raise InputError(f"{where} has the label {label!r}; labels must be integer class indices")
    try:
        return operator.index(label)
    except TypeError:
        raise InputError(f"{where} has the label {label!r}; labels must be integer class indices") from None


def default_classes(dataset: Any, labels: torch.Tensor) -> tuple[str, ...]:
    """The dataset's own class names (torchvision's ``classes``), else the label numbers up to the largest."""
    named = getattr(dataset, "classes", None)
    if isinstance(named, Sequence) and not isinstance(named, str) and all(isinstance(c, str) for c in named):
        return tuple(named)
    return tuple(str(c) for c in range(max(int(labels.max()) + 1, 1)))
