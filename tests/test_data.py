import os
import pickle
import urllib.error
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ticketguard.core.errors import InputError
from ticketguard.data import ImageData, load_dataset
from ticketguard.data import cifar as cifar_module
from ticketguard.data.augment import crop_and_flip, normalize
from ticketguard.data.cifar import load_cifar, load_image_folder


def test_digits_is_a_fixed_stratified_split_of_real_images(digits: ImageData) -> None:
    assert digits.train_images.shape == (1437, 1, 8, 8) and digits.test_images.shape == (360, 1, 8, 8)
    assert digits.train_images.dtype == torch.uint8 and int(digits.train_images.max()) == 255
    assert torch.equal(load_dataset("digits").test_labels, digits.test_labels)
    assert digits.test_labels.bincount().min() >= 35


def test_cifar_jpeg_archive_loads_as_balanced_uint8_tensors(cifar_jpeg_subset: ImageData) -> None:
    data = cifar_jpeg_subset
    assert data.classes[:3] == ("airplane", "automobile", "bird") and data.num_classes == 10
    assert data.train_images.shape == (400, 3, 32, 32) and data.test_images.shape == (400, 3, 32, 32)
    assert data.train_labels.bincount().tolist() == [40] * 10
    assert 80 < data.train_images.float().mean() < 160  # real photographs, not blank images


def _write_official_cifar10(folder: Path, rng: np.random.Generator) -> tuple[np.ndarray, list[int]]:
    folder.mkdir(parents=True)
    names = [n.encode() for n in ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")]
    with open(folder / "batches.meta", "wb") as handle:
        pickle.dump({b"label_names": names}, handle)
    first = None
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        data = rng.integers(0, 256, (4, 3072), dtype=np.uint8)
        labels = rng.integers(0, 10, 4).tolist()
        first = first or (data, labels)
        with open(folder / name, "wb") as handle:
            pickle.dump({b"data": data, b"labels": labels}, handle)
    return first


def test_official_pickle_layout_is_read_channel_first(tmp_path: Path) -> None:
    data_rows, labels = _write_official_cifar10(tmp_path / "cifar-10-batches-py", np.random.default_rng(0))
    data = load_cifar(tmp_path, 10)
    assert data.train_images.shape == (20, 3, 32, 32) and data.test_images.shape == (4, 3, 32, 32)
    assert np.array_equal(data.train_images[0].numpy().reshape(-1), data_rows[0])
    assert data.train_labels[:4].tolist() == labels
    assert data.crop_padding == 4 and data.flip


class Exploit:
    def __reduce__(self):
        return (os.system, ("echo pwned > /tmp/ticketguard-cifar-pwned",))


def test_pickle_with_code_in_a_cifar_folder_is_refused(tmp_path: Path) -> None:
    folder = tmp_path / "cifar-10-batches-py"
    _write_official_cifar10(folder, np.random.default_rng(0))
    with open(folder / "data_batch_1", "wb") as handle:
        pickle.dump({b"data": Exploit(), b"labels": []}, handle)
    with pytest.raises(InputError, match="refused to unpickle"):
        load_cifar(tmp_path, 10)
    assert not os.path.exists("/tmp/ticketguard-cifar-pwned")


def test_image_folder_directory_layout(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    for split in ("train", "test"):
        for cls in ("cat", "dog"):
            (tmp_path / split / cls).mkdir(parents=True)
            for i in range(3):
                Image.fromarray(rng.integers(0, 256, (10, 10, 3), dtype=np.uint8)).save(tmp_path / split / cls / f"{i}.png")
    data = load_image_folder(tmp_path)
    assert data.classes == ("cat", "dog") and data.train_images.shape == (6, 3, 10, 10)
    assert data.train_labels.tolist() == [0, 0, 0, 1, 1, 1]


def test_folder_in_neither_layout_says_what_it_expected(tmp_path: Path) -> None:
    (tmp_path / "random").mkdir()
    with pytest.raises(InputError, match="neither"):
        load_cifar(tmp_path, 10)
    with pytest.raises(InputError, match="needs --data-dir"):
        load_dataset("cifar10")
    with pytest.raises(InputError, match="unknown data set"):
        load_dataset("mnist")


def test_download_without_network_fails_with_advice(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def offline(*args, **kwargs):
        raise urllib.error.URLError("no route to host")

    monkeypatch.setattr(cifar_module.urllib.request, "urlopen", offline)
    with pytest.raises(InputError, match="could not download"):
        load_cifar(tmp_path, 10, download=True)
    assert not any(tmp_path.iterdir())


def test_download_with_wrong_sha256_is_refused(tmp_path: Path) -> None:
    (tmp_path / "cifar-10-python.tar.gz").write_bytes(b"not the archive")
    with pytest.raises(InputError, match="sha256"):
        cifar_module.download_cifar(tmp_path, 10)


def test_crop_without_padding_or_flip_is_identity() -> None:
    images = torch.randint(0, 256, (5, 3, 8, 8), dtype=torch.uint8)
    generator = torch.Generator().manual_seed(0)
    assert torch.equal(crop_and_flip(images, 0, False, generator), images)


def test_crop_and_flip_shift_and_mirror_each_image() -> None:
    images = torch.randint(1, 256, (64, 2, 6, 6), dtype=torch.uint8)
    out = crop_and_flip(images, 2, True, torch.Generator().manual_seed(1))
    padded = torch.nn.functional.pad(images, (2, 2, 2, 2))
    flips = 0
    for i in range(64):
        windows = [padded[i, :, y : y + 6, x : x + 6] for y in range(5) for x in range(5)]
        plain = any(torch.equal(out[i], w) for w in windows)
        mirrored = any(torch.equal(out[i], w.flip(-1)) for w in windows)
        assert plain or mirrored
        flips += mirrored and not plain
    assert 16 < flips < 48


def test_normalize_standardises_channels(digits: ImageData) -> None:
    mean, std = digits.channel_stats()
    x = normalize(digits.train_images, mean, std)
    assert x.mean().abs() < 1e-4 and (x.std() - 1).abs() < 1e-3


def test_subset_is_class_balanced(digits: ImageData) -> None:
    small = digits.subset(5, 3, seed=1)
    assert small.train_labels.bincount().tolist() == [5] * 10
    assert small.test_labels.bincount().tolist() == [3] * 10


def test_official_cifar100_layout_uses_fine_labels(tmp_path: Path) -> None:
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    rng = np.random.default_rng(2)
    names = [f"class{i}".encode() for i in range(100)]
    with open(folder / "meta", "wb") as handle:
        pickle.dump({b"fine_label_names": names, b"coarse_label_names": names[:20]}, handle)
    for split, count in (("train", 6), ("test", 3)):
        rows = rng.integers(0, 256, (count, 3072), dtype=np.uint8)
        with open(folder / split, "wb") as handle:
            pickle.dump({b"data": rows, b"fine_labels": list(range(90, 90 + count)), b"coarse_labels": [0] * count}, handle)
    data = load_dataset("cifar100", tmp_path)
    assert data.name == "cifar100" and data.num_classes == 100
    assert data.train_labels.tolist() == list(range(90, 96)) and data.test_images.shape == (3, 3, 32, 32)
