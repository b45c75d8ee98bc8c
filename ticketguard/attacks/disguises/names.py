"""``rename``: torchvision's names for our layers, or opaque ones.

Names are read from the keys alone, so this disguise needs no exact state_dict.
"""

from __future__ import annotations

import random
from collections.abc import Mapping
from typing import Literal

import torch

from ticketguard.core.errors import InputError
from ticketguard.core.masks import Mask
from ticketguard.models.architecture import Weights, model_named_by, torchvision_names


def _opaque_names(keys: list[str], seed: int) -> dict[str, str]:
    """Unique random 8-hex-digit names that say nothing of the layer."""
    tokens = random.Random(seed).sample(range(16**8), len(keys))
    return {key: f"p{token:08x}" for key, token in zip(keys, tokens)}


def rename(
    weights: Mapping[str, torch.Tensor],
    mask: Mask,
    *,
    style: Literal["torchvision", "opaque"] = "torchvision",
    seed: int = 0,
) -> tuple[Weights, Mask]:
    """Rename every key (torchvision's layer names, or opaque random ones) and shuffle their order.

    Names are read from the keys alone, so ``rename`` also follows ``fold-bn`` and ``widen`` in a chain.
    """
    keys = list(weights)
    if style == "torchvision":
        names = torchvision_names(keys, model_named_by(weights))
    elif style == "opaque":
        names = _opaque_names(keys, seed)
    else:
        raise InputError(f"rename style must be torchvision or opaque, got {style!r}")
    order = torch.randperm(len(keys), generator=torch.Generator().manual_seed(seed)).tolist()
    shuffled = [keys[i] for i in order]
    return (
        {names[key]: weights[key] for key in shuffled},
        Mask({names[key]: mask[key] for key in shuffled if key in mask}),
    )
