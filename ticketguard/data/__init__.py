"""Image data sets as whole uint8 tensors, and the registry of built-in ones."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import math
from collections.abc import Mapping
from typing import Any

import torch

from ticketguard.errors import InputError

MAX_CHANNELS = 64


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
        if any(isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) for v in values):
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
                raise InputError(f"{self.name}: {split} has {images.shape[0]} images but {labels.numel()} labels")
            if labels.numel() and (labels.min() < 0 or labels.max() >= len(self.classes)):
                raise InputError(f"{self.name}: {split} labels fall outside the {len(self.classes)} classes")

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

        Returns this data without them in its training split, and their (sorted) indices into ``train_images``.
        Every class keeps at least one training image.
        """
        if not 0 <= fraction < 1:
            raise InputError(f"the validation share of the training images must lie in [0, 1), got {fraction}")
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
        return replace(self, train_images=self.train_images[keep], train_labels=self.train_labels[keep]), held


def _balanced_indices(labels: torch.Tensor, per_class: int | None, generator: torch.Generator) -> torch.Tensor:
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
