"""Trigger sets T for Scheme V3: Adi et al.'s image folder, or abstract images regenerated from a secret seed.

A trigger set is held as whole tensors, images uint8 (N, C, H, W) at the model's input size and channel
count, labels int64 (N,), so training moves it to the device once and never decodes it again.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from ticketguard.core.errors import InputError
from ticketguard.core.files import sha256_file

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp"}
IMAGE_SUBFOLDER = "pics"
KEYED_GENERATOR = "abstract/1"
SHAPES_PER_IMAGE = 4
STROKES_PER_IMAGE = 3
# ITU-R BT.601 luma, the weights PIL's "L" conversion uses, so keyed and folder sets turn grey alike
LUMA = np.array([0.299, 0.587, 0.114])
MAX_TRIGGER_IMAGES = 100_000
MAX_TRIGGER_BYTES = 1 << 30  # the uint8 images of one set
RENDER_PIXELS = 1 << 18  # pixels rendered at once: bounds the float64 temporaries of the keyed renderer


@dataclass(frozen=True)
class TriggerSet:
    """T: images uint8 (N, C, H, W) and their secret labels int64 (N,), with how to get them back."""

    images: torch.Tensor
    labels: torch.Tensor
    source: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.images.dtype != torch.uint8 or self.images.dim() != 4:
            raise InputError("trigger images must be a uint8 (N, C, H, W) tensor")
        if self.labels.shape != (self.images.shape[0],):
            raise InputError(
                f"the trigger set has {self.images.shape[0]} images but {self.labels.numel()} labels"
            )

    def __len__(self) -> int:
        return self.labels.numel()

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.images.shape[1:])  # type: ignore[return-value]

    def to(self, device: torch.device | str) -> TriggerSet:
        return replace(self, images=self.images.to(device), labels=self.labels.to(device))


def _check_target(channels: int, size: tuple[int, int], count: int) -> None:
    """Refuse a set that could not be made, before anything is allocated for it."""
    if channels not in (1, 3):
        raise InputError(f"trigger images can be made with 1 or 3 channels, the model takes {channels}")
    if min(size) < 1:
        raise InputError(f"trigger images need a positive size, got {size}")
    if not 1 <= count <= MAX_TRIGGER_IMAGES:
        raise InputError(f"a trigger set holds 1 to {MAX_TRIGGER_IMAGES} images, got {count}")
    if count * channels * size[0] * size[1] > MAX_TRIGGER_BYTES:
        raise InputError(
            f"{count} trigger images of {channels}x{size[0]}x{size[1]} would take more than "
            f"{MAX_TRIGGER_BYTES // 1024**2} MiB; use fewer images"
        )


def _check_labels(labels: torch.Tensor, num_classes: int | None, where: str) -> None:
    if num_classes is not None and labels.numel() and (labels.min() < 0 or labels.max() >= num_classes):
        raise InputError(f"{where} holds labels outside the model's {num_classes} classes")


def _image_files(folder: Path) -> list[Path]:
    """Images in *string*-sorted name order (1.jpg, 10.jpg, 100.jpg, 11.jpg, ...), as Adi et al. label."""
    return sorted((p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES), key=lambda p: p.name)


def _labels_file(root: Path, labels: Path | None) -> Path:
    if labels is not None:
        if not labels.is_file():
            raise InputError(f"label file {labels} does not exist")
        return labels
    candidates = sorted(root.glob("*.txt"))
    if len(candidates) != 1:
        found = ", ".join(p.name for p in candidates) or "none"
        raise InputError(f"{root} needs exactly one label file (*.txt), found {found}; name it with --labels")
    return candidates[0]


def _read_labels(path: Path) -> torch.Tensor:
    """One label per line; Adi et al. write them as floats (6.000000000000000000e+00)."""
    try:
        values = np.array([float(line) for line in path.read_text().split()], dtype=np.float64)
    except (ValueError, UnicodeDecodeError):
        raise InputError(f"{path} must hold one numeric label per line") from None
    if not np.all(values == np.round(values)):
        raise InputError(f"{path} holds labels that are not whole numbers")
    return torch.from_numpy(values.astype(np.int64))


def _decode(path: Path, channels: int, size: tuple[int, int]) -> np.ndarray:
    height, width = size
    try:
        with Image.open(path) as image:
            image.draft("RGB", (width, height))  # JPEG: decode at a reduced scale, much faster than full size
            resized = image.convert("RGB").resize((width, height), Image.Resampling.LANCZOS)
            array = np.asarray(resized.convert("L") if channels == 1 else resized)
    except (UnidentifiedImageError, OSError) as err:
        raise InputError(f"cannot decode trigger image {path} ({err})") from None
    return array[None] if channels == 1 else array.transpose(2, 0, 1)


def folder_digest(files: list[Path], labels: Path) -> str:
    """sha256 over every image's name and content and the label file: what a claim pins the folder set by."""
    digest = hashlib.sha256()
    for path in [*files, labels]:
        digest.update(f"{path.name}\0{sha256_file(path)}\n".encode())
    return digest.hexdigest()


def load_trigger_folder(
    root: str | Path,
    channels: int,
    size: tuple[int, int],
    labels: str | Path | None = None,
    num_classes: int | None = None,
) -> TriggerSet:
    """Adi et al.'s format: ``root/pics/*.jpg`` (or images in ``root``) + labels, resized to the model."""
    root = Path(root)
    if not root.is_dir():
        raise InputError(f"trigger folder {root} does not exist")
    image_folder = root / IMAGE_SUBFOLDER if (root / IMAGE_SUBFOLDER).is_dir() else root
    files = _image_files(image_folder)
    if not files:
        raise InputError(f"{image_folder} holds no images ({', '.join(sorted(IMAGE_SUFFIXES))})")
    _check_target(channels, size, len(files))
    label_path = _labels_file(root, Path(labels) if labels is not None else None)
    label_tensor = _read_labels(label_path)
    if label_tensor.numel() != len(files):
        raise InputError(
            f"{label_path} holds {label_tensor.numel()} labels but {image_folder} has {len(files)} images"
        )
    _check_labels(label_tensor, num_classes, str(label_path))
    images = torch.from_numpy(np.stack([_decode(p, channels, size) for p in files]))
    source = {
        "kind": "folder",
        "path": str(root.resolve()),
        "labels_file": label_path.name,
        "sha256": folder_digest(files, label_path),
    }
    return TriggerSet(images, label_tensor, source)


def _segment_distance(xs: np.ndarray, ys: np.ndarray, start: np.ndarray, end: np.ndarray) -> np.ndarray:
    """Distance of every pixel centre to every stroke segment: (N, L, H, W) from endpoints (N, L, 2)."""
    direction = end - start
    length2 = np.maximum((direction**2).sum(-1), 1e-12)[..., None, None]
    dx, dy = xs - start[..., 0, None, None], ys - start[..., 1, None, None]
    along = np.clip((dx * direction[..., 0, None, None] + dy * direction[..., 1, None, None]) / length2, 0, 1)
    return np.hypot(dx - along * direction[..., 0, None, None], dy - along * direction[..., 1, None, None])


def keyed_trigger_set(
    seed: int, count: int, num_classes: int, channels: int, size: tuple[int, int]
) -> TriggerSet:
    """Abstract images (colour field, ellipses, strokes) and labels drawn from the owner's secret seed.

    Every parameter is drawn in unit coordinates before any pixel is rendered, so the same seed gives the same
    pictures and labels at any input size: the claim needs only the seed, never the images.
    """
    if seed < 0:
        raise InputError(f"the trigger seed must be a non-negative integer, got {seed}")
    if num_classes < 2:
        raise InputError(f"a keyed trigger set needs >= 2 classes, got {num_classes}")
    _check_target(channels, size, count)
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, num_classes, count)
    field_from, field_to = rng.random((count, 3)), rng.random((count, 3))
    angle = rng.uniform(0, 2 * np.pi, count)
    centres, radii = (
        rng.random((count, SHAPES_PER_IMAGE, 2)),
        rng.uniform(0.1, 0.4, (count, SHAPES_PER_IMAGE, 2)),
    )
    starts, ends = rng.random((count, STROKES_PER_IMAGE, 2)), rng.random((count, STROKES_PER_IMAGE, 2))
    widths = rng.uniform(0.04, 0.12, (count, STROKES_PER_IMAGE))
    colours = rng.random((count, SHAPES_PER_IMAGE + STROKES_PER_IMAGE, 3))
    drawn = (field_from, field_to, angle, centres, radii, starts, ends, widths, colours)
    images = np.empty((count, channels, *size), dtype=np.uint8)
    step = max(1, RENDER_PIXELS // (size[0] * size[1]))
    for first in range(0, count, step):
        part = slice(first, first + step)
        images[part] = _render([values[part] for values in drawn], channels, size)
    images = torch.from_numpy(images)
    source = {"kind": "keyed", "generator": KEYED_GENERATOR, "seed": seed, "count": count}
    return TriggerSet(images, torch.from_numpy(labels.astype(np.int64)), source)


def _render(drawn: list[np.ndarray], channels: int, size: tuple[int, int]) -> np.ndarray:
    """Pixels (N, C, H, W) uint8 of images whose parameters were drawn in unit coordinates."""
    field_from, field_to, angle, centres, radii, starts, ends, widths, colours = drawn
    height, width = size
    ys = ((np.arange(height) + 0.5) / height)[:, None]
    xs = ((np.arange(width) + 0.5) / width)[None, :]
    ramp = np.cos(angle)[:, None, None] * (xs - 0.5) + np.sin(angle)[:, None, None] * (ys - 0.5)
    ramp = (ramp - ramp.min(axis=(1, 2), keepdims=True)) / np.ptp(ramp, axis=(1, 2), keepdims=True).clip(
        1e-12
    )
    background = field_from[:, :, None, None] + (field_to - field_from)[:, :, None, None] * ramp[:, None]
    ellipses = ((xs - centres[..., 0, None, None]) / radii[..., 0, None, None]) ** 2 + (
        (ys - centres[..., 1, None, None]) / radii[..., 1, None, None]
    ) ** 2 <= 1
    strokes = _segment_distance(xs, ys, starts, ends) <= widths[..., None, None] / 2
    cover = np.concatenate([ellipses, strokes], axis=1)  # (N, layers, H, W), later layers painted on top
    layers = cover.shape[1]
    top = layers - 1 - np.argmax(cover[:, ::-1], axis=1)
    painted = np.take_along_axis(colours[:, None, None], top[..., None, None], axis=3)[:, :, :, 0]
    rgb = np.where(cover.any(axis=1)[:, None], painted.transpose(0, 3, 1, 2), background)
    pixels = (LUMA[None, :, None, None] * rgb).sum(1, keepdims=True) if channels == 1 else rgb
    return np.rint(pixels * 255).clip(0, 255).astype(np.uint8)
