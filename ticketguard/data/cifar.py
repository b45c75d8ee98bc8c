"""CIFAR-10/100 in the official python layout or as an image folder (a directory or a .tar.gz of one)."""

from __future__ import annotations

import io
import logging
import pickle
import tarfile
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import ClassVar

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from ticketguard.core.errors import InputError
from ticketguard.core.files import atomic_path, sha256_file
from ticketguard.data import ImageData

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp"}
DOWNLOAD_TIMEOUT_S = 60


@dataclass(frozen=True)
class CifarLayout:
    """Where the official python pickles of one CIFAR variant live, and how to fetch them."""

    folder: str
    train_files: tuple[str, ...]
    test_file: str
    meta_file: str
    label_key: bytes
    names_key: bytes
    url: str
    sha256: str


CIFAR_LAYOUTS = {
    10: CifarLayout(
        folder="cifar-10-batches-py",
        train_files=tuple(f"data_batch_{i}" for i in range(1, 6)),
        test_file="test_batch",
        meta_file="batches.meta",
        label_key=b"labels",
        names_key=b"label_names",
        url="https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
        sha256="6d958be074577803d12ecdefd02955f39262c83c16fe9348329d7fe0b5c001ce",
    ),
    100: CifarLayout(
        folder="cifar-100-python",
        train_files=("train",),
        test_file="test",
        meta_file="meta",
        label_key=b"fine_labels",
        names_key=b"fine_label_names",
        url="https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz",
        sha256="85cd44d02ba6437773c5bbd22e183051d648de2e7d6b014e1ef29b855ba677a7",
    ),
}


class _ArrayUnpickler(pickle.Unpickler):
    """The official CIFAR files are pickles; allow only what numpy arrays need, so no code can run."""

    ALLOWED: ClassVar[frozenset[tuple[str, str]]] = frozenset({
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
    })

    def find_class(self, module: str, name: str) -> type:
        if (module, name) not in self.ALLOWED:
            raise InputError(f"refused to unpickle {module}.{name}: CIFAR batch files hold only arrays and lists")
        return super().find_class(module, name)


def _read_batch(path: Path) -> dict:
    if not path.is_file():
        raise InputError(f"{path} is missing from the CIFAR folder")
    try:
        with open(path, "rb") as handle:
            return _ArrayUnpickler(handle, encoding="bytes").load()
    except (pickle.UnpicklingError, EOFError, ValueError) as err:
        if isinstance(err, InputError):
            raise
        raise InputError(f"{path} is not a readable CIFAR batch file ({err})") from None


def _decode_names(names: list) -> tuple[str, ...]:
    return tuple(n.decode() if isinstance(n, bytes) else str(n) for n in names)


def _load_pickled(folder: Path, layout: CifarLayout) -> ImageData:
    meta = _read_batch(folder / layout.meta_file)
    splits = []
    for files in (layout.train_files, (layout.test_file,)):
        batches = [_read_batch(folder / name) for name in files]
        try:
            images = np.concatenate([np.asarray(b[b"data"], dtype=np.uint8) for b in batches])
            labels = np.concatenate([np.asarray(b[layout.label_key], dtype=np.int64) for b in batches])
        except KeyError as err:
            raise InputError(f"a CIFAR batch in {folder} lacks the key {err}") from None
        if images.ndim != 2 or images.shape[1] != 3 * 32 * 32:
            raise InputError(f"CIFAR batches in {folder} must hold rows of 3072 pixels, got {images.shape}")
        splits.append((torch.from_numpy(images.reshape(-1, 3, 32, 32).copy()), torch.from_numpy(labels)))
    (train_x, train_y), (test_x, test_y) = splits
    return ImageData(
        name=f"cifar{len(meta[layout.names_key])}",
        classes=_decode_names(meta[layout.names_key]),
        train_images=train_x,
        train_labels=train_y,
        test_images=test_x,
        test_labels=test_y,
        crop_padding=4,
        flip=True,
    )


def download_cifar(root: Path, num_classes: int) -> Path:
    """Fetch and unpack the official archive into ``root``, refusing it if its sha256 differs."""
    layout = CIFAR_LAYOUTS[num_classes]
    archive = root / PurePosixPath(layout.url).name
    root.mkdir(parents=True, exist_ok=True)
    if not archive.is_file():
        log.info("downloading %s", layout.url)
        try:
            with urllib.request.urlopen(layout.url, timeout=DOWNLOAD_TIMEOUT_S) as response, atomic_path(
                archive
            ) as tmp:
                tmp.write_bytes(response.read())
        except (urllib.error.URLError, TimeoutError, OSError) as err:
            raise InputError(
                f"could not download {layout.url} ({err}); fetch it by hand into {root} or point "
                "--data-dir at an existing copy"
            ) from None
    digest = sha256_file(archive)
    if digest != layout.sha256:
        raise InputError(f"{archive} has sha256 {digest}, expected {layout.sha256}; delete it and retry")
    with tarfile.open(archive) as tar:
        tar.extractall(root, filter="data")
    return root / layout.folder


def load_cifar(root: Path, num_classes: int, download: bool = False) -> ImageData:
    """CIFAR from ``root``: the pickled batches (root or root/<official folder>) or an image folder."""
    layout = CIFAR_LAYOUTS[num_classes]
    for folder in (root / layout.folder, root):
        if (folder / layout.meta_file).is_file():
            return _load_pickled(folder, layout)
    if root.exists() and _looks_like_image_folder(root):
        data = load_image_folder(root)
        if data.num_classes != num_classes:
            raise InputError(f"{root} holds {data.num_classes} classes, but cifar{num_classes} has {num_classes}")
        return ImageData(**{**data.__dict__, "name": f"cifar{num_classes}", "crop_padding": 4, "flip": True})
    if download:
        return _load_pickled(download_cifar(root, num_classes), layout)
    raise InputError(
        f"{root} holds neither {layout.folder}/ (the official python batches) nor train/<class>/ and "
        "test/<class>/ image folders; pass --download to fetch the official archive"
    )


def _looks_like_image_folder(root: Path) -> bool:
    if root.is_file():
        return tarfile.is_tarfile(root)
    return (root / "train").is_dir() and (root / "test").is_dir()


def _image_entries(root: Path) -> Iterator[tuple[str, bytes | Path]]:
    """(relative path, file) for every image under a directory or inside a tar archive."""
    if root.is_dir():
        for path in sorted(root.rglob("*")):
            if path.suffix.lower() in IMAGE_SUFFIXES:
                yield path.relative_to(root).as_posix(), path
        return
    with tarfile.open(root) as tar:
        for member in tar:
            if member.isfile() and PurePosixPath(member.name).suffix.lower() in IMAGE_SUFFIXES:
                handle = tar.extractfile(member)
                if handle is not None:
                    yield member.name, handle.read()


def _split_and_class(relative: str) -> tuple[str, str] | None:
    parts = PurePosixPath(relative).parts
    if len(parts) >= 3 and parts[-3] in ("train", "test"):
        return parts[-3], parts[-2]
    return None


def load_image_folder(root: Path, name: str = "folder", per_class: int | None = None) -> ImageData:
    """``train/<class>/*.jpg`` and ``test/<class>/*.jpg`` under a directory or in a .tar(.gz) archive.

    ``per_class`` decodes only the first images of each class and split (in file-name order), for quick runs.
    """
    if not root.exists():
        raise InputError(f"{root} does not exist")
    if not _looks_like_image_folder(root):
        raise InputError(f"{root} is not an image folder: expected train/<class>/ and test/<class>/ inside")
    found: dict[str, list[tuple[str, str, bytes | Path]]] = {"train": [], "test": []}
    for relative, source in _image_entries(root):
        location = _split_and_class(relative)
        if location is not None:
            found[location[0]].append((location[1], relative, source))
    if not found["train"] or not found["test"]:
        raise InputError(f"{root} needs images under both train/<class>/ and test/<class>/")
    classes = tuple(sorted({c for entries in found.values() for c, _, _ in entries}))
    splits = [_decode_images(_first_per_class(found[s], per_class), classes) for s in ("train", "test")]
    (train_x, train_y), (test_x, test_y) = splits
    return ImageData(name, classes, train_x, train_y, test_x, test_y, crop_padding=4, flip=True)


def _first_per_class(
    entries: list[tuple[str, str, bytes | Path]], per_class: int | None
) -> list[tuple[str, str, bytes | Path]]:
    entries = sorted(entries, key=lambda e: e[1])
    if per_class is None:
        return entries
    taken: dict[str, int] = {}
    chosen = []
    for entry in entries:
        if taken.get(entry[0], 0) < per_class:
            taken[entry[0]] = taken.get(entry[0], 0) + 1
            chosen.append(entry)
    return chosen


def _decode_images(entries: list[tuple[str, str, bytes | Path]], classes: tuple[str, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    index = {c: i for i, c in enumerate(classes)}
    arrays, labels, shape = [], [], None
    for cls, relative, source in entries:
        try:
            with Image.open(io.BytesIO(source) if isinstance(source, bytes) else source) as image:
                array = np.asarray(image.convert("RGB"))
        except (UnidentifiedImageError, OSError) as err:
            raise InputError(f"cannot decode image {relative} ({err})") from None
        if shape is None:
            shape = array.shape
        elif array.shape != shape:
            raise InputError(f"image {relative} is {array.shape[:2]} but the others are {shape[:2]}; resize them")
        arrays.append(array)
        labels.append(index[cls])
    images = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()
    return images, torch.tensor(labels, dtype=torch.long)
