"""Architecture facts of the registered ResNets, read by the disguises and by alignment alike.

They live with the models because the attacker's disguises and the verifier's alignment both read them: the
conv/BatchNorm pairs, the residual blocks, the permutation groups (channels that must move together for the network
to compute the same function) and torchvision's names for our layers. ``build_disguised`` reshapes the registered
architecture to the widths and BatchNorm folding that disguised weights have.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import nn

from ticketguard.core.errors import InputError
from ticketguard.models import MODELS, build_model, identify_architecture
from ticketguard.models.cifar_resnet import CifarResNet

Weights = dict[str, torch.Tensor]
Architecture = tuple[str, int, int]

BN_PARAMETERS = ("weight", "bias", "running_mean", "running_var")
BN_STATE = (*BN_PARAMETERS, "num_batches_tracked")


@dataclass
class PermutationGroup:
    """Channels that move together: along every (key, dim) of ``axes``, index i is the same channel.

    A ``stream`` group is the residual stream of a stage (every conv writing into it, their BatchNorms, every
    consumer's input channels, the classifier's input); a ``hidden`` group is a block's inner channels.
    ``embeds`` = (group, offset) marks an option-A stream: its channels offset.. are the earlier stream's
    channels carried by the parameter-free shortcut, so they keep that stream's order; only the zero-padded
    channels around them may move freely.
    """

    name: str
    kind: Literal["stream", "hidden"]
    size: int
    axes: list[tuple[str, int]] = field(default_factory=list)
    embeds: tuple[str, int] | None = None


def exact_architecture(weights: Mapping[str, torch.Tensor], disguise: str) -> Architecture:
    architecture = identify_architecture(dict(weights))
    if architecture is None:
        raise InputError(
            f"{disguise} needs the exact state_dict of a registered architecture; in a chain, put it "
            "before fold-bn, widen and rename"
        )
    return architecture


def probe(architecture: Architecture) -> nn.Module:
    """The architecture's modules without memory: structure only."""
    with torch.device("meta"):
        return build_model(*architecture)


def conv_bn_pairs(model: nn.Module) -> list[tuple[str, str]]:
    """(conv, BatchNorm) module names: each BN normalises the conv registered just before it."""
    pairs, last_conv = [], None
    for name, module in model.named_modules():
        if isinstance(module, nn.Conv2d):
            last_conv = name
        elif isinstance(module, nn.BatchNorm2d) and last_conv is not None:
            pairs.append((last_conv, name))
    return pairs


def residual_blocks(model: nn.Module) -> tuple[str, nn.Sequential]:
    """The residual blocks and their state_dict prefix."""
    return ("blocks", model.blocks) if isinstance(model, CifarResNet) else ("layers", model.layers)


def _written(conv: str, bn: str) -> list[tuple[str, int]]:
    """The axes that index the output channels of ``conv`` followed by ``bn``."""
    return [(f"{conv}.weight", 0), *((f"{bn}.{entry}", 0) for entry in BN_PARAMETERS)]


def permutation_groups(architecture: Architecture) -> list[PermutationGroup]:
    """Every channel permutation symmetry of a registered ResNet, each group after the one it embeds."""
    model = probe(architecture)
    bn_of = dict(conv_bn_pairs(model))
    stem = next(iter(bn_of))
    stream = PermutationGroup("stream.0", "stream", model.get_submodule(stem).out_channels)
    stream.axes += _written(stem, bn_of[stem])
    groups = [stream]
    prefix, blocks = residual_blocks(model)
    for index, block in enumerate(blocks):
        name = f"{prefix}.{index}"
        convs = [f"{name}.{child}" for child, m in block.named_children() if isinstance(m, nn.Conv2d)]
        stream.axes.append((f"{convs[0]}.weight", 1))
        for number, (producer, consumer) in enumerate(itertools.pairwise(convs), 1):
            hidden = PermutationGroup(
                f"{name}.hidden{number}", "hidden", model.get_submodule(producer).out_channels
            )
            hidden.axes += [*_written(producer, bn_of[producer]), (f"{consumer}.weight", 1)]
            groups.append(hidden)
        width = model.get_submodule(convs[-1]).out_channels
        if isinstance(getattr(block, "shortcut", None), nn.Sequential):
            stream.axes.append((f"{name}.shortcut.0.weight", 1))
            stream = PermutationGroup(f"stream.{len(groups)}", "stream", width)
            stream.axes += _written(f"{name}.shortcut.0", f"{name}.shortcut.1")
            groups.append(stream)
        elif getattr(block, "extra_channels", 0):
            embeds = (stream.name, block.extra_channels // 2)
            stream = PermutationGroup(f"stream.{len(groups)}", "stream", width, embeds=embeds)
            groups.append(stream)
        stream.axes += _written(convs[-1], bn_of[convs[-1]])
    stream.axes.append(("fc.weight", 1))
    return groups


def build_disguised(weights: Mapping[str, torch.Tensor], architecture: Architecture) -> nn.Module:
    """The registered architecture reshaped to run disguised weights, loaded with copies of them.

    Every conv, BatchNorm and linear layer takes the width its weights have (``widen``); a BatchNorm without
    entries becomes an identity and its conv gets a bias (``fold-bn``). Strides, padding and shortcuts stay.
    Built on the meta device and then given the weights, so no initialisation is computed and thrown away.
    """
    model = probe(architecture)
    with torch.device("meta"):
        for name, module in list(model.named_modules()):
            replacement = _reshaped(name, module, weights)
            if replacement is not None:
                parent, _, child = name.rpartition(".")
                setattr(model.get_submodule(parent), child, replacement)
    model.load_state_dict({key: tensor.clone() for key, tensor in weights.items()}, assign=True)
    return model


def _reshaped(name: str, module: nn.Module, weights: Mapping[str, torch.Tensor]) -> nn.Module | None:
    """``module`` as wide as ``weights`` say, an identity for a folded BatchNorm; None for other modules."""
    kernel = weights.get(f"{name}.weight")
    if isinstance(module, nn.Conv2d):
        out_channels, in_channels = kernel.shape[:2]
        bias = f"{name}.bias" in weights
        return nn.Conv2d(
            in_channels, out_channels, module.kernel_size, module.stride, module.padding, bias=bias
        )
    if isinstance(module, nn.BatchNorm2d):
        return nn.Identity() if kernel is None else nn.BatchNorm2d(len(kernel), module.eps)
    if isinstance(module, nn.Linear):
        return nn.Linear(kernel.shape[1], kernel.shape[0])
    return None


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


def model_named_by(weights: Mapping[str, torch.Tensor]) -> str:
    """The registered model whose conv kernels ``weights`` names, whatever their widths or BN folding."""
    kernels = {key for key, tensor in weights.items() if key.endswith(".weight") and tensor.dim() == 4}
    for name in MODELS:
        model = probe((name, 3, 10))
        if kernels == {f"{n}.weight" for n, m in model.named_modules() if isinstance(m, nn.Conv2d)}:
            return name
    raise InputError("rename to torchvision names needs the layer names of a registered architecture")


def torchvision_names(keys: list[str], model: str) -> dict[str, str]:
    """torchvision's names: ``blocks.6.conv1`` -> ``layer3.0.conv1``, ``shortcut`` -> ``downsample``."""
    prefix, blocks = residual_blocks(probe((model, 3, 10)))
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
