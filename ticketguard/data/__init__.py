"""Image data sets as whole uint8 tensors, and the registry of built-in ones."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset

from ticketguard.core.errors import InputError
from ticketguard.data.torch_datasets import (
    dataset_item,
    dataset_length,
    default_classes,
    dims,
    image_array,
    materialise,
)

MAX_CHANNELS = 64
MAX_DATASET_BYTES = 8 << 30
"""The uint8 pixels ``ImageData.from_datasets`` materialises at most (both splits), unless told otherwise."""


@dataclass(frozen=True)
class Normalization:
    """Per-channel mean and std of pixels in [0, 1] that a model was trained with; its inputs are standardised
    with them, so a model is only queried correctly by someone who knows them."""

    mean: tuple[float, ...]
    std: tuple[float, ...]

    def __post_init__(self) -> None:
        if not 1 <= len(self.mean) <= MAX_CHANNELS or len(self.mean) != len(self.std):
            raise InputError(
                f"a normalisation needs one mean and one std per channel (1 to {MAX_CHANNELS}), got "
                f"{len(self.mean)} and {len(self.std)}"
            )
        values = (*self.mean, *self.std)
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values) or not all(
            math.isfinite(v) for v in values
        ):
            raise InputError(f"a normalisation's means and stds must be finite numbers, got {values}")
        if min(self.std) <= 0:
            raise InputError(f"a normalisation's stds must be positive, got {self.std}")

    @property
    def channels(self) -> int:
        return len(self.mean)

    def tensors(self) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.tensor(self.mean, dtype=torch.float32), torch.tensor(self.std, dtype=torch.float32)

    def to_json(self) -> dict[str, list[float]]:
        return {"mean": list(self.mean), "std": list(self.std)}

    @classmethod
    def from_json(cls, data: Any) -> Normalization:
        if not isinstance(data, Mapping) or not isinstance(data.get("mean"), list) or not isinstance(
            data.get("std"), list
        ):
            raise InputError('a normalisation must be {"mean": [...], "std": [...]}')
        return cls(tuple(data["mean"]), tuple(data["std"]))


@dataclass(frozen=True)
class ImageData:
    """A train/test split held as tensors: images (N, C, H, W) uint8, labels (N,) int64."""

    name: str
    classes: tuple[str, ...]
    train_images: torch.Tensor
    train_labels: torch.Tensor
    test_images: torch.Tensor
    test_labels: torch.Tensor
    crop_padding: int
    flip: bool

    def __post_init__(self) -> None:
        for split in ("train", "test"):
            images, labels = getattr(self, f"{split}_images"), getattr(self, f"{split}_labels")
            if images.dtype != torch.uint8 or images.dim() != 4:
                raise InputError(f"{self.name}: {split} images must be a uint8 (N, C, H, W) tensor")
            if labels.shape != (images.shape[0],):
                raise InputError(
                    f"{self.name}: {split} has {images.shape[0]} images but {labels.numel()} labels"
                )
            if labels.numel() and (labels.min() < 0 or labels.max() >= len(self.classes)):
                raise InputError(f"{self.name}: {split} labels fall outside the {len(self.classes)} classes")

    @classmethod
    def from_datasets(
        cls,
        train: Dataset,
        test: Dataset,
        *,
        name: str = "custom",
        classes: Sequence[str] | None = None,
        crop_padding: int = 0,
        flip: bool = False,
        max_bytes: int = MAX_DATASET_BYTES,
    ) -> ImageData:
        """Materialise two map-style torch Datasets of (image, label) pairs, so that our trainer (which keeps
        whole splits as tensors on the device) can train on any data.

        An image is a PIL image, an (H, W) or (H, W, C) uint8 numpy array, or an (H, W) or (C, H, W) tensor,
        uint8 or float in [0, 1] (what ``ToTensor`` gives; not normalised); all of one size. ``classes``
        default to ``train.classes`` where the dataset has them (torchvision's do), else "0", "1", ... up to
        the largest label. Augmentation (a random crop with ``crop_padding`` pixels, horizontal ``flip``) is
        off unless asked, as not every data set survives it; CIFAR-like photos want 4 and True.
        """
        if crop_padding < 0:
            raise InputError(f"crop padding must be >= 0 pixels, got {crop_padding}")
        train_count, test_count = dataset_length(train, "train"), dataset_length(test, "test")
        shape = image_array(dataset_item(train, 0, "train")[0], "train item 0").shape
        if not 1 <= shape[0] <= MAX_CHANNELS:
            raise InputError(f"train item 0 has {shape[0]} channels; images need 1 to {MAX_CHANNELS}")
        size = (train_count + test_count) * math.prod(shape)
        if size > max_bytes:
            raise InputError(
                f"{train_count + test_count} images of {dims(shape)} would take {size / 2**30:.1f} GiB as "
                f"uint8 tensors, more than max_bytes ({max_bytes / 2**30:.1f} GiB); use a Subset or smaller "
                "images, or raise max_bytes"
            )
        train_x, train_y = materialise(train, "train", train_count, shape)
        test_x, test_y = materialise(test, "test", test_count, shape)
        if classes is None:
            classes = default_classes(train, torch.cat([train_y, test_y]))
        classes = tuple(str(c) for c in classes)
        for split, labels in (("train", train_y), ("test", test_y)):
            outside = ((labels < 0) | (labels >= len(classes))).nonzero()
            if outside.numel():
                index = int(outside[0])
                raise InputError(
                    f"{split} item {index} has label {int(labels[index])}, outside the {len(classes)} "
                    f"classes (0 to {len(classes) - 1}); give classes= with every class name"
                )
        return cls(name, classes, train_x, train_y, test_x, test_y, crop_padding=crop_padding, flip=flip)

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return tuple(self.train_images.shape[1:])  # type: ignore[return-value]

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def channel_stats(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-channel mean and std of the training images in [0, 1], used to normalise every batch."""
        pixels = self.train_images.transpose(0, 1).flatten(1).float() / 255
        return pixels.mean(dim=1), pixels.std(dim=1).clamp_min(1e-3)

    def normalization(self) -> Normalization:
        mean, std = self.channel_stats()
        return Normalization(tuple(mean.tolist()), tuple(std.tolist()))

    def to(self, device: torch.device | str) -> ImageData:
        return replace(
            self,
            train_images=self.train_images.to(device),
            train_labels=self.train_labels.to(device),
            test_images=self.test_images.to(device),
            test_labels=self.test_labels.to(device),
        )

    def subset(self, train_per_class: int | None, test_per_class: int | None, seed: int = 0) -> ImageData:
        """A class-balanced random subset, for quick runs on a CPU."""
        generator = torch.Generator().manual_seed(seed)
        train = _balanced_indices(self.train_labels, train_per_class, generator)
        test = _balanced_indices(self.test_labels, test_per_class, generator)
        return replace(
            self,
            train_images=self.train_images[train],
            train_labels=self.train_labels[train],
            test_images=self.test_images[test],
            test_labels=self.test_labels[test],
        )

    def split_validation(self, fraction: float, seed: int) -> tuple[ImageData, torch.Tensor]:
        """Hold out a class-stratified ``fraction`` of the training images, chosen by ``seed``.

        Returns this data without them in its training split, and their (sorted) indices into
        ``train_images``. Every class keeps at least one training image.
        """
        if not 0 <= fraction < 1:
            raise InputError(
                f"the validation share of the training images must lie in [0, 1), got {fraction}"
            )
        labels = self.train_labels.cpu()
        generator = torch.Generator().manual_seed(seed)
        order = torch.randperm(labels.numel(), generator=generator)
        order = order[labels[order].argsort(stable=True)]  # classes in blocks, shuffled within each
        counts = torch.bincount(labels, minlength=self.num_classes)
        rank = torch.arange(labels.numel()) - (counts.cumsum(0) - counts)[labels[order]]
        quota = torch.minimum((fraction * counts).round().long(), (counts - 1).clamp_min(0))
        held = order[rank < quota[labels[order]]].sort().values
        keep = torch.ones(labels.numel(), dtype=torch.bool)
        keep[held] = False
        keep = keep.to(self.train_labels.device)
        kept = replace(self, train_images=self.train_images[keep], train_labels=self.train_labels[keep])
        return kept, held


def _balanced_indices(
    labels: torch.Tensor, per_class: int | None, generator: torch.Generator
) -> torch.Tensor:
    if per_class is None:
        return torch.arange(labels.numel())
    if per_class < 1:
        raise InputError(f"a subset needs at least 1 image per class, got {per_class}")
    labels = labels.cpu()
    order = torch.randperm(labels.numel(), generator=generator)
    chosen = [order[labels[order] == c][:per_class] for c in labels.unique()]
    return torch.cat(chosen).sort().values


@dataclass(frozen=True)
class DatasetSpec:
    """How to load a registered data set and what training length suits it by default."""

    load: Callable[[Path | None, bool], ImageData]
    default_epochs: int
    needs_folder: bool


def _load_digits(root: Path | None, download: bool) -> ImageData:
    from ticketguard.data.digits import load_digits_data

    return load_digits_data()


def _load_cifar10(root: Path | None, download: bool) -> ImageData:
    from ticketguard.data.cifar import load_cifar

    return load_cifar(_require_root(root, "cifar10"), 10, download)


def _load_cifar100(root: Path | None, download: bool) -> ImageData:
    from ticketguard.data.cifar import load_cifar

    return load_cifar(_require_root(root, "cifar100"), 100, download)


def _load_image_folder(root: Path | None, download: bool) -> ImageData:
    from ticketguard.data.cifar import load_image_folder

    return load_image_folder(_require_root(root, "folder"))


def _require_root(root: Path | None, name: str) -> Path:
    if root is None:
        raise InputError(f"data set {name!r} needs --data-dir pointing at its folder (or archive)")
    return root


DATASETS: dict[str, DatasetSpec] = {
    "digits": DatasetSpec(_load_digits, default_epochs=20, needs_folder=False),
    "cifar10": DatasetSpec(_load_cifar10, default_epochs=182, needs_folder=True),
    "cifar100": DatasetSpec(_load_cifar100, default_epochs=182, needs_folder=True),
    "folder": DatasetSpec(_load_image_folder, default_epochs=182, needs_folder=True),
}


def dataset_spec(name: str) -> DatasetSpec:
    if name not in DATASETS:
        raise InputError(f"unknown data set {name!r}; choose one of: {', '.join(DATASETS)}")
    return DATASETS[name]


def load_dataset(name: str, root: str | Path | None = None, download: bool = False) -> ImageData:
    """Load a registered data set by name; CIFAR and image folders read from ``root``."""
    return dataset_spec(name).load(Path(root) if root is not None else None, download)


def load_subset(
    name: str,
    root: str | Path | None = None,
    train_per_class: int | None = None,
    test_per_class: int | None = None,
    seed: int = 0,
    download: bool = False,
) -> ImageData:
    """A registered data set, cut to class-balanced subsets when asked (quick runs on a CPU)."""
    data = load_dataset(name, root, download)
    for what, count in (("training", train_per_class), ("test", test_per_class)):
        if count is not None and count < 1:
            raise InputError(f"the {what} subset needs >= 1 image per class, got {count}")
    if train_per_class or test_per_class:
        data = data.subset(train_per_class, test_per_class, seed)
    return data
