from pathlib import Path

import pytest
import torch

from ticketguard import training
from ticketguard.data import ImageData
from ticketguard.masks import Mask, magnitude_prune, prunable_names
from ticketguard.models import build_model
from ticketguard.training import TrainConfig, evaluate, train


def _sparse_resnet20(digits: ImageData, fraction: float = 0.7) -> tuple[torch.nn.Module, Mask]:
    model = build_model("resnet20", 1, 10)
    params = {k: v.detach() for k, v in model.named_parameters()}
    mask = magnitude_prune(params, Mask.ones_like(params, prunable_names(model)), fraction)
    return model, mask


def test_lr_schedule_decays_at_half_and_three_quarters() -> None:
    config = TrainConfig(epochs=182)
    assert [config.lr_at(e) for e in (0, 90, 91, 135, 136, 181)] == pytest.approx([0.1, 0.1, 0.01, 0.01, 0.001, 0.001])


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


def test_interrupted_training_resumes_to_the_same_weights(digits: ImageData, tmp_path: Path, monkeypatch) -> None:
    config = TrainConfig(epochs=4, seed=3)
    torch.manual_seed(1)
    model, mask = _sparse_resnet20(digits)
    reference = train(build_model_like(model), digits, config, mask)

    checkpoint = tmp_path / "run.pt"
    original_save = training._save

    def save_then_die(path, model_, optimizer, generator, config_, state):
        original_save(path, model_, optimizer, generator, config_, state)
        if state["epoch"] == 2:
            raise KeyboardInterrupt

    monkeypatch.setattr(training, "_save", save_then_die)
    resumed_model = build_model_like(model)
    with pytest.raises(KeyboardInterrupt):
        train(resumed_model, digits, config, mask, checkpoint=checkpoint)
    monkeypatch.setattr(training, "_save", original_save)
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
    assert all(a <= b for a, b in zip(rates[:peak], rates[1 : peak + 1]))
    assert all(a >= b for a, b in zip(rates[peak:], rates[peak + 1 :])) and rates[-1] == 0.0
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
