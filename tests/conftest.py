"""Shared fixtures: the real digits data, a real CIFAR-10 JPEG subset and the Adi trigger set from ../shared."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from ticketguard.data import ImageData, load_dataset
from ticketguard.data.cifar import load_image_folder

SHARED = Path(__file__).resolve().parents[2] / "shared" / "datasets"
CIFAR_JPEG = SHARED / "cifar10-jpeg" / "cifar10-jpeg.tar.gz"
ADI_TRIGGER_SET = SHARED / "adi-trigger-set"


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def digits() -> ImageData:
    return load_dataset("digits")


@pytest.fixture(scope="session")
def cifar_jpeg_subset() -> ImageData:
    """40 training and 40 test images per class of the real CIFAR-10 JPEGs."""
    assert CIFAR_JPEG.is_file(), f"the shared CIFAR-10 JPEG archive is missing at {CIFAR_JPEG}"
    return load_image_folder(CIFAR_JPEG, name="cifar10", per_class=40)
