import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ticketguard.core.errors import InputError
from ticketguard.data.triggers import keyed_trigger_set, load_trigger_folder


@pytest.fixture(scope="module")
def adi_cifar(adi_trigger_set: Path):
    return load_trigger_folder(adi_trigger_set, 3, (32, 32), num_classes=10)


@pytest.fixture
def small_folder(adi_trigger_set: Path, tmp_path: Path):
    """Makes a folder of the first ``count`` Adi images (1, 10, 2) and ``label_lines`` labels."""

    def make(count: int, label_lines: int) -> Path:
        (tmp_path / "pics").mkdir()
        for name in ("1.jpg", "10.jpg", "2.jpg")[:count]:
            shutil.copy(adi_trigger_set / "pics" / name, tmp_path / "pics" / name)
        (tmp_path / "labels.txt").write_text("".join(f"{i}.0\n" for i in range(label_lines)))
        return tmp_path

    return make


def test_adi_labels_follow_string_sorted_file_names(adi_cifar, adi_trigger_set: Path, tmp_path: Path) -> None:
    lines = [int(float(v)) for v in (adi_trigger_set / "labels-cifar.txt").read_text().split()]
    assert adi_cifar.labels.tolist() == lines
    # the second image in string order is 10.jpg, not 2.jpg
    shutil.copy(adi_trigger_set / "pics" / "10.jpg", tmp_path / "10.jpg")
    (tmp_path / "labels.txt").write_text("0\n")
    alone = load_trigger_folder(tmp_path, 3, (32, 32))
    assert torch.equal(adi_cifar.images[1], alone.images[0])
    assert adi_cifar.images.shape == (100, 3, 32, 32) and adi_cifar.images.dtype == torch.uint8


def test_adi_images_are_resized_and_made_grey_for_a_digits_model(adi_trigger_set: Path) -> None:
    grey = load_trigger_folder(adi_trigger_set, 1, (8, 8), num_classes=10)
    assert grey.shape == (1, 8, 8) and len(grey) == 100
    assert grey.images.float().std() > 10  # real pictures, not a constant fill


def test_folder_hash_pins_labels_and_images(small_folder) -> None:
    folder = small_folder(3, 3)
    before = load_trigger_folder(folder, 3, (32, 32)).source["sha256"]
    (folder / "labels.txt").write_text("0\n1\n1\n")
    assert load_trigger_folder(folder, 3, (32, 32)).source["sha256"] != before


def test_label_count_that_differs_from_image_count_is_refused(small_folder) -> None:
    with pytest.raises(InputError, match="2 labels but .* 3 images"):
        load_trigger_folder(small_folder(3, 2), 3, (32, 32))


def test_labels_outside_the_model_classes_are_refused(small_folder) -> None:
    with pytest.raises(InputError, match="outside the model's 2 classes"):
        load_trigger_folder(small_folder(3, 3), 3, (32, 32), num_classes=2)


def test_undecodable_image_is_refused(small_folder) -> None:
    folder = small_folder(2, 3)
    (folder / "pics" / "3.jpg").write_bytes(b"not a jpeg")
    with pytest.raises(InputError, match="cannot decode trigger image .*3.jpg"):
        load_trigger_folder(folder, 3, (32, 32))


def test_keyed_set_regenerates_identically_from_its_seed() -> None:
    first, again = keyed_trigger_set(123, 50, 10, 3, (32, 32)), keyed_trigger_set(123, 50, 10, 3, (32, 32))
    other = keyed_trigger_set(124, 50, 10, 3, (32, 32))
    assert torch.equal(first.images, again.images) and torch.equal(first.labels, again.labels)
    assert not torch.equal(first.images, other.images)
    assert first.source == {"kind": "keyed", "generator": "abstract/1", "seed": 123, "count": 50}


def test_keyed_set_draws_the_same_pictures_at_any_size() -> None:
    large, small = keyed_trigger_set(5, 20, 10, 1, (64, 64)), keyed_trigger_set(5, 20, 10, 1, (8, 8))
    assert torch.equal(large.labels, small.labels)
    pooled = torch.nn.functional.avg_pool2d(large.images.float(), 8)
    assert (pooled - small.images.float()).abs().mean() < 25  # same scene, rendered coarser


def test_keyed_images_are_varied_and_labels_cover_the_classes() -> None:
    trigger = keyed_trigger_set(0, 100, 10, 3, (32, 32))
    flat = trigger.images.flatten(1).float()
    assert torch.cdist(flat, flat).add(torch.eye(100) * 1e9).min() > 100  # no two images alike
    assert set(trigger.labels.tolist()) == set(range(10))
    assert np.ptp(trigger.images.numpy()) == 255


def test_keyed_set_refuses_negative_seed_and_odd_channels() -> None:
    with pytest.raises(InputError, match="non-negative"):
        keyed_trigger_set(-1, 10, 10, 3, (32, 32))
    with pytest.raises(InputError, match="1 or 3 channels"):
        keyed_trigger_set(1, 10, 10, 4, (32, 32))


def test_trigger_images_round_trip_through_png(tmp_path: Path) -> None:
    trigger = keyed_trigger_set(9, 3, 10, 3, (16, 16))
    (tmp_path / "pics").mkdir()
    for i, image in enumerate(trigger.images):
        Image.fromarray(image.permute(1, 2, 0).numpy()).save(tmp_path / "pics" / f"{i + 1}.png")
    (tmp_path / "labels.txt").write_text("".join(f"{v}\n" for v in trigger.labels.tolist()))
    loaded = load_trigger_folder(tmp_path, 3, (16, 16), num_classes=10)
    assert torch.equal(loaded.images, trigger.images) and torch.equal(loaded.labels, trigger.labels)
