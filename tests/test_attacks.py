"""Removal attacks: one-shot magnitude and random pruning of the remaining weights, and fine-tuning."""

from __future__ import annotations

import pytest
import torch

from ticketguard.attacks import ATTACKS, fine_tuning, magnitude_pruning, random_pruning
from ticketguard.data import ImageData
from ticketguard.errors import InputError
from ticketguard.masks import Mask, magnitude_prune, prunable_names
from ticketguard.models import build_model
from ticketguard.training import state_copy


@pytest.fixture(scope="module")
def sparse() -> tuple[dict[str, torch.Tensor], Mask]:
    torch.manual_seed(0)
    model = build_model("resnet20", 1, 10)
    weights = state_copy(model)
    mask = magnitude_prune(weights, Mask.ones_like(weights, prunable_names(model)), 0.6)
    return {n: t * mask[n] if n in mask else t for n, t in weights.items()}, mask


def test_registry_names_every_attack() -> None:
    assert ATTACKS == {"magnitude": magnitude_pruning, "random": random_pruning, "finetune": fine_tuning}


@pytest.mark.parametrize("attack", [magnitude_pruning, random_pruning])
def test_pruning_removes_the_fraction_of_remaining_weights_and_zeroes_them(attack, sparse) -> None:
    weights, mask = sparse
    attacked, pruned = attack(weights, mask, fraction=0.3)
    assert pruned.kept() == mask.kept() - round(0.3 * mask.kept())
    for name in mask:
        assert not (pruned[name] & ~mask[name]).any()
        assert (attacked[name][~pruned[name]] == 0).all()
        assert torch.equal(attacked[name][pruned[name]], weights[name][pruned[name]])


def test_magnitude_pruning_drops_the_smallest_weights(sparse) -> None:
    weights, mask = sparse
    _, pruned = magnitude_pruning(weights, mask, fraction=0.5)
    dropped = torch.cat([weights[n][mask[n] & ~pruned[n]].abs() for n in mask])
    kept = torch.cat([weights[n][pruned[n]].abs() for n in mask])
    assert dropped.max() <= kept.min()


def test_random_pruning_is_reproducible_by_seed_and_differs_across_seeds(sparse) -> None:
    weights, mask = sparse
    first, second, other = (random_pruning(weights, mask, fraction=0.2, seed=s)[1] for s in (1, 1, 2))
    assert first == second and first != other


def test_bad_fraction_is_refused(sparse) -> None:
    weights, mask = sparse
    for attack in (magnitude_pruning, random_pruning):
        with pytest.raises(InputError, match="fraction"):
            attack(weights, mask, fraction=1.0)


def test_fine_tuning_changes_weights_but_keeps_the_mask(sparse, digits: ImageData) -> None:
    weights, mask = sparse
    tuned, tuned_mask = fine_tuning(weights, mask, data=digits.subset(20, 10, 0), epochs=1)
    assert tuned_mask == mask
    name = next(iter(mask))
    assert not torch.equal(tuned[name], weights[name])
    assert (tuned[name][~mask[name]] == 0).all()
