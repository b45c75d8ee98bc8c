"""keep_mask: pruned weights stay exactly zero through any torch optimizer's steps; its hooks go on exit."""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from ticketguard.core.errors import InputError
from ticketguard.core.masks import Mask, magnitude_prune, prunable_names
from ticketguard.data import ImageData
from ticketguard.data.augment import normalize
from ticketguard.models import build_model
from ticketguard.training.fixed_mask import keep_mask

Optimizers = Callable[[nn.Module], list[torch.optim.Optimizer]]
OPTIMIZERS: dict[str, Optimizers] = {
    "adam-weight-decay": lambda m: [torch.optim.Adam(m.parameters(), lr=1e-2, weight_decay=0.1)],
    "adamw": lambda m: [torch.optim.AdamW(m.parameters(), lr=1e-2, weight_decay=0.1)],
    "sgd-momentum": lambda m: [torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-2)],
    # two optimizers over disjoint halves: convolutions with Adam, the rest with SGD momentum
    "adam-and-sgd": lambda m: [
        torch.optim.Adam([p for p in m.parameters() if p.dim() == 4], lr=1e-2, weight_decay=0.1),
        torch.optim.SGD([p for p in m.parameters() if p.dim() != 4], lr=0.1, momentum=0.9),
    ],
}


def sparse_model() -> tuple[nn.Module, Mask]:
    """A ResNet-20 for digits with 70 % of its prunable weights removed by magnitude, not yet zeroed."""
    torch.manual_seed(0)
    model = build_model("resnet20", 1, 10)
    weights = {k: v.detach() for k, v in model.named_parameters()}
    return model, magnitude_prune(weights, Mask.ones_like(weights, prunable_names(model)), 0.7)


def run_steps(
    model: nn.Module, optimizers: list[torch.optim.Optimizer], data: ImageData, steps: int = 4
) -> None:
    """A plain training loop on real digits: no ticketguard code in it."""
    mean, std = data.channel_stats()
    for step in range(steps):
        images = normalize(data.train_images[64 * step : 64 * (step + 1)], mean, std)
        loss = F.cross_entropy(model(images), data.train_labels[64 * step : 64 * (step + 1)])
        for optimizer in optimizers:
            optimizer.zero_grad()
        loss.backward()
        for optimizer in optimizers:
            optimizer.step()


def weights(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in model.named_parameters()}


@pytest.mark.parametrize("name", list(OPTIMIZERS))
@pytest.mark.parametrize("scoped", [True, False], ids=["given-optimizers", "every-optimizer"])
def test_pruned_weights_stay_exactly_zero_through_optimizer_steps(
    digits: ImageData, name: str, scoped: bool
) -> None:
    model, mask = sparse_model()
    optimizers = OPTIMIZERS[name](model)
    before = weights(model)
    with keep_mask(model, mask, optimizers if scoped else None):
        assert not mask.revived(dict(model.named_parameters()))  # zeroed on entry
        run_steps(model, optimizers, digits)
    after = dict(model.named_parameters())
    assert not mask.revived(after)
    assert all(not torch.equal(after[n][mask[n]], before[n][mask[n]]) for n in mask)  # kept weights trained


def test_without_the_context_weight_decay_revives_pruned_weights(digits: ImageData) -> None:
    """The control for the test above: Adam's decay and moments do move zeroed weights."""
    model, mask = sparse_model()
    mask.apply_(model)
    run_steps(model, OPTIMIZERS["adam-weight-decay"](model), digits)
    assert sum(mask.revived(dict(model.named_parameters())).values()) > 0.5 * (mask.total() - mask.kept())


@pytest.mark.parametrize("mask_gradients", [True, False])
def test_masked_gradients_keep_adam_moments_of_pruned_weights_at_zero(
    digits: ImageData, mask_gradients: bool
) -> None:
    model, mask = sparse_model()
    [adam] = OPTIMIZERS["adam-weight-decay"](model)
    with keep_mask(model, mask, [adam], mask_gradients=mask_gradients):
        run_steps(model, [adam], digits, steps=2)
    params = dict(model.named_parameters())
    moments = [adam.state[params[n]]["exp_avg"][~mask[n]] for n in mask]
    assert all(bool((m == 0).all()) for m in moments) == mask_gradients


@pytest.mark.parametrize("scoped", [True, False], ids=["given-optimizers", "every-optimizer"])
@pytest.mark.parametrize("failing", [False, True], ids=["normal-exit", "exception"])
def test_hooks_are_removed_on_exit_even_on_an_exception(
    digits: ImageData, scoped: bool, failing: bool
) -> None:
    model, mask = sparse_model()
    [adam] = OPTIMIZERS["adam-weight-decay"](model)
    with (
        pytest.raises(RuntimeError, match="user loop failed") if failing else contextlib.nullcontext(),
        keep_mask(model, mask, [adam] if scoped else None),
    ):
        run_steps(model, [adam], digits, steps=1)
        if failing:
            raise RuntimeError("user loop failed")
    assert not mask.revived(dict(model.named_parameters()))
    run_steps(model, [adam], digits, steps=1)  # no hook any more: decay and gradients move pruned weights
    assert mask.revived(dict(model.named_parameters()))


def test_a_model_cast_inside_the_context_is_still_kept(digits: ImageData) -> None:
    model, mask = sparse_model()
    with keep_mask(model, mask):
        model.double()  # the factors follow the weights' dtype (and device) at the next step
        adam = torch.optim.Adam(model.parameters(), lr=1e-2, weight_decay=0.1)
        images = normalize(digits.train_images[:64], *digits.channel_stats()).double()
        F.cross_entropy(model(images), digits.train_labels[:64]).backward()
        adam.step()
    assert not mask.revived(dict(model.named_parameters()))


def test_a_mask_for_another_model_or_a_foreign_optimizer_is_refused() -> None:
    model, mask = sparse_model()
    with pytest.raises(InputError, match="names no weight"):
        keep_mask(nn.Sequential(nn.Linear(4, 2)), mask)
    with pytest.raises(InputError, match="torch.optim.Optimizer"):
        keep_mask(model, mask, [object()])  # type: ignore[list-item]
