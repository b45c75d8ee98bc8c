"""Removal attacks on a (protected) ticket, paper §4.3: one-shot pruning and fine-tuning.

Every attack is ``attack(weights, mask, **params) -> (weights, mask)``: ``weights`` is a full state_dict,
``mask`` covers the prunable weights; the returned weights are zero wherever the returned mask prunes.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch

from ticketguard.data import ImageData
from ticketguard.errors import InputError
from ticketguard.masks import Mask, magnitude_prune
from ticketguard.models import build_model, identify_architecture
from ticketguard.training import TrainConfig, state_copy, train

Weights = dict[str, torch.Tensor]
Attack = Callable[..., tuple[Weights, Mask]]


def _masked(weights: Mapping[str, torch.Tensor], mask: Mask) -> Weights:
    return {name: t * mask[name].to(t.dtype) if name in mask else t.clone() for name, t in weights.items()}


def magnitude_pruning(
    weights: Mapping[str, torch.Tensor], mask: Mask, *, fraction: float
) -> tuple[Weights, Mask]:
    """One-shot global magnitude pruning of ``fraction`` of the remaining weights."""
    pruned = magnitude_prune(weights, mask, fraction)
    return _masked(weights, pruned), pruned


def random_pruning(
    weights: Mapping[str, torch.Tensor], mask: Mask, *, fraction: float, seed: int = 0
) -> tuple[Weights, Mask]:
    """One-shot pruning of a uniformly random ``fraction`` of the remaining weights."""
    if not 0.0 <= fraction < 1.0:
        raise InputError(f"pruning fraction must be in [0, 1), got {fraction}")
    generator = torch.Generator().manual_seed(seed)
    names = list(mask)
    kept = torch.cat([mask[n].cpu().flatten() for n in names])
    positions = kept.nonzero().squeeze(1)
    drop = positions[torch.randperm(len(positions), generator=generator)[: round(fraction * len(positions))]]
    kept[drop] = False
    pruned, start = {}, 0
    for name in names:
        pruned[name] = kept[start : start + mask[name].numel()].view_as(mask[name])
        start += mask[name].numel()
    result = Mask(pruned)
    return _masked(weights, result), result


def fine_tuning(
    weights: Mapping[str, torch.Tensor],
    mask: Mask,
    *,
    data: ImageData,
    epochs: int = 3,
    lr: float = 0.01,
    seed: int = 0,
    device: torch.device | None = None,
) -> tuple[Weights, Mask]:
    """A few epochs of SGD at a small, constant learning rate on ``data``, mask held fixed."""
    architecture = identify_architecture(dict(weights))
    if architecture is None:
        raise InputError("fine-tuning needs weights of a registered architecture")
    model = build_model(*architecture)
    model.load_state_dict(dict(weights))
    model.to(device or torch.device("cpu"))
    train(
        model,
        data,
        TrainConfig(epochs=epochs, lr=lr, milestones=(), seed=seed),
        mask,
        description="fine-tune",
    )
    return state_copy(model), mask


ATTACKS: dict[str, Attack] = {
    "magnitude": magnitude_pruning,
    "random": random_pruning,
    "finetune": fine_tuning,
}
