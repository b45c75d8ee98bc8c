"""Model registry: every architecture a ticket can name, built for any input channels and class count."""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import torch
from torch import nn

from ticketguard.errors import InputError
from ticketguard.models.cifar_resnet import CifarResNet
from ticketguard.models.imagenet_resnet import BasicBlock, Bottleneck, ResNet

ModelFactory = Callable[..., nn.Module]

MODELS: dict[str, ModelFactory] = {
    "resnet20": partial(CifarResNet, 20),
    "resnet32": partial(CifarResNet, 32),
    "resnet56": partial(CifarResNet, 56),
    "resnet18": partial(ResNet, BasicBlock, (2, 2, 2, 2)),
    "resnet50": partial(ResNet, Bottleneck, (3, 4, 6, 3)),
}

MIN_INPUT_SIZE = 8


def build_model(name: str, in_channels: int = 3, num_classes: int = 10) -> nn.Module:
    """Instantiate a registered architecture; unknown names get a message listing the known ones."""
    if name not in MODELS:
        raise InputError(f"unknown model {name!r}; choose one of: {', '.join(MODELS)}")
    if in_channels < 1 or num_classes < 2:
        raise InputError(f"a model needs >= 1 input channel and >= 2 classes, got {in_channels} and {num_classes}")
    return MODELS[name](in_channels=in_channels, num_classes=num_classes)


def identify_architecture(state: dict[str, torch.Tensor]) -> tuple[str, int, int] | None:
    """(name, input channels, classes) of the registered architecture whose state_dict ``state`` fits, if any."""
    convs = [t for t in state.values() if t.dim() == 4]
    linears = [t for t in state.values() if t.dim() == 2]
    if not convs or not linears:
        return None
    in_channels, num_classes = convs[0].shape[1], linears[-1].shape[0]
    for name, factory in MODELS.items():
        if num_classes < 2:
            break
        with torch.device("meta"):
            expected = factory(in_channels=in_channels, num_classes=num_classes).state_dict()
        if expected.keys() == state.keys() and all(expected[k].shape == state[k].shape for k in expected):
            return name, int(in_channels), int(num_classes)
    return None
