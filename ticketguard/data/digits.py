"""The built-in default data: scikit-learn's 8x8 handwritten digits, shipped with the package, no download."""

from __future__ import annotations

import numpy as np
import torch
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

from ticketguard.data import ImageData

SPLIT_SEED = 0
TEST_FRACTION = 0.2
MAX_PIXEL = 16


def load_digits_data() -> ImageData:
    """1797 real digits, a fixed stratified 80/20 split; pixels rescaled from 0-16 to 0-255."""
    digits = load_digits()
    images = np.rint(digits.images * (255 / MAX_PIXEL)).astype(np.uint8)[:, None]
    train_x, test_x, train_y, test_y = train_test_split(
        images, digits.target, test_size=TEST_FRACTION, random_state=SPLIT_SEED, stratify=digits.target
    )
    return ImageData(
        name="digits",
        classes=tuple(str(d) for d in range(10)),
        train_images=torch.from_numpy(train_x),
        train_labels=torch.from_numpy(train_y).long(),
        test_images=torch.from_numpy(test_x),
        test_labels=torch.from_numpy(test_y).long(),
        crop_padding=1,
        flip=False,
    )
