"""Named training recipes: the paper's, and a fast one that reaches the paper's CIFAR-10 accuracy in 30 epochs.

``fast`` takes from the fast-CIFAR work what transfers to ResNet-20 without changing the architecture: a
one-cycle rate peaking at 0.2, Nesterov momentum, label smoothing 0.1, weight decay 5e-4 on conv and linear
weights only (none on BatchNorm and biases), and horizontal-flip test-time augmentation. Its curve beside the
paper's schedule cut to the same epochs is in ``benchmarks/README.md`` (``benchmarks/cifar10_recipe.py``).
"""

from __future__ import annotations

from collections.abc import Callable

from ticketguard.core.errors import InputError
from ticketguard.training.loop import TrainConfig

RECIPES: dict[str, Callable[[int, int], TrainConfig]] = {
    "paper": lambda epochs, seed: TrainConfig(epochs=epochs, seed=seed),
    "fast": lambda epochs, seed: TrainConfig(
        epochs=epochs, batch_size=128, lr=0.2, momentum=0.9, nesterov=True, weight_decay=5e-4,
        decay_norm_and_bias=False, label_smoothing=0.1, schedule="onecycle", flip_tta=True, seed=seed,
    ),
}


def recipe(name: str, epochs: int, seed: int = 0) -> TrainConfig:
    """The training settings of recipe ``name`` for a run of ``epochs``."""
    if name not in RECIPES:
        raise InputError(f"unknown training recipe {name!r}; choose one of: {', '.join(RECIPES)}")
    return RECIPES[name](epochs, seed)
