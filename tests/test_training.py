import itertools
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import Dataset, IterableDataset

from ticketguard.core.errors import InputError
from ticketguard.core.files import load_checkpoint, save_checkpoint
from ticketguard.core.masks import Mask, magnitude_prune, prunable_names
from ticketguard.data import ImageData
from ticketguard.models import build_model
from ticketguard.training import loop as training
from ticketguard.training.loop import TrainConfig, evaluate, train


def _sparse_resnet20(digits: ImageData, fraction: float = 0.7) -> tuple[torch.nn.Module, Mask]:
    model = build_model("resnet20", 1, 10)
    params = {k: v.detach() for k, v in model.named_parameters()}
    mask = magnitude_prune(params, Mask.ones_like(params, prunable_names(model)), fraction)
    return model, mask


def test_lr_schedule_decays_at_half_and_three_quarters() -> None:
    config = TrainConfig(epochs=182)
    rates = [config.lr_at(e) for e in (0, 90, 91, 135, 136, 181)]
    assert rates == pytest.approx([0.1, 0.1, 0.01, 0.01, 0.001, 0.001])


def test_training_keeps_pruned_weights_exactly_zero_and_learns(digits: ImageData) -> None:
    model, mask = _sparse_resnet20(digits)
    result = train(model, digits, TrainConfig(epochs=4), mask)
    params = dict(model.named_parameters())
    assert all(torch.equal(params[n] != 0, mask[n]) for n in mask)
    assert result.accuracy > 0.8  # chance is 0.1
    assert result.accuracy == evaluate(model, digits)
    assert len(result.history) == 4 and result.history[-1]["loss"] < result.history[0]["loss"]


def test_rewind_state_is_captured_after_k_epochs(digits: ImageData) -> None:
    model = build_model("resnet20", 1, 10)
    initial = {k: v.clone() for k, v in model.state_dict().items()}
    result = train(model, digits, TrainConfig(epochs=3), rewind_epoch=1)
    rewind = result.rewind_state
    assert rewind is not None and rewind.keys() == initial.keys()
    assert not torch.equal(rewind["fc.weight"], initial["fc.weight"])
    assert not torch.equal(rewind["fc.weight"], model.state_dict()["fc.weight"])
    assert int(rewind["bn.num_batches_tracked"]) == 12  # one epoch of 1437 images in batches of 128


def test_interrupted_training_resumes_to_the_same_weights(
    digits: ImageData, tmp_path: Path, monkeypatch
) -> None:
    config = TrainConfig(epochs=4, seed=3)
    torch.manual_seed(1)
    model, mask = _sparse_resnet20(digits)
    reference = train(build_model_like(model), digits, config, mask)

    checkpoint = tmp_path / "run.pt"
    original_save = training.save_training_state

    def save_then_die(path, model_, optimizer, generator, config_, state):
        original_save(path, model_, optimizer, generator, config_, state)
        if state["epoch"] == 2:
            raise KeyboardInterrupt

    monkeypatch.setattr(training, "save_training_state", save_then_die)
    resumed_model = build_model_like(model)
    with pytest.raises(KeyboardInterrupt):
        train(resumed_model, digits, config, mask, checkpoint=checkpoint)
    monkeypatch.setattr(training, "save_training_state", original_save)
    fresh = build_model("resnet20", 1, 10)  # different weights: all must come from the checkpoint
    resumed = train(fresh, digits, config, mask, checkpoint=checkpoint)
    assert resumed.history == reference.history
    assert resumed.accuracy == reference.accuracy


def build_model_like(model: torch.nn.Module) -> torch.nn.Module:
    clone = build_model("resnet20", 1, 10)
    clone.load_state_dict(model.state_dict())
    return clone


def test_checkpoint_from_other_settings_is_refused(digits: ImageData, tmp_path: Path) -> None:
    checkpoint = tmp_path / "run.pt"
    train(build_model("resnet20", 1, 10), digits, TrainConfig(epochs=1), checkpoint=checkpoint)
    with pytest.raises(ValueError, match="other training settings"):
        train(build_model("resnet20", 1, 10), digits, TrainConfig(epochs=2), checkpoint=checkpoint)


@pytest.mark.slow
def test_resnet20_learns_real_cifar10_jpegs(cifar_jpeg_subset: ImageData) -> None:
    torch.manual_seed(0)
    model = build_model("resnet20")
    result = train(model, cifar_jpeg_subset, TrainConfig(epochs=8, batch_size=64, lr=0.05))
    assert result.accuracy > 0.2  # chance is 0.1 on 400 balanced test images


def test_onecycle_warms_up_then_decays_to_zero() -> None:
    config = TrainConfig(epochs=10, lr=0.4, schedule="onecycle")
    rates = [config.lr_at(e / 10) for e in range(101)]
    peak = rates.index(max(rates))
    assert rates[0] == pytest.approx(0.016) and max(rates) == pytest.approx(0.4) and peak == 30
    assert all(a <= b for a, b in itertools.pairwise(rates[: peak + 1]))
    assert all(a >= b for a, b in itertools.pairwise(rates[peak:])) and rates[-1] == 0.0
    with pytest.raises(ValueError, match="unknown schedule"):
        TrainConfig(schedule="cosine")


@pytest.mark.slow
def test_compiled_training_follows_eager_training(digits: ImageData) -> None:
    runs = []
    for compiled in (False, True):
        torch.manual_seed(0)
        model, mask = _sparse_resnet20(digits)
        runs.append(train(model, digits, TrainConfig(epochs=2, compile=compiled), mask))
        params = dict(model.named_parameters())
        assert all(torch.equal(params[n] != 0, mask[n]) for n in mask)
    eager, compiled_run = runs
    for a, b in zip(eager.history, compiled_run.history):
        assert b["loss"] == pytest.approx(a["loss"], abs=0.05)
    assert compiled_run.history[-1]["loss"] < compiled_run.history[0]["loss"] - 0.3


class DigitsDataset(Dataset):
    """A torch Dataset over one split of the digits, each image in the form a user's pipeline might give."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, form: str = "pil") -> None:
        self.images, self.labels, self.form = images, labels, form
        self.classes = [f"digit {d}" for d in range(10)]

    def __len__(self) -> int:
        return self.labels.numel()

    def __getitem__(self, index: int) -> tuple[Any, Any]:
        image, label = self.images[index], self.labels[index]
        forms = {
            "pil": lambda: Image.fromarray(image[0].numpy()),
            "numpy-hw": lambda: image[0].numpy(),
            "numpy-hwc": lambda: image.permute(1, 2, 0).numpy(),
            "uint8-chw": lambda: image,
            "float-chw": lambda: image.float() / 255,
        }
        return forms[self.form](), int(label) if self.form == "pil" else label


def datasets(data: ImageData, form: str = "pil") -> tuple[DigitsDataset, DigitsDataset]:
    return (DigitsDataset(data.train_images, data.train_labels, form),
            DigitsDataset(data.test_images, data.test_labels, form))


def test_image_data_from_a_torch_dataset_trains_with_our_trainer(digits: ImageData) -> None:
    small = digits.subset(40, 20, 0)
    data = ImageData.from_datasets(*datasets(small), name="digits-dataset", crop_padding=1)
    assert torch.equal(data.train_images, small.train_images)
    assert torch.equal(data.test_labels, small.test_labels)
    assert data.classes[3] == "digit 3" and data.name == "digits-dataset"
    model, mask = _sparse_resnet20(data)
    result = train(model, data, TrainConfig(epochs=4, batch_size=32), mask)
    assert result.accuracy > 0.5  # chance is 0.1
    assert not mask.revived(dict(model.named_parameters()))


@pytest.mark.parametrize("form", ["pil", "numpy-hw", "numpy-hwc", "uint8-chw", "float-chw"])
def test_every_image_form_gives_the_same_uint8_pixels(digits: ImageData, form: str) -> None:
    small = digits.subset(3, 2, 0)
    data = ImageData.from_datasets(*datasets(small, form))
    assert torch.equal(data.train_images, small.train_images)
    assert torch.equal(data.test_images, small.test_images)
    assert torch.equal(data.train_labels, small.train_labels) and data.num_classes == 10


class Items(Dataset):
    """A dataset that returns the given items as they are."""

    def __init__(self, items: list[Any]) -> None:
        self.items = items

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> Any:
        return self.items[index]


class Stream(IterableDataset):
    def __iter__(self) -> Iterator[Any]:
        return iter([(torch.zeros(1, 8, 8, dtype=torch.uint8), 0)])


PIXELS = torch.zeros(1, 8, 8, dtype=torch.uint8)
BAD_DATA = {
    "empty": (Items([]), "the train dataset is empty"),
    "iterable": (Stream(), "give a map-style Dataset"),
    "not-a-pair": (Items([PIXELS]), "item 0 is of type Tensor; a dataset must give \\(image, label\\) pairs"),
    "sizes-vary": (Items([(PIXELS, 0), (PIXELS[:, 1:], 1)]), "train item 1 is 1x7x8 but"),
    "float-out-of-range": (Items([(PIXELS.float() + 2, 0)]), "values outside \\[0, 1\\]"),
    "float-numpy": (Items([(np.zeros((8, 8)), 0)]), "numpy images must be uint8"),
    "int32-tensor": (Items([(PIXELS.int(), 0)]), "tensor images must be uint8 or float"),
    "float-label": (Items([(PIXELS, 1.0)]), "labels must be integer class indices"),
    "label-outside-classes": (Items([(PIXELS, 0), (PIXELS, 2)]), "item 1 has label 2, outside the 2 classes"),
    "negative-label": (Items([(PIXELS, -1)]), "train item 0 has label -1"),
    "16-bit-pil": (Items([(Image.new("I;16", (8, 8)), 0)]), "deeper than 8 bits"),
}


@pytest.mark.parametrize("case", list(BAD_DATA))
def test_bad_datasets_are_refused_with_what_is_wrong(case: str) -> None:
    train_set, message = BAD_DATA[case]
    with pytest.raises(InputError, match=message):
        ImageData.from_datasets(train_set, Items([(PIXELS, 0)]), classes=("zero", "one"))


def test_a_test_image_of_another_size_and_too_much_data_are_refused() -> None:
    train_set = Items([(PIXELS, 0), (PIXELS, 1)])
    with pytest.raises(InputError, match="test item 0 is 1x4x4 but train item 0 is 1x8x8"):
        ImageData.from_datasets(train_set, Items([(torch.zeros(1, 4, 4, dtype=torch.uint8), 0)]))
    with pytest.raises(InputError, match="3 images of 1x8x8 would take .* more than max_bytes"):
        ImageData.from_datasets(train_set, Items([(PIXELS, 0)]), max_bytes=100)


def _smoothed_cross_entropy(logits: torch.Tensor, labels: torch.Tensor, smoothing: float) -> float:
    """By hand: (1 - s) of the target's -log p plus s of the mean -log p over all classes."""
    log_p = logits.log_softmax(1)
    picked = -log_p.gather(1, labels[:, None]).squeeze(1)
    return float(((1 - smoothing) * picked + smoothing * -log_p.mean(1)).mean())


@pytest.mark.parametrize("smoothing", [0.0, 0.3])
def test_label_smoothing_gives_the_hand_computed_loss(digits: ImageData, smoothing: float) -> None:
    small = digits.subset(10, 2, 0)
    model = build_model("resnet20", 1, 10)
    train(model, small, TrainConfig(epochs=3, batch_size=20))  # confident logits, where smoothing matters
    before = build_model_like(model).train()
    seen = []

    def capture(images: torch.Tensor, labels: torch.Tensor, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        seen.append((images.clone(), labels.clone()))
        return images, labels

    config = TrainConfig(epochs=1, batch_size=100, label_smoothing=smoothing)  # one step over all 100 images
    result = train(model, small, config, batch_hook=capture)
    (images, labels), = seen
    with torch.no_grad():
        logits = before(training.normalize(images, *small.channel_stats()))
    by_hand = _smoothed_cross_entropy(logits, labels, smoothing)
    assert result.history[0]["loss"] == pytest.approx(by_hand, rel=1e-5)
    assert _smoothed_cross_entropy(logits, labels, smoothing) != pytest.approx(
        _smoothed_cross_entropy(logits, labels, 0.15), rel=0.01
    )


@pytest.mark.parametrize(("crop_padding", "largest_shift"), [(None, 1), (0, 0), (3, 3)])
def test_crop_padding_sets_how_far_training_crops_move_the_images(
    digits: ImageData, crop_padding: int | None, largest_shift: int
) -> None:
    small = digits.subset(10, 2, 0)
    seen = []

    def capture(images: torch.Tensor, labels: torch.Tensor, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        seen.append(images.clone())
        return images, labels

    config = TrainConfig(epochs=3, batch_size=100, crop_padding=crop_padding)
    train(build_model("resnet20", 1, 10), small, config, batch_hook=capture)
    height, width = small.train_images.shape[-2:]
    padded = torch.nn.functional.pad(small.train_images, (3, 3, 3, 3))

    def moved(dy: int, dx: int) -> torch.Tensor:
        return padded[..., 3 + dy : 3 + dy + height, 3 + dx : 3 + dx + width]

    shifts = set()
    for images in seen:  # each crop is one of the original images moved by (dy, dx), zero-filled
        for image in images:
            moves = [
                (dy, dx) for dy in range(-3, 4) for dx in range(-3, 4)
                if (moved(dy, dx) == image).all((1, 2, 3)).any()
            ]
            assert moves, "a training image is not a moved copy of any original"
            shifts.add(min(max(abs(dy), abs(dx)) for dy, dx in moves))
    assert max(shifts) == largest_shift


@pytest.mark.parametrize("decay_norm_and_bias", [True, False])
def test_batchnorm_and_biases_can_be_spared_weight_decay(decay_norm_and_bias: bool) -> None:
    model = build_model("resnet20", 1, 10)
    before = {k: v.detach().clone() for k, v in model.named_parameters()}
    config = TrainConfig(lr=1.0, momentum=0.0, weight_decay=0.1, decay_norm_and_bias=decay_norm_and_bias)
    optimizer = training.make_optimizer(model, config)
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    optimizer.step()  # a zero gradient leaves only the decay: p <- (1 - lr * wd) p
    for name, p in model.named_parameters():
        shrinks = p.dim() > 1 or decay_norm_and_bias
        assert torch.allclose(p.detach(), before[name] * (0.9 if shrinks else 1.0)), name
    assert any(n.startswith("bn") for n in before) and "fc.bias" in before


def test_nesterov_momentum_looks_ahead_along_the_velocity() -> None:
    model = torch.nn.Linear(2, 1)
    config = TrainConfig(lr=0.1, momentum=0.9, weight_decay=0.0, nesterov=True)
    optimizer = training.make_optimizer(model, config)
    start = model.weight.detach().clone()
    model.weight.grad, model.bias.grad = torch.ones_like(model.weight), torch.ones_like(model.bias)
    optimizer.step()  # first step: v = g, update g + 0.9 v = 1.9 g (plain momentum moves by g)
    assert torch.allclose(model.weight.detach(), start - 0.1 * 1.9)
    with pytest.raises(ValueError, match="Nesterov momentum needs a momentum above 0"):
        TrainConfig(momentum=0.0, nesterov=True)


def test_flip_tta_averages_the_logits_of_each_image_and_its_mirror(digits: ImageData) -> None:
    model = build_model("resnet20", 1, 10)
    train(model, digits.subset(20, 10, 0), TrainConfig(epochs=1, batch_size=64))
    images, labels = digits.test_images[:300], digits.test_labels[:300]
    stats = digits.channel_stats()
    plain = training.predict_logits(model, images, *stats)
    mirrored = training.predict_logits(model, images.flip(3), *stats)
    averaged = training.predict_logits(model, images, *stats, flip_tta=True)
    assert torch.allclose(averaged, (plain + mirrored) / 2, atol=1e-5)
    assert not torch.allclose(averaged, plain, atol=1e-3)  # digits are not mirror-symmetric
    assert torch.equal(training.predict_labels(model, images, *stats, flip_tta=True), averaged.argmax(1))
    flipped_data = replace(digits, test_images=images, test_labels=labels, flip=True)
    expected = float((averaged.argmax(1) == labels).float().mean())
    assert evaluate(model, flipped_data, flip_tta=True) == pytest.approx(expected)


def test_flip_tta_is_refused_for_data_trained_without_flips(digits: ImageData) -> None:
    with pytest.raises(InputError, match="not trained with flips"):
        train(build_model("resnet20", 1, 10), digits, TrainConfig(epochs=1, flip_tta=True))


def test_the_short_run_options_train_together(digits: ImageData) -> None:
    config = TrainConfig(
        epochs=4, lr=0.2, schedule="onecycle", nesterov=True, weight_decay=5e-4, decay_norm_and_bias=False,
        label_smoothing=0.1,
    )
    result = train(build_model("resnet20", 1, 10), digits, config)
    assert result.accuracy > 0.7  # chance is 0.1
    assert result.history[-1]["loss"] < result.history[0]["loss"]


def test_checkpoint_from_before_the_short_run_options_resumes(digits: ImageData, tmp_path: Path) -> None:
    checkpoint = tmp_path / "run.pt"
    config = TrainConfig(epochs=1)
    train(build_model("resnet20", 1, 10), digits, config, checkpoint=checkpoint)
    saved = load_checkpoint(checkpoint)
    for name in ("label_smoothing", "nesterov", "decay_norm_and_bias", "flip_tta"):
        del saved["config"][name]
    save_checkpoint(checkpoint, saved)
    resumed = train(build_model("resnet20", 1, 10), digits, config, checkpoint=checkpoint)
    assert resumed.history == saved["history"]  # nothing retrained: the old checkpoint was accepted
    with pytest.raises(ValueError, match="other training settings"):
        train(build_model("resnet20", 1, 10), digits, replace(config, nesterov=True), checkpoint=checkpoint)


@pytest.mark.parametrize(
    "settings, message",
    [
        ({"label_smoothing": 1.0}, "label smoothing must lie in"),
        ({"label_smoothing": -0.1}, "label smoothing must lie in"),
        ({"label_smoothing": float("nan")}, "label smoothing must be a finite number"),
        ({"flip_tta": "yes"}, "flip_tta must be True or False"),
        ({"decay_norm_and_bias": 0}, "decay_norm_and_bias must be True or False"),
    ],
)
def test_bad_short_run_options_are_refused(settings: dict[str, Any], message: str) -> None:
    with pytest.raises(InputError, match=message):
        TrainConfig(**settings)
