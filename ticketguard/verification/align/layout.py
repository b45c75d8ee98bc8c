"""What every alignment step shares: the reference architecture's layout, the suspect's parts under its keys,
the channel axes of a permutation group, and the error a step raises when the suspect cannot be aligned.

Its own module so that the steps (structure, permutations, scales) can depend on it and not on each other.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import nn

from ticketguard.core.errors import InputError
from ticketguard.models import build_model
from ticketguard.models.architecture import PermutationGroup, conv_bn_pairs, permutation_groups

Architecture = tuple[str, int, int]
Weights = dict[str, torch.Tensor]
Axis = tuple[str, int]


class AlignmentError(InputError):
    """The suspect cannot be put in the reference's form: another architecture, or a disguise alignment cannot
    undo. The message is the reason ownership is not shown."""


@dataclass(frozen=True)
class Layout:
    """The reference architecture as alignment reads it."""

    architecture: Architecture
    convs: tuple[str, ...]
    bn_of: dict[str, str]
    eps: dict[str, float]
    strides: dict[str, tuple[int, ...]]
    classifier: str
    state: dict[str, tuple[tuple[int, ...], torch.dtype]]
    groups: tuple[PermutationGroup, ...]

    @property
    def kernel_keys(self) -> list[str]:
        return [f"{conv}.weight" for conv in self.convs]

    @property
    def unfolded_keys(self) -> list[str]:
        return [key for key in self.state if not key.endswith("num_batches_tracked")]

    @property
    def folded_keys(self) -> list[str]:
        biases = [f"{conv}.bias" for conv in self.convs]
        return [*self.kernel_keys, *biases, f"{self.classifier}.weight", f"{self.classifier}.bias"]


@functools.lru_cache(maxsize=8)
def layout_of(architecture: Architecture) -> Layout:
    with torch.device("meta"):
        model = build_model(*architecture)
    convs = {name: m for name, m in model.named_modules() if isinstance(m, nn.Conv2d)}
    bn_of = dict(conv_bn_pairs(model))
    if set(bn_of) != set(convs):
        raise InputError(f"{architecture[0]} has a conv without BatchNorm, which alignment does not handle")
    return Layout(
        architecture,
        tuple(convs),
        bn_of,
        {bn: model.get_submodule(bn).eps for bn in bn_of.values()},
        {name: tuple(m.stride) for name, m in convs.items()},
        [name for name, m in model.named_modules() if isinstance(m, nn.Linear)][-1],
        {key: (tuple(t.shape), t.dtype) for key, t in model.state_dict().items()},
        tuple(permutation_groups(architecture)),
    )


@dataclass
class Parts:
    """The suspect's tensors under the reference's keys, still in the suspect's channel order and widths
    (float64). With opaque names the 1-D tensors wait in ``vectors`` until channel orders are known."""

    tensors: Weights
    sources: dict[str, str]
    structure: str
    folded: bool
    vectors: dict[str, torch.Tensor] | None = None


def group_axes(group: PermutationGroup, tensors: Mapping[str, torch.Tensor]) -> list[Axis]:
    """The group's axes present in ``tensors``, with the folded conv biases that follow their kernels'
    rows."""
    axes = [(key, dim) for key, dim in group.axes if key in tensors]
    biases = [
        (f"{key.removesuffix('.weight')}.bias", 0)
        for key, dim in axes
        if dim == 0 and tensors[key].dim() == 4
    ]
    return axes + [axis for axis in biases if axis[0] in tensors]


def axis_owners(layout: Layout, tensors: Mapping[str, torch.Tensor]) -> dict[Axis, str]:
    return {axis: group.name for group in layout.groups for axis in group_axes(group, tensors)}


def group_width(tensors: Mapping[str, torch.Tensor], group: PermutationGroup) -> int:
    key, dim = group_axes(group, tensors)[0]
    return tensors[key].shape[dim]
