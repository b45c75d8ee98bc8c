"""``rename``, and torchvision's names for our layers.

Names are read from the keys alone, so this module needs no exact state_dict; ``torchvision_names`` is the one
definition of torchvision's names, which alignment also uses to recognise a renamed suspect.
"""

from __future__ import annotations

import random
from collections.abc import Mapping
from typing import Literal

import torch
from torch import nn

from ticketguard.disguises.structure import Weights, _blocks, _probe
from ticketguard.errors import InputError
from ticketguard.masks import Mask
from ticketguard.models import MODELS

CIFAR_STEM_NAMES = {"conv": "conv1", "bn": "bn1"}  # torchvision's names for the CIFAR ResNet stem


def _stage_positions(blocks: nn.Sequential) -> list[tuple[int, int]]:
    """(stage from 1, index in stage) per block: a stage starts at each block that downsamples."""
    positions, stage, index = [], 1, 0
    for number, block in enumerate(blocks):
        downsamples = any(m.stride != (1, 1) for m in block.modules() if isinstance(m, nn.Conv2d))
        if number and downsamples:
            stage, index = stage + 1, 0
        positions.append((stage, index))
        index += 1
    return positions


def _model_named_by(weights: Mapping[str, torch.Tensor]) -> str:
    """The registered model whose conv kernels ``weights`` names, whatever their widths or BN folding."""
    kernels = {key for key, tensor in weights.items() if key.endswith(".weight") and tensor.dim() == 4}
    for name in MODELS:
        probe = _probe((name, 3, 10))
        if kernels == {f"{n}.weight" for n, m in probe.named_modules() if isinstance(m, nn.Conv2d)}:
            return name
    raise InputError("rename to torchvision names needs the layer names of a registered architecture")


def torchvision_names(keys: list[str], model: str) -> dict[str, str]:
    """torchvision's names: ``blocks.6.conv1`` -> ``layer3.0.conv1``, ``shortcut`` -> ``downsample``."""
    prefix, blocks = _blocks(_probe((model, 3, 10)))
    positions = _stage_positions(blocks)
    names = {}
    for key in keys:
        head, rest = key.split(".", 1)
        if head == prefix:
            block, rest = rest.split(".", 1)
            stage, index = positions[int(block)]
            names[key] = f"layer{stage}.{index}.{rest.replace('shortcut.', 'downsample.')}"
        else:
            names[key] = f"{CIFAR_STEM_NAMES.get(head, head)}.{rest}"
    return names


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
        names = torchvision_names(keys, _model_named_by(weights))
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
