"""Model registry: the built-in architectures by short name, and any other model by import path (``spec``);
every one built for any input channels and class count."""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import torch
from torch import nn

from ticketguard.core.errors import InputError
from ticketguard.models.cifar_resnet import CifarResNet
from ticketguard.models.imagenet_resnet import BasicBlock, Bottleneck, ResNet
from ticketguard.models.spec import build_from_spec, is_import_path, parse_spec, trust_model_code

ModelFactory = Callable[..., nn.Module]

MODELS: dict[str, ModelFactory] = {
    "resnet20": partial(CifarResNet, 20),
    "resnet32": partial(CifarResNet, 32),
    "resnet56": partial(CifarResNet, 56),
    "resnet18": partial(ResNet, BasicBlock, (2, 2, 2, 2)),
    "resnet50": partial(ResNet, Bottleneck, (3, 4, 6, 3)),
}

MIN_INPUT_SIZE = 8

__all__ = [
    "MIN_INPUT_SIZE", "MODELS", "ModelFactory", "accept_model_name", "build_from_state", "build_model",
    "check_model_name", "identify_architecture", "is_import_path", "named_architecture", "trust_model_code",
]


def build_model(name: str, in_channels: int = 3, num_classes: int = 10) -> nn.Module:
    """Instantiate a registered architecture or a trusted import path (``package.module:factory(...)``)."""
    if in_channels < 1 or num_classes < 2:
        raise InputError(f"a model needs >= 1 input channel and >= 2 classes, got {in_channels} and {num_classes}")
    if is_import_path(name):
        return build_from_spec(name, in_channels, num_classes)
    check_model_name(name)
    return MODELS[name](in_channels=in_channels, num_classes=num_classes)


def check_model_name(name: str) -> None:
    """A registered name or a well-formed import path; the message lists both forms."""
    if is_import_path(name):
        parse_spec(name)
    elif name not in MODELS:
        raise InputError(
            f"unknown model {name!r}; choose one of: {', '.join(MODELS)}, or name any model by import path "
            "(package.module:factory)"
        )


def accept_model_name(name: str) -> None:
    """A model name the caller gave (an option, a Python argument): checked, and trusted when it is an import
    path, since the caller named that code; a name read from a file is never trusted this way."""
    check_model_name(name)
    if is_import_path(name):
        trust_model_code(name)


def build_from_state(
    state: dict[str, torch.Tensor],
    purpose: str,
    architecture: tuple[str, int, int] | None = None,
    *,
    reshaped: bool = True,
) -> tuple[nn.Module, tuple[str, int, int]]:
    """The model ``state`` fits, loaded with it: ``architecture`` (name or import path, input channels,
    classes) when the caller knows it, else the registered architecture the weights fit; ``purpose`` says why
    in the error.

    ``reshaped``: weights with every name of a registered architecture but other channel widths (a
    structurally pruned or widened copy) run in that architecture with each conv, BatchNorm and linear layer
    as wide as its weights (``architecture.build_disguised``), when those widths fit together."""
    if architecture is None:
        architecture = identify_architecture(state) or (named_architecture(state) if reshaped else None)
    if architecture is None:
        raise InputError(
            f"{purpose} needs the weights of a registered architecture ({', '.join(MODELS)}), or the model's "
            "import path (--model)"
        )
    model = build_model(*architecture)
    try:
        model.load_state_dict(state)
    except RuntimeError as err:
        if reshaped and architecture[0] in MODELS and set(state) == set(model.state_dict()):
            return _at_their_widths(state, architecture), architecture
        first = str(err).strip().splitlines()[:2]
        raise InputError(f"the weights do not fit {architecture[0]}: {' '.join(first)}") from None
    return model, architecture


def named_architecture(state: dict[str, torch.Tensor]) -> tuple[str, int, int] | None:
    """(name, input channels, classes) of the registered architecture whose state_dict names exactly the
    tensors of ``state``, whatever their widths."""
    for name, factory in MODELS.items():
        with torch.device("meta"):
            probe = factory()
        if set(probe.state_dict()) != set(state):
            continue
        convs = [f"{n}.weight" for n, m in probe.named_modules() if isinstance(m, nn.Conv2d)]
        linears = [f"{n}.weight" for n, m in probe.named_modules() if isinstance(m, nn.Linear)]
        stem, classifier = state[convs[0]], state[linears[-1]]
        if stem.dim() == 4 and classifier.dim() == 2:
            return name, int(stem.shape[1]), int(classifier.shape[0])
    return None


def _at_their_widths(state: dict[str, torch.Tensor], architecture: tuple[str, int, int]) -> nn.Module:
    """The registered architecture with every layer as wide as ``state`` says, once a forward pass on the
    meta device shows that those widths fit together."""
    from ticketguard.models.architecture import build_disguised  # it builds on this registry

    shapes = {key: torch.empty_like(tensor, device="meta") for key, tensor in state.items()}
    probe_input = torch.empty(1, architecture[1], 4 * MIN_INPUT_SIZE, 4 * MIN_INPUT_SIZE, device="meta")
    try:
        with torch.no_grad():
            build_disguised(shapes, architecture).eval()(probe_input)
    except RuntimeError as err:
        first = str(err).strip().splitlines()[0]
        raise InputError(
            f"the weights name every layer of {architecture[0]}, but their widths do not fit together: "
            f"{first}"
        ) from None
    return build_disguised(state, architecture)


def identify_architecture(state: dict[str, torch.Tensor]) -> tuple[str, int, int] | None:
    """(name, input channels, classes) of the registered architecture whose state_dict ``state`` fits, if any.

    Key order is not trusted (safetensors sorts keys): the stem and classifier are found by name per model.
    """
    for name, factory in MODELS.items():
        with torch.device("meta"):
            probe = factory()
        convs = [f"{n}.weight" for n, m in probe.named_modules() if isinstance(m, nn.Conv2d)]
        linears = [f"{n}.weight" for n, m in probe.named_modules() if isinstance(m, nn.Linear)]
        stem, classifier = state.get(convs[0]), state.get(linears[-1])
        if stem is None or classifier is None or stem.dim() != 4 or classifier.dim() != 2:
            continue
        in_channels, num_classes = int(stem.shape[1]), int(classifier.shape[0])
        with torch.device("meta"):
            expected = factory(in_channels=in_channels, num_classes=num_classes).state_dict()
        if expected.keys() == state.keys() and all(expected[k].shape == state[k].shape for k in expected):
            return name, in_channels, num_classes
    return None
